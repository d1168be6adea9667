"""RMSprop: plain, with momentum, centered.

Keras: keras/src/optimizers/rmsprop.py.  Papers: Tieleman and Hinton 2012,
lecture 6e (plain); Graves 2013, arXiv:1308.0850, eqs. (38)-(41) (centered,
with momentum).
"""

from __future__ import annotations

from reference.arithmetic import square
from reference.optimizer import Optimizer, Point
from reference.pieces import apply_with_momentum, ema_weighted, one_minus, root
from reference.rule import slots

DEFAULTS = {"learning_rate": 0.001, "rho": 0.9, "momentum": 0.0, "epsilon": 1e-7,
            "centered": False}

PIECES = {
    "epsilon": ("inside", "outside", "none"),
    # precision: 1 - rho as a Python float (Keras) or in the working dtype
    "one_minus_rho": ("python", "tensor"),
}


def states(hp, c):
    return (slots("velocity") + (slots("momentum") if hp["momentum"] > 0 else [])
            + (slots("average_gradient") if hp["centered"] else []))


def update(ar, hp, c, s, g, t, lr):
    rho = ar.const(hp["rho"])
    one_minus_rho = one_minus(ar, hp["rho"], rho, c["one_minus_rho"])
    e = ar.const(hp["epsilon"])
    out = {}
    v = ema_weighted(s["velocity"], square(g), rho, one_minus_rho)
    out["velocity"] = v
    if hp["centered"]:
        avg = ema_weighted(s["average_gradient"], g, rho, one_minus_rho)
        out["average_gradient"] = avg
        v = v - square(avg)
    increment = lr * g / root(c["epsilon"], v, e)
    with_momentum = hp["momentum"] > 0
    out.update(apply_with_momentum(s["variable"], increment,
                                   s["momentum"] if with_momentum else None,
                                   ar.const(hp["momentum"]) if with_momentum else None))
    return out


KERAS = Point(
    {"epsilon": "inside", "one_minus_rho": "python"},
    source="keras/src/optimizers/rmsprop.py (Keras 3)",
    doc="""v = rho * v + (1 - rho) * g**2;
    centered: average_grad = rho * average_grad + (1 - rho) * g,
              denominator = v - average_grad**2 + e;  otherwise denominator = v + e;
    increment = lr * g / sqrt(denominator);
    momentum: m = momentum * m + increment, w = w - m;  otherwise w = w - increment.""",
    keras_base=True)

TEXTBOOK = Point(
    # Tieleman and Hinton's lecture has no epsilon; Graves's centered form has it inside
    lambda hp: {"epsilon": "inside" if hp["centered"] else "none", "one_minus_rho": "tensor"},
    source="plain: Tieleman and Hinton 2012, Neural Networks for Machine Learning, "
           "lecture 6e, slide 29; centered with momentum: Graves 2013, "
           "arXiv:1308.0850, eqs. (38)-(41)",
    doc="""plain: MeanSquare = rho * MeanSquare + (1 - rho) * g**2;  w = w - lr * g / sqrt(MeanSquare).
    Graves (aleph = rho, beth = momentum, gimel = lr, daleth = epsilon):
        n = aleph * n + (1 - aleph) * g**2;  gbar = aleph * gbar + (1 - aleph) * g;
        Delta = beth * Delta - gimel * g / sqrt(n - gbar**2 + daleth);  w = w + Delta.""",
    notes="The lecture divides by sqrt(MeanSquare) with no epsilon at all; none is "
          "added (a zero gradient on a zero mean square is then 0/0). Graves's "
          "epsilon is inside the square root. Graves's update Delta is added to "
          "the weights, Keras's momentum slot is subtracted: momentum = -Delta.",
    textbook_base=True)

ARTICLE = Point(
    {"epsilon": "inside", "one_minus_rho": "tensor"},
    source="shared/article.md, section RMSprop",
    doc="""v = rho * v + (1 - rho) * g**2;  w = w - lr * g / sqrt(v + e);
    momentum and centered: average_grad = rho * average_grad + (1 - rho) * g;
    m = momentum * m + (lr * g) / sqrt(v - average_grad**2 + e);  w = w - m.""",
    notes="The centered form updates v, then average_grad, then m, then w, "
          "in the order written.",
    unstated=lambda hp: None if hp["centered"] == (hp["momentum"] > 0) else (
        "the article gives RMSprop only plain, or with momentum and centered together"))

RMSPROP = Optimizer("RMSprop", DEFAULTS, PIECES, states, update,
                    {"keras": KERAS, "textbook": TEXTBOOK, "article": ARTICLE},
                    explained=("epsilon",))
