"""The `textbook` family: each optimizer as its original paper states it.

Hyperparameter names map onto Keras's (the paper's symbol is given in each
docstring); values are the configuration's, or Keras's defaults where the
configuration is silent, so that only the algorithm differs.  State is kept
in Keras's slots; where a paper keeps another form, the rule converts, and
says how, exactly (no rounding).  Where a paper leaves a choice open, `choices`
says what was chosen and why.
"""

from __future__ import annotations

from reference.arithmetic import sign, sqrt, square
from reference.rule import StateSpec, register, slots

FAMILY = "textbook"


@register(FAMILY, "SGD", defaults={"learning_rate": 0.01, "momentum": 0.0, "nesterov": False},
          states=lambda hp: slots("momentum") if hp["momentum"] else [],
          source="plain: Robbins and Monro 1951; momentum: Polyak 1964, eq. (9) "
                 "(heavy ball); Nesterov: Sutskever et al. 2013, eqs. (3)-(4), in the "
                 "form of Bengio et al. 2013, eq. (7)",
          choices="Heavy ball w_{t+1} = w_t - a g + b (w_t - w_{t-1}) keeps v = w_t - "
                  "w_{t-1}, which is Keras's momentum slot. Sutskever's Nesterov needs "
                  "the gradient at the look-ahead point w + mu v; Bengio et al.'s "
                  "reformulation stores the look-ahead point as the weights, which makes "
                  "it computable from the gradient at the stored weights.")
def sgd(ar, hp, s, g, t):
    """plain: w = w - lr * g.
    heavy ball (a = lr, b = momentum): v = b * v - a * g;  w = w + v.
    Nesterov, Bengio et al. form (mu = momentum, epsilon = lr), with the
    weights holding the look-ahead point Theta = theta + mu * v:
        v_new = mu * v - epsilon * g;  Theta = Theta - mu * v + (1 + mu) * v_new."""
    lr = ar.learning_rate(hp["learning_rate"])
    w = s["variable"]
    if not hp["momentum"]:
        return {"variable": w - lr * g}
    mu = ar.const(hp["momentum"])
    v = s["momentum"]
    v_new = mu * v - lr * g
    if hp["nesterov"]:
        return {"variable": w - mu * v + (1 + mu) * v_new, "momentum": v_new}
    return {"variable": w + v_new, "momentum": v_new}


@register(FAMILY, "Adagrad",
          defaults={"learning_rate": 0.001, "initial_accumulator_value": 0.1, "epsilon": 1e-7},
          states=lambda hp: slots("accumulator"),
          source="Duchi, Hazan and Singer 2011, JMLR 12, section 1, the diagonal update "
                 "x_{t+1} = x_t - eta diag(delta I + diag(G_t)^(1/2))^(-1) g_t",
          choices="G_t is the sum of the squared gradients so far, so it starts at 0 "
                  "(initial_accumulator_value is not part of the paper). delta is added "
                  "outside the square root, as the paper writes it; it takes Keras's "
                  "epsilon.")
def adagrad(ar, hp, s, g, t):
    """eta = lr, delta = epsilon;  G = G + g**2;  w = w - eta * g / (delta + sqrt(G))."""
    lr = ar.learning_rate(hp["learning_rate"])
    acc = s["accumulator"] + square(g)
    return {"variable": s["variable"] - lr * g / (ar.const(hp["epsilon"]) + sqrt(acc)),
            "accumulator": acc}


def _rmsprop_states(hp):
    return (slots("velocity") + (slots("momentum") if hp["momentum"] > 0 else [])
            + (slots("average_gradient") if hp["centered"] else []))


