"""The `article` family: the formulas exactly as shared/article.md writes them.

Nothing here is corrected.  State starts at zero unless the article says
otherwise; hyperparameters the article leaves unstated take Keras's defaults.
Where the article does not fix an order of operations, the rule's `choices`
says what was chosen.  Notation follows the article: lr, g, e, w, t (the
iteration count before the step, Keras's `iterations`).
"""

from __future__ import annotations

from reference.arithmetic import sign, sqrt, square
from reference.rule import StateSpec, Unsupported, register, slots

FAMILY = "article"
SOURCE = "shared/article.md"


@register(FAMILY, "SGD", defaults={"learning_rate": 0.01, "momentum": 0.0, "nesterov": False},
          states=lambda hp: slots("momentum") if hp["momentum"] else [],
          source=SOURCE + ", section SGD",
          choices="With momentum and without Nesterov the article gives only "
                  "m = momentum * m - lr * g and no weight update, so the weights stay "
                  "as they are. In the Nesterov form, the second line uses the m just "
                  "updated by the first (reading top to bottom).")
def sgd(ar, hp, s, g, t):
    """w = w - lr * g;  with momentum: m = momentum * m - lr * g;
    Nesterov: m = momentum * m - lr * g;  w = w + (momentum * m - lr * g)."""
    lr = ar.learning_rate(hp["learning_rate"])
    w = s["variable"]
    if not hp["momentum"]:
        return {"variable": w - lr * g}
    momentum = ar.const(hp["momentum"])
    m = momentum * s["momentum"] - lr * g
    if hp["nesterov"]:
        return {"variable": w + (momentum * m - lr * g), "momentum": m}
    return {"variable": w, "momentum": m}


@register(FAMILY, "Adagrad",
          defaults={"learning_rate": 0.001, "initial_accumulator_value": 0.1, "epsilon": 1e-7},
          states=lambda hp: slots("accumulator"),
          source=SOURCE + ", section Adagrad",
          choices="The article states no initial accumulator, so it starts at zero "
                  "(initial_accumulator_value is not used by the article's formula).")
def adagrad(ar, hp, s, g, t):
    """accumulator = accumulator + g**2;  w = w - (lr * g) / sqrt(accumulator + e)."""
    lr = ar.learning_rate(hp["learning_rate"])
    acc = s["accumulator"] + square(g)
    return {"variable": s["variable"] - (lr * g) / sqrt(acc + ar.const(hp["epsilon"])),
            "accumulator": acc}


def _rmsprop_states(hp):
    if hp["centered"] != (hp["momentum"] > 0):
        raise Unsupported("the article gives RMSprop only plain, or with momentum and "
                          "centered together")
    if hp["centered"]:
        return slots("velocity", "momentum", "average_gradient")
    return slots("velocity")


@register(FAMILY, "RMSprop",
          defaults={"learning_rate": 0.001, "rho": 0.9, "momentum": 0.0, "epsilon": 1e-7,
                    "centered": False},
          states=_rmsprop_states,
          source=SOURCE + ", section RMSprop",
          choices="The centered form updates v, then average_grad, then m, then w, "
                  "in the order written.")
def rmsprop(ar, hp, s, g, t):
    """v = rho * v + (1 - rho) * g**2;  w = w - lr * g / sqrt(v + e);
    momentum and centered: average_grad = rho * average_grad + (1 - rho) * g;
    m = momentum * m + (lr * g) / sqrt(v - average_grad**2 + e);  w = w - m."""
    _rmsprop_states(hp)
    lr = ar.learning_rate(hp["learning_rate"])
    rho, e = ar.const(hp["rho"]), ar.const(hp["epsilon"])
    v = rho * s["velocity"] + (1 - rho) * square(g)
    if not hp["centered"]:
        return {"variable": s["variable"] - lr * g / sqrt(v + e), "velocity": v}
    avg = rho * s["average_gradient"] + (1 - rho) * g
    m = ar.const(hp["momentum"]) * s["momentum"] + (lr * g) / sqrt(v - square(avg) + e)
    return {"variable": s["variable"] - m, "velocity": v, "momentum": m,
            "average_gradient": avg}


ADAM_DEFAULTS = {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7,
                 "amsgrad": False}


def _adam(ar, hp, s, g, t, w):
    if hp["amsgrad"]:
        raise Unsupported("the article does not give amsgrad")
    lr = ar.learning_rate(hp["learning_rate"])
    b1, b2 = ar.const(hp["beta_1"]), ar.const(hp["beta_2"])
    local_step = t + 1
    alpha = lr * sqrt(1 - b2 ** local_step) / (1 - b1 ** local_step)
    m = s["momentum"] + (1 - b1) * (g - s["momentum"])
    v = s["velocity"] + (1 - b2) * (square(g) - s["velocity"])
    w = w - (alpha * m) / (sqrt(v) + ar.const(hp["epsilon"]))
    return {"variable": w, "momentum": m, "velocity": v}


