"""Keras's learning-rate schedules, evaluated as Keras evaluates them.

keras/src/optimizers/schedules/learning_rate_schedule.py (Keras 3.15.1): each
schedule converts `initial_learning_rate` (a Python float) to a tensor, of
Keras's floatx, float32 (float64 on JAX with x64: the `schedule_float64`
precision setting), and computes in that dtype; its hyperparameters go
through ops.cast to it and Python-float operands meet its tensors, so every
value of a schedule is a value of that dtype.  The optimizer calls the schedule
with its stored counter, `BaseOptimizer._get_current_learning_rate`:
`self._learning_rate(self._iterations)` -- `_iterations`, the calls to
`apply` so far, also under gradient accumulation (not the `iterations`
property, _iterations // n).  Every update then casts that tensor to the
weights' dtype (exact, or a rounding to float32 where x64 JAX runs float32).

A configuration gives a schedule as Keras serializes it, {"class_name": ...,
"config": {...}}.  Step counts are integers below 2**24, so float32 holds them
and their differences, minima and comparisons exactly.
"""

from __future__ import annotations

import math

import numpy as np

from reference.arithmetic import (PRECISIONS, Arithmetic, Tracked, ceil, cos, floor, log,
                                  minimum, quotient, to_float32, where)

REQUIRED = object()  # an argument Keras's schedule has no default for

# each schedule's arguments at Keras's defaults
DEFAULTS = {
    "ExponentialDecay": {"initial_learning_rate": REQUIRED, "decay_steps": REQUIRED,
                         "decay_rate": REQUIRED, "staircase": False, "name": None},
    "PiecewiseConstantDecay": {"boundaries": REQUIRED, "values": REQUIRED, "name": None},
    "PolynomialDecay": {"initial_learning_rate": REQUIRED, "decay_steps": REQUIRED,
                        "end_learning_rate": 0.0001, "power": 1.0, "cycle": False,
                        "name": None},
    "InverseTimeDecay": {"initial_learning_rate": REQUIRED, "decay_steps": REQUIRED,
                         "decay_rate": REQUIRED, "staircase": False, "name": None},
    "CosineDecay": {"initial_learning_rate": REQUIRED, "decay_steps": REQUIRED, "alpha": 0.0,
                    "warmup_target": None, "warmup_steps": 0, "name": None},
    "CosineDecayRestarts": {"initial_learning_rate": REQUIRED, "first_decay_steps": REQUIRED,
                            "t_mul": 2.0, "m_mul": 1.0, "alpha": 0.0, "name": None},
}


def is_schedule(value) -> bool:
    """A learning rate that is not a constant: a schedule or a plain callable."""
    return isinstance(value, dict)


def is_callable(value) -> bool:
    """A plain callable learning rate, {"callable": x} (verify/configurations.py)."""
    return isinstance(value, dict) and "callable" in value


def python_float(value) -> float | None:
    """The Python float a plain callable learning rate returns, else None."""
    if is_callable(value) and not is_schedule(value["callable"]):
        return float(value["callable"])
    return None


def unsupported(value) -> str | None:
    """Why a serialized schedule is not one this module models, or None."""
    if is_callable(value):
        return unsupported(value["callable"])
    if not is_schedule(value):
        return None
    name = value.get("class_name")
    if name not in DEFAULTS:
        return f"no model of the learning-rate schedule {name!r}"
    config = value.get("config", {})
    unknown = sorted(set(config) - set(DEFAULTS[name]))
    missing = sorted(k for k, v in DEFAULTS[name].items() if v is REQUIRED
                     and k not in config)
    if unknown or missing:
        return f"{name} {'has no argument' if unknown else 'needs'} {(unknown or missing)[0]!r}"
    if name == "PiecewiseConstantDecay" and all(
            isinstance(config[k], list) for k in ("values", "boundaries")) and len(
            config["values"]) != len(config["boundaries"]) + 1:  # Keras's own check
        return "PiecewiseConstantDecay needs one value more than boundaries"
    return None


