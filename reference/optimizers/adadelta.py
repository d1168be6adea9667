"""Adadelta.

Keras: keras/src/optimizers/adadelta.py (TensorFlow, JAX) and
keras/src/backend/torch/optimizers/torch_adadelta.py (the same operations in
_foreach form).  Paper: Zeiler 2012, arXiv:1212.5701, "ADADELTA: An Adaptive
Learning Rate Method", Algorithm 1 and eq. (9).
"""

from __future__ import annotations

from reference.arithmetic import sqrt, square
from reference.optimizer import Optimizer, Point
from reference.pieces import ema_weighted
from reference.rule import slots

DEFAULTS = {"learning_rate": 0.001, "rho": 0.95, "epsilon": 1e-7}

PIECES = {
    # the update Delta x scaled by the learning rate (Keras), or applied as it is
    "learning_rate": ("applied", "none"),
}


def states(hp, c):
    return slots("accumulated_grad", "accumulated_delta_var")


def update(ar, hp, c, s, g, t, lr):
    rho, one_minus_rho, e = ar.const(hp["rho"]), ar.const(1 - hp["rho"]), ar.const(hp["epsilon"])
    acc_g = ema_weighted(s["accumulated_grad"], square(g), rho, one_minus_rho)
    # RMS[y] = sqrt(E[y^2] + epsilon), Zeiler eq. (9)
    delta = -((sqrt(s["accumulated_delta_var"] + e) * g) / sqrt(acc_g + e))
    acc_d = ema_weighted(s["accumulated_delta_var"], square(delta), rho, one_minus_rho)
    step = lr * delta if c["learning_rate"] == "applied" else delta
    return {"variable": s["variable"] + step, "accumulated_grad": acc_g,
            "accumulated_delta_var": acc_d}


ADADELTA = Optimizer(
    "Adadelta", DEFAULTS, PIECES, states, update, {
        "keras": Point(
            {"learning_rate": "applied"},
            source="keras/src/optimizers/adadelta.py (Keras 3)",
            doc="""rms(x) = sqrt(x + e);  accumulated_grad = rho * accumulated_grad + (1 - rho) * g**2;
    delta = -(rms(accumulated_delta_var) * g) / rms(accumulated_grad);
    accumulated_delta_var = rho * accumulated_delta_var + (1 - rho) * delta**2;
    w = w + lr * delta.""",
            keras_base=True),
        "textbook": Point(
            {"learning_rate": "none"},
            source="Zeiler 2012, arXiv:1212.5701, Algorithm 1 (lines 6-9) with RMS of eq. (9)",
            doc="""E[g^2] = rho * E[g^2] + (1 - rho) * g**2;
    Delta x = -(RMS[Delta x]_{t-1} / RMS[g]_t) * g,  RMS[y] = sqrt(E[y^2] + epsilon);
    E[Delta x^2] = rho * E[Delta x^2] + (1 - rho) * (Delta x)**2;  w = w + Delta x.""",
            notes="Algorithm 1 has no learning rate (its point is to need none): the "
                  "update Delta x is added to the weights as it is, so the configured "
                  "learning_rate is not used. E[g^2] and E[Delta x^2] start at 0 (line 3), "
                  "Keras's accumulated_grad and accumulated_delta_var.",
            textbook_base=True),
    },
    explained=("learning_rate",))