@register(FAMILY, "RMSprop",
          defaults={"learning_rate": 0.001, "rho": 0.9, "momentum": 0.0, "epsilon": 1e-7,
                    "centered": False},
          states=_rmsprop_states,
          source="plain: Tieleman and Hinton 2012, Neural Networks for Machine Learning, "
                 "lecture 6e, slide 29; centered with momentum: Graves 2013, "
                 "arXiv:1308.0850, eqs. (38)-(41)",
          choices="The lecture divides by sqrt(MeanSquare) with no epsilon at all; none is "
                  "added (a zero gradient on a zero mean square is then 0/0). Graves's "
                  "epsilon is inside the square root. Graves's update Delta is added to "
                  "the weights, Keras's momentum slot is subtracted: momentum = -Delta.")
def rmsprop(ar, hp, s, g, t):
    """plain: MeanSquare = rho * MeanSquare + (1 - rho) * g**2;  w = w - lr * g / sqrt(MeanSquare).
    Graves (aleph = rho, beth = momentum, gimel = lr, daleth = epsilon):
        n = aleph * n + (1 - aleph) * g**2;  gbar = aleph * gbar + (1 - aleph) * g;
        Delta = beth * Delta - gimel * g / sqrt(n - gbar**2 + daleth);  w = w + Delta."""
    lr = ar.learning_rate(hp["learning_rate"])
    rho = ar.const(hp["rho"])
    n = rho * s["velocity"] + (1 - rho) * square(g)
    out = {"velocity": n}
    if hp["centered"]:
        gbar = rho * s["average_gradient"] + (1 - rho) * g
        out["average_gradient"] = gbar
        scale = sqrt(n - square(gbar) + ar.const(hp["epsilon"]))
    else:
        scale = sqrt(n)
    step = lr * g / scale
    if hp["momentum"] > 0:
        delta = ar.const(hp["momentum"]) * -s["momentum"] - step
        out["momentum"] = -delta
        out["variable"] = s["variable"] + delta
    else:
        out["variable"] = s["variable"] - step
    return out


ADAM_DEFAULTS = {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7,
                 "amsgrad": False}


def _adam_moments(ar, hp, s, g, t):
    """Kingma and Ba 2015, Algorithm 1, lines 7-10."""
    b1, b2 = ar.const(hp["beta_1"]), ar.const(hp["beta_2"])
    m = b1 * s["momentum"] + (1 - b1) * g
    v = b2 * s["velocity"] + (1 - b2) * square(g)
    m_hat = m / (1 - b1 ** (t + 1))
    v_hat = v / (1 - b2 ** (t + 1))
    return m, v, m_hat / (sqrt(v_hat) + ar.const(hp["epsilon"]))


@register(FAMILY, "Adam", defaults=ADAM_DEFAULTS,
          states=lambda hp: slots("momentum", "velocity"),
          source="Kingma and Ba 2015, ICLR, Algorithm 1",
          choices="epsilon is added to sqrt(v_hat), the bias-corrected second moment, "
                  "as Algorithm 1 states (not the 'epsilon hat' of the last paragraph of "
                  "section 2).")
def adam(ar, hp, s, g, t):
    """alpha = lr;  m = beta_1 * m + (1 - beta_1) * g;  v = beta_2 * v + (1 - beta_2) * g**2;
    m_hat = m / (1 - beta_1**t);  v_hat = v / (1 - beta_2**t);
    w = w - alpha * m_hat / (sqrt(v_hat) + epsilon)."""
    m, v, direction = _adam_moments(ar, hp, s, g, t)
    lr = ar.learning_rate(hp["learning_rate"])
    return {"variable": s["variable"] - lr * direction, "momentum": m, "velocity": v}


@register(FAMILY, "AdamW", defaults={**ADAM_DEFAULTS, "weight_decay": 0.004},
          states=lambda hp: slots("momentum", "velocity"),
          source="Loshchilov and Hutter 2019, ICLR, Algorithm 2 (AdamW)",
          choices="The schedule multiplier eta_t of line 11 is 1 (a constant schedule), "
                  "so line 12 decays by lambda * theta per step, not by lr * lambda * "
                  "theta; lambda is Keras's weight_decay. Decay and step both use the "
                  "weights before the step, as line 12 writes them.")
