"""Adagrad.

Keras: keras/src/optimizers/adagrad.py.  Paper: Duchi, Hazan and Singer 2011,
JMLR 12, section 1 (the diagonal update).
"""

from __future__ import annotations

from reference.optimizer import Optimizer, Point
from reference.pieces import root
from reference.arithmetic import square
from reference.rule import StateSpec

DEFAULTS = {"learning_rate": 0.001, "initial_accumulator_value": 0.1, "epsilon": 1e-7}

PIECES = {
    # the accumulator starts at initial_accumulator_value, or at 0 (a sum of squares)
    "initial_accumulator": ("configured", "zero"),
    "epsilon_placement": ("inside", "outside"),
}


def states(hp, c):
    initial = hp["initial_accumulator_value"] if c["initial_accumulator"] == "configured" else 0.0
    return [StateSpec("accumulator", initial, initial_via_cast=True)]


def update(ar, hp, c, s, g, t, lr):
    acc = s["accumulator"] + square(g)
    w = s["variable"] - (lr * g) / root(c["epsilon_placement"], acc, ar.const(hp["epsilon"]))
    return {"variable": w, "accumulator": acc}


KERAS = Point(
    {"initial_accumulator": "configured", "epsilon_placement": "inside"},
    source="keras/src/optimizers/adagrad.py (Keras 3)",
    doc="""accumulator starts at initial_accumulator_value (0.1);
    accumulator = accumulator + g**2;  w = w - (lr * g) / sqrt(accumulator + e).""",
    keras_base=True)

TEXTBOOK = Point(
    {"initial_accumulator": "zero", "epsilon_placement": "outside"},
    source="Duchi, Hazan and Singer 2011, JMLR 12, section 1, the diagonal update "
           "x_{t+1} = x_t - eta diag(delta I + diag(G_t)^(1/2))^(-1) g_t",
    doc="eta = lr, delta = epsilon;  G = G + g**2;  w = w - eta * g / (delta + sqrt(G)).",
    notes="G_t is the sum of the squared gradients so far, so it starts at 0 "
          "(initial_accumulator_value is not part of the paper). delta is added "
          "outside the square root, as the paper writes it; it takes Keras's "
          "epsilon.",
    textbook_base=True)

ARTICLE = Point(
    {"initial_accumulator": "zero", "epsilon_placement": "inside"},
    source="shared/article.md, section Adagrad",
    doc="accumulator = accumulator + g**2;  w = w - (lr * g) / sqrt(accumulator + e).",
    notes="The article states no initial accumulator, so it starts at zero "
          "(initial_accumulator_value is not used by the article's formula).")

ADAGRAD = Optimizer("Adagrad", DEFAULTS, PIECES, states, update,
                    {"keras": KERAS, "textbook": TEXTBOOK, "article": ARTICLE},
                    explained=("initial_accumulator", "epsilon_placement"))
