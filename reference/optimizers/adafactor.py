"""Adafactor.

Keras: keras/src/optimizers/adafactor.py (every backend; torch has no kernel
of its own, so the Python-float operands epsilon_1 and beta_2_decay round to
float32 there, the `operand_float32` precision setting).  Paper: Shazeer and
Stern 2018, ICML, "Adafactor: Adaptive Learning Rates with Sublinear Memory
Cost", Algorithm 4 (weight matrices) and Algorithm 5 (weight vectors), with
the sections "Update Clipping", "Increasing Decay Parameter" and "Relative
Step Size", and the proposed hyperparameters listed with the two algorithms.

A variable of rank >= 2 is factored over its last two axes: Keras keeps r
(shape[:-1]) and c (shape[:-2] + shape[-1:]) beside the full velocity v.  For a
variable of rank < 2 Keras keeps v only, plus two scalar placeholders in `_r`
and `_c` (`backend.Variable(0, ...)`, an integer 0 that is never updated); they
are in `optimizer.variables`, so the state here describes them as shape ()
slots that stay 0.
"""

from __future__ import annotations

import numpy as np

from reference.arithmetic import (Tracked, maximum, mean_over, minimum, ops_mean, sqrt,
                                  square, sum_over, to_float32)
from reference.optimizer import Optimizer, Point
from reference.pieces import hyperparameter
from reference.rule import StateSpec

DEFAULTS = {"learning_rate": 0.001, "beta_2_decay": -0.8, "epsilon_1": 1e-30,
            "epsilon_2": 1e-3, "clip_threshold": 1.0, "relative_step": True}

PIECES = {
    # the factored second moment: Keras keeps the row and column means r, c of
    # G^2 + epsilon_1 and forms V = (r / mean(r)) c; Algorithm 4 keeps the row
    # and column sums R, C and forms V = R C / (1^T R).  V is the same; the
    # stored r and c differ by the factors m (columns) and n (rows).
    "factored_moments": ("mean", "sum"),
    # Keras's relative_step: ignored, the step is always the relative one,
    # alpha = max(epsilon_2, RMS(w)) * min(lr, 1/sqrt(t)); "configured": the
    # paper's relative step when relative_step, else the absolute step alpha = lr
    "relative_step": ("always", "configured"),
    # precision: epsilon_2 through ops.cast (Keras) or as a Python float;
    # epsilon_1 and beta_2_decay as Keras ops' operands and means in ops.mean's
    # compute dtype (Keras), or exact
    "hyperparameters": ("ops.cast", "python"),
    "operands": ("ops", "python"),
}


def factored(shape: tuple) -> bool:
    return len(shape) >= 2


def states(hp, c):
    return [StateSpec("r", 0.0, shape=lambda s, path: s[:-1] if factored(s) else ()),
            StateSpec("c", 0.0, shape=lambda s, path: s[:-2] + s[-1:] if factored(s) else ()),
            StateSpec("velocity", 0.0)]


def rms(x: Tracked, mean=mean_over) -> Tracked:
    """sqrt(mean(x^2)) over the whole variable (each of the k steps on its own)."""
    axes = tuple(range(1, np.ndim(x.v)))
    return sqrt(mean(square(x), axes, keepdims=True))


def expand(x: Tracked, axis: int) -> Tracked:
    return x.reshape(np.expand_dims(x.v, axis).shape)