def adamw(ar, hp, s, g, t):
    """alpha = lr, lambda = weight_decay, eta_t = 1 (schedule multiplier);
    m, v, m_hat, v_hat as in Adam (Algorithm 1);
    w = w - eta_t * (alpha * m_hat / (sqrt(v_hat) + epsilon) + lambda * w)."""
    m, v, direction = _adam_moments(ar, hp, s, g, t)
    lr = ar.learning_rate(hp["learning_rate"])
    eta = ar.const(1.0)
    w = s["variable"]
    w = w - eta * (lr * direction + ar.const(hp["weight_decay"]) * w)
    return {"variable": w, "momentum": m, "velocity": v}


NADAM_PSI = 0.004  # Dozat 2016: mu_t = beta_1 (1 - 0.5 * 0.96^(t/250))


@register(FAMILY, "Nadam", defaults={"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999,
                                      "epsilon": 1e-7},
          states=lambda hp: slots("momentum", "velocity")
          + [StateSpec("u_product", 1.0, per_variable=False)],
          source="Dozat 2016, ICLR workshop, 'Incorporating Nesterov Momentum into Adam', "
                 "Algorithm 2, with the momentum schedule mu_t = beta_1 (1 - 0.5 * "
                 "0.96^(t psi)), psi = 0.004 (i.e. 0.96^(t/250)) as published",
          choices="The running product of mu_i is Keras's u_product slot (an empty "
                  "product: 1).")
def nadam(ar, hp, s, g, t):
    """mu_t = beta_1 * (1 - 0.5 * 0.96**(t * psi)), psi = 0.004;
    prod_t = prod_{t-1} * mu_t;
    m = beta_1 * m + (1 - beta_1) * g;  n = beta_2 * n + (1 - beta_2) * g**2;
    m_bar = mu_{t+1} * m / (1 - prod_t * mu_{t+1}) + (1 - mu_t) * g / (1 - prod_t);
    n_hat = n / (1 - beta_2**t);  w = w - lr * m_bar / (sqrt(n_hat) + epsilon)."""
    lr = ar.learning_rate(hp["learning_rate"])
    b1, b2 = ar.const(hp["beta_1"]), ar.const(hp["beta_2"])
    psi, decay = ar.const(NADAM_PSI), ar.const(0.96)
    step = t + 1
    mu_t = b1 * (1 - 0.5 * decay ** (step * psi))
    mu_next = b1 * (1 - 0.5 * decay ** ((step + 1) * psi))
    prod = s["u_product"] * mu_t
    m = b1 * s["momentum"] + (1 - b1) * g
    n = b2 * s["velocity"] + (1 - b2) * square(g)
    m_bar = mu_next * m / (1 - prod * mu_next) + (1 - mu_t) * g / (1 - prod)
    n_hat = n / (1 - b2 ** step)
    w = s["variable"] - lr * m_bar / (sqrt(n_hat) + ar.const(hp["epsilon"]))
    return {"variable": w, "momentum": m, "velocity": n, "u_product": prod}


@register(FAMILY, "Lion", defaults={"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.99},
          states=lambda hp: slots("momentum"),
          source="Chen et al. 2023, NeurIPS, 'Symbolic Discovery of Optimization "
                 "Algorithms', Algorithm 2 (Lion), with lambda = 0")
def lion(ar, hp, s, g, t):
    """eta = lr;  c = beta_1 * m + (1 - beta_1) * g;  w = w - eta * (sign(c) + lambda * w);
    m = beta_2 * m + (1 - beta_2) * g   (lambda = 0: no weight decay configured)."""
    lr = ar.learning_rate(hp["learning_rate"])
    b1, b2 = ar.const(hp["beta_1"]), ar.const(hp["beta_2"])
    m = s["momentum"]
    w = s["variable"] - lr * sign(b1 * m + (1 - b1) * g)
    return {"variable": w, "momentum": b2 * m + (1 - b2) * g}
