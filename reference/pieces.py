"""Small named pieces that update rules are built from (the optax style).

A textbook rule and Keras's rule often differ by exactly one of these; keeping
them named makes that difference visible and swappable.
"""

from __future__ import annotations

import numpy as np

from reference.arithmetic import Arithmetic, Tracked, sqrt


def ema_interpolate(avg: Tracked, x: Tracked, one_minus_beta) -> Tracked:
    """avg + (x - avg) * (1 - beta): moving average in Keras's Adam form."""
    return avg + (x - avg) * one_minus_beta


def ema_weighted(avg: Tracked, x: Tracked, beta, one_minus_beta) -> Tracked:
    """beta * avg + (1 - beta) * x: moving average as a weighted sum."""
    return beta * avg + one_minus_beta * x


def eps_outside_sqrt(v: Tracked, eps) -> Tracked:
    """sqrt(v) + e."""
    return sqrt(v) + eps


def eps_inside_sqrt(v: Tracked, eps) -> Tracked:
    """sqrt(v + e)."""
    return sqrt(v + eps)


def apply_with_momentum(w: Tracked, increment: Tracked, m: Tracked | None,
                        momentum) -> dict:
    """With momentum: m = momentum * m + increment, w = w - m; otherwise
    w = w - increment (Keras's RMSprop; Graves 2013 eq. 40 with m = -Delta)."""
    if m is None:
        return {"variable": w - increment}
    m = momentum * m + increment
    return {"momentum": m, "variable": w - m}


def adam_step_size(lr, beta_1, beta_2, local_step) -> Tracked:
    """alpha = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t).

    Kingma and Ba 2015, section 2, last paragraph before 2.1: folding the bias
    corrections into the step size, which makes e act as an "epsilon hat".
    """
    return lr * sqrt(1 - beta_2 ** local_step) / (1 - beta_1 ** local_step)


def decoupled_weight_decay(ar: Arithmetic, w: Tracked, weight_decay: float,
                           lr: Tracked) -> Tracked:
    """w = w - w * wd * lr, applied before the optimizer's own step.

    With the `decay_factor_float32` precision setting the factor (1 - wd*lr)
    is formed in float32 and then multiplies the weights (torch backend).
    """
    if ar.precision.decay_factor_float32:
        # torch: 1 - wd * lr on a float32 scalar tensor, every step rounded to
        # float32 and known exactly, so it carries no error bound of its own.
        f32 = Arithmetic("float32", ar.precision, track=False)
        factor = 1 - f32.const(weight_decay) * f32.learning_rate(float(lr.v))
        return w * ar.exact(np.asarray(factor.v))
    return w - w * ar.cast(weight_decay) * lr
