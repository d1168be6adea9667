"""Floating-point arithmetic that carries a running error bound.

Every value computed by a reference rule is a `Tracked`: the value rounded in
the working dtype (float32, float64, float16 or bfloat16), exactly as numpy computes it, and a
first-order bound on its absolute distance from the exact real-number result
of the same formula (a running error analysis, Higham, "Accuracy and Stability
of Numerical Algorithms", 2nd ed. 2002, section 3.3).  For each operation
z = fl(x op y) with u the unit roundoff (eps / 2):

    x +- y   e_z = e_x + e_y + u|z|
    x * y    e_z = |y| e_x + |x| e_y + u|z|
    x / y    e_z = (e_x + |z| e_y) / |y| + u|z|
    sqrt x   e_z = min(e_x / z, sqrt(e_x)) + u|z|
    x ** t   e_z = |t z / x| e_x + u|z| (1 + |t ln x|)   (pow through exp/log)
    cos x    e_z = |sin x| e_x + 2u|z|       (within one ulp: SLEEF u10, Eigen, libm)
    log x    e_z = e_x / |x| + 2u|z|         (the same)
    exp x    e_z = |z| expm1(e_x) + 6u|z|    (numpy's float32 exp: within three ulps)
    floor x, ceil x   exact integers; a tie where an integer lies within the bound

plus, for every operation, the absolute error of underflow (eq. 2.8).

Infinities and NaN are outside this model (Higham's excludes overflow).  A
non-finite result that an operand's inf or NaN passes on (inf + x, x / 0, inf *
inf) is IEEE's exact answer, bound 0, as the comparison takes it; one that
overflowed from finite operands, or whose operands' bounds are not finite or
whose sign is unsure (an operand within its bound of 0), may be finite in
another faithful evaluation: its bound is inf, and a finite value computed from
it gets a bound that is not finite (x / inf: inf * 0), which the comparison
cannot judge (verify/compare.py: such an element is never a pass).
Over whole axes (section 3.1; section 3.5 for matrix products), with
gamma_n = n u / (1 - n u):

    sum of n    e_z = sum e_i + gamma_{n-1} sum |x_i|
    max of n    e_z = max e_i                          (max is 1-Lipschitz)
    max(x, y), min(x, y)   e_z = max(e_x, e_y)         (exact, 1-Lipschitz)
    A @ B       e_z = gamma_n |A| |B| + |A| e_B + e_A |B| + e_A e_B   (inner dimension n)
    |x|, transpose, reshape: exact (e_z = e_x)

The bound is what a faithful implementation of the same formula may differ
by, whatever order it evaluates it in up to a small factor; the comparison
engine divides the observed difference by it (see verify/compare.py).

A discontinuous function evaluated within rounding of its jump (sign of a
value whose magnitude is below `tie_width` times its error bound, sqrt of a
value that rounding made negative, a division by a value within rounding of
zero) is a tie: either result is legitimate.  Ties are carried as a mask next
to the bound, through every later operation, and the comparison accepts any
value at a tied element of that step only.

numpy's own ufuncs and functions work on Tracked values through its dispatch
protocols (a rule written in plain numpy, reference/user_rule.py): those of
NUMPY_UFUNCS and NUMPY_FUNCTIONS, each one of the operations above, numbers and
arrays beside a Tracked value lifted as the operators lift them.  A comparison
(x > y, np.greater) gives a bool array, a Condition, tied where x and y are
within rounding of each other; np.where passes its ties on.  Anything else
raises UnsupportedOperation.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import numpy as np


def numpy_dtype(name) -> np.dtype:
    """A dtype by name; bfloat16, which numpy lacks, is ml_dtypes's (what JAX,
    TensorFlow's numpy conversion and Keras's convert_to_numpy give)."""
    if str(name) == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def finfo(dtype):
    """np.finfo, for bfloat16 too (ml_dtypes.finfo)."""
    dtype = numpy_dtype(dtype)
    if dtype.name == "bfloat16":
        import ml_dtypes
        return ml_dtypes.finfo(dtype)
    return np.finfo(dtype)


@dataclass(frozen=True)
class Precision:
    """Where Keras rounds beyond the working dtype, as a named setting.

    learning_rate_float32: Keras stores the learning rate in a float32
        variable whatever the weights' dtype.
    cast_rounds_to_float32: `ops.cast(python_float, dtype)` goes through a
        float32 tensor first (TensorFlow's `tf.cast` of a Python float).
    decay_factor_float32: the decoupled weight-decay factor (1 - wd * lr)
        is computed in float32 (torch backend's `_apply_weight_decay`).
    operand_float32: a Python float operand of a Keras op (ops.add, ops.subtract,
        ops.multiply, ops.power, ops.clip) becomes a float32 tensor first
        (torch's `convert_to_tensor` gives a Python float the dtype floatx,
        float32); Python operators on tensors and ops.divide keep it exact.
    min_max_float32: ops.minimum / ops.maximum of a tensor and a Python float
        compute in float32 (torch's dtype promotion there gives float32 for a
        float64 tensor); so do those of two float64 tensors (the torch backend
        converts both to Keras's result_type, which maps float64 to float32
        on every backend but TensorFlow), and the result is a float32 tensor.
    mean_float32: ops.mean of a float64 tensor rounds it to float32, averages in
        float32 and casts the result back (the JAX and torch backends' mean takes
        its compute dtype from Keras's result_type(x.dtype, "float32"), which maps
        float64 to float32 on every backend but TensorFlow:
        keras/src/backend/common/dtypes.py, BIT64_TO_BIT32_DTYPE).
    value_aliases_variable: a variable's `.value` kept before an assign to the
        variable reads the assigned value (TensorFlow's tf.Variable, torch's
        in-place tensor; JAX arrays are immutable).
    norm_float32: ops.norm of a float64 tensor casts it to float32 and computes
        in float32 (Keras's `dtypes.result_type(x.dtype, float)` in the JAX and
        torch backends' `linalg.norm` forces 64-bit types to 32-bit off
        TensorFlow: BIT64_TO_BIT32_DTYPE in keras/src/backend/common/dtypes.py).
    schedule_float64: a learning-rate schedule computes in float64 in float64
        runs (JAX, whose x64 mode the harness enables exactly for float64 work,
        converts the schedule's Python floats to float64 tensors; elsewhere they
        become float32, Keras's floatx), except ops.cos, which computes in
        float32 (result_type(x.dtype, float) maps float64 to float32 off
        TensorFlow, as for mean_float32), its result a float32 tensor.
    moving_average_weighted: the backend's own Adam, AdamW, Nadam and Adamax
        kernels (torch: keras/src/backend/torch/optimizers/) form the moments
        as beta * m + (1 - beta) * g (_foreach_mul_, _foreach_add_), where the
        generic code writes m + (g - m) * (1 - beta): the same to rounding for
        finite values, but an infinite m stays infinite where the generic form
        gives inf - inf = NaN.
    sign_of_nan_zero: sign(NaN) is 0 (torch.sign), not NaN.
    accumulator_reset_multiplies: the gradient accumulators are reset by
        multiplying them by 0.0 (torch's `_backend_reset_gradient_accumulators`),
        which leaves NaN where one holds inf or NaN, not 0.
    kernels_keep_gradient_dtype: the classes whose own kernels (torch:
        keras/src/backend/torch/optimizers/) use a gradient in the dtype it
        arrives in, where every generic `update_step` casts it to the variable's
        dtype first; it differs only for a float32 gradient of a float16 or
        bfloat16 variable (LossScaleOptimizer's of a rank-0 weight, divided by
        its float32 scale: torch.divide widens a tensor of higher rank by a
        zero-dimensional one only across categories), which such a kernel
        squares and scales in float32 before the assign rounds the result to
        the variable's dtype.
    flushes_subnormals: subnormal operands may be read as zero and subnormal
        results flushed to zero (TensorFlow and XLA set FTZ/DAZ on CPU;
        measured in float32 and float64, eager and compiled: max(0, s), s + 0,
        s * 1 and a product that underflows give 0 for a subnormal s, abs(s)
        keeps it), so each operation's underflow error is up to the smallest
        normal number rather than half the smallest subnormal (Higham 2002,
        eq. 2.8), and an input or constant s that is subnormal is within |s|
        of what the backend computes with.
    """

    name: str
    learning_rate_float32: bool = True
    cast_rounds_to_float32: bool = False
    decay_factor_float32: bool = False
    operand_float32: bool = False
    min_max_float32: bool = False
    mean_float32: bool = False
    value_aliases_variable: bool = False
    norm_float32: bool = False
    schedule_float64: bool = False
    flushes_subnormals: bool = False
    moving_average_weighted: bool = False
    sign_of_nan_zero: bool = False
    accumulator_reset_multiplies: bool = False
    kernels_keep_gradient_dtype: tuple = ()

    def describe(self) -> str:
        parts = [text for flag, text in DESCRIPTIONS.items() if getattr(self, flag)]
        return "; ".join(parts) or "no rounding beyond the working dtype"


DESCRIPTIONS = {  # each setting as the reports state it, in this order
    "learning_rate_float32": "learning rate stored as float32",
    "cast_rounds_to_float32": "ops.cast(Python float) rounds to float32 first",
    "decay_factor_float32": "weight-decay factor (1 - wd*lr) computed in float32",
    "operand_float32": "Python-float operands of Keras ops round to float32 first",
    "min_max_float32": "ops.minimum/maximum of float64 compute in float32",
    "mean_float32": "ops.mean of a float64 tensor computes in float32",
    "norm_float32": "ops.norm of a float64 tensor computes in float32",
    "value_aliases_variable": "a variable's .value read before an assign sees the assigned value",
    "schedule_float64": "learning-rate schedules compute in float64 in float64 runs "
                        "(ops.cos in float32)",
    "flushes_subnormals": "subnormal results may be flushed to zero",
    "moving_average_weighted": "Adam, AdamW, Nadam and Adamax moments as beta*m + (1-beta)*g",
    "sign_of_nan_zero": "sign(NaN) is 0",
    "accumulator_reset_multiplies": "gradient accumulators reset by multiplying by 0.0",
    "kernels_keep_gradient_dtype": "the own kernels of Adadelta, Adagrad, Adam, Adamax, AdamW, "
                                   "Lion, Nadam, RMSprop and SGD use a float32 gradient of a "
                                   "float16/bfloat16 variable uncast",
}

PRECISIONS = {
    "tensorflow": Precision("tensorflow", cast_rounds_to_float32=True, flushes_subnormals=True,
                            value_aliases_variable=True),
    "jax": Precision("jax", mean_float32=True, norm_float32=True, schedule_float64=True,
                     flushes_subnormals=True),
    "torch": Precision("torch", decay_factor_float32=True, operand_float32=True,
                       min_max_float32=True, mean_float32=True, norm_float32=True,
                       value_aliases_variable=True, moving_average_weighted=True,
                       sign_of_nan_zero=True, accumulator_reset_multiplies=True,
                       kernels_keep_gradient_dtype=("Adadelta", "Adagrad", "Adam", "Adamax",
                                                    "AdamW", "Lion", "Nadam", "RMSprop",
                                                    "SGD")),
    # No rounding beyond the working dtype: the formulas as real-number math.
    "exact": Precision("exact", learning_rate_float32=False),
    # The peers (verify/peers/) round nowhere beyond the working dtype: a Python-float
    # hyperparameter meets a tensor in the tensor's dtype (torch's wrapped scalars, JAX's
    # weak types), and the learning rate is a Python float, not Keras's float32 variable.
    # XLA on CPU flushes subnormals (as in the harness's jax setting); torch's CPU
    # kernels do not.
    "torch.optim": Precision("torch.optim", learning_rate_float32=False),
    "optax": Precision("optax", learning_rate_float32=False, flushes_subnormals=True),
}


class Arithmetic:
    """The working dtype, the precision setting, and whether bounds are kept."""

    def __init__(self, dtype, precision: Precision, *, track: bool = True,
                 tie_width: float = 32.0):
        self.dtype = numpy_dtype(dtype)
        self.precision = precision
        self.track = track
        info = finfo(self.dtype)
        self.u = float(info.eps) / 2
        # absolute error of an underflowing result (Higham 2002, eq. 2.8)
        self.smallest_normal = float(info.smallest_normal)
        self.underflow = (float(info.smallest_normal) if precision.flushes_subnormals
                          else float(info.smallest_subnormal) / 2)
        self.tie_width = tie_width

    def read_as_zero(self, value):
        """|value| where a backend that flushes subnormals may read it as 0 (a
        subnormal operand), else 0: the error of reading it."""
        if not self.precision.flushes_subnormals:
            return 0.0
        a = np.abs(np.asarray(value, dtype=np.float64))
        subnormal = (a > 0) & (a < self.smallest_normal)
        return np.where(subnormal, a, 0.0) if np.any(subnormal) else 0.0

    # --- constants -------------------------------------------------------
    def _rounded(self, exact: float) -> "Tracked":
        value = self.dtype.type(exact)
        err = None
        if self.track:
            err = np.float64(abs(float(value) - exact) + self.read_as_zero(value))
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

    def operand(self, x: float) -> "Tracked":
        """A Python float passed to a Keras op beside a tensor (`ops.multiply(c, x)`);
        the precision setting may round it to float32 first."""
        x = float(x)
        if self.precision.operand_float32:
            x = float(np.float32(x))
        return self._rounded(x)

    def hyperparameter(self, x: float) -> "Tracked":
        """A Python-float hyperparameter of a rule that does not say how Keras takes
        it (a `Hyperparameter`): as it is (a Python operator) or rounded to float32
        first (ops.cast on TensorFlow, an op's operand on torch: the settings
        cast_rounds_to_float32 and operand_float32).  Its value in the working
        dtype, its bound covering both."""
        out = self.const(x)
        if self.track and (self.precision.cast_rounds_to_float32
                           or self.precision.operand_float32):
            out.e = np.maximum(out.e, abs(float(np.float32(x)) - float(x)))
        return out

    def learning_rate(self, lr: float) -> "Tracked":
        lr = float(lr)
        if self.precision.learning_rate_float32:
            lr = float(np.float32(lr))
        return self._rounded(lr)

    def exact(self, array) -> "Tracked":
        """An input that both sides receive bit for bit (gradient, state); where
        it is subnormal a backend that flushes may compute with 0 instead."""
        value = np.asarray(array, dtype=self.dtype)
        return Tracked(value, np.float64(self.read_as_zero(value)) if self.track else None, self)

    def step_count(self, t) -> "Tracked":
        """An integer step count converted to the working dtype (exact)."""
        return self.exact(np.asarray(t, dtype=np.float64))


def _unsure(x: "Tracked"):
    """Where an IEEE special computed from x is not certain: x's bound is not
    finite, or x is within its bound of 0 (the sign of inf * x, x / 0)."""
    e = np.broadcast_to(x.e, np.shape(x.v))
    with np.errstate(invalid="ignore"):
        return ~np.isfinite(e) | ((e > 0) & (np.abs(x.v.astype(np.float64)) <= e))


def _specials(z, e, special, unsure):
    """The bound e with that of z's non-finite elements: 0 where an operand's inf or
    NaN (or an exact 0 divisor: `special`) passes on exactly, inf where z
    overflowed or is `unsure` (see the module docstring)."""
    bad = ~np.isfinite(z)
    if not np.any(bad):
        return e
    return np.where(bad, np.where(special & ~unsure, 0.0, np.inf), e)


def _stays_hyperparameter(operation):
    def method(*args):
        result = operation(*args)
        return Hyperparameter(result) if type(result) is float else result
    return method


class Hyperparameter(float):
    """A float hyperparameter handed to a rule written in plain numpy
    (reference/user_rule.py).  Python arithmetic on it is Python's, as Keras's
    `1 - self.beta_1` is, and gives a Hyperparameter; where one meets a Tracked
    value it enters through `Arithmetic.hyperparameter`."""

    __add__ = _stays_hyperparameter(float.__add__)
    __radd__ = _stays_hyperparameter(float.__radd__)
    __sub__ = _stays_hyperparameter(float.__sub__)
    __rsub__ = _stays_hyperparameter(float.__rsub__)
    __mul__ = _stays_hyperparameter(float.__mul__)
    __rmul__ = _stays_hyperparameter(float.__rmul__)
    __truediv__ = _stays_hyperparameter(float.__truediv__)
    __rtruediv__ = _stays_hyperparameter(float.__rtruediv__)
    __pow__ = _stays_hyperparameter(float.__pow__)
    __rpow__ = _stays_hyperparameter(float.__rpow__)
    __neg__ = _stays_hyperparameter(float.__neg__)
    __abs__ = _stays_hyperparameter(float.__abs__)


def _lift(ar: Arithmetic, x) -> "Tracked":
    """x as a Tracked value: a Hyperparameter as `Arithmetic.hyperparameter` takes
    it, any other number as `Arithmetic.const` does; a comparison's
    bools as exact 0 and 1 with its ties; a numpy array's numbers each rounded to
    the working dtype, with that rounding."""
    if isinstance(x, Tracked):
        return x
    if isinstance(x, Hyperparameter):
        return ar.hyperparameter(x)
    if isinstance(x, (int, float, np.floating, np.integer)):
        return ar.const(float(x))
    if isinstance(x, Condition):
        return Tracked(np.asarray(x, ar.dtype), np.float64(0.0) if ar.track else None, ar,
                       x.tie)
    if isinstance(x, np.ndarray) and x.dtype.kind in "biuf":
        exact = x.astype(np.float64)
        value = exact.astype(ar.dtype)
        e = np.abs(value.astype(np.float64) - exact) + ar.read_as_zero(value)
        return Tracked(value, e if ar.track else None, ar)
    raise TypeError(f"cannot combine Tracked with {type(x).__name__}")


def _either(a, b):
    """Union of two tie masks (None: no tie anywhere)."""
    if a is None:
        return b
    if b is None:
        return a
    return a | b


def _rearranged(a, v, how, arg):
    """A bound or tie mask rearranged like its value v; a scalar (the same
    for every element) and None stay as they are."""
    if a is None or np.ndim(a) == 0:
        return a
    return how(np.broadcast_to(a, np.shape(v)), arg)


class Tracked:
    """A value in the working dtype, its absolute error bound (or None when
    bounds are not kept) and its tie mask (None, or True where the value
    depends on a discontinuity evaluated within rounding of its jump)."""

    __slots__ = ("v", "e", "ar", "tie")

    def __init__(self, v, e, ar: Arithmetic, tie=None):
        self.v = v
        self.e = e
        self.ar = ar
        self.tie = tie

    # --- numpy's dispatch protocols: a rule in plain numpy (see NUMPY_UFUNCS) ----
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return numpy_ufunc(ufunc, method, inputs, kwargs)

    def __array_function__(self, func, types, args, kwargs):
        return numpy_function(func, args, kwargs)

    def __array__(self, dtype=None, copy=None):
        raise UnsupportedOperation("a Tracked value cannot become a plain numpy array in a "
                                   "rule (its error bound would be lost)")

    @property
    def shape(self) -> tuple:
        return np.shape(self.v)

    @property
    def ndim(self) -> int:
        return np.ndim(self.v)

    @property
    def T(self) -> "Tracked":
        return self.transpose()

    # --- exact rearrangements: the same values, bounds and ties ------------
    def reshape(self, shape) -> "Tracked":
        return Tracked(np.reshape(self.v, shape), _rearranged(self.e, self.v, np.reshape, shape),
                       self.ar, _rearranged(self.tie, self.v, np.reshape, shape))

    def transpose(self, axes=None) -> "Tracked":
        return Tracked(np.transpose(self.v, axes),
                       _rearranged(self.e, self.v, np.transpose, axes), self.ar,
                       _rearranged(self.tie, self.v, np.transpose, axes))

    def exact_zero(self):
        return (self.v == 0) & (self.e == 0)

    def _new(self, v, e_parts, other, exact_result=None, special=None):
        """Result v of an operation with `other`: the propagated bound, its own
        rounding u|v|, and the underflow error where v is below the normal
        range, unless `exact_result` marks results that are exactly zero; a
        non-finite v as `_specials` says (`special`: more operands whose IEEE
        result is exact, an exact 0 divisor)."""
        if not self.ar.track:
            return Tracked(v, None, self.ar)
        av = np.abs(v)
        e = e_parts() + np.multiply(av, self.ar.u, dtype=np.float64)  # not in float32
        small = av < self.ar.smallest_normal
        if np.any(small):
            if exact_result is not None:
                small = small & ~exact_result()
            e = e + np.where(small, self.ar.underflow, 0.0)
        if not np.all(np.isfinite(v)):
            given = ~np.isfinite(self.v) | ~np.isfinite(other.v)
            e = _specials(v, e, given if special is None else given | special(),
                          _unsure(self) | _unsure(other))
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
            out = self._new(z, lambda: (self.e + np.abs(z) * o.e) / ay, o, self.exact_zero,
                            o.exact_zero)
            # a divisor within its error of zero (but not exactly zero, where
            # inf or NaN is the exact IEEE result) is a tie: any result goes; one
            # whose bound is not finite leaves the result's bound not finite
            near_zero = (ay <= o.e) & (o.e > 0) & np.isfinite(o.e)
            if np.any(near_zero):
                out.e = np.where(near_zero, 0.0, out.e)
                out.tie = _either(out.tie, near_zero)
        return out

    def __rtruediv__(self, other):
        return _lift(self.ar, other) / self

    def __gt__(self, other):
        return compare(np.greater, self, _lift(self.ar, other))

    def __ge__(self, other):
        return compare(np.greater_equal, self, _lift(self.ar, other))

    def __lt__(self, other):
        return compare(np.less, self, _lift(self.ar, other))

    def __le__(self, other):
        return compare(np.less_equal, self, _lift(self.ar, other))

    def __eq__(self, other):
        return compare(np.equal, self, _lift(self.ar, other))

    def __ne__(self, other):
        return compare(np.not_equal, self, _lift(self.ar, other))

    def __abs__(self):
        """|x| is exact and 1-Lipschitz: the bound passes through unchanged."""
        return Tracked(np.abs(self.v), self.e, self.ar, self.tie)

    def __matmul__(self, other):
        return matmul(self, _lift(self.ar, other))

    def __rmatmul__(self, other):
        return matmul(_lift(self.ar, other), self)

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

    def __rpow__(self, other):
        return _lift(self.ar, other) ** self


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
    e = _specials(z, e, ~np.isfinite(x.v), _unsure(x))
    negative = x.v < 0
    known = np.isfinite(x.e)  # an unbounded x is no tie: its result is not judged
    tie = negative & known & (np.abs(x.v.astype(np.float64)) <= x.ar.tie_width * x.e)
    # out of the domain beyond rounding: NaN is the exact answer (bound 0)
    e = np.where(negative & known, 0.0, e)
    return Tracked(z, e, x.ar, _either(x.tie, tie if np.any(tie) else None))


def cos(x: Tracked) -> Tracked:
    """cos(x): the argument's bound times |sin x|, and one ulp of the result."""
    z = np.cos(x.v)
    if not x.ar.track:
        return Tracked(z, None, x.ar)
    return x._new(z, lambda: np.abs(np.sin(x.v.astype(np.float64))) * x.e
                  + x.ar.u * np.abs(z.astype(np.float64)), x)


def log(x: Tracked) -> Tracked:
    """log(x) for x > 0: the argument's relative bound, and one ulp of the result."""
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.log(x.v)
        if not x.ar.track:
            return Tracked(z, None, x.ar)
        return x._new(z, lambda: x.e / np.abs(x.v.astype(np.float64))
                      + x.ar.u * np.abs(z.astype(np.float64)), x)


def exp(x: Tracked) -> Tracked:
    """exp(x): the argument's bound through |exp(x) - exp(x^)| <= exp(x^) expm1(e_x)
    for |x - x^| <= e_x (the mean value theorem; to first order the condition number
    |x f'(x) / f(x)| = |x| of Higham 2002, section 1.6), and three ulps of the result:
    numpy's own accuracy test allows exp three ulps in float32 and one in float64
    (numpy/_core/tests/data/umath-validation-set-exp.csv; 2.3 measured in float32)."""
    with np.errstate(over="ignore"):
        z = np.exp(x.v)
    if not x.ar.track:
        return Tracked(z, None, x.ar)
    az = np.abs(z.astype(np.float64))
    with np.errstate(over="ignore", invalid="ignore"):
        return x._new(z, lambda: az * np.expm1(x.e) + 5 * x.ar.u * az, x)


def _rounded_integer(x: Tracked, z) -> Tracked:
    """An integer-valued z = floor(x) or ceil(x): exact, except that where the
    exact x may lie on the other side of an integer (within tie_width times its
    bound) either neighbouring integer is legitimate, a tie."""
    if not x.ar.track:
        return Tracked(z, None, x.ar)
    v = x.v.astype(np.float64)
    reach = x.ar.tie_width * np.broadcast_to(x.e, np.shape(v))
    known = np.isfinite(reach)  # an unbounded x is no tie: its result is not judged
    tie = known & (reach > 0) & ((np.abs(v - np.round(v)) <= reach))
    return Tracked(z, np.where(known, 0.0, np.inf), x.ar,
                   _either(x.tie, tie if np.any(tie) else None))


def floor(x: Tracked) -> Tracked:
    return _rounded_integer(x, np.floor(x.v))


def ceil(x: Tracked) -> Tracked:
    return _rounded_integer(x, np.ceil(x.v))


def quotient(x: Tracked, y: Tracked) -> Tracked:
    """x / y, exact where both are exact integers and y divides x (the quotient
    is then an integer no larger than |x|, representable, and IEEE division is
    correctly rounded): a step count over a number of steps."""
    z = x / y
    if x.ar.track:
        xv, yv = x.v.astype(np.float64), y.v.astype(np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            exact = ((np.broadcast_to(x.e, np.shape(z.v)) == 0)
                     & (np.broadcast_to(y.e, np.shape(z.v)) == 0)
                     & (xv == np.round(xv)) & (yv == np.round(yv)) & (yv != 0)
                     & (np.fmod(xv, yv) == 0))
        z.e = np.where(exact, 0.0, z.e)
    return z


def square(x: Tracked) -> Tracked:
    return x * x


def sign(x: Tracked) -> Tracked:
    """sign(x); a tie within rounding of 0 may legitimately go either way."""
    z = np.sign(x.v)
    if x.ar.precision.sign_of_nan_zero:
        z = np.where(np.isnan(z), 0.0, z).astype(z.dtype)
    if not x.ar.track:
        return Tracked(z, None, x.ar)
    known = np.isfinite(x.e)  # an unbounded x is no tie: its result is not judged
    tie = known & (x.e > 0) & (np.abs(x.v.astype(np.float64)) <= x.ar.tie_width * x.e)
    return Tracked(z, np.where(known, np.zeros(np.shape(z)), np.inf), x.ar,
                   _either(x.tie, tie if np.any(tie) else None))


def maximum(x: Tracked, y: Tracked) -> Tracked:
    """max is 1-Lipschitz: the larger of the two bounds covers it."""
    z = np.maximum(x.v, y.v)
    if not x.ar.track:
        return Tracked(z, None, x.ar)
    return Tracked(z, np.maximum(x.e, y.e), x.ar, _either(x.tie, y.tie))


def minimum(x: Tracked, y: Tracked) -> Tracked:
    """min is 1-Lipschitz like max: the larger of the two bounds covers it."""
    z = np.minimum(x.v, y.v)
    if not x.ar.track:
        return Tracked(z, None, x.ar)
    return Tracked(z, np.maximum(x.e, y.e), x.ar, _either(x.tie, y.tie))


def to_float32(x: Tracked) -> Tracked:
    """x rounded to float32 (a float32 tensor inside a float64 computation, e.g.
    torch's ops.maximum of float64 tensors): its rounding u32 |z|, and the float32
    underflow below float32's normal range; in float32 it is x itself."""
    if x.ar.dtype == np.float32:
        return x
    z = x.v.astype(np.float32).astype(x.ar.dtype)
    if not x.ar.track:
        return Tracked(z, None, x.ar)
    f32 = np.finfo(np.float32)
    az = np.abs(z.astype(np.float64))
    e = x.e + az * (float(f32.eps) / 2)
    if np.any(az < float(f32.smallest_normal)):
        underflow = (float(f32.smallest_normal) if x.ar.precision.flushes_subnormals
                     else float(f32.smallest_subnormal) / 2)
        e = e + np.where((az < float(f32.smallest_normal)) & (x.v != 0), underflow, 0.0)
    return Tracked(z, _specials(z, e, ~np.isfinite(x.v), _unsure(x)), x.ar, x.tie)


def stored(x: Tracked) -> Tracked:
    """x assigned to a variable of the working dtype: a value computed in a wider
    dtype (a float32 gradient's terms, `kernels_keep_gradient_dtype`) rounded to
    it, with that rounding."""
    if x.v.dtype == x.ar.dtype:
        return x
    z = x.v.astype(x.ar.dtype)
    if not x.ar.track:
        return Tracked(z, None, x.ar, x.tie)
    az = np.abs(z.astype(np.float64))
    e = x.e + az * x.ar.u + np.where((az < x.ar.smallest_normal) & (z != 0), x.ar.underflow, 0.0)
    return Tracked(z, _specials(z, e, ~np.isfinite(x.v), _unsure(x)), x.ar, x.tie)


def gamma(n, u: float):
    """gamma_n = n u / (1 - n u) (Higham 2002, section 3.1, lemma 3.1)."""
    n = np.asarray(n, dtype=np.float64)
    return n * u / (1 - n * u)


def _axes(ndim: int, axis) -> tuple:
    if axis is None:
        return tuple(range(ndim))
    return tuple(a % ndim for a in np.atleast_1d(axis))


def _reduced_specials(x: Tracked, z, e, axes, keepdims):
    """`_specials` of a reduction over `axes`: a term's inf or NaN passes on."""
    if np.all(np.isfinite(z)):
        return e
    return _specials(z, e, np.any(~np.isfinite(x.v), axis=axes, keepdims=keepdims),
                     np.any(_unsure(x), axis=axes, keepdims=keepdims))


def _any_tie(x: Tracked, axis, keepdims):
    if x.tie is None:
        return None
    return np.any(np.broadcast_to(x.tie, np.shape(x.v)), axis=axis, keepdims=keepdims)


def sum_over(x: Tracked, axis=None, keepdims: bool = False) -> Tracked:
    """The sum over `axis` (numpy's convention; None: every axis).

    Summing n terms in any order (numpy's pairwise sum, a backend's reduction
    tree) passes each term through at most n - 1 additions, so the computed
    sum is within gamma_{n-1} sum |x_i| of the exact sum of the computed terms
    (Higham 2002, section 4.2, recursive summation; the bound holds for every
    order), plus the terms' own bounds.  With subnormals flushed to zero, each
    addition may also lose up to the smallest normal number.
    """
    axes = _axes(np.ndim(x.v), axis)
    z = np.sum(x.v, axis=axes, keepdims=keepdims)
    if not x.ar.track:
        return Tracked(z, None, x.ar)
    n = int(np.prod([np.shape(x.v)[a] for a in axes]))
    magnitude = np.sum(np.abs(x.v.astype(np.float64)), axis=axes, keepdims=keepdims)
    propagated = np.sum(np.broadcast_to(x.e, np.shape(x.v)), axis=axes, keepdims=keepdims)
    e = propagated + gamma(max(n - 1, 0), x.ar.u) * magnitude
    if x.ar.precision.flushes_subnormals:
        e = e + np.where(magnitude > 0, max(n - 1, 0) * x.ar.underflow, 0.0)
    return Tracked(z, _reduced_specials(x, z, e, axes, keepdims), x.ar, _any_tie(x, axes, keepdims))


def mean_over(x: Tracked, axis=None, keepdims: bool = False) -> Tracked:
    """The mean over `axis`: the sum divided by the count (the count rounded to
    the dtype, as a backend converts it), with the division's rounding."""
    axes = _axes(np.ndim(x.v), axis)
    n = int(np.prod([np.shape(x.v)[a] for a in axes]))
    return sum_over(x, axes, keepdims) / x.ar.const(float(n))


def ops_mean(x: Tracked, axis=None, keepdims: bool = False) -> Tracked:
    """Keras's ops.mean: `mean_over`, except that under the `mean_float32`
    precision setting a float64 x is rounded to float32 and averaged in float32.

    Then each term carries its float32 rounding u32 |x_i|, the float32 sum of n
    terms gamma_{n-1}(u32) sum |x_i| (1 + u32) (Higham 2002, section 4.2, any
    order), the division by n its rounding u32 |z|, and each float32 conversion
    and addition the float32 underflow; the cast back to float64 is exact.
    """
    ar = x.ar
    if not (ar.precision.mean_float32 and ar.dtype == np.float64):
        return mean_over(x, axis, keepdims)
    axes = _axes(np.ndim(x.v), axis)
    n = int(np.prod([np.shape(x.v)[a] for a in axes]))
    x32 = x.v.astype(np.float32)
    z = (np.sum(x32, axis=axes, keepdims=keepdims, dtype=np.float32)
         / np.float32(n)).astype(np.float64)
    if not ar.track:
        return Tracked(z, None, ar)
    f32 = np.finfo(np.float32)
    u32 = float(f32.eps) / 2
    underflow32 = (float(f32.smallest_normal) if ar.precision.flushes_subnormals
                   else float(f32.smallest_subnormal) / 2)
    magnitude = np.sum(np.abs(x.v.astype(np.float64)), axis=axes, keepdims=keepdims)
    propagated = np.sum(np.broadcast_to(x.e, np.shape(x.v)), axis=axes, keepdims=keepdims)
    summed = (propagated + u32 * magnitude + gamma(max(n - 1, 0), u32) * (1 + u32) * magnitude
              + np.where(magnitude > 0, (2 * n - 1) * underflow32, 0.0))
    e = summed / n + u32 * np.abs(z)
    e = e + np.where(np.abs(z) < float(f32.smallest_normal), underflow32, 0.0)
    return Tracked(z, _reduced_specials(x, z, e, axes, keepdims), ar, _any_tie(x, axes, keepdims))


def norm(x: Tracked, axis=None, keepdims: bool = False) -> Tracked:
    """The 2-norm over `axis`: sqrt of the sum of squares, each operation with
    its bound."""
    return sqrt(sum_over(square(x), axis, keepdims))


def matmul(a: Tracked, b: Tracked) -> Tracked:
    """a @ b over the last two axes (numpy's batching for the leading ones).

    Each element is an inner product of length n (the inner dimension): in any
    order of summation it is within gamma_n |a| |b| of the exact product of the
    computed factors (Higham 2002, section 3.1 for inner products, section 3.5
    for matrix products); the factors' bounds add |a| e_b + e_a |b| + e_a e_b.
    With subnormals flushed, each of the n products and n - 1 additions may
    also lose up to the smallest normal number.
    """
    z = np.matmul(a.v, b.v).astype(a.ar.dtype, copy=False)  # bfloat16's is float32
    if not a.ar.track:
        return Tracked(z, None, a.ar)
    n = np.shape(a.v)[-1]
    abs_a, abs_b = np.abs(a.v.astype(np.float64)), np.abs(b.v.astype(np.float64))
    e_a = np.broadcast_to(a.e, np.shape(a.v)).astype(np.float64)
    e_b = np.broadcast_to(b.e, np.shape(b.v)).astype(np.float64)
    magnitude = np.matmul(abs_a, abs_b)
    e = (gamma(n, a.ar.u) * magnitude + np.matmul(abs_a, e_b) + np.matmul(e_a, abs_b)
         + np.matmul(e_a, e_b))
    if a.ar.precision.flushes_subnormals:
        e = e + np.where(magnitude > 0, (2 * n - 1) * a.ar.underflow, 0.0)
    else:
        # gradual underflow: each product may lose half the smallest subnormal
        e = e + np.where(magnitude > 0, n * a.ar.underflow, 0.0)
    if not np.all(np.isfinite(z)):
        # a row of a or column of b holding inf or NaN passes it on
        def along(mask_a, mask_b):
            return (np.matmul(mask_a.astype(float), np.ones_like(abs_b))
                    + np.matmul(np.ones_like(abs_a), mask_b.astype(float))) > 0
        e = _specials(z, e, along(~np.isfinite(a.v), ~np.isfinite(b.v)),
                      along(_unsure(a), _unsure(b)))
    tie = None
    if a.tie is not None or b.tie is not None:
        ta = np.broadcast_to(False if a.tie is None else a.tie, np.shape(a.v)).astype(float)
        tb = np.broadcast_to(False if b.tie is None else b.tie, np.shape(b.v)).astype(float)
        tie = (np.matmul(ta, np.ones_like(abs_b)) + np.matmul(np.ones_like(abs_a), tb)) > 0
    return Tracked(z, e, a.ar, tie)


def where(condition, a: Tracked, b: Tracked) -> Tracked:
    """a where the (exactly known) condition holds, else b, each with its bound."""
    tie = None
    if a.tie is not None or b.tie is not None:
        tie = np.where(condition, False if a.tie is None else a.tie,
                       False if b.tie is None else b.tie)
    e = None if a.e is None else np.where(condition, a.e, b.e)
    return Tracked(np.where(condition, a.v, b.v), e, a.ar, tie)


def compare(ufunc, x: Tracked, y: Tracked) -> "Condition":
    """x > y (or another comparison `ufunc`) as a bool array; a tie where x and y
    are within tie_width times their bounds of each other, where the exact values
    may compare either way."""
    values = ufunc(x.v, y.v)
    if not x.ar.track:
        return Condition(values, None, x.ar)
    reach = x.ar.tie_width * (np.broadcast_to(x.e, np.shape(values))
                              + np.broadcast_to(y.e, np.shape(values)))
    with np.errstate(invalid="ignore", over="ignore"):
        gap = np.abs(x.v.astype(np.float64) - y.v.astype(np.float64))
        # an unbounded operand is no tie: its result is not judged
        tie = np.isfinite(reach) & (reach > 0) & (gap <= reach)
    return Condition(values, _either(_either(x.tie, y.tie), tie if np.any(tie) else None),
                     x.ar)


class Condition(np.ndarray):
    """The bools of a comparison of Tracked values, with its tie mask (`compare`).

    np.where keeps the ties in its result; `&`, `|`, `^` and `~` in theirs;
    arithmetic takes the bools as exact 0 and 1 with the ties.  Anything else is
    numpy's on the bools where nothing is tied, and an UnsupportedOperation where
    something is (a Python `if`, np.any), whose answer rounding may decide."""

    def __new__(cls, values, tie, ar: Arithmetic):
        condition = np.asarray(values, dtype=bool).view(cls)
        condition.tie, condition.ar = tie, ar
        return condition

    def __array_finalize__(self, parent):
        self.tie, self.ar = None, getattr(parent, "ar", None)

    def __bool__(self):
        _refuse_if_tied("a Python `if`", (self,))
        return bool(np.asarray(self))

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if any(isinstance(x, Tracked) for x in inputs) or (
                ufunc in NUMPY_UFUNCS and method == "__call__"):
            return numpy_ufunc(ufunc, method, inputs, kwargs)
        if ufunc in LOGICAL and method == "__call__" and not kwargs:
            values = ufunc(*(np.asarray(x) for x in inputs))
            tie = None
            for x in inputs:
                if isinstance(x, Condition) and x.tie is not None:
                    tie = _either(tie, np.broadcast_to(x.tie, np.shape(values)))
            return Condition(values, tie, self.ar)
        _refuse_if_tied(_name(ufunc) + ("" if method == "__call__" else f".{method}"), inputs)
        if "out" in kwargs:
            kwargs["out"] = tuple(np.asarray(x) for x in kwargs["out"])
        return getattr(ufunc, method)(*(np.asarray(x) if isinstance(x, Condition) else x
                                        for x in inputs), **kwargs)

    def __array_function__(self, func, types, args, kwargs):
        if func in NUMPY_FUNCTIONS:
            return numpy_function(func, args, kwargs)
        _refuse_if_tied(_name(func), args)
        return super().__array_function__(func, types, args, kwargs)


def _refuse_if_tied(what: str, values) -> None:
    if any(isinstance(x, Condition) and x.tie is not None and np.any(x.tie) for x in values):
        raise UnsupportedOperation(f"{what} on a comparison within rounding of its operands "
                                   "is not supported in a rule: use np.where")


class UnsupportedOperation(ValueError):
    """A numpy function or ufunc a rule may not use on Tracked values."""


# the bools' own operations on comparisons (`&`, `|`, `^`, `~` and numpy's logical_*)
LOGICAL = (np.logical_and, np.logical_or, np.logical_xor, np.logical_not, np.bitwise_and,
           np.bitwise_or, np.bitwise_xor, np.invert)

# numpy's ufuncs a rule may apply to Tracked values, as the operations above
NUMPY_UFUNCS = {
    np.add: lambda x, y: x + y,
    np.subtract: lambda x, y: x - y,
    np.multiply: lambda x, y: x * y,
    np.divide: lambda x, y: x / y,
    np.power: lambda x, y: x ** y,
    np.negative: lambda x: -x,
    np.absolute: abs,
    np.sqrt: sqrt,
    np.square: square,
    np.sign: sign,
    np.maximum: maximum,
    np.minimum: minimum,
    np.log: log,
    np.exp: exp,
    np.cos: cos,
    np.matmul: matmul,
    **{ufunc: (lambda ufunc: lambda x, y: compare(ufunc, x, y))(ufunc)
       for ufunc in (np.greater, np.greater_equal, np.less, np.less_equal, np.equal,
                     np.not_equal)},
}


def _where(condition, x, y):
    ar = _arithmetic((condition, x, y))
    out = where(np.asarray(condition, dtype=bool), _lift(ar, x), _lift(ar, y))
    if isinstance(condition, Condition) and condition.tie is not None:
        out.tie = _either(out.tie, np.broadcast_to(condition.tie, np.shape(out.v)))
    return out


def _filled(a, fill_value):
    ar = _arithmetic((a, fill_value))
    fill = _lift(ar, fill_value)
    shape = np.shape(a.v if isinstance(a, Tracked) else a)
    if np.shape(fill.v) == shape:
        return fill
    return Tracked(np.broadcast_to(fill.v, shape).copy(), fill.e, ar,
                   None if fill.tie is None else np.broadcast_to(fill.tie, shape))


def _clip(a, a_min, a_max):
    ar = _arithmetic((a, a_min, a_max))
    out = _lift(ar, a)
    if a_min is not None:
        out = maximum(out, _lift(ar, a_min))
    if a_max is not None:
        out = minimum(out, _lift(ar, a_max))
    return out


def _norm(x, ord=None, axis=None, keepdims=False):
    if ord is not None:
        _unsupported(f"numpy.linalg.norm with ord={ord!r}")
    return norm(x, axis, keepdims)


def _tracked(operation):
    """`operation` of a Tracked first argument, lifted if it is a comparison."""
    @functools.wraps(operation)
    def lifted(a, *args, **kwargs):
        return operation(_lift(_arithmetic((a,)), a), *args, **kwargs)
    return lifted


# numpy's functions a rule may call on Tracked values: each implementation takes
# numpy's arguments by numpy's names, and nothing more
NUMPY_FUNCTIONS = {
    np.where: _where,
    np.sum: _tracked(lambda a, axis=None, keepdims=False: sum_over(a, axis, keepdims)),
    np.mean: _tracked(lambda a, axis=None, keepdims=False: mean_over(a, axis, keepdims)),
    np.linalg.norm: _tracked(_norm),
    np.zeros_like: lambda a: _filled(a, 0.0),
    np.ones_like: lambda a: _filled(a, 1.0),
    np.full_like: _filled,
    np.clip: _clip,
    np.shape: _tracked(lambda a: a.shape),
    np.ndim: _tracked(lambda a: a.ndim),
    np.reshape: _tracked(lambda a, shape: a.reshape(shape)),
    np.transpose: _tracked(lambda a, axes=None: a.transpose(axes)),
}


def _arithmetic(values) -> Arithmetic:
    """The arithmetic of the first Tracked value or comparison among `values`."""
    return next(x.ar for x in values if isinstance(x, (Tracked, Condition)))


def _name(numpy_object) -> str:
    module = getattr(numpy_object, "__module__", None) or "numpy"
    return f"{module}.{numpy_object.__name__}"


def _supported() -> str:
    return ", ".join(sorted(_name(f) for f in (*NUMPY_UFUNCS, *NUMPY_FUNCTIONS)))


def _unsupported(what: str):
    raise UnsupportedOperation(f"{what} is not supported in a rule (supported: {_supported()})")


def numpy_ufunc(ufunc, method: str, inputs: tuple, kwargs: dict):
    """numpy's ufunc call on Tracked values (`Tracked.__array_ufunc__`): the
    operation of NUMPY_UFUNCS on the inputs, numbers and arrays lifted as the
    operators lift them; anything else is an UnsupportedOperation."""
    name = _name(ufunc)
    if ufunc not in NUMPY_UFUNCS:
        _unsupported(name)
    if method != "__call__":
        _unsupported(f"{name}.{method}")
    if kwargs:
        _unsupported(f"{name} with {', '.join(f'{k}=' for k in kwargs)}")
    ar = _arithmetic(inputs)
    return NUMPY_UFUNCS[ufunc](*(_lift(ar, x) for x in inputs))


def numpy_function(func, args: tuple, kwargs: dict):
    """numpy's function call on Tracked values (`Tracked.__array_function__`): the
    implementation of NUMPY_FUNCTIONS, called with numpy's arguments; anything
    else, or an argument it does not take, is an UnsupportedOperation."""
    name = _name(func)
    implementation = NUMPY_FUNCTIONS.get(func)
    if implementation is None:
        _unsupported(name)
    try:
        inspect.signature(implementation).bind(*args, **kwargs)
    except TypeError as error:
        _unsupported(f"{name} with these arguments ({error})")
    return implementation(*args, **kwargs)
