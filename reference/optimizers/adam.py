"""Adam and AdamW.

Keras: keras/src/optimizers/adam.py, adamw.py (AdamW is Adam with the base
optimizer's weight decay, reference/base.py).  Papers: Kingma and Ba 2015,
ICLR, Algorithm 1 and section 2; Loshchilov and Hutter 2019, ICLR,
Algorithm 2; with amsgrad, Reddi, Kale and Kumar 2018, ICLR, "On the
Convergence of Adam and Beyond", Algorithm 2 (AMSGrad).
"""

from __future__ import annotations

from reference.arithmetic import maximum, square
from reference.optimizer import Optimizer, Point
from reference.pieces import (adam_step_size, ema, hyperparameter, moving_average_form,
                              one_minus, root)
from reference.rule import slots

DEFAULTS = {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7,
            "amsgrad": False}
ADAMW_DEFAULTS = {**DEFAULTS, "weight_decay": 0.004}

PIECES = {
    # "hat": the bias corrections folded into the step size, so that epsilon is
    # added to sqrt(v) (Kingma and Ba, end of section 2); "plain": epsilon is
    # added to sqrt(v_hat) (Algorithm 1)
    "epsilon": ("hat", "plain"),
    # "none": no epsilon at all (Reddi et al.'s Algorithm 2)
    "epsilon_placement": ("outside", "inside", "none"),
    "bias_correction": ("on", "off"),
    # AdamW's decay, in Keras's base pipeline (reference/base.py)
    "decay_scale": ("lr", "schedule"),
    "decay_order": ("before_step", "after_step"),
    # where the decay is written: Keras's base optimizer; the article's line
    # before the step; Loshchilov and Hutter's line 12, one expression with the step
    "decay_form": ("base_optimizer", "article", "algorithm_2"),
    "ema": ("interpolate", "weighted"),
    # precision: the betas of the step size through ops.cast (Keras) or as
    # Python floats, and 1 - beta as a Python float (Keras) or in the dtype
    "hyperparameters": ("ops.cast", "python"),
    "one_minus_beta": ("python", "tensor"),
}


def states(hp, c):
    return slots("momentum", "velocity") + (slots("velocity_hat") if hp["amsgrad"] else [])


def update(ar, hp, c, s, g, t, lr):
    b1 = hyperparameter(ar, hp["beta_1"], c["hyperparameters"])
    b2 = hyperparameter(ar, hp["beta_2"], c["hyperparameters"])
    e = ar.const(hp["epsilon"])
    w = s["variable"]
    decay = hp.get("weight_decay")
    if decay is not None and c["decay_form"] == "article":
        w = w - ar.const(decay) * lr * w
    local_step = t + 1
    form = moving_average_form(ar, c["ema"])
    m = ema(form, s["momentum"], g, b1, one_minus(ar, hp["beta_1"], b1, c["one_minus_beta"]))
    v = ema(form, s["velocity"], square(g), b2,
            one_minus(ar, hp["beta_2"], b2, c["one_minus_beta"]))
    out = {"momentum": m, "velocity": v}
    if hp["amsgrad"]:
        v = maximum(s["velocity_hat"], v)
        out["velocity_hat"] = v
    on = c["bias_correction"] == "on"
    if c["epsilon"] == "hat":  # the bias corrections folded into the step size
        alpha = adam_step_size(lr, b1, b2, local_step) if on else lr
        step = (m * alpha) / root(c["epsilon_placement"], v, e)
    else:  # Algorithm 1: epsilon added to sqrt(v_hat)
        m_hat = m / (1 - b1 ** local_step) if on else m
        v_hat = v / (1 - b2 ** local_step) if on else v
        direction = m_hat / root(c["epsilon_placement"], v_hat, e)
        if decay is not None and c["decay_form"] == "algorithm_2":
            # line 12: w = w - eta_t * (alpha * direction + lambda * w), eta_t = 1
            out["variable"] = w - ar.const(1.0) * (lr * direction + ar.const(decay) * w)
            return out
        step = lr * direction
    out["variable"] = w - step
    return out


KERAS_CHOICES = {"epsilon": "hat", "epsilon_placement": "outside", "bias_correction": "on",
                 "decay_scale": "lr", "decay_order": "before_step",
                 "decay_form": "base_optimizer", "ema": "interpolate",
                 "hyperparameters": "ops.cast", "one_minus_beta": "python"}
TEXTBOOK_CHOICES = {"epsilon": "plain", "epsilon_placement": "outside", "bias_correction": "on",
                    "decay_scale": "schedule", "decay_order": "before_step",
                    "decay_form": "algorithm_2", "ema": "weighted",
                    "hyperparameters": "python", "one_minus_beta": "tensor"}
# Reddi et al. 2018, Algorithm 2, with constant alpha_t = lr and beta_1t = beta_1:
# no debiasing and no epsilon, x = x - alpha_t m / sqrt(v_hat) (without either, epsilon
# "hat" and "plain" are one formula; "hat" keeps explain from naming it)
AMSGRAD_CHOICES = {**TEXTBOOK_CHOICES, "epsilon": "hat", "epsilon_placement": "none",
                   "bias_correction": "off"}