@register(FAMILY, "Adam", defaults=ADAM_DEFAULTS,
          states=lambda hp: slots("momentum", "velocity"),
          source=SOURCE + ", section Adam")
def adam(ar, hp, s, g, t):
    """local_step = t + 1;  alpha = lr * sqrt(1 - beta_2**local_step) / (1 - beta_1**local_step);
    m = m + (1 - beta_1) * (g - m);  v = v + (1 - beta_2) * (g**2 - v);
    w = w - (alpha * m) / (sqrt(v) + e)."""
    return _adam(ar, hp, s, g, t, s["variable"])


@register(FAMILY, "AdamW", defaults={**ADAM_DEFAULTS, "weight_decay": 0.004},
          states=lambda hp: slots("momentum", "velocity"),
          source=SOURCE + ", section AdamW",
          choices="The article gives the decay line but not when it happens relative "
                  "to the Adam step; it is applied first, to the weights before the "
                  "step (as in Loshchilov and Hutter's Algorithm 2, line 12).")
def adamw(ar, hp, s, g, t):
    """w = w - weight_decay * lr * w, then the Adam step."""
    lr = ar.learning_rate(hp["learning_rate"])
    w = s["variable"]
    w = w - ar.const(hp["weight_decay"]) * lr * w
    return _adam(ar, hp, s, g, t, w)


@register(FAMILY, "Nadam", defaults={"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999,
                                      "epsilon": 1e-7},
          states=lambda hp: slots("momentum", "velocity")
          + [StateSpec("u_product", 0.0, per_variable=False)],
          source=SOURCE + ", section Nadam",
          choices="u_product_t has no stated initial value, so it starts at zero; "
                  "u_t_1 uses beta_2 as written.")
def nadam(ar, hp, s, g, t):
    """decay = 0.96;  u_t = beta_1 * (1 - 0.5 * decay**(t+1));
    u_t_1 = beta_2 * (1 - 0.5 * decay**(t+2));
    u_product_t = u_product_t * beta_1 * (1 - 0.5 * decay**(t+1));
    u_product_t_1 = u_product_t * u_t_1;  beta_2_power = beta_2**(t+1);
    m = m + (1 - beta_1) * (g - m);  v = v + (1 - beta_2) * (g**2 - v);
    m_hat = u_t_1 * m / (1 - u_product_t_1) + ((1 - u_t) * g) / (1 - u_product_t);
    v_hat = v / (1 - beta_2_power);  w = w - (lr * m_hat) / (sqrt(v_hat) + epsilon)."""
    lr = ar.learning_rate(hp["learning_rate"])
    b1, b2 = ar.const(hp["beta_1"]), ar.const(hp["beta_2"])
    decay = ar.const(0.96)
    local_step, next_step = t + 1, t + 2
    u_t = b1 * (1 - 0.5 * decay ** local_step)
    u_t_1 = b2 * (1 - 0.5 * decay ** next_step)
    u_product_t = s["u_product"] * b1 * (1 - 0.5 * decay ** local_step)
    u_product_t_1 = u_product_t * u_t_1
    beta_2_power = b2 ** local_step
    m = s["momentum"] + (1 - b1) * (g - s["momentum"])
    v = s["velocity"] + (1 - b2) * (square(g) - s["velocity"])
    m_hat = u_t_1 * m / (1 - u_product_t_1) + ((1 - u_t) * g) / (1 - u_product_t)
    v_hat = v / (1 - beta_2_power)
    w = s["variable"] - (lr * m_hat) / (sqrt(v_hat) + ar.const(hp["epsilon"]))
    return {"variable": w, "momentum": m, "velocity": v, "u_product": u_product_t}


@register(FAMILY, "Lion", defaults={"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.99},
          states=lambda hp: slots("momentum"),
          source=SOURCE + ", section Lion")
def lion(ar, hp, s, g, t):
    """w = w - lr * sign(beta_1 * m + (1 - beta_1) * g);  m = beta_2 * m + (1 - beta_2) * g."""
    lr = ar.learning_rate(hp["learning_rate"])
    b1, b2 = ar.const(hp["beta_1"]), ar.const(hp["beta_2"])
    m = s["momentum"]
    w = s["variable"] - lr * sign(b1 * m + (1 - b1) * g)
    return {"variable": w, "momentum": b2 * m + (1 - b2) * g}
