"""Schedule-Free AdamW.

Keras: keras/src/optimizers/schedule_free_adamw.py (every backend; no torch
kernel of its own, and every constant goes through ops.cast), with the base
optimizer's weight decay (reference/base.py).  Paper: Defazio et al. 2024,
NeurIPS, "The Road Less Scheduled", Algorithm 1 (Schedule-Free AdamW).

Keras keeps y (the point where the gradient is taken) as the weights and z as
the `momentum` slot, which starts as a copy of the weights; x is recovered
from them, x = (y - (1 - beta_1) z) / beta_1 (line 5 of Algorithm 1 solved
for x).
"""

from __future__ import annotations

import numpy as np

from reference.arithmetic import Tracked, gamma, minimum, sqrt, square
from reference.optimizer import Optimizer, Point
from reference.pieces import hyperparameter
from reference.rule import StateSpec, slots

DEFAULTS = {"learning_rate": 0.0025, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-8,
            "warmup_steps": 0, "weight_decay": None}

PIECES = {
    # "plain": lr * g / (sqrt(v / (1 - beta_2^t)) + e) (Keras);  "hat": the bias
    # correction in the step size, gamma_t = lr * sqrt(1 - beta_2^t), and
    # gamma_t * g / (sqrt(v) + e) (Algorithm 1, lines 8-9)
    "epsilon": ("plain", "hat"),
    # the averaging weight c_{t+1}: 1 / t (Keras) or gamma_t^2 / sum_i gamma_i^2 (line 10)
    "averaging": ("uniform", "gamma_squared"),
    # the weight decay: the base optimizer's, on y before the update (Keras), or
    # Algorithm 1's - gamma_t * lambda * y in the step of z (line 9)
    "decay_form": ("base_optimizer", "z_step"),
    # the z in x = (y - (1 - beta_1) z) / beta_1: what Keras's `momentum.value`,
    # kept before the assign to momentum, reads then (z_{t+1} where the value
    # aliases the variable, the precision setting), or z_t (line 5)
    "x_from": ("momentum.value", "z_old"),
    # precision: beta_1, beta_2 and epsilon through ops.cast (Keras) or as Python
    # floats; the warmup factor through ops.minimum(x, 1.0) (Keras) or exact
    "hyperparameters": ("ops.cast", "python"),
}


def states(hp, c):
    return [StateSpec("momentum", 0.0, copies_variable=True)] + slots("velocity")


def warmup(ar, hp, step, how="python"):
    """min(t / T_warmup, 1), or None without warmup; through ops.minimum(x, 1.0)
    it is rounded to float32 where the precision setting says so."""
    if hp["warmup_steps"] <= 0:
        return None
    factor = minimum(step / ar.cast(hp["warmup_steps"]), ar.const(1.0))
    if how == "ops.cast" and ar.precision.min_max_float32:
        rounded = factor.v.astype(np.float32).astype(ar.dtype)
        error = None if factor.e is None else factor.e + np.abs(
            rounded.astype(np.float64) - factor.v.astype(np.float64))
        factor = Tracked(rounded, error, ar, factor.tie)
    return factor


def gamma_squared_weight(ar, hp, local_step):
    """c_{t+1} = gamma_t^2 / sum_{i<=t} gamma_i^2 with gamma_i = lr sqrt(1 - beta_2^i)
    min(1, i / T_warmup) (Algorithm 1, lines 8 and 10; lr cancels): a schedule of t
    alone, computed in float64 with 1 - beta_2^i = -expm1(i log beta_2), within
    gamma_{t+2} of its value, then rounded to the working dtype."""
    steps = np.asarray(local_step.v, dtype=np.float64)
    i = np.arange(1.0, steps.max() + 1)
    squares = -np.expm1(i * np.log(hp["beta_2"]))
    if hp["warmup_steps"] > 0:
        squares = squares * np.minimum(i / hp["warmup_steps"], 1.0) ** 2
    index = steps.astype(int) - 1
    c = squares[index] / np.cumsum(squares)[index]
    value = c.astype(ar.dtype)
    if not ar.track:
        return Tracked(value, None, ar)
    error = gamma(steps + 2, np.finfo(np.float64).eps / 2) * c + np.abs(value - c)
    return Tracked(value, error, ar)


