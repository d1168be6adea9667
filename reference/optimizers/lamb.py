"""Lamb.

Keras: keras/src/optimizers/lamb.py (every backend; torch has no kernel of
its own, so the Python-float operands 1 - beta and epsilon round to float32
there, the `operand_float32` precision setting), with the base optimizer's
weight decay (reference/base.py).  Paper: You et al. 2020, ICLR, "Large Batch
Optimization for Deep Learning: Training BERT in 76 minutes", Algorithm 2.
"""

from __future__ import annotations

import numpy as np

from reference.arithmetic import norm, sqrt, square, where
from reference.optimizer import Optimizer, Point
from reference.pieces import ema, hyperparameter
from reference.rule import slots

DEFAULTS = {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7,
            "weight_decay": None}

PIECES = {
    # the weight decay: Keras's base optimizer, w = w - wd * lr * w before the
    # update; or Algorithm 2's, lambda * w added to the ratio r inside the trust ratio
    "decay_form": ("base_optimizer", "trust_ratio"),
    "ema": ("interpolate", "weighted"),
    # precision: the betas of the bias corrections through ops.cast (Keras) or
    # as Python floats; 1 - beta and epsilon as Keras ops' operands (Keras) or exact
    "hyperparameters": ("ops.cast", "python"),
    "operands": ("ops", "python"),
}


def states(hp, c):
    return slots("momentum", "velocity")


def update(ar, hp, c, s, g, t, lr):
    operand = ar.operand if c["operands"] == "ops" else ar.const
    b1 = hyperparameter(ar, hp["beta_1"], c["hyperparameters"])
    b2 = hyperparameter(ar, hp["beta_2"], c["hyperparameters"])
    local_step = t + 1
    w = s["variable"]
    m = ema(c["ema"], s["momentum"], g, ar.const(hp["beta_1"]), operand(1 - hp["beta_1"]))
    v = ema(c["ema"], s["velocity"], square(g), ar.const(hp["beta_2"]),
            operand(1 - hp["beta_2"]))
    r = (m / (1.0 - b1 ** local_step)) / (sqrt(v / (1.0 - b2 ** local_step))
                                          + operand(hp["epsilon"]))
    if hp.get("weight_decay") is not None and c["decay_form"] == "trust_ratio":
        r = r + ar.const(hp["weight_decay"]) * w
    # the trust ratio ||w|| / ||r|| of this variable, 1 where either norm is 0
    axes = tuple(range(1, np.ndim(w.v)))
    w_norm, r_norm = norm(w, axes, keepdims=True), norm(r, axes, keepdims=True)
    ratio = where((w_norm.v > 0) & (r_norm.v > 0), w_norm / r_norm, ar.const(1.0))
    return {"variable": w - ratio * lr * r, "momentum": m, "velocity": v}


LAMB = Optimizer(
    "Lamb", DEFAULTS, PIECES, states, update, {
        "keras": Point(
            {"decay_form": "base_optimizer", "ema": "interpolate", "hyperparameters": "ops.cast",
             "operands": "ops"},
            source="keras/src/optimizers/lamb.py (Keras 3)",
            doc="""weight_decay: w = w - w * wd * lr first (the base optimizer);  local_step = t + 1;
    m = m + (g - m) * (1 - beta_1);  v = v + (g**2 - v) * (1 - beta_2);
    update = (m / (1 - beta_1**local_step)) / (sqrt(v / (1 - beta_2**local_step)) + e);
    ratio = ||w|| / ||update|| over this variable (1 where either norm is 0);
    w = w - ratio * lr * update.""",
            keras_base=True),
        "textbook": Point(
            {"decay_form": "trust_ratio", "ema": "weighted", "hyperparameters": "python",
             "operands": "python"},
            source="You et al. 2020, ICLR, 'Large Batch Optimization for Deep Learning: "
                   "Training BERT in 76 minutes', Algorithm 2 (LAMB)",
            doc="""eta = lr, lambda = weight_decay, phi(z) = z;
    m = beta_1 * m + (1 - beta_1) * g;  v = beta_2 * v + (1 - beta_2) * g**2;
    m_hat = m / (1 - beta_1**t);  v_hat = v / (1 - beta_2**t);  r = m_hat / (sqrt(v_hat) + epsilon);
    w = w - eta * phi(||w||) / ||r + lambda * w|| * (r + lambda * w), per variable (layer).""",
            notes="The scaling function phi is the identity (the algorithm leaves it "
                  "general, bounded in [alpha_l, alpha_u]); the norms are over each "
                  "variable, the paper's layers. lambda takes Keras's weight_decay and is "
                  "not multiplied by the learning rate. Where a norm is 0 the ratio is "
                  "taken as 1, as in Keras (the algorithm leaves 0/0 undefined)."),
    },
    explained=("decay_form",), elementwise=False)
