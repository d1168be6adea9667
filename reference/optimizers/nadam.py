"""Nadam.

Keras: keras/src/optimizers/nadam.py.  Paper: Dozat 2016, ICLR workshop,
"Incorporating Nesterov Momentum into Adam", Algorithm 2.
"""

from __future__ import annotations

from reference.arithmetic import sqrt, square
from reference.optimizer import Optimizer, Point
from reference.pieces import ema, hyperparameter, moving_average_form
from reference.rule import StateSpec, slots

DEFAULTS = {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7}
PSI = 0.004  # Dozat 2016: mu_t = beta_1 (1 - 0.5 * 0.96^(t psi)), i.e. 0.96^(t/250)

PIECES = {
    # the exponent of the momentum schedule: 0.96^(t psi)
    "schedule_psi": ("1", "0.004"),
    # the beta of mu_{t+1} (the article writes beta_2)
    "u_t_1_beta": ("beta_1", "beta_2"),
    "u_product_init": ("1", "0"),
    # the running product: (u_product * beta_1) * (1 - 0.5 * 0.96^t) as Keras's
    # _backend_update_step writes it, or u_product * mu_t
    "u_product_update": ("times_beta_then_factor", "times_mu"),
    "ema": ("interpolate", "weighted"),
    # precision: the betas and 0.96 of the per-variable update through
    # ops.cast (Keras) or as Python floats
    "hyperparameters": ("ops.cast", "python"),
}


def states(hp, c):
    return slots("momentum", "velocity") + [
        StateSpec("u_product", float(c["u_product_init"]), per_variable=False)]


def _mu(beta, decay, step, c):
    """mu_t = beta * (1 - 0.5 * 0.96^(t psi))."""
    exponent = step if c["schedule_psi"] == "1" else step * beta.ar.const(PSI)
    return beta * (1.0 - 0.5 * decay ** exponent)


def prepare(ar, hp, c, state, grads, t):
    """u_product = u_product * mu_{t+1}, once per step, with Python-float constants."""
    b1, decay = ar.const(hp["beta_1"]), ar.const(0.96)
    if c["u_product_update"] == "times_mu":
        return {"u_product": state["u_product"] * _mu(b1, decay, t + 1, c)}
    exponent = t + 1 if c["schedule_psi"] == "1" else (t + 1) * ar.const(PSI)
    return {"u_product": state["u_product"] * b1 * (1.0 - 0.5 * decay ** exponent)}


def update(ar, hp, c, s, g, t, lr):
    local_step, next_step = t + 1, t + 2
    decay = hyperparameter(ar, 0.96, c["hyperparameters"])
    b1 = hyperparameter(ar, hp["beta_1"], c["hyperparameters"])
    b2 = hyperparameter(ar, hp["beta_2"], c["hyperparameters"])
    u_product_t = s["u_product"]
    u_t = _mu(b1, decay, local_step, c)
    u_t_1 = _mu(b1 if c["u_t_1_beta"] == "beta_1" else b2, decay, next_step, c)
    u_product_t_1 = u_product_t * u_t_1
    form = moving_average_form(ar, c["ema"])
    m = ema(form, s["momentum"], g, b1, 1 - b1)
    v = ema(form, s["velocity"], square(g), b2, 1 - b2)
    m_hat = (u_t_1 * m) / (1 - u_product_t_1) + ((1 - u_t) * g) / (1 - u_product_t)
    v_hat = v / (1 - b2 ** local_step)
    w = s["variable"] - (m_hat * lr) / (sqrt(v_hat) + ar.const(hp["epsilon"]))
    return {"variable": w, "momentum": m, "velocity": v}


