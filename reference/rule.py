"""What a reference rule is, and the registry of rules by family.

A rule is one optimizer step over named state, written in numpy through
`reference.arithmetic` so that every value carries its rounding bound.  State
names are Keras's: "variable" for the weights, the slot names Keras gives its
per-variable optimizer variables ("momentum", "velocity", "accumulator",
"average_gradient"), and the attribute name of any optimizer-wide variable
("u_product").  Inputs have a leading batch axis so that one call can evaluate
many steps at once (lockstep) or one step (free-run).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from reference.arithmetic import Arithmetic, Tracked

# Base-optimizer arguments a rule accepts only at their neutral values, until
# a piece models them (clipping, EMA, loss scaling, accumulation).
NEUTRAL_BASE_ARGUMENTS = {
    "name": None,
    "clipnorm": None,
    "clipvalue": None,
    "global_clipnorm": None,
    "use_ema": False,
    "ema_momentum": None,
    "ema_overwrite_frequency": None,
    "loss_scale_factor": None,
    "gradient_accumulation_steps": None,
}


class Unsupported(ValueError):
    """A configuration the rule does not model."""


@dataclass(frozen=True)
class StateSpec:
    name: str
    initial: float
    per_variable: bool = True  # False: one optimizer-wide scalar
    # True when the initial value goes through ops.cast (Keras's Constant
    # initializer), so the precision setting's cast rounding applies.
    initial_via_cast: bool = False

    def initial_value(self, ar: Arithmetic) -> float:
        return float((ar.cast if self.initial_via_cast else ar.const)(self.initial).v)


StepFn = Callable[[Arithmetic, dict, dict, Tracked, Tracked], dict]


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

    def hyperparameters(self, config: dict) -> dict:
        """The full hyperparameter set: the rule's defaults under `config`."""
        hp = dict(self.defaults)
        for key, value in config.items():
            if key in hp:
                hp[key] = value
            elif key in NEUTRAL_BASE_ARGUMENTS:
                neutral = NEUTRAL_BASE_ARGUMENTS[key]
                if value not in (neutral, None, False) and key not in (
                        "name", "ema_momentum"):
                    raise Unsupported(
                        f"{self.family}/{self.class_name} does not model {key}={value!r}")
            else:
                raise Unsupported(
                    f"{self.family}/{self.class_name} has no hyperparameter {key!r}")
        return hp

    def state_specs(self, config: dict) -> list:
        return self.states(self.hyperparameters(config))

    def __call__(self, ar: Arithmetic, hp: dict, state: dict, grad: Tracked,
                 iteration: Tracked) -> dict:
        """One step from `state` (Tracked values) at Keras's `iterations`."""
        return self.step(ar, hp, state, grad, iteration)


REGISTRY: dict = {}


def register(family: str, class_name: str, *, defaults: dict, states, source: str,
             choices: str = ""):
    def wrap(fn: StepFn) -> StepFn:
        key = (family, class_name)
        if key in REGISTRY:
            raise ValueError(f"duplicate rule {key}")
        REGISTRY[key] = Rule(family, class_name, dict(defaults), states, fn,
                             source, choices, (fn.__doc__ or "").strip())
        return fn
    return wrap


def slots(*names, initial=0.0):
    return [StateSpec(n, initial) for n in names]