def learning_rate(ar: Arithmetic, value, t: Tracked, accumulation=None) -> Tracked:
    """The learning rate the optimizer uses at stored iteration t ([k]): a
    constant from Keras's float32 variable, or the schedule's value at t.

    A plain callable is called with no argument (`_get_current_learning_rate`):
    a number it returns is a Python float that each update passes through
    ops.cast to the weights' dtype, never a float32 variable; a schedule it
    calls with `optimizer.iterations` sees the property, _iterations // n under
    gradient accumulation over n calls.
    """
    if is_callable(value):
        inner = value["callable"]
        if not is_schedule(inner):
            return ar.cast(inner)
        if accumulation:
            t = ar.step_count(np.floor_divide(np.asarray(t.v, np.float64), accumulation))
        return learning_rate(ar, inner, t)
    if not is_schedule(value):
        return ar.learning_rate(value)
    s = Arithmetic(dtype(ar), ar.precision, track=ar.track, tie_width=ar.tie_width)
    config = {**DEFAULTS[value["class_name"]], **value.get("config", {})}
    lr = SCHEDULES[value["class_name"]](s, config, np.asarray(t.v, np.float64))
    return Tracked(lr.v.astype(ar.dtype), lr.e, ar, lr.tie)


def values(value, steps: int) -> np.ndarray:
    """A serialized schedule's value at steps 0 .. steps - 1, each operation a float64
    rounding: the formula as Python floats compute it (a peer's schedule function)."""
    s = Arithmetic(np.float64, PRECISIONS["exact"], track=False)
    config = {**DEFAULTS[value["class_name"]], **value.get("config", {})}
    return np.asarray(SCHEDULES[value["class_name"]](
        s, config, np.arange(steps, dtype=np.float64)).v, np.float64)


def dtype(ar: Arithmetic):
    """The dtype a schedule computes in: float32, Keras's floatx, unless the
    precision setting says otherwise (JAX's float64 runs, or exact math)."""
    if not ar.precision.learning_rate_float32 or (ar.precision.schedule_float64
                                                  and ar.dtype == np.float64):
        return ar.dtype
    return np.dtype(np.float32)


def _steps(s: Arithmetic, n) -> Tracked:
    """Integer step counts in the schedule's dtype (exact)."""
    return s.exact(np.asarray(n, np.float64))


# --- one function per schedule: (s, config, step [k] as float64 integers) ----
def exponential_decay(s, c, step):
    """ExponentialDecay.__call__: lr0 * rate ** p, p = step / decay_steps
    (floored when staircase)."""
    p = quotient(_steps(s, step), s.const(c["decay_steps"]))
    if c["staircase"]:
        p = floor(p)
    return s.const(c["initial_learning_rate"]) * power(s.const(c["decay_rate"]), p)


def piecewise_constant_decay(s, c, step):
    """PiecewiseConstantDecay.__call__: values[0] while step <= boundaries[0],
    values[i + 1] while boundaries[i] < step <= boundaries[i + 1], values[-1]
    after the last boundary (a sum of exact 0/1 indicators times the values)."""
    piece = np.searchsorted(np.asarray(c["boundaries"], np.float64), step, side="left")
    values = [s.const(v) for v in c["values"]]
    out = Tracked(np.full(np.shape(step), values[-1].v), values[-1].e, s)
    for i, v in enumerate(values[:-1]):
        out = where(piece == i, Tracked(np.full(np.shape(step), v.v), v.e, s), out)
    return out


def polynomial_decay(s, c, step):
    """PolynomialDecay.__call__: (lr0 - end) * (1 - p) ** power + end with
    p = step / decay_steps, the step capped at decay_steps; with cycle,
    decay_steps times ceil(step / decay_steps) instead (1 at step 0)."""
    decay_steps = s.const(c["decay_steps"])
    t = _steps(s, step)
    if c["cycle"]:
        multiplier = where(step == 0, s.exact(np.ones(np.shape(step))),
                           ceil(quotient(t, decay_steps)))
        decay_steps = integer_product(decay_steps, multiplier)
    else:
        t = minimum(t, decay_steps)
    p = quotient(t, decay_steps)
    initial, end = s.const(c["initial_learning_rate"]), s.const(c["end_learning_rate"])
    return (initial - end) * ((1 - p) ** s.const(c["power"])) + end


def inverse_time_decay(s, c, step):
    """InverseTimeDecay.__call__: lr0 / (1 + rate * p), p = step / decay_steps
    (floored when staircase)."""
    p = quotient(_steps(s, step), s.const(c["decay_steps"]))
    if c["staircase"]:
        p = floor(p)
    return quotient(s.const(c["initial_learning_rate"]), 1 + s.const(c["decay_rate"]) * p)