NADAM = Optimizer(
    "Nadam", DEFAULTS, PIECES, states, update, {
        "keras": Point(
            {"schedule_psi": "1", "u_t_1_beta": "beta_1", "u_product_init": "1",
             "u_product_update": "times_beta_then_factor", "ema": "interpolate",
             "hyperparameters": "ops.cast"},
            source="keras/src/optimizers/nadam.py (Keras 3)",
            doc="""u_product = u_product * beta_1 * (1 - 0.5 * 0.96**(t+1))   (once per step);
    u_t = beta_1 * (1 - 0.5 * decay**(t+1));  u_t_1 = beta_1 * (1 - 0.5 * decay**(t+2));
    u_product_t_1 = u_product * u_t_1;
    m = m + (g - m) * (1 - beta_1);  v = v + (g**2 - v) * (1 - beta_2);
    m_hat = (u_t_1 * m) / (1 - u_product_t_1) + ((1 - u_t) * g) / (1 - u_product);
    v_hat = v / (1 - beta_2**(t+1));  w = w - (m_hat * lr) / (sqrt(v_hat) + e).""",
            notes="u_product is updated once per step, before the per-variable "
                  "updates, with a Python-float 0.96 (Nadam._backend_update_step); "
                  "the per-variable u_t uses ops.cast(0.96).",
            keras_base=True),
        "textbook": Point(
            {"schedule_psi": "0.004", "u_t_1_beta": "beta_1", "u_product_init": "1",
             "u_product_update": "times_mu", "ema": "weighted", "hyperparameters": "python"},
            source="Dozat 2016, ICLR workshop, 'Incorporating Nesterov Momentum into Adam', "
                   "Algorithm 2, with the momentum schedule mu_t = beta_1 (1 - 0.5 * "
                   "0.96^(t psi)), psi = 0.004 (i.e. 0.96^(t/250)) as published",
            doc="""mu_t = beta_1 * (1 - 0.5 * 0.96**(t * psi)), psi = 0.004;
    prod_t = prod_{t-1} * mu_t;
    m = beta_1 * m + (1 - beta_1) * g;  n = beta_2 * n + (1 - beta_2) * g**2;
    m_bar = mu_{t+1} * m / (1 - prod_t * mu_{t+1}) + (1 - mu_t) * g / (1 - prod_t);
    n_hat = n / (1 - beta_2**t);  w = w - lr * m_bar / (sqrt(n_hat) + epsilon).""",
            notes="The running product of mu_i is Keras's u_product slot (an empty "
                  "product: 1). Algorithm 2 as printed has n_hat = nu * n_t / (1 - nu^t); "
                  "the factor nu (beta_2) is read as a misprint and left out, n_hat = "
                  "n_t / (1 - nu^t): it is not in the bias correction of Adam's "
                  "Algorithm 1 (Kingma and Ba 2015), which the algorithm otherwise "
                  "follows, and it would scale every step by 1/sqrt(nu).",
            textbook_base=True),
        "article": Point(
            {"schedule_psi": "1", "u_t_1_beta": "beta_2", "u_product_init": "0",
             "u_product_update": "times_beta_then_factor", "ema": "interpolate",
             "hyperparameters": "python"},
            source="shared/article.md, section Nadam",
            doc="""decay = 0.96;  u_t = beta_1 * (1 - 0.5 * decay**(t+1));
    u_t_1 = beta_2 * (1 - 0.5 * decay**(t+2));
    u_product_t = u_product_t * beta_1 * (1 - 0.5 * decay**(t+1));
    u_product_t_1 = u_product_t * u_t_1;  beta_2_power = beta_2**(t+1);
    m = m + (1 - beta_1) * (g - m);  v = v + (1 - beta_2) * (g**2 - v);
    m_hat = u_t_1 * m / (1 - u_product_t_1) + ((1 - u_t) * g) / (1 - u_product_t);
    v_hat = v / (1 - beta_2_power);  w = w - (lr * m_hat) / (sqrt(v_hat) + epsilon).""",
            notes="u_product_t has no stated initial value, so it starts at zero; "
                  "u_t_1 uses beta_2 as written."),
    },
    explained=("schedule_psi", "u_t_1_beta", "u_product_init"), prepare=prepare)
