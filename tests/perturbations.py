"""Reference rules with one real formula change, as extra families.

Used as the "Keras" statement in sensitivity tests: each must be caught as a
mismatch against real Keras in float64 on every backend.
"""

from dataclasses import replace

import numpy as np

import reference
from reference.arithmetic import Arithmetic
from reference.rule import REGISTRY

KERAS_ADAM = reference.get_rule("keras", "Adam")
# the Keras Adam step with epsilon moved inside the square root
_EPS_INSIDE_SQRT_ADAM = reference.SPACES["Adam"].rule({"epsilon_placement": "inside"}).step


def _shifted(rule, key, delta):
    """Shift a hyperparameter the configuration uses (a zero momentum stays 0)."""
    def step(ar, hp, s, g, t, paths):
        return rule.step(ar, {**hp, key: hp[key] + delta} if hp[key] else hp, s, g, t, paths)
    return step


def _learning_rate_as_given(rule):
    def step(ar, hp, s, g, t, paths):
        exact = Arithmetic(ar.dtype, replace(ar.precision, learning_rate_float32=False),
                           track=ar.track, tie_width=ar.tie_width)
        return rule.step(exact, hp, s, g, t, paths)
    return step


def _without_running_max(rule):
    """AMSGrad's v_hat = max(v_hat, v) taken from 0, i.e. v_hat = v (the branch lost)."""
    def step(ar, hp, s, g, t, paths):
        zeros = [ar.exact(np.zeros(np.shape(v.v))) for v in s["velocity_hat"]]
        return rule.step(ar, hp, {**s, "velocity_hat": zeros}, g, t, paths)
    return step


def _register(family, class_name, step):
    base = reference.get_rule("keras", class_name)
    REGISTRY[(family, class_name)] = replace(base, family=family, step=step)


SHIFTS = {  # family: (hyperparameter, Keras classes)
    "beta_1+1e-4": ("beta_1", ["Adam", "AdamW", "Nadam", "Adamax", "Lamb"]),
    "beta_2+1e-4": ("beta_2", ["Lion", "Adamax", "ScheduleFreeAdamW"]),
    "momentum+1e-4": ("momentum", ["SGD"]),
    "rho+1e-4": ("rho", ["RMSprop", "Adadelta"]),
    "l1+1e-4": ("l1_regularization_strength", ["Ftrl"]),
}
ALL_CLASSES = ["SGD", "Adagrad", "RMSprop", "Adam", "AdamW", "Nadam", "Lion", "Adamax",
               "Adadelta", "Ftrl", "Lamb", "ScheduleFreeAdamW"]

# family -> the configuration ids whose math the change alters
PERTURBED = {
    "eps-inside-sqrt": ["adam", "adam_amsgrad"],
    "beta_1+1e-4": ["adam", "adamw", "nadam", "adamax", "adam_amsgrad", "lamb"],
    "beta_2+1e-4": ["lion", "adamax", "schedule_free_adamw"],
    "momentum+1e-4": ["sgd_momentum", "sgd_nesterov"],
    "rho+1e-4": ["rmsprop", "rmsprop_momentum_centered", "adadelta"],
    "amsgrad-without-max": ["adam_amsgrad"],
    "l1+1e-4": ["ftrl"],
    "ftrl-l2-once": ["ftrl"],
    "lamb-one-norm-for-all": ["lamb"],
    "lr-not-float32": ["sgd", "sgd_momentum", "sgd_nesterov", "adagrad", "rmsprop",
                       "rmsprop_momentum_centered", "adam", "adamw", "nadam", "lion",
                       "adamax", "adadelta", "adam_amsgrad",
                       "ftrl", "lamb", "schedule_free_adamw"],
}

if ("eps-inside-sqrt", "Adam") not in REGISTRY:
    _register("eps-inside-sqrt", "Adam", _EPS_INSIDE_SQRT_ADAM)
    REGISTRY[("amsgrad-without-max", "Adam")] = replace(
        KERAS_ADAM, family="amsgrad-without-max", step=_without_running_max(KERAS_ADAM),
        unstated=lambda hp: None if hp["amsgrad"] else "no running maximum without amsgrad")
    # Keras's FTRL with its L2 term counted once in the denominator (the paper's lambda_2)
    _register("ftrl-l2-once", "Ftrl", reference.SPACES["Ftrl"].rule({"l2_factor": "1"}).step)
    # Keras's Lamb with the trust ratio's norms taken over all variables at once
    # (the comparison hands an elementwise rule every variable as one)
    REGISTRY[("lamb-one-norm-for-all", "Lamb")] = replace(
        reference.get_rule("keras", "Lamb"), family="lamb-one-norm-for-all",
        elementwise=lambda hp: True)
    for family, (key, classes) in SHIFTS.items():
        for name in classes:
            _register(family, name, _shifted(reference.get_rule("keras", name), key, 1e-4))
    for name in ALL_CLASSES:
        _register("lr-not-float32", name, _learning_rate_as_given(reference.get_rule("keras", name)))

FAMILIES = list(PERTURBED)