def update(ar, hp, c, s, g, t, lr):
    operand = ar.operand if c["operands"] == "ops" else ar.const
    mean = ops_mean if c["operands"] == "ops" else mean_over
    # torch's ops.minimum / ops.maximum compute in float32 and give a float32
    # tensor, also for two float64 tensors (the `min_max_float32` setting)
    narrow = (to_float32 if c["operands"] == "ops" and ar.precision.min_max_float32
              else lambda x: x)
    w = s["variable"]
    local_step = t + 1
    epsilon_2 = hyperparameter(ar, hp["epsilon_2"], c["hyperparameters"])
    one = ar.const(1.0)
    # Relative Step Size section: alpha_t = max(epsilon_2, RMS(X_{t-1})) rho_t,
    # rho_t = min(10^-2, 1/sqrt(t)) with learning_rate as its cap
    if c["relative_step"] == "always" or hp["relative_step"]:
        inverse_root = 1 / sqrt(local_step)
        rho = minimum(narrow(lr), narrow(inverse_root))
        alpha = narrow(maximum(narrow(epsilon_2), narrow(rms(w, mean))) * rho)
    else:
        alpha = lr
    # Increasing Decay Parameter section: beta_2_t = 1 - t^-0.8 (beta_2_decay = -0.8)
    beta = 1 - local_step ** operand(hp["beta_2_decay"])
    regulated = square(g) + operand(hp["epsilon_1"])
    out = {}
    if factored(np.shape(w.v)[1:]):
        # Algorithm 4: R_t = beta R + (1 - beta)(G^2 + eps_1 1 1^T) 1_m,
        # C_t = beta C + (1 - beta) 1_n^T (G^2 + eps_1 1 1^T), V_t = R_t C_t / (1_n^T R_t)
        reduce = mean if c["factored_moments"] == "mean" else sum_over
        b = beta.reshape(np.shape(beta.v)[:-1])  # [k, 1, ..., 1], one axis fewer
        r = b * s["r"] + (1 - b) * reduce(regulated, -1)
        col = b * s["c"] + (1 - b) * reduce(regulated, -2)
        if c["factored_moments"] == "mean":
            v = expand(r / mean(r, -1, keepdims=True), -1) * expand(col, -2)
        else:
            v = (expand(r, -1) * expand(col, -2)) / expand(sum_over(r, -1, keepdims=True), -1)
        out.update(r=r, c=col)
    else:
        # Algorithm 5: V_t = beta V + (1 - beta)(G^2 + eps_1 1_n)
        v = beta * s["velocity"] + (1 - beta) * regulated
        out.update(r=s["r"], c=s["c"])  # Keras's placeholders, never assigned
    u = g / sqrt(v)
    # Update Clipping section: U_hat = U / max(1, RMS(U) / d)
    u_hat = u / maximum(narrow(one), narrow(rms(u, mean) / ar.const(hp["clip_threshold"])))
    out.update(velocity=v, variable=w - alpha * u_hat)
    return out


DOC_KERAS = """local_step = t + 1;  rho = min(lr, 1 / sqrt(local_step)) (whatever relative_step says);
    alpha = max(epsilon_2, rms(w)) * rho;  beta = 1 - local_step**beta_2_decay;
    rank >= 2 (last two axes): r = beta * r + (1 - beta) * mean(g**2 + epsilon_1, axis=-1);
      c = beta * c + (1 - beta) * mean(g**2 + epsilon_1, axis=-2);
      v = (r / mean(r, axis=-1))[..., None] * c[..., None, :];
    rank < 2: v = beta * v + (1 - beta) * (g**2 + epsilon_1) (r, c: scalar placeholders, 0);
    u = g / sqrt(v);  u = u / max(1, rms(u) / clip_threshold);  w = w - alpha * u;
    rms(x) = sqrt(mean(x**2)) over the whole variable."""

DOC_TEXTBOOK = """rho_t = min(lr, 1/sqrt(t));  alpha_t = max(eps_2, RMS(X_{t-1})) * rho_t if relative_step,
    else alpha_t = lr;  beta_2_t = 1 - t**beta_2_decay (= 1 - t**-0.8);
    matrices (Algorithm 4): R_t = beta_2_t R + (1 - beta_2_t) (G**2 + eps_1) 1_m  (row sums);
      C_t = beta_2_t C + (1 - beta_2_t) 1_n^T (G**2 + eps_1)  (column sums);  V_t = R_t C_t / (1_n^T R_t);
    vectors (Algorithm 5): V_t = beta_2_t V + (1 - beta_2_t) (G**2 + eps_1);
    U_t = G / sqrt(V_t);  U_t = U_t / max(1, RMS(U_t) / d);  X_t = X_{t-1} - alpha_t U_t."""


ADAFACTOR = Optimizer(
    "Adafactor", DEFAULTS, PIECES, states, update, {
        "keras": Point(
            {"factored_moments": "mean", "relative_step": "always",
             "hyperparameters": "ops.cast", "operands": "ops"},
            source="keras/src/optimizers/adafactor.py (Keras 3)",
            doc=DOC_KERAS, keras_base=True),
        "textbook": Point(
            {"factored_moments": "sum", "relative_step": "configured",
             "hyperparameters": "python", "operands": "python"},
            source="Shazeer and Stern 2018, ICML, 'Adafactor: Adaptive Learning Rates with "
                   "Sublinear Memory Cost', Algorithms 4 and 5, with update clipping, the "
                   "increasing decay 1 - t^-0.8 and relative step sizes",
            doc=DOC_TEXTBOOK,
            notes="learning_rate is the cap 10^-2 of the proposed rho_t = min(10^-2, 1/sqrt(t)); "
                  "without relative_step, the absolute step size alpha_t is learning_rate "
                  "(the algorithms take a step-size sequence and leave it open). A tensor of "
                  "rank > 2 is a stack of matrices over its last two axes (Algorithm 4 is "
                  "stated for matrices); a scalar is a vector of one element (Algorithm 5). "
                  "RMS is over the whole variable. Keras's scalar placeholders r, c of a "
                  "variable of rank < 2 (the algorithm has none) are carried unchanged at 0."),
    },
    explained=("factored_moments", "relative_step"), elementwise=False)
