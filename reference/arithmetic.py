"""Floating-point arithmetic that carries a running error bound.

Every value computed by a reference rule is a `Tracked`: the value rounded in
the working dtype (float32 or float64), exactly as numpy computes it, and a
first-order bound on its absolute distance from the exact real-number result
of the same formula (a running error analysis, Higham, "Accuracy and Stability
of Numerical Algorithms", 2nd ed. 2002, section 3.3).  For each operation
z = fl(x op y) with u the unit roundoff (eps / 2):

    x +- y   e_z = e_x + e_y + u|z|
    x * y    e_z = |y| e_x + |x| e_y + u|z|
    x / y    e_z = (e_x + |z| e_y) / |y| + u|z|
    sqrt x   e_z = min(e_x / z, sqrt(e_x)) + u|z|
    x ** t   e_z = |t z / x| e_x + u|z| (1 + |t ln x|)   (pow through exp/log)

plus, for every operation, the absolute error of underflow (eq. 2.8).

The bound is what a faithful implementation of the same formula may differ
by, whatever order it evaluates it in up to a small factor; the comparison
engine divides the observed difference by it (see verify/compare.py).

A discontinuous function evaluated within rounding of its jump (sign of a
value whose magnitude is below `tie_width` times its error bound, sqrt of a
value that rounding made negative, a division by a value within rounding of
zero) is a tie: either result is legitimate.  Ties are carried as a mask next
to the bound, through every later operation, and the comparison accepts any
value at a tied element of that step only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Precision:
    """Where Keras rounds beyond the working dtype, as a named setting.

    learning_rate_float32: Keras stores the learning rate in a float32
        variable whatever the weights' dtype.
    cast_rounds_to_float32: `ops.cast(python_float, dtype)` goes through a
        float32 tensor first (TensorFlow's `tf.cast` of a Python float).
    decay_factor_float32: the decoupled weight-decay factor (1 - wd * lr)
        is computed in float32 (torch backend's `_apply_weight_decay`).
    flushes_subnormals: results below the smallest normal number may be
        flushed to zero (TensorFlow and XLA set FTZ/DAZ on CPU), so each
        operation's underflow error is up to the smallest normal number
        rather than half the smallest subnormal (Higham 2002, eq. 2.8).
    """

    name: str
    learning_rate_float32: bool = True
    cast_rounds_to_float32: bool = False
    decay_factor_float32: bool = False
    flushes_subnormals: bool = False

    def describe(self) -> str:
        parts = []
        if self.learning_rate_float32:
            parts.append("learning rate stored as float32")
        if self.cast_rounds_to_float32:
            parts.append("ops.cast(Python float) rounds to float32 first")
        if self.decay_factor_float32:
            parts.append("weight-decay factor (1 - wd*lr) computed in float32")
        if self.flushes_subnormals:
            parts.append("subnormal results may be flushed to zero")
        return "; ".join(parts) or "no rounding beyond the working dtype"


PRECISIONS = {
    "tensorflow": Precision("tensorflow", cast_rounds_to_float32=True, flushes_subnormals=True),
    "jax": Precision("jax", flushes_subnormals=True),
    "torch": Precision("torch", decay_factor_float32=True),
    # No rounding beyond the working dtype: the formulas as real-number math.
    "exact": Precision("exact", learning_rate_float32=False),
}


class Arithmetic:
    """The working dtype, the precision setting, and whether bounds are kept."""

    def __init__(self, dtype, precision: Precision, *, track: bool = True,
                 tie_width: float = 32.0):
        self.dtype = np.dtype(dtype)
        self.precision = precision
        self.track = track
        info = np.finfo(self.dtype)
        self.u = float(info.eps) / 2
        # absolute error of an underflowing result (Higham 2002, eq. 2.8)
        self.smallest_normal = float(info.smallest_normal)
        self.underflow = (float(info.smallest_normal) if precision.flushes_subnormals
                          else float(info.smallest_subnormal) / 2)
        self.tie_width = tie_width

    # --- constants -------------------------------------------------------
    def _rounded(self, exact: float) -> "Tracked":
        value = self.dtype.type(exact)
        err = None
        if self.track:
            err = np.float64(abs(float(value) - exact))
        return Tracked(np.asarray(value), err, self)

    def const(self, x: float) -> "Tracked":
        """A Python float entering arithmetic in the working dtype."""
        return self._rounded(float(x))

    def cast(self, x: float) -> "Tracked":
        """`ops.cast(x, dtype)` of a Python float hyperparameter."""
        x = float(x)
        if self.precision.cast_rounds_to_float32:
            x = float(np.float32(x))
        return self._rounded(x)

    def learning_rate(self, lr: float) -> "Tracked":
        lr = float(lr)
        if self.precision.learning_rate_float32:
            lr = float(np.float32(lr))
        return self._rounded(lr)

    def exact(self, array) -> "Tracked":
        """An input that both sides receive bit for bit (gradient, state)."""
        value = np.asarray(array, dtype=self.dtype)
        return Tracked(value, np.float64(0.0) if self.track else None, self)

    def step_count(self, t) -> "Tracked":
        """An integer step count converted to the working dtype (exact)."""
        return self.exact(np.asarray(t, dtype=np.float64))


def _lift(ar: Arithmetic, x) -> "Tracked":
    if isinstance(x, Tracked):
        return x
    if isinstance(x, (int, float, np.floating, np.integer)):
        return ar.const(float(x))
    raise TypeError(f"cannot combine Tracked with {type(x).__name__}")


def _either(a, b):
    """Union of two tie masks (None: no tie anywhere)."""
    if a is None:
        return b
    if b is None:
        return a
    return a | b


class Tracked:
    """A value in the working dtype, its absolute error bound (or None when
    bounds are not kept) and its tie mask (None, or True where the value
    depends on a discontinuity evaluated within rounding of its jump)."""

    __slots__ = ("v", "e", "ar", "tie")
    __array_ufunc__ = None  # keep numpy from taking over mixed expressions

    def __init__(self, v, e, ar: Arithmetic, tie=None):
        self.v = v
        self.e = e
        self.ar = ar
        self.tie = tie

    def exact_zero(self):
        return (self.v == 0) & (self.e == 0)

    def _new(self, v, e_parts, other, exact_result=None):
        """Result v of an operation with `other`: the propagated bound, its own
        rounding u|v|, and the underflow error where v is below the normal
        range, unless `exact_result` marks results that are exactly zero."""
        if not self.ar.track:
            return Tracked(v, None, self.ar)
        av = np.abs(v)
        e = e_parts() + np.multiply(av, self.ar.u, dtype=np.float64)  # not in float32
        small = av < self.ar.smallest_normal
        if np.any(small):
            if exact_result is not None:
                small = small & ~exact_result()
            e = e + np.where(small, self.ar.underflow, 0.0)
        return Tracked(v, e, self.ar, _either(self.tie, other.tie))

    def __add__(self, other):
        o = _lift(self.ar, other)
        return self._new(self.v + o.v, lambda: self.e + o.e, o,
                         lambda: self.exact_zero() & o.exact_zero())

    __radd__ = __add__

    def __sub__(self, other):
        o = _lift(self.ar, other)
        return self._new(self.v - o.v, lambda: self.e + o.e, o,
                         lambda: self.exact_zero() & o.exact_zero())

    def __rsub__(self, other):
        return _lift(self.ar, other) - self

    def __mul__(self, other):
        o = _lift(self.ar, other)
        with np.errstate(invalid="ignore"):
            return self._new(self.v * o.v,
                             lambda: np.abs(o.v) * self.e + np.abs(self.v) * o.e, o,
                             lambda: self.exact_zero() | o.exact_zero())

    __rmul__ = __mul__

    def __truediv__(self, other):
        o = _lift(self.ar, other)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            z = self.v / o.v
            if not self.ar.track:
                return Tracked(z, None, self.ar)
            ay = np.abs(o.v)
            out = self._new(z, lambda: (self.e + np.abs(z) * o.e) / ay, o, self.exact_zero)
            # a divisor within its error of zero (but not exactly zero, where
            # inf or NaN is the exact IEEE result) is a tie: any result goes
            near_zero = (ay <= o.e) & (o.e > 0)
            if np.any(near_zero):
                out.e = np.where(near_zero, 0.0, out.e)
                out.tie = _either(out.tie, near_zero)
        return out

    def __rtruediv__(self, other):
        return _lift(self.ar, other) / self

    def __neg__(self):
        return Tracked(-self.v, self.e, self.ar, self.tie)

    def __pow__(self, t):
        """x ** t for a step count t (Tracked or number)."""
        t = _lift(self.ar, t)
        z = np.power(self.v, t.v)

        def err():
            x = np.abs(self.v.astype(np.float64))
            tt = np.abs(t.v.astype(np.float64))
            zz = np.abs(z.astype(np.float64))
            with np.errstate(divide="ignore", invalid="ignore"):
                prop = np.where(x > 0, tt * zz / x, 0.0) * self.e
                cond = np.where(x > 0, tt * np.abs(np.log(x)), 0.0)
            return prop + self.ar.u * zz * cond

        return self._new(z, err, t)


def sqrt(x: Tracked) -> Tracked:
    """sqrt(x); a negative x within rounding of 0 is a tie (NaN or a number)."""
    with np.errstate(invalid="ignore"):
        z = np.sqrt(x.v)
    if not x.ar.track:
        return Tracked(z, None, x.ar)
    zz = z.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        near = np.where(zz > 0, x.e / zz, np.inf)
        e = np.minimum(near, np.sqrt(x.e)) + x.ar.u * np.abs(zz)
    e = np.where((zz > 0) & (zz < x.ar.smallest_normal), e + x.ar.underflow, e)
    negative = x.v < 0
    tie = negative & (np.abs(x.v.astype(np.float64)) <= x.ar.tie_width * x.e)
    # out of the domain beyond rounding: NaN is the exact answer (bound 0)
    e = np.where(negative, 0.0, e)
    return Tracked(z, e, x.ar, _either(x.tie, tie if np.any(tie) else None))


def square(x: Tracked) -> Tracked:
    return x * x


def sign(x: Tracked) -> Tracked:
    """sign(x); a tie within rounding of 0 may legitimately go either way."""
    z = np.sign(x.v)
    if not x.ar.track:
        return Tracked(z, None, x.ar)
    tie = (x.e > 0) & (np.abs(x.v.astype(np.float64)) <= x.ar.tie_width * x.e)
    return Tracked(z, np.zeros(np.shape(z)), x.ar, _either(x.tie, tie if np.any(tie) else None))


def maximum(x: Tracked, y: Tracked) -> Tracked:
    """max is 1-Lipschitz: the larger of the two bounds covers it."""
    z = np.maximum(x.v, y.v)
    if not x.ar.track:
        return Tracked(z, None, x.ar)
    return Tracked(z, np.maximum(x.e, y.e), x.ar, _either(x.tie, y.tie))
