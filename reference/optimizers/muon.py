"""Muon.

Keras: keras/src/optimizers/muon.py (every backend: torch has no kernel of its
own, so a Python-float operand of a Keras op, and of a Python operator on a
keras.Variable, which goes through the same ops, rounds to float32 there: the
`operand_float32` precision setting).  Muon overrides `_apply_weight_decay`
(weight_decay for the Muon variables, adam_weight_decay for the AdamW ones),
so the base optimizer's decay stage (reference/base.py) is not used: the
decay is done here, per variable, before its update, which is the same thing.

Papers: Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural
networks" (blog post, kellerjordan.github.io/posts/muon): the momentum, its
Nesterov form and the quintic Newton-Schulz iteration with (a, b, c) =
(3.4445, -4.7750, 2.0315); Liu et al. 2025, "Muon is Scalable for LLM
Training" (arXiv 2502.16982): section 2.1, eqs. (1) and (2) (Muon, the
Newton-Schulz iteration from X_0 = M_t / ||M_t||_F), section 2.2, eq. (3)
(weight decay) and eq. (4) (the update RMS matched to AdamW's,
0.2 * O_t * sqrt(max(A, B))); the variables Muon does not take are trained by
AdamW (Kingma and Ba 2015, Algorithm 1, with decoupled weight decay).
"""

from __future__ import annotations

import math
import re

import numpy as np

from reference import base
from reference.arithmetic import Arithmetic, Tracked, matmul, norm, sqrt, square
from reference.optimizer import Optimizer, Point
from reference.pieces import ema, hyperparameter
from reference.rule import StateSpec

DEFAULTS = {"learning_rate": 0.001, "adam_beta_1": 0.9, "adam_beta_2": 0.999,
            "adam_weight_decay": 0.004, "epsilon": 1e-7, "weight_decay": 0.004,
            "exclude_layers": None, "exclude_embeddings": True, "muon_a": 3.4445,
            "muon_b": -4.7750, "muon_c": 2.0315, "adam_lr_ratio": 1, "momentum": 0.95,
            "ns_steps": 5, "nesterov": True, "rms_rate": 0.2}

PIECES = {
    # X_0 of the Newton-Schulz iteration: Keras's x / (||x||_F + 1e-7), or
    # M / ||M||_F as Liu et al. write it (section 2.1)
    "ns_normalisation": ("frobenius_plus_1e-7", "frobenius"),
    # the AdamW branch: bias corrections folded into the step size, epsilon added
    # to sqrt(v) ("hat", Kingma and Ba end of section 2), or epsilon added to
    # sqrt(v_hat) ("plain", their Algorithm 1)
    "adam_epsilon": ("hat", "plain"),
    # the AdamW variables' decay w * wd * lr: with Muon's learning rate (Keras),
    # or with their own, lr * adam_lr_ratio, the rate of their update
    "adam_decay_lr": ("lr", "adam_lr"),
    # the same math in another order (rounding only):
    # momentum buffer m + (g + m * (momentum - 1)) (Keras) or momentum * m + g
    "momentum_form": ("increment", "weighted"),
    # a tall matrix iterated transposed (Keras, and the post's code) or as it is:
    # X p(X^T X) = p(X X^T) X, one function either way
    "ns_orientation": ("transpose_tall", "as_given"),
    # the Muon variables' decay before the update (Keras) or in one expression
    # with it, W - lr (scale * O + lambda W) (Liu et al. eq. 4)
    "decay_form": ("before_update", "equation_4"),
    "adam_ema": ("interpolate", "weighted"),
    # precision: Keras forms lr * adam_lr_ratio (a float32 variable times a Python
    # number) and sqrt(max(A, B)) (ops.sqrt of an integer gives floatx) in float32
    "scalars": ("float32", "working_dtype"),
    # the AdamW betas through ops.cast (Keras) or as Python floats; the Python
    # floats given to Keras ops (1 - beta, epsilon, momentum) as its operands or exact
    "hyperparameters": ("ops.cast", "python"),
    "operands": ("ops", "python"),
}


def uses_adamw(hp: dict, shape: tuple, path: str) -> bool:
    """Keras's `Muon._should_use_adamw`: rank other than 2, an embedding (by its
    path, lower-cased) when exclude_embeddings, or a path matching exclude_layers."""
    if len(shape) != 2:
        return True
    if hp["exclude_embeddings"] and "embedding" in path.lower():
        return True
    return any(re.search(keyword, path) for keyword in hp["exclude_layers"] or [])


def states(hp, c):
    return [StateSpec("momentum", 0.0),
            StateSpec("velocity", 0.0, shape=lambda shape, path: (
                tuple(shape) if uses_adamw(hp, shape, path) else None))]