ARTICLE_CHOICES = {**KERAS_CHOICES, "decay_form": "article", "hyperparameters": "python",
                   "one_minus_beta": "tensor"}

KERAS_DOC = """local_step = t + 1;  alpha = lr * sqrt(1 - beta_2**local_step) / (1 - beta_1**local_step);
    m = m + (g - m) * (1 - beta_1);  v = v + (g**2 - v) * (1 - beta_2);
    amsgrad: v_hat = max(v_hat, v), used in place of v;
    w = w - (m * alpha) / (sqrt(v) + e)."""
ARTICLE_DOC = """local_step = t + 1;  alpha = lr * sqrt(1 - beta_2**local_step) / (1 - beta_1**local_step);
    m = m + (1 - beta_1) * (g - m);  v = v + (1 - beta_2) * (g**2 - v);
    w = w - (alpha * m) / (sqrt(v) + e)."""


def _no_amsgrad(who):
    return lambda hp: f"{who} does not give amsgrad" if hp["amsgrad"] else None


ADAM = Optimizer(
    "Adam", DEFAULTS, PIECES, states, update, {
        "keras": Point(KERAS_CHOICES, source="keras/src/optimizers/adam.py (Keras 3)",
                       doc=KERAS_DOC, keras_base=True),
        "textbook": Point(
            lambda hp: AMSGRAD_CHOICES if hp["amsgrad"] else TEXTBOOK_CHOICES,
            source="Kingma and Ba 2015, ICLR, Algorithm 1; with amsgrad: Reddi, Kale and "
                   "Kumar 2018, ICLR, 'On the Convergence of Adam and Beyond', Algorithm 2 "
                   "(AMSGrad)",
            doc="""alpha = lr;  m = beta_1 * m + (1 - beta_1) * g;  v = beta_2 * v + (1 - beta_2) * g**2;
    m_hat = m / (1 - beta_1**t);  v_hat = v / (1 - beta_2**t);
    w = w - alpha * m_hat / (sqrt(v_hat) + epsilon).
    AMSGrad (Reddi et al. Algorithm 2): m and v as above;  v_hat = max(v_hat, v);
    w = w - alpha_t * m / sqrt(v_hat).""",
            notes="epsilon is added to sqrt(v_hat), the bias-corrected second moment, "
                  "as Algorithm 1 states (not the 'epsilon hat' of the last paragraph of "
                  "section 2). AMSGrad: Algorithm 2 takes sequences alpha_t and beta_1t; "
                  "they are the constants lr and beta_1, as Keras has them (the "
                  "convergence analysis of section 4 decays both). It has no debiasing "
                  "and no epsilon (where v_hat "
                  "is 0, a zero gradient from the start, the step is 0/0), and the "
                  "projection onto F is the identity (unconstrained weights). v_hat is "
                  "Keras's velocity_hat slot. A weight_decay takes Loshchilov and "
                  "Hutter's Algorithm 2, line 12 (AdamW), as Keras's Adam decays as AdamW.",
            unstated=lambda hp: ("Reddi et al.'s Algorithm 2 states no weight decay"
                                 if hp["amsgrad"] and hp.get("weight_decay") is not None
                                 else None),
            textbook_base=True),
        "article": Point(ARTICLE_CHOICES, source="shared/article.md, section Adam",
                         doc=ARTICLE_DOC, unstated=_no_amsgrad("the article")),
    },
    explained=("epsilon", "epsilon_placement", "bias_correction"))

ADAMW = Optimizer(
    "AdamW", ADAMW_DEFAULTS, PIECES, states, update, {
        "keras": Point(KERAS_CHOICES, source="keras/src/optimizers/adamw.py (Keras 3)",
                       doc=KERAS_DOC, keras_base=True,
                       notes="AdamW is Adam with the base optimizer's weight decay, whose "
                             "default is 0.004."),
        "textbook": Point(
            TEXTBOOK_CHOICES, source="Loshchilov and Hutter 2019, ICLR, Algorithm 2 (AdamW)",
            doc="""alpha = lr, lambda = weight_decay, eta_t = 1 (schedule multiplier);
    m, v, m_hat, v_hat as in Adam (Algorithm 1);
    w = w - eta_t * (alpha * m_hat / (sqrt(v_hat) + epsilon) + lambda * w).""",
            notes="The schedule multiplier eta_t of line 11 is 1 (a constant schedule), "
                  "so line 12 decays by lambda * theta per step, not by lr * lambda * "
                  "theta; lambda is Keras's weight_decay. Decay and step both use the "
                  "weights before the step, as line 12 writes them.",
            unstated=_no_amsgrad("Loshchilov and Hutter's Algorithm 2"),
            textbook_base=True),
        "article": Point(
            ARTICLE_CHOICES, source="shared/article.md, section AdamW",
            doc="w = w - weight_decay * lr * w, then the Adam step.",
            notes="The article gives the decay line but not when it happens relative "
                  "to the Adam step; it is applied first, to the weights before the "
                  "step (as in Loshchilov and Hutter's Algorithm 2, line 12).",
            unstated=_no_amsgrad("the article")),
    },
    explained=("epsilon", "epsilon_placement", "bias_correction", "decay_scale",
               "decay_order"))
