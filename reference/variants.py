"""Variant spaces: each optimizer as a combination of swappable named pieces.

A point of a space is a dict {piece: option}.  `build(class_name, choices)`
returns a step function over Keras's state names, so every variant can be
compared with real Keras in lockstep.  Each space names the point its paper
states (`textbook`) and the point Keras's source states (`keras`); `verify
explain` runs every point and reports which ones reproduce Keras.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from reference.arithmetic import sign, sqrt, square
from reference.pieces import apply_with_momentum, eps_inside_sqrt, eps_outside_sqrt
from reference.rule import REGISTRY, Rule, StateSpec, slots


@dataclass(frozen=True)
class Space:
    class_name: str
    pieces: dict          # piece -> tuple of options (first: Keras's)
    textbook: object      # the paper's choices (or hyperparameters -> choices)
    keras: dict           # Keras's choices
    states: object        # hp, choices -> list of StateSpec
    step: object          # choices -> step(ar, hp, s, g, t)
    defaults: dict

    def paper(self, config: dict) -> dict:
        """The paper's point for a configuration (`textbook` may depend on it)."""
        if callable(self.textbook):
            return self.textbook({**self.defaults, **config})
        return self.textbook

    def points(self):
        names = list(self.pieces)
        for values in itertools.product(*(self.pieces[n] for n in names)):
            yield dict(zip(names, values))


def name_of(choices: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in choices.items())


# --- Adam and AdamW ------------------------------------------------------------
ADAM_DEFAULTS = {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7,
                 "amsgrad": False, "weight_decay": None}


def _adam_step(c):
    def step(ar, hp, s, g, t):
        lr = ar.learning_rate(hp["learning_rate"])
        b1, b2 = ar.const(hp["beta_1"]), ar.const(hp["beta_2"])
        e = ar.const(hp["epsilon"])
        w = s["variable"]
        wd = hp.get("weight_decay")
        decay = None
        if wd:
            decay = ar.const(wd) * (lr if c["decay_scale"] == "lr" else ar.const(1.0))
            if c["decay_order"] == "before_step":
                w = w - decay * w
        m = b1 * s["momentum"] + (1 - b1) * g
        v = b2 * s["velocity"] + (1 - b2) * square(g)
        on = c["bias_correction"] == "on"
        c1 = (1 - b1 ** (t + 1)) if on else ar.const(1.0)
        c2 = (1 - b2 ** (t + 1)) if on else ar.const(1.0)
        if c["epsilon"] == "hat":   # Kingma and Ba, end of section 2
            alpha = lr * sqrt(c2) / c1
            den = sqrt(v + e) if c["epsilon_placement"] == "inside" else sqrt(v) + e
            update = alpha * m / den
        else:                       # Algorithm 1 as written
            v_hat = v / c2
            den = sqrt(v_hat + e) if c["epsilon_placement"] == "inside" else sqrt(v_hat) + e
            update = lr * (m / c1) / den
        w_new = w - update
        if decay is not None and c["decay_order"] == "after_step":
            w_new = w_new - decay * w_new
        return {"variable": w_new, "momentum": m, "velocity": v}
    return step


def _adam_space(class_name, decay):
    pieces = {"epsilon": ("hat", "plain"), "epsilon_placement": ("outside", "inside"),
              "bias_correction": ("on", "off")}
    textbook = {"epsilon": "plain", "epsilon_placement": "outside", "bias_correction": "on"}
    if decay:
        pieces.update({"decay_scale": ("lr", "schedule"),
                       "decay_order": ("before_step", "after_step")})
        textbook.update({"decay_scale": "schedule", "decay_order": "before_step"})
    keras = {k: v[0] for k, v in pieces.items()}
    defaults = dict(ADAM_DEFAULTS, weight_decay=0.004 if decay else None)
    return Space(class_name, pieces, textbook, keras,
                 lambda hp, c: slots("momentum", "velocity"), _adam_step, defaults)


# --- Nadam ---------------------------------------------------------------------
def _nadam_step(c):
    def step(ar, hp, s, g, t):
        lr = ar.learning_rate(hp["learning_rate"])
        b1, b2 = ar.const(hp["beta_1"]), ar.const(hp["beta_2"])
        psi, decay = ar.const(float(c["schedule_psi"])), ar.const(0.96)
        beta_next = b1 if c["u_t_1_beta"] == "beta_1" else b2
        mu_t = b1 * (1 - 0.5 * decay ** ((t + 1) * psi))
        mu_next = beta_next * (1 - 0.5 * decay ** ((t + 2) * psi))
        prod = s["u_product"] * mu_t
        m = b1 * s["momentum"] + (1 - b1) * g
        v = b2 * s["velocity"] + (1 - b2) * square(g)
        m_hat = mu_next * m / (1 - prod * mu_next) + (1 - mu_t) * g / (1 - prod)
        w = s["variable"] - lr * m_hat / (sqrt(v / (1 - b2 ** (t + 1))) + ar.const(hp["epsilon"]))
        return {"variable": w, "momentum": m, "velocity": v, "u_product": prod}
    return step


NADAM = Space(
    "Nadam",
    {"schedule_psi": ("1", "0.004"), "u_t_1_beta": ("beta_1", "beta_2"),
     "u_product_init": ("1", "0")},
    {"schedule_psi": "0.004", "u_t_1_beta": "beta_1", "u_product_init": "1"},
    {"schedule_psi": "1", "u_t_1_beta": "beta_1", "u_product_init": "1"},
    lambda hp, c: slots("momentum", "velocity")
    + [StateSpec("u_product", float(c["u_product_init"]), per_variable=False)],
    _nadam_step,
    {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.999, "epsilon": 1e-7})


