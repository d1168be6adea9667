"""Small named pieces that update rules are built from (the optax style).

A textbook rule and Keras's rule often differ by exactly one of these; keeping
them named makes that difference visible and swappable.  The optimizer modules
(reference/optimizers/) choose among them by the option names of their pieces.
"""

from __future__ import annotations

from reference.arithmetic import Arithmetic, Tracked, sqrt


def hyperparameter(ar: Arithmetic, value: float, how: str) -> Tracked:
    """A Python-float hyperparameter entering the arithmetic: "ops.cast" where
    Keras's source casts it (the precision setting may round it to float32
    first), "python" where it is combined with a tensor as it is."""
    return ar.cast(value) if how == "ops.cast" else ar.const(value)


def one_minus(ar: Arithmetic, value: float, beta: Tracked, how: str) -> Tracked:
    """1 - beta: "python" computes it as a Python float (Keras's `1 - self.beta_1`),
    "tensor" in the working dtype from beta."""
    return ar.const(1 - value) if how == "python" else 1 - beta


def ema_interpolate(avg: Tracked, x: Tracked, one_minus_beta) -> Tracked:
    """avg + (x - avg) * (1 - beta): moving average in Keras's Adam form."""
    return avg + (x - avg) * one_minus_beta


def ema_weighted(avg: Tracked, x: Tracked, beta, one_minus_beta) -> Tracked:
    """beta * avg + (1 - beta) * x: moving average as a weighted sum."""
    return beta * avg + one_minus_beta * x


def ema(form: str, avg: Tracked, x: Tracked, beta, one_minus_beta) -> Tracked:
    """The moving average in the named form ("interpolate" or "weighted")."""
    if form == "interpolate":
        return ema_interpolate(avg, x, one_minus_beta)
    return ema_weighted(avg, x, beta, one_minus_beta)


def moving_average_form(ar: Arithmetic, form: str) -> str:
    """The form a backend's own kernel computes a moment in: "weighted" under the
    `moving_average_weighted` precision setting (torch), else `form`."""
    return "weighted" if ar.precision.moving_average_weighted else form


def eps_outside_sqrt(v: Tracked, eps) -> Tracked:
    """sqrt(v) + e."""
    return sqrt(v) + eps


def eps_inside_sqrt(v: Tracked, eps) -> Tracked:
    """sqrt(v + e)."""
    return sqrt(v + eps)


def root(placement: str, v: Tracked, eps) -> Tracked:
    """The denominator sqrt(v) with epsilon "inside", "outside" or "none"."""
    if placement == "inside":
        return eps_inside_sqrt(v, eps)
    if placement == "outside":
        return eps_outside_sqrt(v, eps)
    return sqrt(v)


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