def update(ar, hp, c, s, g, t, lr):
    b1 = hyperparameter(ar, hp["beta_1"], c["hyperparameters"])
    b2 = hyperparameter(ar, hp["beta_2"], c["hyperparameters"])
    e = hyperparameter(ar, hp["epsilon"], c["hyperparameters"])
    local_step = t + 1
    ramp = warmup(ar, hp, local_step, c["hyperparameters"])
    lr_t = lr * ramp if ramp is not None else lr
    y, z = s["variable"], s["momentum"]
    bias_correction_2 = 1 - b2 ** local_step
    v = s["velocity"] + (square(g) - s["velocity"]) * (1 - b2)
    if c["epsilon"] == "plain":
        step_size, denominator = lr_t, sqrt(v / bias_correction_2) + e
    else:
        step_size, denominator = lr_t * sqrt(bias_correction_2), sqrt(v) + e
    z_new = z - (step_size * g) / denominator
    if hp["weight_decay"] is not None and c["decay_form"] == "z_step":
        z_new = z_new - step_size * ar.const(hp["weight_decay"]) * y
    weight = (1.0 / local_step if c["averaging"] == "uniform"
              else gamma_squared_weight(ar, hp, local_step))
    aliased = c["x_from"] == "momentum.value" and ar.precision.value_aliases_variable
    x_old = (y - (1 - b1) * (z_new if aliased else z)) / b1
    x_new = (1 - weight) * x_old + weight * z_new
    y_new = (1 - b1) * z_new + b1 * x_new
    return {"variable": y_new, "momentum": z_new, "velocity": v}


SCHEDULE_FREE_ADAMW = Optimizer(
    "ScheduleFreeAdamW", DEFAULTS, PIECES, states, update, {
        "keras": Point(
            {"epsilon": "plain", "averaging": "uniform", "decay_form": "base_optimizer",
             "x_from": "momentum.value", "hyperparameters": "ops.cast"},
            source="keras/src/optimizers/schedule_free_adamw.py (Keras 3)",
            doc="""weight_decay: y = y - y * wd * lr first (the base optimizer);  local_step = t + 1;
    lr_t = lr * min(local_step / warmup_steps, 1);  z = momentum (starts as a copy of y);
    v = v + (g**2 - v) * (1 - beta_2);  z_new = z - (lr_t * g) / (sqrt(v / (1 - beta_2**local_step)) + e);
    x = (y - (1 - beta_1) * momentum.value) / beta_1, where momentum.value, kept before the
    assign of z_new, reads z_new on TensorFlow and torch and z on JAX;  c = 1 / local_step;
    x_new = (1 - c) * x + c * z_new;  y = (1 - beta_1) * z_new + beta_1 * x_new.""",
            keras_base=True),
        "textbook": Point(
            {"epsilon": "hat", "averaging": "gamma_squared", "decay_form": "z_step",
             "x_from": "z_old", "hyperparameters": "python"},
            source="Defazio et al. 2024, NeurIPS, 'The Road Less Scheduled', Algorithm 1 "
                   "(Schedule-Free AdamW)",
            doc="""y = (1 - beta_1) z + beta_1 x (line 5);  v = beta_2 v + (1 - beta_2) g**2 (line 7);
    gamma_t = lr * sqrt(1 - beta_2**t) * min(1, t / T_warmup) (line 8);
    z = z - gamma_t g / (sqrt(v) + epsilon) - gamma_t lambda y (line 9);
    c = gamma_t**2 / sum_{i<=t} gamma_i**2 (line 10);  x = (1 - c) x + c z (line 11).""",
            notes="The weights are y, the point where the gradient is taken (as Keras "
                  "keeps them), and x is recovered from y and z by line 5; z starts as "
                  "x_1 (line 2), i.e. as the initial weights. lambda takes Keras's "
                  "weight_decay, T_warmup its warmup_steps (no warmup: min(1, t / "
                  "T_warmup) = 1)."),
    },
    explained=("epsilon", "averaging", "decay_form", "x_from"))
