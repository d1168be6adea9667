"""Adamax.

Keras: keras/src/optimizers/adamax.py (TensorFlow, JAX) and
keras/src/backend/torch/optimizers/torch_adamax.py (torch's _foreach form,
m = beta_1 * m + (1 - beta_1) * g, within the tolerance of Keras's
m + (g - m) * (1 - beta_1)).  Paper: Kingma and Ba 2015, ICLR, section 7.1,
Algorithm 2.
"""

from __future__ import annotations

from reference.arithmetic import maximum
from reference.optimizer import Optimizer, Point
from reference.pieces import ema, hyperparameter, moving_average_form, one_minus
from reference.rule import slots

DEFAULTS = {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}

PIECES = {
    # epsilon added to the infinity norm u in the denominator, or no epsilon
    "epsilon": ("added", "none"),
    "ema": ("interpolate", "weighted"),
    # precision: beta_1 of the bias correction through ops.cast (Keras) or as
    # a Python float; 1 - beta_1 as a Python float (Keras) or in the dtype
    "hyperparameters": ("ops.cast", "python"),
    "one_minus_beta": ("python", "tensor"),
}


def states(hp, c):
    return slots("momentum", "norm")


def update(ar, hp, c, s, g, t, lr):
    b1 = hyperparameter(ar, hp["beta_1"], c["hyperparameters"])
    m = ema(moving_average_form(ar, c["ema"]), s["momentum"], g, ar.const(hp["beta_1"]),
            one_minus(ar, hp["beta_1"], ar.const(hp["beta_1"]), c["one_minus_beta"]))
    u = maximum(ar.const(hp["beta_2"]) * s["norm"], abs(g))
    denominator = u + ar.const(hp["epsilon"]) if c["epsilon"] == "added" else u
    w = s["variable"] - (lr * m) / ((1 - b1 ** (t + 1)) * denominator)
    return {"variable": w, "momentum": m, "norm": u}


ADAMAX = Optimizer(
    "Adamax", DEFAULTS, PIECES, states, update, {
        "keras": Point(
            {"epsilon": "added", "ema": "interpolate", "hyperparameters": "ops.cast",
             "one_minus_beta": "python"},
            source="keras/src/optimizers/adamax.py (Keras 3)",
            doc="""local_step = t + 1;  m = m + (g - m) * (1 - beta_1);  u = max(beta_2 * u, |g|);
    w = w - (lr * m) / ((1 - beta_1**local_step) * (u + e)).""",
            keras_base=True),
        "textbook": Point(
            {"epsilon": "none", "ema": "weighted", "hyperparameters": "python",
             "one_minus_beta": "tensor"},
            source="Kingma and Ba 2015, ICLR, section 7.1, Algorithm 2 (AdaMax)",
            doc="""alpha = lr;  m = beta_1 * m + (1 - beta_1) * g;  u = max(beta_2 * u, |g|);
    w = w - (alpha / (1 - beta_1**t)) * m / u.""",
            notes="Algorithm 2 has no epsilon: where u is 0 (a zero gradient from the "
                  "start) the step is 0/0. Its default alpha = 0.002 is not used; alpha "
                  "takes the configured learning rate.",
            textbook_base=True),
    },
    explained=("epsilon",))