# --- Adagrad -------------------------------------------------------------------
def _adagrad_step(c):
    def step(ar, hp, s, g, t):
        lr = ar.learning_rate(hp["learning_rate"])
        e = ar.const(hp["epsilon"])
        acc = s["accumulator"] + square(g)
        den = sqrt(acc + e) if c["epsilon_placement"] == "inside" else sqrt(acc) + e
        return {"variable": s["variable"] - lr * g / den, "accumulator": acc}
    return step


ADAGRAD = Space(
    "Adagrad",
    {"initial_accumulator": ("configured", "zero"), "epsilon_placement": ("inside", "outside")},
    {"initial_accumulator": "zero", "epsilon_placement": "outside"},
    {"initial_accumulator": "configured", "epsilon_placement": "inside"},
    lambda hp, c: [StateSpec("accumulator", hp["initial_accumulator_value"]
                             if c["initial_accumulator"] == "configured" else 0.0,
                             initial_via_cast=True)],
    _adagrad_step,
    {"learning_rate": 0.001, "initial_accumulator_value": 0.1, "epsilon": 1e-7})


# --- RMSprop -------------------------------------------------------------------
def _rmsprop_step(c):
    def step(ar, hp, s, g, t):
        lr = ar.learning_rate(hp["learning_rate"])
        rho, e = ar.const(hp["rho"]), ar.const(hp["epsilon"])
        v = rho * s["velocity"] + (1 - rho) * square(g)
        out = {"velocity": v}
        base = v
        if hp["centered"]:
            avg = rho * s["average_gradient"] + (1 - rho) * g
            out["average_gradient"] = avg
            base = v - square(avg)
        den = {"inside": lambda: eps_inside_sqrt(base, e),
               "outside": lambda: eps_outside_sqrt(base, e),
               "none": lambda: sqrt(base)}[c["epsilon"]]()
        inc = lr * g / den
        with_momentum = hp["momentum"] > 0
        out.update(apply_with_momentum(s["variable"], inc,
                                       s["momentum"] if with_momentum else None,
                                       ar.const(hp["momentum"]) if with_momentum else None))
        return out
    return step


RMSPROP = Space(
    "RMSprop",
    {"epsilon": ("inside", "outside", "none")},
    # Tieleman and Hinton's lecture has no epsilon; Graves's centered form has it inside
    lambda hp: {"epsilon": "inside" if hp["centered"] else "none"},
    {"epsilon": "inside"},
    lambda hp, c: slots("velocity") + (slots("momentum") if hp["momentum"] > 0 else [])
    + (slots("average_gradient") if hp["centered"] else []),
    _rmsprop_step,
    {"learning_rate": 0.001, "rho": 0.9, "momentum": 0.0, "epsilon": 1e-7, "centered": False})


# --- SGD -------------------------------------------------------------------------
def _sgd_step(c):
    def step(ar, hp, s, g, t):
        lr = ar.learning_rate(hp["learning_rate"])
        w = s["variable"]
        if not hp["momentum"]:
            return {"variable": w - lr * g}
        mu = ar.const(hp["momentum"])
        m = mu * s["momentum"] - lr * g
        if not hp["nesterov"]:
            return {"variable": w + m, "momentum": m}
        if c["nesterov_form"] == "look_ahead_weights":  # Bengio et al. 2013, eq. (7)
            return {"variable": w - mu * s["momentum"] + (1 + mu) * m, "momentum": m}
        if c["nesterov_form"] == "momentum_then_gradient":
            return {"variable": w + (mu * m - lr * g), "momentum": m}
        return {"variable": w + m, "momentum": m}  # "none": plain heavy ball
    return step


SGD = Space(
    "SGD",
    {"nesterov_form": ("momentum_then_gradient", "look_ahead_weights", "none")},
    {"nesterov_form": "look_ahead_weights"},
    {"nesterov_form": "momentum_then_gradient"},
    lambda hp, c: slots("momentum") if hp["momentum"] else [],
    _sgd_step,
    {"learning_rate": 0.01, "momentum": 0.0, "nesterov": False})


# --- Lion --------------------------------------------------------------------------
def _lion_step(c):
    def step(ar, hp, s, g, t):
        lr = ar.learning_rate(hp["learning_rate"])
        b1, b2 = ar.const(hp["beta_1"]), ar.const(hp["beta_2"])
        m_new = b2 * s["momentum"] + (1 - b2) * g
        m_used = s["momentum"] if c["order"] == "weights_first" else m_new
        w = s["variable"] - lr * sign(b1 * m_used + (1 - b1) * g)
        return {"variable": w, "momentum": m_new}
    return step


LION = Space(
    "Lion",
    {"order": ("weights_first", "momentum_first")},
    {"order": "weights_first"},
    {"order": "weights_first"},
    lambda hp, c: slots("momentum"),
    _lion_step,
    {"learning_rate": 0.001, "beta_1": 0.9, "beta_2": 0.99})


SPACES = {s.class_name: s for s in (
    _adam_space("Adam", decay=False), _adam_space("AdamW", decay=True), NADAM, ADAGRAD,
    RMSPROP, SGD, LION)}


def register_variants(class_name: str) -> list:
    """Register every point of a space as a family "variant:<name>"; return
    [(family, choices)] in the space's order."""
    space = SPACES[class_name]
    out = []
    for choices in space.points():
        family = "variant:" + name_of(choices)
        if (family, class_name) not in REGISTRY:
            REGISTRY[(family, class_name)] = Rule(
                family, class_name, dict(space.defaults),
                lambda hp, c=choices: space.states(hp, c), space.step(choices),
                source=f"variant of {class_name}: {name_of(choices)}")
        out.append((family, choices))
    return out