def swap_last(x):
    axes = list(range(np.ndim(x.v)))
    axes[-2], axes[-1] = axes[-1], axes[-2]
    return x.transpose(axes)


def in_float32(x: Tracked) -> Tracked:
    """x rounded to float32, in float32 arithmetic (each element within u32 |x|
    of its value, beside its own bound)."""
    f32 = Arithmetic("float32", x.ar.precision, track=x.ar.track)
    v = x.v.astype(np.float32)
    e = None if x.e is None else x.e + f32.u * np.abs(x.v.astype(np.float64))
    return Tracked(v, e, f32, x.tie)


def frobenius_norm(x, ar, c):
    """||x||_F (+ 1e-7), as Keras's ops.norm computes it: in float32 for a
    float64 tensor where the precision setting says so (JAX, torch); the
    float32 result then divides the float64 tensor."""
    if ar.precision.norm_float32 and ar.dtype == np.float64:
        x = in_float32(x)
    size = norm(x, axis=(-2, -1), keepdims=True)
    if c["ns_normalisation"] == "frobenius_plus_1e-7":
        size = size + x.ar.const(1e-7)
    return Tracked(size.v.astype(ar.dtype), size.e, ar, size.tie)


def ns_step(x, a, b, cc):
    gram = matmul(x, swap_last(x))
    return a * x + matmul(b * gram + matmul(cc * gram, gram), x)


def ns_lipschitz(hp, x: np.ndarray) -> np.ndarray:
    """A bound on the Frechet derivative of one step X -> a X + b (X X^T) X +
    c (X X^T)^2 X at x [k, m, n], per matrix [k, 1, 1], in the Frobenius norm.

    The step is the generalized matrix function U f(S) V^T of f(s) = a s + b s^3
    + c s^5 (X = U S V^T); its derivative multiplies the components of a
    perturbation in the singular bases by the divided differences f[s_i, s_j],
    (f(s_i) + f(s_j)) / (s_i + s_j) = f[-s_j, s_i] and f(s_i) / s_i (Noferini
    2017, "A formula for the Frechet derivative of a generalized matrix
    function", SIAM J. Matrix Anal. Appl. 38(2): its analogue of the
    Daleckii-Krein theorem), so their largest
    modulus bounds it.  For the polynomial they are polynomials of the singular
    values (no division).
    """
    a, b, c = hp["muon_a"], hp["muon_b"], hp["muon_c"]
    s = np.linalg.svd(np.nan_to_num(x.astype(np.float64)), compute_uv=False)
    x_, y_ = s[..., :, None], s[..., None, :]
    x2, y2, xy = x_ * x_, y_ * y_, x_ * y_
    same = a + b * (x2 + xy + y2) + c * (x2 * x2 + x2 * xy + xy * xy + xy * y2 + y2 * y2)
    mixed = a + b * (x2 - xy + y2) + c * (x2 * x2 - x2 * xy + xy * xy - xy * y2 + y2 * y2)
    alone = a + b * s ** 2 + c * s ** 4
    bound = np.maximum(np.max(np.abs(same), axis=(-2, -1)), np.max(np.abs(mixed), axis=(-2, -1)))
    return np.maximum(bound, np.max(np.abs(alone), axis=-1))[..., None, None]


def frobenius(e: np.ndarray) -> np.ndarray:
    return np.sqrt(np.sum(np.square(e, dtype=np.float64), axis=(-2, -1), keepdims=True))


def newton_schulz(ar, hp, c, x):
    """The quintic Newton-Schulz iteration over the last two axes (Keras's
    `zeropower_via_newtonschulz5`): X_0 = x / ||x||_F, then ns_steps times
    A = X X^T, B = b A + (c A) A, X = a X + B X.

    The bound: an elementwise running bound through five steps of matrix
    products grows with |X| |X^T| ..., which ignores the cancellation that keeps
    the iteration's derivative small (about 10^7 times the observed error in
    float32).  Instead each step's own rounding is bounded elementwise (the
    step evaluated from its computed input, exact), and the error carried in
    is passed on in the Frobenius norm, times the step's derivative bound
    (ns_lipschitz): e_{k+1} = L_k e_k + ||R_k||_F, first order as everywhere
    here; the last step's own rounding stays elementwise.
    """
    transpose = x.v.shape[-2] > x.v.shape[-1] and c["ns_orientation"] == "transpose_tall"
    if transpose:
        x = swap_last(x)
    x = x / frobenius_norm(x, ar, c)
    a, b, cc = ar.const(hp["muon_a"]), ar.const(hp["muon_b"]), ar.const(hp["muon_c"])
    steps = int(hp["ns_steps"])
    if not ar.track:
        for _ in range(steps):
            x = ns_step(x, a, b, cc)
    elif steps > 0:
        carried = frobenius(np.broadcast_to(x.e, np.shape(x.v)))
        tie = x.tie
        for k in range(steps):
            lipschitz = ns_lipschitz(hp, x.v)
            local = ns_step(ar.exact(x.v), a, b, cc)
            if k < steps - 1:
                carried = lipschitz * carried + frobenius(np.broadcast_to(local.e, np.shape(local.v)))
                x = local
            else:
                with np.errstate(invalid="ignore"):
                    e = np.where(np.isfinite(local.v), local.e + lipschitz * carried, 0.0)
                x = Tracked(local.v, e, ar, None if tie is None else np.any(
                    tie, axis=(-2, -1), keepdims=True) & np.ones(np.shape(local.v), bool))
    return swap_last(x) if transpose else x


