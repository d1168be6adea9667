"""FTRL-Proximal.

Keras: keras/src/optimizers/ftrl.py (every backend; torch has no kernel of
its own, so Python-float operands of its ops round to float32 there, the
`operand_float32` precision setting).  Paper: McMahan et al. 2013, KDD, "Ad
Click Prediction: a View from the Trenches", Algorithm 1 (per-coordinate
FTRL-Proximal with L1 and L2 regularization).
"""

from __future__ import annotations

from reference.arithmetic import maximum, square
from reference.optimizer import Optimizer, Point
from reference.rule import StateSpec

DEFAULTS = {"learning_rate": 0.001, "learning_rate_power": -0.5,
            "initial_accumulator_value": 0.1, "l1_regularization_strength": 0.0,
            "l2_regularization_strength": 0.0, "l2_shrinkage_regularization_strength": 0.0,
            "beta": 0.0}

PIECES = {
    # n starts at initial_accumulator_value, or at 0 (a sum of squares)
    "initial_accumulator": ("configured", "zero"),
    # the gradient in z's update gets 2 * l2_shrinkage * w added, or not
    "shrinkage": ("applied", "none"),
    # the L2 term of the denominator: 2 * l2 (Keras's penalty l2 ||w||^2) or
    # lambda_2 (the paper's (lambda_2 / 2) ||w||^2)
    "l2_factor": ("2", "1"),
    # the weights in sigma * w: the stored weights, or the paper's w_t computed
    # from z and n at the start of the round (so w_1 = 0)
    "weights": ("stored", "from_state"),
}


def states(hp, c):
    initial = hp["initial_accumulator_value"] if c["initial_accumulator"] == "configured" else 0.0
    return [StateSpec("accumulator", initial, initial_via_cast=True), StateSpec("linear", 0.0)]


def clip(ar, x, bound):
    """ops.clip(x, -bound, bound), the Python-float bounds as Keras ops receive them."""
    lo, hi = ar.operand(-bound), ar.operand(bound)
    return -maximum(-maximum(x, lo), -hi)


def weights(ar, hp, c, z, root_n, lr):
    """w = (clip(z, -l1, l1) - z) / q: 0 where |z| <= l1, else -(z - sgn(z) l1) / q."""
    l2, beta = ar.const(hp["l2_regularization_strength"]), ar.const(hp["beta"])
    if c["l2_factor"] == "2":  # Keras: sqrt(n) / lr + 2 * (l2 + beta / (2 lr))
        quadratic = root_n / lr + 2 * (l2 + beta / (2 * lr))
    else:  # the paper: (beta + sqrt(n)) / alpha + lambda_2
        quadratic = (beta + root_n) / lr + l2
    return (clip(ar, z, hp["l1_regularization_strength"]) - z) / quadratic


def update(ar, hp, c, s, g, t, lr):
    power = ar.operand(-hp["learning_rate_power"])
    n, z = s["accumulator"], s["linear"]
    w = s["variable"] if c["weights"] == "stored" else weights(ar, hp, c, z, n ** power, lr)
    grad_to_use = g
    if c["shrinkage"] == "applied":
        grad_to_use = g + ar.operand(2 * hp["l2_shrinkage_regularization_strength"]) * w
    new_n = n + square(g)
    root_new_n = new_n ** power
    z = z + (grad_to_use - ((root_new_n - n ** power) / lr) * w)
    return {"variable": weights(ar, hp, c, z, root_new_n, lr), "accumulator": new_n,
            "linear": z}


def _unstated(hp):
    if hp["learning_rate_power"] != -0.5:
        return ("McMahan et al.'s Algorithm 1 uses the square root (learning_rate_power "
                "= -0.5) only")
    return None


FTRL = Optimizer(
    "Ftrl", DEFAULTS, PIECES, states, update, {
        "keras": Point(
            {"initial_accumulator": "configured", "shrinkage": "applied", "l2_factor": "2",
             "weights": "stored"},
            source="keras/src/optimizers/ftrl.py (Keras 3)",
            doc="""p = -learning_rate_power;  l2_reg = l2 + beta / (2 lr);
    grad_to_use = g + 2 * l2_shrinkage * w;  new_accum = accum + g**2;
    linear = linear + grad_to_use - ((new_accum**p - accum**p) / lr) * w;
    quadratic = new_accum**p / lr + 2 * l2_reg;
    w = (clip(linear, -l1, l1) - linear) / quadratic;  accum = new_accum.""",
            keras_base=True),
        "textbook": Point(
            {"initial_accumulator": "zero", "shrinkage": "none", "l2_factor": "1",
             "weights": "from_state"},
            source="McMahan et al. 2013, KDD, 'Ad Click Prediction: a View from the "
                   "Trenches', Algorithm 1 (per-coordinate FTRL-Proximal)",
            doc="""alpha = lr, lambda_1 = l1, lambda_2 = l2, z = linear, n = accumulator;
    w_t = 0 if |z| <= lambda_1 else -((beta + sqrt(n)) / alpha + lambda_2)^-1 (z - sgn(z) lambda_1);
    sigma = (sqrt(n + g**2) - sqrt(n)) / alpha;  z = z + g - sigma * w_t;  n = n + g**2;
    w_{t+1} from z and n as w_t.""",
            notes="z and n start at 0 (Keras's initial_accumulator_value is not part of "
                  "the algorithm), so the weights at the start of round 1 are 0, not the "
                  "model's initial weights: w_t is a function of z and n, computed at the "
                  "start of each round, and the reported weights after a step are w_{t+1}. "
                  "The algorithm has no L2 shrinkage of the gradient, so "
                  "l2_shrinkage_regularization_strength is not used; lambda_2 takes "
                  "Keras's l2_regularization_strength as it is.",
            unstated=_unstated),
    },
    explained=("initial_accumulator", "shrinkage", "l2_factor", "weights"))
