"""The `keras` family: what Keras 3 computes, restated from the math.

Written from reading keras/src/optimizers/*.py (Keras 3.x) and the torch
backend's keras/src/backend/torch/optimizers/*.py, never by calling them.
Defaults, initial slot values and the order of the update are Keras's.  The
distinction between `ar.cast(x)` (Keras calls `ops.cast` on a Python float,
which the precision setting may round to float32) and `ar.const(x)` (a Python
float combined directly with a tensor) follows the source; the learning rate
always comes from Keras's float32 variable (`ar.learning_rate`).

Every optimizer also takes the base optimizer's `weight_decay`: Keras applies
w = w - w * wd * lr to the weights before the optimizer's own step
(`BaseOptimizer._apply_weight_decay`, called in `_backend_apply_gradients`).
"""

from __future__ import annotations

from reference.arithmetic import maximum, sign, sqrt, square
from reference.pieces import (adam_step_size, apply_with_momentum, decoupled_weight_decay,
                              ema_interpolate)
from reference.rule import StateSpec, register, slots

FAMILY = "keras"
SOURCE = "keras/src/optimizers/{}.py (Keras 3)"


def _keras_rule(class_name, *, defaults, states, module, choices=""):
    """Register a Keras rule with the base optimizer's weight decay in front."""
    defaults = {"weight_decay": None, **defaults}

    def wrap(core):
        def step(ar, hp, s, g, t):
            lr = ar.learning_rate(hp["learning_rate"])
            if hp["weight_decay"] is not None:
                s = {**s, "variable": decoupled_weight_decay(ar, s["variable"],
                                                             hp["weight_decay"], lr)}
            return core(ar, hp, s, g, t, lr)

        step.__doc__ = core.__doc__
        register(FAMILY, class_name, defaults=defaults, states=states,
                 source=SOURCE.format(module), choices=choices)(step)
        return core
    return wrap


@_keras_rule("SGD", defaults={"learning_rate": 0.01, "momentum": 0.0, "nesterov": False},
             states=lambda hp: slots("momentum") if hp["momentum"] != 0 else [],
             module="sgd")
def sgd(ar, hp, s, g, t, lr):
    """w = w - g * lr;  momentum: m = m * momentum - g * lr, then w = w + m;
    Nesterov: m = m * momentum - g * lr, then w = w + (m * momentum - g * lr)."""
    w = s["variable"]
    if hp["momentum"] == 0:
        return {"variable": w - g * lr}
    momentum = ar.cast(hp["momentum"])
    m = s["momentum"] * momentum - g * lr
    if hp["nesterov"]:
        return {"variable": w + (m * momentum - g * lr), "momentum": m}
    return {"variable": w + m, "momentum": m}


@_keras_rule("Adagrad",
             defaults={"learning_rate": 0.001, "initial_accumulator_value": 0.1,
                       "epsilon": 1e-7},
             states=lambda hp: [StateSpec("accumulator", hp["initial_accumulator_value"],
                                          initial_via_cast=True)],
             module="adagrad")
def adagrad(ar, hp, s, g, t, lr):
    """accumulator starts at initial_accumulator_value (0.1);
    accumulator = accumulator + g**2;  w = w - (lr * g) / sqrt(accumulator + e)."""
    acc = s["accumulator"] + square(g)
    return {"variable": s["variable"] - (lr * g) / sqrt(acc + ar.const(hp["epsilon"])),
            "accumulator": acc}


@_keras_rule("RMSprop",
             defaults={"learning_rate": 0.001, "rho": 0.9, "momentum": 0.0, "epsilon": 1e-7,
                       "centered": False},
             states=lambda hp: slots("velocity")
             + (slots("momentum") if hp["momentum"] > 0 else [])
             + (slots("average_gradient") if hp["centered"] else []),
             module="rmsprop")
def rmsprop(ar, hp, s, g, t, lr):
    """v = rho * v + (1 - rho) * g**2;
    centered: average_grad = rho * average_grad + (1 - rho) * g,
              denominator = v - average_grad**2 + e;  otherwise denominator = v + e;
    increment = lr * g / sqrt(denominator);
    momentum: m = momentum * m + increment, w = w - m;  otherwise w = w - increment."""
    rho, one_minus_rho = ar.const(hp["rho"]), ar.const(1 - hp["rho"])
    e = ar.const(hp["epsilon"])
    out = {}
    v = rho * s["velocity"] + one_minus_rho * square(g)
    out["velocity"] = v
    if hp["centered"]:
        avg = rho * s["average_gradient"] + one_minus_rho * g
        out["average_gradient"] = avg
        denominator = v - square(avg) + e
    else:
        denominator = v + e
    increment = lr * g / sqrt(denominator)
    with_momentum = hp["momentum"] > 0
    out.update(apply_with_momentum(s["variable"], increment,
                                   s["momentum"] if with_momentum else None,
                                   ar.const(hp["momentum"]) if with_momentum else None))
    return out