def rms_scale(ar, c, shape):
    """sqrt(max(A, B)) of the matrix's two dimensions."""
    n = max(shape[-2], shape[-1])
    if c["scalars"] == "float32" and ar.precision.learning_rate_float32:
        return ar.exact(np.float32(np.sqrt(np.float32(n))))
    return ar.const(math.sqrt(n))


def adam_learning_rate(ar, hp, c, lr):
    """lr * adam_lr_ratio: Keras multiplies its float32 learning-rate variable."""
    ratio = hp["adam_lr_ratio"]
    if c["scalars"] == "float32" and ar.precision.learning_rate_float32:
        # every backend rounds the product to float32, the same bits everywhere
        return ar.exact(np.float32(lr.v) * np.float32(ratio))
    return lr * ar.const(ratio)


def decay(ar, w, weight_decay, lr):
    """w - w * wd * lr (`Muon._apply_weight_decay`: wd through ops.cast, the
    learning rate its float32 variable cast to the dtype)."""
    return w - w * ar.cast(weight_decay) * lr


def adamw_update(ar, hp, c, s, g, t, lr):
    operand = ar.operand if c["operands"] == "ops" else ar.const
    lr_a = adam_learning_rate(ar, hp, c, lr)
    w = s["variable"]
    if hp["adam_weight_decay"] is not None:
        w = decay(ar, w, hp["adam_weight_decay"], lr if c["adam_decay_lr"] == "lr" else lr_a)
    b1 = hyperparameter(ar, hp["adam_beta_1"], c["hyperparameters"])
    b2 = hyperparameter(ar, hp["adam_beta_2"], c["hyperparameters"])
    local_step = t + 1
    m = ema(c["adam_ema"], s["momentum"], g, ar.const(hp["adam_beta_1"]),
            operand(1 - hp["adam_beta_1"]))
    v = ema(c["adam_ema"], s["velocity"], square(g), ar.const(hp["adam_beta_2"]),
            operand(1 - hp["adam_beta_2"]))
    eps = operand(hp["epsilon"])
    if c["adam_epsilon"] == "hat":
        alpha = lr_a * sqrt(1 - b2 ** local_step) / (1 - b1 ** local_step)
        step = (m * alpha) / (sqrt(v) + eps)
    else:
        step = lr_a * (m / (1 - b1 ** local_step)) / (sqrt(v / (1 - b2 ** local_step)) + eps)
    return {"variable": w - step, "momentum": m, "velocity": v}


def muon_update(ar, hp, c, s, g, lr):
    operand = ar.operand if c["operands"] == "ops" else ar.const
    w, m = s["variable"], s["momentum"]
    wd = hp["weight_decay"]
    in_update = c["decay_form"] == "equation_4"
    if wd is not None and not in_update:
        w = decay(ar, w, wd, lr)
    if c["momentum_form"] == "increment":
        m = m + (g + m * operand(hp["momentum"] - 1))
    else:
        m = ar.const(hp["momentum"]) * m + g
    x = g + operand(hp["momentum"]) * m if hp["nesterov"] else m
    o = newton_schulz(ar, hp, c, x)
    shape = np.shape(w.v)
    if in_update:
        step = o if hp["rms_rate"] is None else (
            ar.const(hp["rms_rate"]) * o * rms_scale(ar, c, shape))
        if wd is not None:
            step = step + ar.const(wd) * w
        return {"variable": w - lr * step, "momentum": m}
    step = lr * o
    if hp["rms_rate"] is not None:
        step = step * rms_scale(ar, c, shape) * ar.const(hp["rms_rate"])
    return {"variable": w - step, "momentum": m}


def update(ar, hp, c, s, g, t, lr):
    if not base.decays(hp, s["path"]):  # Muon's _apply_weight_decay asks _use_weight_decay
        hp = {**hp, "weight_decay": None, "adam_weight_decay": None}
    if uses_adamw(hp, np.shape(s["variable"].v)[1:], s["path"]):
        return adamw_update(ar, hp, c, s, g, t, lr)
    return muon_update(ar, hp, c, s, g, lr)


