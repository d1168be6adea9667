"""Lion.

Keras: keras/src/optimizers/lion.py.  Paper: Chen et al. 2023, NeurIPS,
"Symbolic Discovery of Optimization Algorithms", Algorithm 2.
"""

from __future__ import annotations

from reference.arithmetic import sign
from reference.optimizer import Optimizer, Point
from reference.pieces import ema_weighted, hyperparameter
from reference.rule import slots

DEFAULTS = {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.99}

PIECES = {
    # the sign is taken of an interpolation with the momentum before its update
    # ("weights_first") or after it
    "order": ("weights_first", "momentum_first"),
    # precision: the betas through ops.cast (Keras) or as Python floats
    "hyperparameters": ("ops.cast", "python"),
}


def states(hp, c):
    return slots("momentum")


def update(ar, hp, c, s, g, t, lr):
    b1 = hyperparameter(ar, hp["beta_1"], c["hyperparameters"])
    b2 = hyperparameter(ar, hp["beta_2"], c["hyperparameters"])
    m_new = ema_weighted(s["momentum"], g, b2, 1.0 - b2)
    m_used = s["momentum"] if c["order"] == "weights_first" else m_new
    w = s["variable"] - lr * sign(ema_weighted(m_used, g, b1, 1.0 - b1))
    return {"variable": w, "momentum": m_new}


PAPER = {"order": "weights_first", "hyperparameters": "python"}

LION = Optimizer(
    "Lion", DEFAULTS, PIECES, states, update, {
        "keras": Point(
            {"order": "weights_first", "hyperparameters": "ops.cast"},
            source="keras/src/optimizers/lion.py (Keras 3)",
            doc="""w = w - lr * sign(m * beta_1 + g * (1 - beta_1));
    m = m * beta_2 + g * (1 - beta_2).""",
            keras_base=True),
        "textbook": Point(
            PAPER, source="Chen et al. 2023, NeurIPS, 'Symbolic Discovery of Optimization "
                          "Algorithms', Algorithm 2 (Lion), with lambda = 0",
            doc="""eta = lr;  c = beta_1 * m + (1 - beta_1) * g;  w = w - eta * (sign(c) + lambda * w);
    m = beta_2 * m + (1 - beta_2) * g   (lambda = 0: no weight decay configured)."""),
        "article": Point(
            PAPER, source="shared/article.md, section Lion",
            doc="w = w - lr * sign(beta_1 * m + (1 - beta_1) * g);  "
                "m = beta_2 * m + (1 - beta_2) * g."),
    },
    explained=("order",))
