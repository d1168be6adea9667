"""Keras's base optimizer: the stages around every optimizer's own update.

`BaseOptimizer.apply` (keras/src/optimizers/base_optimizer.py, Keras 3.15.1)
runs the same pipeline for every optimizer class; the `keras` point of every
optimizer goes through it, stated once here (`run`), in Keras's order:

  1. unscale: g = g / loss_scale_factor (`apply`, a Python operator);
  2. accumulate (`gradient_accumulation_steps` = n, `_backend_apply_gradients`):
     on the step where (_iterations + 1) % n == 0 the gradients are
     (g + accumulator) / n and steps 3-5 run, the accumulators reset to 0;
     on every other step the accumulators become accumulator + g and the
     weights and every optimizer slot stay as they are.  The optimizer's own
     step sees `iterations` = _iterations // n (the property), so its bias
     corrections count updates, not calls;
  3. clip (`_clip_gradients`): clipnorm per variable, or global_clipnorm
     over all variables together, or clipvalue;
  4. weight decay (`_apply_weight_decay`), on the weights but those
     `exclude_from_weight_decay` names (`_use_weight_decay`);
  5. the optimizer's own update (`_backend_update_step`: `update_step` per
     variable);
  6. EMA (`use_ema`, `_update_model_variables_moving_average`), on every
     call: average = m * average + (1 - m) * w with m = ema_momentum, but
     m = 0 while `iterations` (the property) is 0; then, with
     `ema_overwrite_frequency` f, the weights are overwritten by the new
     average where (iterations + 1) % f == 0;
  7. `_iterations` += 1 (the harness reads it; a rule returns no iteration).

A rule's `iteration` argument is Keras's stored counter `_iterations` (the
number of calls to `apply` so far), which is what the `iterations` property
returns unless gradients are accumulated.

The three backends were read for each stage.  JAX overrides step 2 and the
overwrite of step 6 (keras/src/backend/jax/optimizer.py): it runs steps 3-5
on every call, on the raw gradients where it is not an update step, and then
keeps the old values of the weights and of every optimizer variable through
`jax.lax.cond`; it overwrites with average * 1 + w * 0.  Both are the same
numbers as the `ops.cond` of the other backends for finite values.  torch
resets the accumulators with accumulator * 0.0 and increments them with
`_foreach_add_(alpha=1.0)` (keras/src/backend/torch/optimizers/
torch_parallel_optimizer.py), again the same numbers, but for an accumulator
holding inf or NaN, which the product leaves NaN (the precision setting
accumulator_reset_multiplies).  TensorFlow clips by
norm with `tf.clip_by_norm` (keras/src/backend/tensorflow/optimizer.py), the
same formula as Keras's `_clip_by_norm`.  Where the backends round
differently (torch's Python-float operands and minimum/maximum in float32)
the precision settings of reference/arithmetic.py say so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from reference import schedules
from reference.arithmetic import (Arithmetic, Tracked, maximum, sqrt, square, where,
                                  sum_over)
from reference.state import StateSpec

# hyperparameters of the base optimizer that every Keras optimizer takes, at
# Keras's defaults (BaseOptimizer.__init__)
DEFAULTS = {"weight_decay": None, "clipnorm": None, "clipvalue": None,
            "global_clipnorm": None, "use_ema": False, "ema_momentum": 0.99,
            "ema_overwrite_frequency": None, "loss_scale_factor": None,
            "gradient_accumulation_steps": None,
            # not an argument: the method `exclude_from_weight_decay(var_names=...)`,
            # called before build ({"var_names": [...]}; verify/configurations.py)
            "exclude_from_weight_decay": None}


# --- exact selections and float32 results ---------------------------------
def per_row(mask: np.ndarray, x: Tracked) -> np.ndarray:
    """A [k] mask shaped [k, 1, ..., 1] to broadcast against x [k, *shape]."""
    return np.reshape(mask, (-1,) + (1,) * (np.ndim(x.v) - 1))


def rounded_to_float32(x: Tracked) -> Tracked:
    """x stored as a float32 tensor (torch's ops.minimum / ops.maximum with a
    Python float, `min_max_float32`): the value rounded, its bound grown by
    the rounding.  An inf or NaN stays itself in float32, exactly: its bound is
    its own (0 where it is IEEE's exact answer, reference/arithmetic.py), not
    inf - inf; a finite value beyond float32's range that becomes inf grows its
    bound to inf (an overflow)."""
    if x.ar.dtype == np.float32:
        return x
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = x.v.astype(np.float32).astype(x.ar.dtype)
        rounding = np.abs(rounded.astype(np.float64) - x.v.astype(np.float64))
    e = None if x.e is None else x.e + np.where(np.isfinite(x.v), rounding, 0.0)
    return Tracked(rounded, e, x.ar, x.tie)


def min_max_result(ar: Arithmetic, x: Tracked) -> Tracked:
    """The result of ops.minimum / ops.maximum of a tensor and a Python float."""
    return rounded_to_float32(x) if ar.precision.min_max_float32 else x


# --- 1. unscale ------------------------------------------------------------
def unscale(ar: Arithmetic, hp: dict, grads: list) -> list:
    """g / loss_scale_factor (`BaseOptimizer.apply`: `g / scale`, a Python
    operator, so the factor enters in the working dtype on every backend)."""
    scale = hp["loss_scale_factor"]
    if scale is None:
        return grads
    return [g / ar.const(scale) for g in grads]


# --- 3. clip ---------------------------------------------------------------
def _axes(x: Tracked) -> tuple:
    """Every axis of one variable (the leading axis is the batch of steps)."""
    return tuple(range(1, np.ndim(x.v)))


def clip_by_norm(ar: Arithmetic, g: Tracked, clipnorm: float) -> Tracked:
    """`BaseOptimizer._clip_by_norm` (and `tf.clip_by_norm`, the same lines):
    g * c / max(||g||, c) over all axes of the variable.

    Pascanu, Mikolov and Bengio 2013, "On the difficulty of training recurrent
    neural networks", ICML, Algorithm 1: g <- (c / ||g||) g where ||g|| >= c.
    Keras writes it as one expression for every g, so where ||g|| <= c it is
    g * c / c (two roundings, not g itself).
    """
    l2sum = sum_over(square(g), _axes(g), keepdims=True)
    # where(l2sum > 0, sqrt(l2sum), l2sum): sqrt(0) = 0 = l2sum, the same value
    l2norm = where(l2sum.v > 0, sqrt(l2sum), l2sum)
    c = ar.operand(clipnorm)  # ops.multiply / ops.maximum receive the Python float
    return (g * c) / min_max_result(ar, maximum(l2norm, c))


def global_norm(ar: Arithmetic, grads: list) -> Tracked:
    """sqrt(sum over variables of sum(g**2)) (`base_optimizer.global_norm`:
    the per-variable sums stacked and summed), shaped [k]."""
    sums = [sum_over(square(g), _axes(g)) for g in grads]
    ties = None
    if any(s.tie is not None for s in sums):
        ties = np.stack([np.broadcast_to(False if s.tie is None else s.tie, np.shape(s.v))
                         for s in sums], axis=-1)
    stacked = Tracked(np.stack([s.v for s in sums], axis=-1),
                      None if not ar.track else np.stack(
                          [np.broadcast_to(s.e, np.shape(s.v)) for s in sums], axis=-1),
                      ar, ties)
    return sqrt(sum_over(stacked, -1))


def clip_by_global_norm(ar: Arithmetic, grads: list, clip_norm: float) -> list:
    """`base_optimizer.clip_by_global_norm`: every g * scale with
    scale = c * min(1 / ||g||, 1 / c) + (||g|| - ||g||) (the last term is 0,
    or NaN when the norm is not finite; exact either way).

    Pascanu et al. 2013, Algorithm 1, with ||g|| the norm of all parameters'
    gradients together.
    """
    use_norm = global_norm(ar, grads)
    smaller = min_max_result(ar, _minimum(1.0 / use_norm, ar.const(1.0 / clip_norm)))
    if ar.precision.min_max_float32 and ar.dtype != np.float32:
        # the minimum is a float32 tensor, so c * minimum is a float32 product
        f32 = Arithmetic("float32", ar.precision, track=ar.track)
        product = f32.const(clip_norm) * Tracked(smaller.v.astype(np.float32), smaller.e,
                                                 f32, smaller.tie)
        scale = Tracked(product.v.astype(ar.dtype), product.e, ar, product.tie)
    else:
        scale = ar.const(clip_norm) * smaller
    with np.errstate(invalid="ignore"):
        scale = scale + ar.exact(use_norm.v - use_norm.v)
    return [g * scale.reshape((-1,) + (1,) * (np.ndim(g.v) - 1)) for g in grads]


def _minimum(x: Tracked, y: Tracked) -> Tracked:
    return -maximum(-x, -y)


def clip_by_value(ar: Arithmetic, g: Tracked, clipvalue: float) -> Tracked:
    """ops.clip(g, -v, v): the Python-float bounds as Keras ops receive them."""
    lo, hi = ar.operand(-clipvalue), ar.operand(clipvalue)
    return _minimum(maximum(g, lo), hi)


def clip(ar: Arithmetic, hp: dict, grads: list) -> list:
    """`BaseOptimizer._clip_gradients`: the first of clipnorm, global_clipnorm,
    clipvalue that is set and positive (Keras allows at most one)."""
    if hp["clipnorm"] and hp["clipnorm"] > 0:
        return [clip_by_norm(ar, g, hp["clipnorm"]) for g in grads]
    if hp["global_clipnorm"] and hp["global_clipnorm"] > 0:
        return clip_by_global_norm(ar, grads, hp["global_clipnorm"])
    if hp["clipvalue"] and hp["clipvalue"] > 0:
        return [clip_by_value(ar, g, hp["clipvalue"]) for g in grads]
    return grads


# --- 4. weight decay --------------------------------------------------------
def decoupled_weight_decay(ar: Arithmetic, w: Tracked, weight_decay: float,
                           lr: Tracked, python_lr: float | None = None) -> Tracked:
    """w = w - w * wd * lr (`BaseOptimizer._apply_weight_decay`).

    With the `decay_factor_float32` precision setting the factor (1 - wd*lr)
    is formed in float32 and then multiplies the weights (torch backend); from
    a plain callable's Python-float learning rate `python_lr` it is a Python
    float, which the product rounds to the weights' dtype.
    """
    if np.ndim(lr.v):  # a schedule's value per step [k]
        lr = lr.reshape(np.shape(per_row(lr.v, w)))
    if ar.precision.decay_factor_float32 and python_lr is not None:
        return w * ar.exact(np.asarray(1 - weight_decay * python_lr, ar.dtype))
    if ar.precision.decay_factor_float32:
        # torch: 1 - wd * lr on a float32 scalar tensor, every step rounded to
        # float32 and known exactly, so it carries no error bound of its own.
        f32 = Arithmetic("float32", ar.precision, track=False)
        factor = 1 - f32.const(weight_decay) * f32.exact(np.float32(lr.v))
        return w * ar.exact(np.asarray(factor.v))
    return w - w * ar.cast(weight_decay) * lr


def decays(hp: dict, path: str) -> bool:
    """Is this variable decayed? `BaseOptimizer._use_weight_decay`: not when
    re.search("|".join(var_names), variable.name) finds a match (the names are
    regular expressions, searched anywhere in the name; the harness's variables
    are in no name scope, so their name is their path)."""
    exclude = hp.get("exclude_from_weight_decay")
    if not exclude or not exclude.get("var_names"):
        return True
    return re.search("|".join(exclude["var_names"]), path) is None


def weight_decay(ar: Arithmetic, hp: dict, c: dict, variables: list, lr: Tracked,
                 paths: list) -> list:
    """Decoupled weight decay of every variable `decays`, when `weight_decay` is set.

    Pieces (AdamW's variant space names them; Keras's choice is the default):
    decay_scale "lr" multiplies the decay by the learning rate, "schedule" by
    a schedule multiplier of 1 (Loshchilov and Hutter 2019, Algorithm 2);
    decay_order "before_step" decays the weights before the update,
    "after_step" the updated weights; a point whose decay_form is not
    "base_optimizer" decays in its own update instead.
    """
    if hp["weight_decay"] is None or c.get("decay_form", "base_optimizer") != "base_optimizer":
        return variables
    by_lr = c.get("decay_scale", "lr") == "lr"
    scale = lr if by_lr else ar.const(1.0)
    python_lr = schedules.python_float(hp["learning_rate"]) if by_lr else None
    return [decoupled_weight_decay(ar, w, hp["weight_decay"], scale, python_lr)
            if decays(hp, path) else w for w, path in zip(variables, paths)]


# --- 2. accumulate ----------------------------------------------------------
def accumulate(ar, hp, c, state, grads, t, lr, step, paths) -> tuple:
    """Gradient accumulation over n = gradient_accumulation_steps calls.

    Returns the states after the call and the iteration the optimizer saw
    (`iterations` = _iterations // n)."""
    n = int(hp["gradient_accumulation_steps"])
    accumulators = state["gradient_accumulator"]
    summed = [g + a for g, a in zip(grads, accumulators)]
    averaged = [s / ar.const(n) for s in summed]  # `/ steps`, a Python int
    t_opt = ar.step_count(np.floor_divide(np.asarray(t.v, np.float64), n))
    is_update = (np.asarray(t.v, np.float64) + 1) % n == 0
    out = update(ar, hp, c, state, averaged, t_opt, lr, step, paths)
    kept = {}
    for name, value in out.items():
        if isinstance(value, list):
            kept[name] = [None if v is None else where(per_row(is_update, v), v, state[name][i])
                          for i, v in enumerate(value)]
        else:
            kept[name] = where(is_update, value, state[name])
    if ar.precision.accumulator_reset_multiplies:  # accumulator * 0.0: NaN from inf
        with np.errstate(invalid="ignore"):
            reset = [ar.exact(a.v * 0.0) for a in accumulators]
    else:
        reset = [ar.exact(np.zeros_like(s.v)) for s in summed]
    kept["gradient_accumulator"] = [where(per_row(is_update, s), r, s)
                                    for s, r in zip(summed, reset)]
    return kept, t_opt


# --- 3-5: clip, weight decay, the optimizer's own step ----------------------
def update(ar, hp, c, state, grads, t, lr, step, paths) -> dict:
    """The stages of PIPELINE that the point's pieces choose, in order, around the
    optimizer's own step `step(state, grads, t)` -> {state: value}."""
    states = {**state, "variable": list(state["variable"])}
    for stage in PIPELINE:
        if stage.chosen(c):
            states, grads = stage.apply(ar, hp, c, states, grads, t, lr, step, paths)
    return states


# --- 6. EMA ------------------------------------------------------------------
def moving_average(ar, hp, state, out, t_opt) -> dict:
    """The EMA of the weights after the step, and its overwrite of them.

    Keras: average = m * average + (1 - m) * w, m = ema_momentum (through
    ops.multiply, so a Python-float operand), 0 while `iterations` is 0 (the
    average then starts as the weights); with f = ema_overwrite_frequency, the
    weights become the new average where (iterations + 1) % f == 0.
    Polyak and Juditsky 1992 ("Acceleration of stochastic approximation by
    averaging", SIAM J. Control Optim. 30(4)) average the iterates uniformly,
    w_bar_t = (1/t) sum w_i, and never feed the average back into the
    iteration; Keras's average is exponential, and it may overwrite the weights.
    """
    first = np.asarray(t_opt.v, np.float64) == 0
    momentum = where(first, ar.exact(np.zeros(np.shape(first))),
                     ar.operand(hp["ema_momentum"]))
    rest = ar.const(1.0) - momentum  # ops.subtract(1, momentum): an int 1, exact
    averages = []
    for a, w in zip(state["average"], out["variable"]):
        m, r = momentum.reshape(per_row(first, w).shape), rest.reshape(per_row(first, w).shape)
        averages.append(m * a + r * w)
    out = dict(out)
    f = hp["ema_overwrite_frequency"]
    if f:
        overwrite = (np.asarray(t_opt.v, np.float64) + 1) % f == 0
        out["variable"] = [where(per_row(overwrite, w), a, w)
                           for a, w in zip(averages, out["variable"])]
    out["average"] = averages
    return out


# --- the textbook family's forms of the same stages ------------------------
def pascanu_clip(ar: Arithmetic, grads: list, threshold: float) -> list:
    """Pascanu, Mikolov and Bengio 2013, Algorithm 1: g_hat <- (threshold /
    ||g_hat||) g_hat where ||g_hat|| >= threshold, g_hat the gradient of all
    parameters together (the norm is Keras's global_clipnorm's, not the
    per-variable norm of its clipnorm); a NaN norm fails the test, so the
    gradient is kept, and an infinite one scales it by c / inf = 0."""
    norm = global_norm(ar, grads)
    with np.errstate(invalid="ignore"):
        over = np.asarray(norm.v) >= threshold
    scale = ar.const(threshold) / norm
    return [where(per_row(over, g), g * scale.reshape(per_row(over, g).shape), g)
            for g in grads]


def textbook_clip(ar: Arithmetic, hp: dict, grads: list) -> list:
    """clipnorm and global_clipnorm: `pascanu_clip`; clipvalue: each component
    clipped to [-v, v] (Mikolov 2012, as Pascanu et al. 2013, section 3.2,
    describe it)."""
    norm = hp["clipnorm"] or hp["global_clipnorm"]
    if norm and norm > 0:
        return pascanu_clip(ar, grads, norm)
    if hp["clipvalue"] and hp["clipvalue"] > 0:
        v = ar.const(hp["clipvalue"])
        return [_minimum(maximum(g, -v), v) for g in grads]
    return grads


def hanson_pratt_decay(ar: Arithmetic, hp: dict, c: dict, variables: list) -> list:
    """Weight decay as Hanson and Pratt 1988 define it, in Loshchilov and
    Hutter 2019, eq. (1): theta_(t+1) = (1 - lambda) theta_t - alpha grad_t,
    the decay not scaled by the learning rate; a point whose update decays
    in its own form (its `decay_form` piece) is left to it."""
    if hp["weight_decay"] is None or c.get("decay_form", "base_optimizer") != "base_optimizer":
        return variables
    return [ar.const(1.0 - hp["weight_decay"]) * w for w in variables]


def polyak_average(ar: Arithmetic, state: dict, out: dict, t: Tracked) -> dict:
    """Polyak and Juditsky 1992 ("Acceleration of stochastic approximation by
    averaging", SIAM J. Control Optim. 30(4)): the uniform mean of the iterates,
    never fed back into the iteration, here of the weights after each update,
    w_bar_t = w_bar_(t-1) + (w_t - w_bar_(t-1)) / t (Keras's average holds the
    same iterates)."""
    count = t + 1
    averages = [a + (w - a) / count.reshape(per_row(np.asarray(t.v), w).shape)
                for a, w in zip(state["average"], out["variable"])]
    return {**out, "average": averages}


def textbook_unstated(hp: dict) -> str | None:
    """Why the textbook family does not state a base configuration, or None."""
    hp = {**DEFAULTS, **hp}
    if hp["gradient_accumulation_steps"]:
        return ("gradient_accumulation_steps: no paper the textbook family follows states "
                "gradient accumulation")
    if hp.get("exclude_from_weight_decay"):
        return ("exclude_from_weight_decay: Hanson and Pratt, and Loshchilov and Hutter, decay "
                "every weight; excluding weights by name is Keras's API, not a paper's")
    if hp["use_ema"] and hp["ema_overwrite_frequency"]:
        return ("Polyak and Juditsky 1992 never write the average back into the iterates: "
                "ema_overwrite_frequency has no textbook form")
    return None


def run_textbook(ar: Arithmetic, hp: dict, c: dict, state: dict, grads: list, t: Tracked,
                 lr: Tracked, step: Callable, paths: list) -> dict:
    """The textbook family's stages around `step`: static loss scaling
    (Micikevicius et al. 2018, ICLR, "Mixed Precision Training", section 3.2:
    the gradients divided by the scale before the update, Keras's `unscale`),
    `textbook_clip`, `hanson_pratt_decay`, the step, `polyak_average`."""
    hp = {**DEFAULTS, **hp}
    grads = textbook_clip(ar, hp, unscale(ar, hp, grads))
    out = step({**state, "variable": hanson_pratt_decay(ar, hp, c, state["variable"])},
               grads, t)
    return polyak_average(ar, state, out, t) if hp["use_ema"] else out


def textbook_states(hp: dict) -> list:
    """The average of `polyak_average`, named as Keras's EMA slot."""
    return [StateSpec("average", 0.0)] if hp.get("use_ema") else []


# --- the pipeline -------------------------------------------------------------
def run(ar: Arithmetic, hp: dict, c: dict, state: dict, grads: list, t: Tracked,
        lr: Tracked, step: Callable, paths: list) -> dict:
    """One call of `BaseOptimizer.apply` around `step(state, grads, t)`, the
    optimizer's own update of all variables (-> {state name: value}); `paths`
    the variables' paths."""
    hp = {**DEFAULTS, **hp}
    grads = unscale(ar, hp, grads)
    if hp["gradient_accumulation_steps"]:
        out, t_opt = accumulate(ar, hp, c, state, grads, t, lr, step, paths)
    else:
        out, t_opt = update(ar, hp, c, state, grads, t, lr, step, paths), t
    if hp["use_ema"]:
        out = moving_average(ar, hp, state, out, t_opt)
    return out


def states(hp: dict) -> list:
    """The optimizer variables the base pipeline adds, named as the harness
    reads Keras's (`<variable path>_<name>`, in lists indexed like the weights):
    `average` (build: add_optimizer_variables(variables, "average")) and
    `gradient_accumulator` (add_variable_from_reference), both zeros."""
    out = []
    if hp.get("use_ema"):
        out.append(StateSpec("average", 0.0))
    if hp.get("gradient_accumulation_steps"):
        out.append(StateSpec("gradient_accumulator", 0.0))
    return out


def elementwise(hp: dict, c: dict) -> bool:
    """True when every stage that runs treats each element on its own: the
    norms of clipnorm (per variable) and global_clipnorm (over all) do not, nor
    a weight decay that excludes variables by name."""
    return not ((hp.get("clipnorm") and hp["clipnorm"] > 0)
                or (hp.get("global_clipnorm") and hp["global_clipnorm"] > 0)
                or hp.get("exclude_from_weight_decay"))


@dataclass(frozen=True)
class Stage:
    name: str
    # (ar, hp, c, states, grads, t, lr, step, paths) -> (states, grads)
    apply: Callable
    chosen: Callable[[dict], bool] = lambda c: True  # the point's pieces -> does it run here?


def _clip_stage(ar, hp, c, states, grads, t, lr, step, paths):
    return states, clip(ar, hp, grads)


def _weight_decay_stage(ar, hp, c, states, grads, t, lr, step, paths):
    return {**states, "variable": weight_decay(ar, hp, c, states["variable"], lr, paths)}, grads


def _step_stage(ar, hp, c, states, grads, t, lr, step, paths):
    return step(states, grads, t), grads


def _decays_after_step(c: dict) -> bool:
    return c.get("decay_order") == "after_step"


# Steps 3-5 of the module docstring in Keras's order; weight decay goes before the
# optimizer's step, or after it where the point's `decay_order` piece says so.
PIPELINE = (
    Stage("clip", _clip_stage),
    Stage("weight_decay", _weight_decay_stage, lambda c: not _decays_after_step(c)),
    Stage("step", _step_stage),
    Stage("weight_decay", _weight_decay_stage, _decays_after_step),
)
