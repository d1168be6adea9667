"""Reference rules with one real formula change, as extra families.

Used as the "Keras" statement in sensitivity tests: each must be caught as a
mismatch against real Keras in float64 on every backend.
"""

from dataclasses import replace

import reference
from reference import pieces
from reference.arithmetic import Arithmetic, square
from reference.rule import REGISTRY, Rule

KERAS_ADAM = reference.get_rule("keras", "Adam")


def _eps_inside_sqrt_adam(ar, hp, s, g, t):
    """The Keras Adam step with epsilon moved inside the square root."""
    lr = ar.learning_rate(hp["learning_rate"])
    alpha = pieces.adam_step_size(lr, ar.cast(hp["beta_1"]), ar.cast(hp["beta_2"]), t + 1)
    m = pieces.ema_interpolate(s["momentum"], g, ar.const(1 - hp["beta_1"]))
    v = pieces.ema_interpolate(s["velocity"], square(g), ar.const(1 - hp["beta_2"]))
    w = s["variable"] - (m * alpha) / pieces.eps_inside_sqrt(v, ar.const(hp["epsilon"]))
    return {"variable": w, "momentum": m, "velocity": v}


def _shifted(rule, key, delta):
    def step(ar, hp, s, g, t):
        return rule.step(ar, {**hp, key: hp[key] + delta}, s, g, t)
    return step


def _learning_rate_as_given(rule):
    def step(ar, hp, s, g, t):
        exact = Arithmetic(ar.dtype, replace(ar.precision, learning_rate_float32=False),
                           track=ar.track, tie_width=ar.tie_width)
        return rule.step(exact, hp, s, g, t)
    return step


def _register(family, class_name, step):
    base = reference.get_rule("keras", class_name)
    REGISTRY[(family, class_name)] = replace(base, family=family, step=step)


PERTURBED = {
    "eps-inside-sqrt": ["Adam"],
    "beta_1+1e-4": ["Adam", "Nadam", "Lion"],
    "momentum+1e-4": ["SGD"],
    "rho+1e-4": ["RMSprop"],
    "lr-not-float32": ["SGD", "Adagrad", "RMSprop", "Adam", "Nadam", "Lion"],
}

if ("eps-inside-sqrt", "Adam") not in REGISTRY:
    _register("eps-inside-sqrt", "Adam", _eps_inside_sqrt_adam)
    for name in PERTURBED["beta_1+1e-4"]:
        _register("beta_1+1e-4", name, _shifted(reference.get_rule("keras", name), "beta_1", 1e-4))
    _register("momentum+1e-4", "SGD", _shifted(reference.get_rule("keras", "SGD"), "momentum",
                                               1e-4))
    _register("rho+1e-4", "RMSprop", _shifted(reference.get_rule("keras", "RMSprop"), "rho",
                                              1e-4))
    for name in PERTURBED["lr-not-float32"]:
        _register("lr-not-float32", name, _learning_rate_as_given(reference.get_rule("keras", name)))

FAMILIES = list(PERTURBED)
assert all(isinstance(REGISTRY[(f, c)], Rule) for f, cs in PERTURBED.items() for c in cs)
