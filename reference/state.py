"""A state a rule keeps beside the weights: its name, initial value and shape
(reference/rule.py's interface; reference/base.py's pipeline adds its own)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class StateSpec:
    name: str
    initial: float
    per_variable: bool = True  # False: one optimizer-wide scalar
    # True when the initial value goes through ops.cast (Keras's Constant
    # initializer), so the precision setting's cast rounding applies.
    initial_via_cast: bool = False
    # True when the slot starts as a copy of its weights (Keras's build assigns
    # ops.copy(var): ScheduleFreeAdamW's momentum, the iterate z); `initial` is unused
    copies_variable: bool = False
    # (variable shape, variable path) -> the slot's shape, or None where Keras
    # keeps no such slot for that variable (Adafactor's factored moments, Muon's
    # Adam velocity); None here: the variable's own shape, for every variable
    shape: Callable[[tuple, str], tuple | None] | None = None
    # the dtype Keras gives the variable whatever the weights' (LossScaleOptimizer's
    # float32 scale); None: the working dtype
    dtype: str | None = None

    def shape_for(self, variable_shape: tuple, path: str) -> tuple | None:
        if not self.per_variable:
            return ()
        return tuple(variable_shape) if self.shape is None else self.shape(
            tuple(variable_shape), path)