KERAS_CHOICES = {"ns_normalisation": "frobenius_plus_1e-7", "adam_epsilon": "hat",
                 "adam_decay_lr": "lr", "momentum_form": "increment",
                 "ns_orientation": "transpose_tall", "decay_form": "before_update",
                 "adam_ema": "interpolate", "scalars": "float32",
                 "hyperparameters": "ops.cast", "operands": "ops"}
TEXTBOOK_CHOICES = {"ns_normalisation": "frobenius", "adam_epsilon": "plain",
                    "adam_decay_lr": "adam_lr", "momentum_form": "weighted",
                    "ns_orientation": "transpose_tall", "decay_form": "equation_4",
                    "adam_ema": "weighted", "scalars": "working_dtype",
                    "hyperparameters": "python", "operands": "python"}

MUON = Optimizer(
    "Muon", DEFAULTS, PIECES, states, update, {
        "keras": Point(
            KERAS_CHOICES, source="keras/src/optimizers/muon.py (Keras 3)",
            doc="""AdamW for a variable of rank other than 2, an 'embedding' path (exclude_embeddings)
    or a path matching exclude_layers; Muon for the other 2-D variables.
    Muon: w = w - w * weight_decay * lr;  m = m + (g + m * (momentum - 1));
    x = g + momentum * m (nesterov) or m;  x transposed if it has more rows than columns;
    X = x / (||x||_F + 1e-7);  ns_steps times: A = X X^T;  X = a X + (b A + (c A) A) X;
    w = w - (lr * X) * sqrt(max(A, B)) * rms_rate  (sqrt in float32; no factor if rms_rate is None).
    AdamW: w = w - w * adam_weight_decay * lr;  lr_a = lr * adam_lr_ratio (float32);
    local_step = t + 1;  alpha = lr_a * sqrt(1 - beta_2**local_step) / (1 - beta_1**local_step);
    m = m + (g - m) * (1 - beta_1);  v = v + (g**2 - v) * (1 - beta_2);
    w = w - (m * alpha) / (sqrt(v) + epsilon).""",
            notes="Muon's own _apply_weight_decay replaces the base optimizer's (on torch "
                  "too: no float32 decay factor); it is applied per variable before its "
                  "update, as Keras applies it to all before any update. The AdamW "
                  "variables are decayed with the Muon learning rate, not lr * "
                  "adam_lr_ratio.",
            keras_base=True),
        "textbook": Point(
            TEXTBOOK_CHOICES,
            source="Jordan et al. 2024, 'Muon: An optimizer for hidden layers in neural "
                   "networks' (blog post): momentum, Nesterov, the quintic Newton-Schulz "
                   "iteration; Liu et al. 2025, 'Muon is Scalable for LLM Training' "
                   "(arXiv 2502.16982), section 2.1 eqs. (1)-(2), section 2.2 eqs. (3)-(4); "
                   "AdamW for the other variables: Kingma and Ba 2015, Algorithm 1, with "
                   "decoupled weight decay",
            doc="""Muon (2-D variables): B = momentum * B + G;  x = G + momentum * B (Nesterov) or B;
    X_0 = x / ||x||_F (iterated on the transpose of a tall matrix);
    X_k = a X + b (X X^T) X + c (X X^T)^2 X with (a, b, c) = (3.4445, -4.7750, 2.0315), O = X_ns_steps;
    W = W - lr * (rms_rate * O * sqrt(max(A, B)) + lambda * W)  (eq. 4; eq. 3 without rms_rate).
    AdamW (the other variables), with lr_a = lr * adam_lr_ratio:  W = W - lr_a * adam_weight_decay * W;
    m = beta_1 m + (1 - beta_1) g;  v = beta_2 v + (1 - beta_2) g**2;
    W = W - lr_a * m_hat / (sqrt(v_hat) + epsilon)  (Algorithm 1).""",
            notes="Which variables Muon takes is Keras's rule (rank 2, not an embedding, "
                  "not in exclude_layers): the papers give Muon the hidden 2-D matrices and "
                  "AdamW the rest (the post flattens convolution filters for Muon; Keras "
                  "gives them to AdamW). The papers have one learning rate: Keras's "
                  "adam_lr_ratio is taken as the AdamW variables' own rate, lr * "
                  "adam_lr_ratio, for their update and, as AdamW's decoupled decay is "
                  "lr * lambda, for their decay. The post computes the iteration in "
                  "bfloat16; here it is the working dtype. The Nesterov form G + momentum * "
                  "B is the post's implementation's; the +1e-7 in the normalisation is "
                  "also only in its code, the equations divide by ||M||_F (0/0 for a zero "
                  "matrix)."),
    },
    explained=("ns_normalisation", "adam_epsilon", "adam_decay_lr"), elementwise=False)
