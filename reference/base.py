"""Keras's base optimizer: the stages around every optimizer's own update.

`BaseOptimizer.apply` (keras/src/optimizers/base_optimizer.py) runs the same
pipeline for every optimizer class; the `keras` point of every optimizer goes
through it, stated once here.  Stages run over all variables and gradients at
once (lists of Tracked, one per variable), before or after the per-variable
update:

    before the update:  weight decay (`_apply_weight_decay`, called in
                        `_backend_apply_gradients`)
    the optimizer's own update (`_backend_update_step`: `update_step` per variable)

Keras's other stages (loss-scale unscaling, gradient accumulation, clipnorm /
clipvalue / global_clipnorm, the EMA of the weights) are not modelled yet: a
configuration that turns them on is refused (reference/rule.py,
NEUTRAL_BASE_ARGUMENTS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from reference.arithmetic import Arithmetic, Tracked

# hyperparameters of the base optimizer that every Keras optimizer takes
DEFAULTS = {"weight_decay": None}


def decoupled_weight_decay(ar: Arithmetic, w: Tracked, weight_decay: float,
                           lr: Tracked) -> Tracked:
    """w = w - w * wd * lr (`BaseOptimizer._apply_weight_decay`).

    With the `decay_factor_float32` precision setting the factor (1 - wd*lr)
    is formed in float32 and then multiplies the weights (torch backend).
    """
    if ar.precision.decay_factor_float32:
        # torch: 1 - wd * lr on a float32 scalar tensor, every step rounded to
        # float32 and known exactly, so it carries no error bound of its own.
        f32 = Arithmetic("float32", ar.precision, track=False)
        factor = 1 - f32.const(weight_decay) * f32.learning_rate(float(lr.v))
        return w * ar.exact(np.asarray(factor.v))
    return w - w * ar.cast(weight_decay) * lr


def weight_decay(ar: Arithmetic, hp: dict, c: dict, variables: list, grads: list,
                 lr: Tracked) -> tuple:
    """Decoupled weight decay of every variable, when `weight_decay` is set.

    Pieces (AdamW's variant space names them; Keras's choice is the default):
    decay_scale "lr" multiplies the decay by the learning rate, "schedule" by
    a schedule multiplier of 1 (Loshchilov and Hutter 2019, Algorithm 2);
    decay_order "before_step" decays the weights before the update,
    "after_step" the updated weights; a point whose decay_form is not
    "base_optimizer" decays in its own update instead.
    """
    if hp["weight_decay"] is None or c.get("decay_form", "base_optimizer") != "base_optimizer":
        return variables, grads
    scale = lr if c.get("decay_scale", "lr") == "lr" else ar.const(1.0)
    return [decoupled_weight_decay(ar, w, hp["weight_decay"], scale) for w in variables], grads


@dataclass(frozen=True)
class Stage:
    name: str
    apply: Callable  # (ar, hp, c, variables, grads, lr) -> (variables, grads)
    # the point's pieces -> "before" or "after" the optimizer's update
    when: Callable[[dict], str]
    # True when the stage treats every element on its own, so that the
    # variables may be evaluated as one flat array (reference/optimizer.py)
    elementwise: bool = True


PIPELINE = (
    Stage("weight_decay", weight_decay,
          lambda c: "after" if c.get("decay_order") == "after_step" else "before"),
)


def stages(c: dict, when: str) -> tuple:
    """The stages of the pipeline that run `when` ("before", "after") the update."""
    return tuple(s for s in PIPELINE if s.when(c) == when)