def one_plus_cos(s, x):
    """1.0 + cos(x).  Under `schedule_float64` in float64, ops.cos rounds x to
    float32 and computes in float32, and 1.0 + that float32 tensor stays
    float32: the result is then a float32 value (its Arithmetic float32)."""
    if s.precision.schedule_float64 and s.dtype == np.float64:
        f32 = Arithmetic(np.float32, s.precision, track=s.track, tie_width=s.tie_width)
        x = to_float32(x)
        x = Tracked(x.v.astype(np.float32), x.e, f32, x.tie)
    return 1.0 + cos(x)


def _cosine(s, alpha, fraction):
    """(1 - alpha) * 0.5 * (1 + cos(pi * fraction)) + alpha (CosineDecay's
    _decay_function; pi as an array of the schedule's dtype; Python floats
    then meet the dtype of 1 + cos)."""
    term = one_plus_cos(s, s.const(math.pi) * fraction)
    c = term.ar
    return c.const(1 - alpha) * (c.const(0.5) * term) + c.const(alpha)


def cosine_decay(s, c, step):
    """CosineDecay.__call__: without warmup, lr0 * cosine(min(step, D) / D);
    with warmup_target, the step capped at D + W, a linear ramp
    (target - lr0) * step / W + lr0 while step < W, then
    target * cosine((step - W) / D)."""
    initial = s.const(c["initial_learning_rate"])
    decay_steps = s.const(c["decay_steps"])
    if c["warmup_target"] is None:
        t = minimum(_steps(s, step), decay_steps)
        decayed = _cosine(s, c["alpha"], quotient(t, decay_steps))
        # lr0 is a weakly typed tensor on JAX: it takes decayed's dtype
        return decayed.ar.const(c["initial_learning_rate"]) * decayed
    target, warmup = s.const(c["warmup_target"]), s.const(c["warmup_steps"])
    step = np.minimum(step, float(decay_steps.v) + float(warmup.v))
    ramp = (target - initial) * quotient(_steps(s, step), warmup) + initial
    decay = target * _cosine(s, c["alpha"], quotient(_steps(s, step - float(warmup.v)),
                                                     decay_steps))
    return where(step < float(warmup.v), ramp, decay)


def cosine_decay_restarts(s, c, step):
    """CosineDecayRestarts.__call__: fraction = step / first_decay_steps; with
    t_mul == 1, restart i = floor(fraction) and fraction - i; otherwise
    i = floor(log(1 - fraction (1 - t_mul)) / log(t_mul)) and
    (fraction - (1 - t_mul**i) / (1 - t_mul)) / t_mul**i; then
    lr0 * ((1 - alpha) * 0.5 * m_mul**i * (1 + cos(pi * fraction)) + alpha)."""
    alpha, t_mul, m_mul = s.const(c["alpha"]), s.const(c["t_mul"]), s.const(c["m_mul"])
    fraction = quotient(_steps(s, step), s.const(c["first_decay_steps"]))
    if float(t_mul.v) == 1.0:
        i = floor(fraction)
        fraction = fraction - i
    else:
        i = floor(log(1.0 - fraction * (1.0 - t_mul)) / log(t_mul))
        grown = power(t_mul, i)
        fraction = (fraction - (1.0 - grown) / (1.0 - t_mul)) / grown
    decayed = s.const(0.5) * power(m_mul, i) * one_plus_cos(s, s.const(math.pi) * fraction)
    return s.const(c["initial_learning_rate"]) * ((1 - alpha) * decayed + alpha)


SCHEDULES = {
    "ExponentialDecay": exponential_decay,
    "PiecewiseConstantDecay": piecewise_constant_decay,
    "PolynomialDecay": polynomial_decay,
    "InverseTimeDecay": inverse_time_decay,
    "CosineDecay": cosine_decay,
    "CosineDecayRestarts": cosine_decay_restarts,
}


# --- two operations the schedules need beyond reference/arithmetic.py ------
def power(x: Tracked, p: Tracked) -> Tracked:
    """x ** p with the exponent's own bound too: d(x**p)/dp = x**p ln x."""
    z = x ** p
    if z.e is None:
        return z
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = np.where(x.v > 0, np.abs(z.v.astype(np.float64) * np.log(
            np.abs(x.v.astype(np.float64)))), 0.0)
    z.e = z.e + slope * p.e
    return z


def integer_product(x: Tracked, y: Tracked) -> Tracked:
    """x * y of exact integer values: exact below 2**24 in float32 (the tie
    masks of a floor or ceil carry over)."""
    z = x * y
    if z.e is not None:
        z.e = np.where((np.broadcast_to(x.e, np.shape(z.v)) == 0)
                       & (np.broadcast_to(y.e, np.shape(z.v)) == 0), 0.0, z.e)
    return z