ADAM_DEFAULTS = {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7,
                 "amsgrad": False}


def _adam(ar, hp, s, g, t, lr):
    """local_step = t + 1;  alpha = lr * sqrt(1 - beta_2**local_step) / (1 - beta_1**local_step);
    m = m + (g - m) * (1 - beta_1);  v = v + (g**2 - v) * (1 - beta_2);
    amsgrad: v_hat = max(v_hat, v), used in place of v;
    w = w - (m * alpha) / (sqrt(v) + e)."""
    alpha = adam_step_size(lr, ar.cast(hp["beta_1"]), ar.cast(hp["beta_2"]), t + 1)
    m = ema_interpolate(s["momentum"], g, ar.const(1 - hp["beta_1"]))
    v = ema_interpolate(s["velocity"], square(g), ar.const(1 - hp["beta_2"]))
    out = {"momentum": m, "velocity": v}
    if hp["amsgrad"]:
        v = maximum(s["velocity_hat"], v)
        out["velocity_hat"] = v
    out["variable"] = s["variable"] - (m * alpha) / (sqrt(v) + ar.const(hp["epsilon"]))
    return out


def _adam_states(hp):
    return slots("momentum", "velocity") + (slots("velocity_hat") if hp["amsgrad"] else [])


_keras_rule("Adam", defaults=ADAM_DEFAULTS, states=_adam_states, module="adam")(_adam)
_keras_rule("AdamW", defaults={**ADAM_DEFAULTS, "weight_decay": 0.004}, states=_adam_states,
            module="adamw",
            choices="AdamW is Adam with the base optimizer's weight decay, whose "
                    "default is 0.004.")(_adam)


@_keras_rule("Nadam", defaults={"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999,
                                "epsilon": 1e-7},
             states=lambda hp: slots("momentum", "velocity")
             + [StateSpec("u_product", 1.0, per_variable=False)],
             module="nadam",
             choices="u_product is updated once per step, before the per-variable "
                     "updates, with a Python-float 0.96 (Nadam._backend_update_step); "
                     "the per-variable u_t uses ops.cast(0.96).")
def nadam(ar, hp, s, g, t, lr):
    """u_product = u_product * beta_1 * (1 - 0.5 * 0.96**(t+1))   (once per step);
    u_t = beta_1 * (1 - 0.5 * decay**(t+1));  u_t_1 = beta_1 * (1 - 0.5 * decay**(t+2));
    u_product_t_1 = u_product * u_t_1;
    m = m + (g - m) * (1 - beta_1);  v = v + (g**2 - v) * (1 - beta_2);
    m_hat = (u_t_1 * m) / (1 - u_product_t_1) + ((1 - u_t) * g) / (1 - u_product);
    v_hat = v / (1 - beta_2**(t+1));  w = w - (m_hat * lr) / (sqrt(v_hat) + e)."""
    local_step, next_step = t + 1, t + 2
    u_product_t = s["u_product"] * ar.const(hp["beta_1"]) * (
        1.0 - 0.5 * ar.const(0.96) ** local_step)
    decay = ar.cast(0.96)
    b1, b2 = ar.cast(hp["beta_1"]), ar.cast(hp["beta_2"])
    u_t = b1 * (1.0 - 0.5 * decay ** local_step)
    u_t_1 = b1 * (1.0 - 0.5 * decay ** next_step)
    u_product_t_1 = u_product_t * u_t_1
    m = ema_interpolate(s["momentum"], g, 1 - b1)
    v = ema_interpolate(s["velocity"], square(g), 1 - b2)
    m_hat = (u_t_1 * m) / (1 - u_product_t_1) + ((1 - u_t) * g) / (1 - u_product_t)
    v_hat = v / (1 - b2 ** local_step)
    w = s["variable"] - (m_hat * lr) / (sqrt(v_hat) + ar.const(hp["epsilon"]))
    return {"variable": w, "momentum": m, "velocity": v, "u_product": u_product_t}


@_keras_rule("Lion", defaults={"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.99},
             states=lambda hp: slots("momentum"), module="lion")
def lion(ar, hp, s, g, t, lr):
    """w = w - lr * sign(m * beta_1 + g * (1 - beta_1));
    m = m * beta_2 + g * (1 - beta_2)."""
    b1, b2 = ar.cast(hp["beta_1"]), ar.cast(hp["beta_2"])
    m = s["momentum"]
    w = s["variable"] - lr * sign(m * b1 + g * (1.0 - b1))
    return {"variable": w, "momentum": m * b2 + g * (1.0 - b2)}
