"""SGD: plain, with heavy-ball momentum, with Nesterov momentum.

Keras: keras/src/optimizers/sgd.py.  Papers: Robbins and Monro 1951 (plain),
Polyak 1964 eq. (9) (heavy ball), Sutskever et al. 2013 eqs. (3)-(4) in the
form of Bengio et al. 2013 eq. (7) (Nesterov).
"""

from __future__ import annotations

from reference.optimizer import Optimizer, Point
from reference.pieces import hyperparameter
from reference.rule import slots

DEFAULTS = {"learning_rate": 0.01, "momentum": 0.0, "nesterov": False}

PIECES = {
    # how Nesterov momentum moves the weights
    "nesterov_form": ("momentum_then_gradient", "look_ahead_weights", "none"),
    # heavy ball: the new momentum is added to the weights, or (the article) not
    "heavy_ball": ("w_plus_m", "weights_unchanged"),
    # precision: the momentum through ops.cast (Keras) or as a Python float
    "hyperparameters": ("ops.cast", "python"),
}


def states(hp, c):
    return slots("momentum") if hp["momentum"] != 0 else []


def update(ar, hp, c, s, g, t, lr):
    w = s["variable"]
    if hp["momentum"] == 0:
        return {"variable": w - lr * g}
    mu = hyperparameter(ar, hp["momentum"], c["hyperparameters"])
    m = mu * s["momentum"] - lr * g
    if not hp["nesterov"]:
        if c["heavy_ball"] == "w_plus_m":
            w = w + m
    elif c["nesterov_form"] == "momentum_then_gradient":
        w = w + (mu * m - lr * g)
    elif c["nesterov_form"] == "look_ahead_weights":  # Bengio et al. 2013, eq. (7)
        w = w - mu * s["momentum"] + (1 + mu) * m
    else:  # "none": plain heavy ball
        w = w + m
    return {"variable": w, "momentum": m}


KERAS = Point(
    {"nesterov_form": "momentum_then_gradient", "heavy_ball": "w_plus_m",
     "hyperparameters": "ops.cast"},
    source="keras/src/optimizers/sgd.py (Keras 3)",
    doc="""w = w - g * lr;  momentum: m = m * momentum - g * lr, then w = w + m;
    Nesterov: m = m * momentum - g * lr, then w = w + (m * momentum - g * lr).""",
    keras_base=True)

TEXTBOOK = Point(
    {"nesterov_form": "look_ahead_weights", "heavy_ball": "w_plus_m",
     "hyperparameters": "python"},
    source="plain: Robbins and Monro 1951; momentum: Polyak 1964, eq. (9) "
           "(heavy ball); Nesterov: Sutskever et al. 2013, eqs. (3)-(4), in the "
           "form of Bengio et al. 2013, eq. (7)",
    doc="""plain: w = w - lr * g.
    heavy ball (a = lr, b = momentum): v = b * v - a * g;  w = w + v.
    Nesterov, Bengio et al. form (mu = momentum, epsilon = lr), with the
    weights holding the look-ahead point Theta = theta + mu * v:
        v_new = mu * v - epsilon * g;  Theta = Theta - mu * v + (1 + mu) * v_new.""",
    notes="Heavy ball w_{t+1} = w_t - a g + b (w_t - w_{t-1}) keeps v = w_t - "
          "w_{t-1}, which is Keras's momentum slot. Sutskever's Nesterov needs "
          "the gradient at the look-ahead point w + mu v; Bengio et al.'s "
          "reformulation stores the look-ahead point as the weights, which makes "
          "it computable from the gradient at the stored weights.",
    textbook_base=True)

ARTICLE = Point(
    {"nesterov_form": "momentum_then_gradient", "heavy_ball": "weights_unchanged",
     "hyperparameters": "python"},
    source="shared/article.md, section SGD",
    doc="""w = w - lr * g;  with momentum: m = momentum * m - lr * g;
    Nesterov: m = momentum * m - lr * g;  w = w + (momentum * m - lr * g).""",
    notes="With momentum and without Nesterov the article gives only "
          "m = momentum * m - lr * g and no weight update, so the weights stay "
          "as they are. In the Nesterov form, the second line uses the m just "
          "updated by the first (reading top to bottom).")

SGD = Optimizer("SGD", DEFAULTS, PIECES, states, update,
                {"keras": KERAS, "textbook": TEXTBOOK, "article": ARTICLE},
                explained=("nesterov_form",))
