"""LossScaleOptimizer: Keras's dynamic loss scaling around another optimizer.

Keras: keras/src/optimizers/loss_scale_optimizer.py (Keras 3.15.1).  `apply`
(`_common_apply` and `_stateful_handle_finite_grads` / `_non_finite_grads`,
on TensorFlow through `_tf_apply`) and `stateless_apply` (JAX's trainer) do
the same per step:

  1. finite: every element of every gradient is finite (`check_finite`,
     ops.all(ops.isfinite(g)) over all variables together);
  2. if finite, the inner optimizer's `apply` of g / scale (ops.divide by the
     variable `dynamic_scale` as it was before this step), then
     step_counter == dynamic_growth_steps - 1 ?
         step_counter = 0, scale = scale * 2  :  step_counter = step_counter + 1;
  3. if not, step_counter = 0 and scale = scale * 0.5, and nothing else
     changes: the weights and every variable of the inner optimizer (its slots
     and its iteration counter) stay as they are, the step is skipped.

`dynamic_scale` is a float32 variable whatever the weights' dtype (`build`),
so its doubling and halving round, and overflow, in float32; `step_counter`
is an integer.  The constructor sets the inner optimizer's
`loss_scale_factor` to None.  The wrapper's own `_iterations` is never
incremented (its `apply` replaces the base optimizer's): Keras's
`iterations` is the inner optimizer's counter, a state here ("iteration"),
which counts the steps not skipped.

The scenario's gradient, for this class, is the gradient of the unscaled
loss.  The trainer differentiates `scale_loss(loss)` = loss * dynamic_scale,
so `apply` receives g * scale: the worker (verify/worker/run.py) plays that part
with the scale after the previous step, a numpy product in the working
dtype, and `step` below forms the same product.  With a power-of-two scale
and no overflow the inner optimizer sees the scenario's gradient itself.

The algorithm is Micikevicius et al. 2018, "Mixed Precision Training", ICLR,
section 3.2 (dynamic loss scaling: skip the update and lower the scale on an
overflow, raise it after N steps without one); its numbers (halving,
doubling, when N counts) are Keras's, so only the `keras` family states it.
"""

from __future__ import annotations

import numpy as np

from reference.arithmetic import Arithmetic, Tracked, stored, where
from reference.base import per_row
from reference.optimizer import broadcastable
from reference.rule import REGISTRY, Rule, StateSpec, Unsupported

CLASS_NAME = "LossScaleOptimizer"
DEFAULTS = {"inner_optimizer": None, "initial_scale": 2.0 ** 15,
            "dynamic_growth_steps": 2000}

DOC = """finite = all(isfinite(g * scale)) over every variable;
    finite:  the inner optimizer's step on (g * scale) / scale;
             step_counter == dynamic_growth_steps - 1 ? (step_counter = 0, scale = 2 * scale)
                                                      : step_counter += 1;
    else:    step_counter = 0, scale = 0.5 * scale (float32); weights and inner slots kept."""


def inner(hp: dict) -> tuple:
    """(the inner optimizer's keras rule, its hyperparameters, loss_scale_factor off)."""
    serialized = hp["inner_optimizer"]
    if not isinstance(serialized, dict) or "class_name" not in serialized:
        raise Unsupported(f"{CLASS_NAME} needs inner_optimizer, a serialized optimizer")
    try:
        rule = REGISTRY[("keras", serialized["class_name"])]
    except KeyError:
        raise Unsupported(f"{CLASS_NAME}: the keras family does not state the inner "
                          f"optimizer {serialized['class_name']}") from None
    config = {**serialized.get("config", {}), "loss_scale_factor": None}
    return rule, rule.hyperparameters(config)


def _arrives_float32(quotient: Tracked) -> bool:
    """Is g / scale, a float16 or bfloat16 gradient divided by the float32 scale,
    float32 where a kernel keeps the gradient's dtype (kernels_keep_gradient_dtype:
    torch)?  There ops.divide is torch.divide, whose type promotion lets a
    zero-dimensional tensor (the scale) widen only another zero-dimensional one, or
    one of a lower category: only the gradient of a rank-0 weight, [k] here."""
    return np.ndim(quotient.v) == 1


def states(hp: dict) -> list:
    rule, inner_hp = inner(hp)
    return [StateSpec("step_counter", 0.0, per_variable=False),
            StateSpec("dynamic_scale", hp["initial_scale"], per_variable=False,
                      initial_via_cast=True, dtype="float32"),
            StateSpec("iteration", 0.0, per_variable=False)] + rule.states(inner_hp)


def step(ar, hp, state, grads, t, paths, arrives_float32=_arrives_float32):
    """One step; `t` (the wrapper's own `_iterations`, always 0) is not used;
    `arrives_float32` is the backend's promotion of g / scale (_arrives_float32)."""
    rule, inner_hp = inner(hp)
    scale, counter, iteration = state["dynamic_scale"], state["step_counter"], state["iteration"]
    k = np.shape(scale.v)[0]
    fed = [g * broadcastable(scale, g) for g in grads]  # the trainer's (the worker's) product
    finite = np.all([np.isfinite(np.reshape(f.v, (k, -1))).all(axis=1) for f in fed], axis=0)
    unscaled = [f / broadcastable(scale, f) for f in fed]
    own = ["variable"] + [s.name for s in rule.states(inner_hp)]
    # The inner update_step casts the quotient to the variable's dtype, unless the
    # backend's own kernel keeps the dtype it arrives in
    wide = (ar.dtype.itemsize < 4
            and rule.class_name in ar.precision.kernels_keep_gradient_dtype)
    if wide:
        unscaled = [Tracked(u.v.astype(np.float32), u.e, ar, u.tie) if arrives_float32(u)
                    else stored(u) for u in unscaled]
    out = rule(ar, inner_hp, {n: state[n] for n in own}, unscaled, iteration, paths)
    if wide:
        out = {n: [None if x is None else stored(x) for x in v] if isinstance(v, list)
               else stored(v) for n, v in out.items()}
    kept = {n: [None if new is None else where(per_row(finite, new), new, old)
                for new, old in zip(out[n], state[n])] for n in own}

    f32 = Arithmetic("float32", ar.precision, track=ar.track)
    scale32 = f32.exact(scale.v)
    grow = finite & (counter.v == hp["dynamic_growth_steps"] - 1)
    kept["dynamic_scale"] = where(finite, where(grow, scale32 * f32.const(2.0), scale32),
                                  scale32 * f32.const(0.5))
    zero = ar.exact(np.zeros(k))
    kept["step_counter"] = where(finite & ~grow, counter + ar.const(1.0), zero)
    kept["iteration"] = where(finite, iteration + ar.const(1.0), iteration)
    return kept


def _unstated(hp):
    try:
        inner(hp)
    except Unsupported as exc:
        return str(exc)
    return None


KERAS = Rule("keras", CLASS_NAME, DEFAULTS, states, step,
             source="keras/src/optimizers/loss_scale_optimizer.py (Keras 3)", doc=DOC,
             choices="The scenario's gradient is the unscaled loss's: the harness multiplies "
                     "it by the scale, as the trainer's scale_loss does, before apply.",
             unstated=_unstated, inner=lambda hp: [("inner_optimizer", *inner(hp))])
