"""What a reference rule is, and the registry of rules by family.

A rule is one optimizer step over named state, written in numpy through
`reference.arithmetic` so that every value carries its rounding bound.  State
names are Keras's: "variable" for the weights, the slot names Keras gives its
per-variable optimizer variables ("momentum", "velocity", "accumulator",
"average_gradient"), and the attribute name of any optimizer-wide variable
("u_product").

The interface: `rule(ar, hp, state, grads, iteration, paths)` where
  state[name]  is a list with one Tracked per variable, each [k, *shape] (a
               leading batch axis of k steps; the slot's own shape, see
               `StateSpec.shape`, and None where the variable has no such
               slot), for a per-variable state, and one Tracked [k] for an
               optimizer-wide state;
  grads        is the list of the variables' gradients, each [k, *shape];
  iteration    is Keras's stored counter `_iterations` before the step (the
               calls to `apply` so far; what the `iterations` property
               returns unless gradients are accumulated, reference/base.py),
               a Tracked [k];
  paths        is the list of the variables' paths (Keras's `variable.path`:
               Muon and Adafactor branch on it and on the rank).
It returns the states after the step in the same form.  One call evaluates k
independent steps at once (lockstep) or one step (free-run).  A rule whose
`elementwise(hp)` is true may be handed all variables as one flat variable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from reference import base
from reference.arithmetic import Arithmetic, Tracked
from reference.state import StateSpec

# Base-optimizer arguments a rule accepts only at their neutral values.  A
# `keras` point runs Keras's base-optimizer pipeline (reference/base.py) and
# takes every argument that pipeline models (base.DEFAULTS: weight decay,
# clipping, EMA, loss scaling, accumulation) as a hyperparameter; a point
# without that pipeline (textbook, article) accepts those at their neutral
# values only (None, False; base.DEFAULTS's value), and `name` always.
NEUTRAL_BASE_ARGUMENTS = {
    "name": None,
}


class Unsupported(ValueError):
    """A configuration the rule does not model."""


StepFn = Callable[[Arithmetic, dict, dict, list, Tracked], dict]


@dataclass(frozen=True)
class Rule:
    family: str
    class_name: str
    defaults: dict
    states: Callable[[dict], list]
    step: StepFn
    source: str
    choices: str = ""
    doc: str = field(default="", compare=False)
    # hyperparameters -> why the source does not state this configuration, or None
    unstated: Callable[[dict], str | None] | None = field(default=None, compare=False)
    # hyperparameters -> True when every element is updated on its own, so that
    # all variables may be evaluated as one flat [k, N] variable
    elementwise: Callable[[dict], bool] = field(default=lambda hp: False, compare=False)
    # hyperparameters -> [(label, rule, its hyperparameters)] of the optimizers this
    # one wraps (LossScaleOptimizer's inner optimizer, MultiOptimizer's)
    inner: Callable[[dict], list] = field(default=lambda hp: [], compare=False)

    def hyperparameters(self, config: dict) -> dict:
        """The full hyperparameter set: the rule's defaults under `config`."""
        hp = dict(self.defaults)
        for key, value in config.items():
            if key in hp:
                hp[key] = value
            elif key in NEUTRAL_BASE_ARGUMENTS or key in base.DEFAULTS:
                neutral = NEUTRAL_BASE_ARGUMENTS.get(key, base.DEFAULTS.get(key))
                if value not in (neutral, None, False) and key not in (
                        "name", "ema_momentum"):
                    raise Unsupported(
                        f"{self.family}/{self.class_name} does not model {key}={value!r}"
                        + (" (it does not run Keras's base-optimizer pipeline)"
                           if key in base.DEFAULTS else ""))
            else:
                raise Unsupported(
                    f"{self.family}/{self.class_name} has no hyperparameter {key!r}")
        if self.unstated is not None and (reason := self.unstated(hp)):
            raise Unsupported(reason)
        return hp

    def __call__(self, ar: Arithmetic, hp: dict, state: dict, grads: list,
                 iteration: Tracked, paths: list | None = None) -> dict:
        """One step from `state` at Keras's `iterations` (see the module docstring)."""
        return self.step(ar, hp, state, grads, iteration,
                         paths if paths is not None else [""] * len(grads))


REGISTRY: dict = {}


def slots(*names, initial=0.0):
    return [StateSpec(n, initial) for n in names]
