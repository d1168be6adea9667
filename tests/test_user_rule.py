"""A user's rule in plain numpy (reference/user_rule.py) on the bound-tracking
arithmetic's numpy protocols (reference/arithmetic.py).

Specificity: Keras's Adam and Lamb written in plain numpy
(examples/own_optimizer/adam_rule.py, tests/rules/lamb.py) give the built-in keras
rules' values within their bounds, bit for bit where both round alike, on every
backend's precision setting, in float32 and float64, with weight decay, on a batch of
steps of a matrix and a vector.  Sensitivity: the same files
with beta_1 moved by 1e-4, epsilon inside the square root, or the trust ratio's
norms over one axis, are outside the bound (verify.compare's scaled error above
its TOLERANCE).
"""

from decimal import Decimal, getcontext
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

import reference
from reference import PRECISIONS, Arithmetic, user_rule
from reference.arithmetic import (Condition, UnsupportedOperation, cos, exp, log, matmul,
                                  maximum, mean_over, minimum, norm, sign, sqrt, square,
                                  sum_over, where)
from reference.user_rule import RuleError
from test_compare import N, S, stream
from verify.compare import TOLERANCE, RunComparison, Segments, element_errors

# Keras's Adam as a user writes it is the example of the README and docs/rules.md
RULES = {"adam.py": Path(__file__).parent.parent / "examples" / "own_optimizer" / "adam_rule.py",
         "lamb.py": Path(__file__).parent / "rules" / "lamb.py"}
BACKENDS = ("tensorflow", "jax", "torch")
DTYPES = ("float32", "float64")
ITERATIONS = np.array([0.0, 1.0, 9.0, 99.0])  # Keras's iterations before each step
SHAPES = ((3, 4), (5,))  # a matrix and a vector variable


# --- numpy's protocols on Tracked -----------------------------------------------------
def values(ar, seed=0, shape=(3, 4)):
    rng = np.random.default_rng(seed)
    return ar.exact(rng.standard_normal(shape)), ar.exact(rng.random(shape) + 0.5)


def same(a, b):
    """The same value, bound and ties."""
    assert type(a) is type(b)
    np.testing.assert_array_equal(a.v, b.v)
    np.testing.assert_array_equal(np.broadcast_to(a.e, np.shape(a.v)),
                                  np.broadcast_to(b.e, np.shape(b.v)))
    assert (a.tie is None) == (b.tie is None)


NUMPY_AND_ARITHMETIC = {
    "add": (lambda x, y: np.add(x, y), lambda x, y: x + y),
    "subtract": (lambda x, y: np.subtract(x, y), lambda x, y: x - y),
    "multiply": (lambda x, y: np.multiply(x, y), lambda x, y: x * y),
    "divide": (lambda x, y: np.divide(x, y), lambda x, y: x / y),
    "true_divide": (lambda x, y: np.true_divide(x, y), lambda x, y: x / y),
    "power": (lambda x, y: np.power(y, 3), lambda x, y: y ** 3),
    "negative": (lambda x, y: np.negative(x), lambda x, y: -x),
    "abs": (lambda x, y: np.abs(x), lambda x, y: abs(x)),
    "sqrt": (lambda x, y: np.sqrt(y), lambda x, y: sqrt(y)),
    "sqrt + eps": (lambda x, y: np.sqrt(y) + 1e-7, lambda x, y: sqrt(y) + 1e-7),
    "square": (lambda x, y: np.square(x), lambda x, y: square(x)),
    "sign": (lambda x, y: np.sign(x), lambda x, y: sign(x)),
    "maximum": (lambda x, y: np.maximum(x, y), lambda x, y: maximum(x, y)),
    "minimum": (lambda x, y: np.minimum(x, 0.5), lambda x, y: minimum(x, x.ar.const(0.5))),
    "log": (lambda x, y: np.log(y), lambda x, y: log(y)),
    "exp": (lambda x, y: np.exp(x), lambda x, y: exp(x)),
    "cos": (lambda x, y: np.cos(x), lambda x, y: cos(x)),
    "matmul": (lambda x, y: np.matmul(x, y.T), lambda x, y: matmul(x, y.transpose())),
    "@": (lambda x, y: x @ np.transpose(y), lambda x, y: matmul(x, y.transpose())),
    "sum": (lambda x, y: np.sum(x, axis=1, keepdims=True),
            lambda x, y: sum_over(x, 1, keepdims=True)),
    "mean": (lambda x, y: np.mean(y), lambda x, y: mean_over(y)),
    "norm": (lambda x, y: np.linalg.norm(x, axis=0), lambda x, y: norm(x, 0)),
    "where": (lambda x, y: np.where(x.v > 0, x, y), lambda x, y: where(x.v > 0, x, y)),
    "clip": (lambda x, y: np.clip(x, -0.5, 0.5),
             lambda x, y: minimum(maximum(x, x.ar.const(-0.5)), x.ar.const(0.5))),
    "zeros_like": (lambda x, y: np.zeros_like(x) + y, lambda x, y: x.ar.const(0.0) + y),
    "ones_like": (lambda x, y: np.ones_like(x) * y, lambda x, y: x.ar.const(1.0) * y),
    "full_like": (lambda x, y: np.full_like(x, 0.25) * y, lambda x, y: x.ar.const(0.25) * y),
    "reshape": (lambda x, y: np.reshape(x, (2, 6)), lambda x, y: x.reshape((2, 6))),
    "transpose": (lambda x, y: np.transpose(x), lambda x, y: x.transpose()),
}


@pytest.mark.parametrize("name", NUMPY_AND_ARITHMETIC)
@pytest.mark.parametrize("backend", ["exact", "torch"])
def test_numpy_calls_are_the_arithmetic_operations(name, backend):
    ar = Arithmetic("float32", PRECISIONS[backend])
    x, y = values(ar)
    through_numpy, direct = NUMPY_AND_ARITHMETIC[name]
    same(through_numpy(x, y), direct(x, y))


def test_shapes_come_from_the_values():
    ar = Arithmetic("float64", PRECISIONS["exact"])
    x, _ = values(ar)
    assert np.shape(x) == x.shape == (3, 4) and np.ndim(x) == x.ndim == 2
    assert x.T.shape == (4, 3)


def test_numbers_and_arrays_are_lifted_with_their_rounding():
    ar = Arithmetic("float32", PRECISIONS["exact"])
    x, _ = values(ar)
    same(1 - x, ar.const(1.0) - x)
    same(np.float64(0.1) * x, ar.const(0.1) * x)
    same(x * np.full((3, 4), 0.1), x * ar.const(0.1))  # 0.1 rounded, its rounding bound
    same(np.full((3, 4), 0.5, np.float32) - x, 0.5 - x)


def test_hyperparameters_stay_python_floats_and_cover_a_float32_rounding_where_it_happens():
    """Keras's `1 - self.beta_1` is Python's; a float meets a float64 tensor rounded to
    float32 where ops.cast (TensorFlow) or an op (torch) rounds it, as it is elsewhere."""
    beta = reference.arithmetic.Hyperparameter(0.9)
    one_minus = 1 - beta
    assert isinstance(one_minus, reference.arithmetic.Hyperparameter)
    assert one_minus == 1 - 0.9
    rounding = abs(float(np.float32(one_minus)) - one_minus)
    for backend, widened in (("jax", False), ("exact", False), ("tensorflow", True),
                             ("torch", True)):
        lifted = Arithmetic("float64", PRECISIONS[backend]).hyperparameter(one_minus)
        assert float(lifted.v) == one_minus
        assert (float(lifted.e) >= rounding) is widened
    in_float32 = Arithmetic("float32", PRECISIONS["torch"]).hyperparameter(one_minus)
    same(in_float32, Arithmetic("float32", PRECISIONS["torch"]).const(one_minus))


def test_a_comparison_is_a_bool_array_tied_within_rounding_and_where_keeps_the_ties():
    ar = Arithmetic("float32", PRECISIONS["exact"])
    x = ar.exact([1.0, 2.0, 3.0]) * ar.const(0.1)  # each within its bound of 0.1 * x
    near = ar.exact(np.float32([1.0, 2.0, 3.0]) * np.float32(0.1))
    far = ar.exact([0.05, 0.3, 0.2])
    close, apart = x > near, x > far
    assert isinstance(close, Condition) and close.dtype == bool
    assert close.tie is not None and close.tie.all()
    assert apart.tie is None  # sensitivity: beyond rounding a comparison is sure
    np.testing.assert_array_equal(apart, [True, False, True])
    assert apart.any() and not (x > far * 10).any()  # numpy's own where nothing is tied
    with pytest.raises(UnsupportedOperation, match="numpy.logical_or.reduce on a comparison"):
        close.any()
    chosen = np.where(close, x, near)
    assert chosen.tie is not None and chosen.tie.all()
    assert np.where(apart, x, far).tie is None
    mask = np.where(close, 1.0, 0.0)
    assert mask.tie is not None and mask.tie.all()
    assert ((~close) & apart).tie is not None
    assert (close * x).tie is not None


def test_python_if_on_a_tied_comparison_raises_and_on_a_sure_one_decides():
    ar = Arithmetic("float32", PRECISIONS["exact"])
    x = ar.exact(1.0) * ar.const(0.1)
    assert bool(x > ar.exact(0.05)) and not bool(x > ar.exact(0.2))
    with pytest.raises(UnsupportedOperation, match="np.where"):
        bool(x > ar.exact(np.float32(0.1)))


def exact_exp(x: Decimal) -> np.longdouble:
    """exp of an exact input in long double (64-bit significand: its rounding, below
    1e-19 relative, is far inside any float64 bound)."""
    return np.exp(np.longdouble(str(x)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(3))
def test_exp_bound_covers_the_error_against_long_double(dtype, seed):
    """exp of x = a * b + c computed in the dtype (so x carries a bound): within its
    bound of the exact exp(a * b + c) (the exact input in Fractions, exp in long
    double).  Sensitivity: the exact exp of the input moved by 1e-4 is outside it."""
    getcontext().prec = 60
    ar = Arithmetic(dtype, PRECISIONS["exact"])
    rng = np.random.default_rng(seed)
    a, b, c = (rng.uniform(-4, 4, 200).astype(dtype) for _ in range(3))
    z = exp(ar.exact(a) * ar.exact(b) + ar.exact(c))
    inputs = [Fraction(float(p)) * Fraction(float(q)) + Fraction(float(r))
              for p, q, r in zip(a, b, c)]
    exact = np.array([exact_exp(Decimal(f.numerator) / Decimal(f.denominator))
                      for f in inputs])
    error = np.abs(z.v.astype(np.longdouble) - exact)
    assert np.all(error <= z.e)
    moved = np.array([exact_exp(Decimal(f.numerator) / Decimal(f.denominator)
                                + Decimal("1e-4")) for f in inputs])
    assert np.all(np.abs(z.v.astype(np.longdouble) - moved) > z.e)


@pytest.mark.parametrize("call,named", [
    (lambda x: np.cumsum(x), "numpy.cumsum"),
    (lambda x: np.tanh(x), "numpy.tanh"),
    (lambda x: np.add.reduce(x), "numpy.add.reduce"),
    (lambda x: np.sum(x, dtype=np.float64), "numpy.sum"),
    (lambda x: np.linalg.norm(x, ord=1), "numpy.linalg.norm with ord=1"),
    (lambda x: np.add(x, x, dtype=np.float64), "numpy.add with dtype="),
    (lambda x: np.asarray(x), "plain numpy array"),
    (lambda x: np.any(x), "numpy.any"),
])
def test_an_unsupported_numpy_call_names_itself_in_one_line(call, named):
    ar = Arithmetic("float32", PRECISIONS["exact"])
    x, _ = values(ar)
    with pytest.raises(UnsupportedOperation) as raised:
        call(x)
    assert named in str(raised.value) and "\n" not in str(raised.value)


# --- a user's rule against the built-in keras rules ----------------------------------
def random_states(seed, velocity_scale=0.01):
    rng = np.random.default_rng(seed)
    k = len(ITERATIONS)
    return ({"variable": [rng.standard_normal((k, *s)) for s in SHAPES],
             "momentum": [0.1 * rng.standard_normal((k, *s)) for s in SHAPES],
             "velocity": [velocity_scale * rng.random((k, *s)) for s in SHAPES]},
            [rng.standard_normal((k, *s)) for s in SHAPES])


def step(rule, ar, config, states, grads):
    hp = rule.hyperparameters(config)
    tracked = {name: [ar.exact(x) for x in xs] for name, xs in states.items()}
    return rule(ar, hp, tracked, [ar.exact(g) for g in grads], ar.step_count(ITERATIONS))


def user(file, class_name="Adam", path=None):
    loaded = user_rule.load(path or RULES[file])
    return user_rule.optimizer(loaded, class_name,
                               reference.OPTIMIZERS[class_name].defaults).rule("rule")


def worst_scaled(expected, got):
    """The harness's scaled error of `expected` (standing for Keras) against the
    user's rule `got` and its bound, over every state and variable."""
    return max(float(np.nanmax(element_errors(e.v, g.v, g.e, g.tie)[2]))
               for name in got for e, g in zip(expected[name], got[name]))


def bounds_a_rounding_keras_states(ar) -> bool:
    """Where a rule bounds a float32 rounding of its hyperparameters that the built-in
    rule takes as Keras's formula: in float64 where Keras may round a Python float to
    float32 (Arithmetic.hyperparameter), and TensorFlow's ops.cast of the betas."""
    return ar.precision.cast_rounds_to_float32 or (ar.dtype == np.float64
                                                   and ar.precision.operand_float32)


def agree(builtin, got, ar, bit_for_bit):
    for name in builtin:
        for b, g in zip(builtin[name], got[name]):
            difference = np.abs(b.v.astype(np.float64) - g.v.astype(np.float64))
            assert np.all(difference <= b.e + g.e), name  # both within bound of exact
            if bit_for_bit:
                np.testing.assert_array_equal(b.v, g.v, err_msg=name)
            got_bound, builtin_bound = (np.broadcast_to(x.e, x.v.shape) for x in (g, b))
            np.testing.assert_array_equal(got_bound == 0, builtin_bound == 0, err_msg=name)
            ratio = got_bound[builtin_bound > 0] / builtin_bound[builtin_bound > 0]
            if bounds_a_rounding_keras_states(ar):
                assert np.all(ratio >= 0.25), name
            else:
                assert np.all((0.25 <= ratio) & (ratio <= 4)), name


@pytest.mark.parametrize("weight_decay", [None, 0.01])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS + ("exact",))
def test_adam_in_plain_numpy_is_keras_adam(backend, dtype, weight_decay):
    """Values within both bounds, bit for bit where both compute alike (not torch's
    kernel form beta*m + (1-beta)*g, not TensorFlow's float32 betas in float64).
    Bounds within a factor 4, but where the rule bounds a rounding that the built-in
    rule knows to be Keras's formula (bounds_a_rounding_keras_states)."""
    ar = Arithmetic(dtype, PRECISIONS[backend])
    config = {"learning_rate": 0.01, "weight_decay": weight_decay}
    states, grads = random_states(seed=1)
    builtin = step(reference.get_rule("keras", "Adam"), ar, config, states, grads)
    got = step(user("adam.py"), ar, config, states, grads)
    assert set(got) == set(builtin) == {"variable", "momentum", "velocity"}
    p = ar.precision
    agree(builtin, got, ar, bit_for_bit=not p.moving_average_weighted and not (
        dtype == "float64" and p.cast_rounds_to_float32))
    assert worst_scaled(builtin, got) <= 1


BASE_CONFIGS = [{"clipnorm": 1.0}, {"global_clipnorm": 1.0}, {"clipvalue": 0.5},
                {"use_ema": True, "ema_overwrite_frequency": 2},
                {"gradient_accumulation_steps": 2}, {"loss_scale_factor": 128.0},
                {"weight_decay": 0.1, "exclude_from_weight_decay": {"var_names": ["s1"]}}]


@pytest.mark.parametrize("base", BASE_CONFIGS, ids=lambda c: ",".join(c))
def test_the_base_pipeline_runs_around_a_rule_as_around_keras_adam(base):
    """Clipping, EMA, accumulation, loss scaling and decay by name, each the same numbers
    around the file's Adam as around the built-in one (exact setting, float64)."""
    ar = Arithmetic("float64", PRECISIONS["exact"])
    config = {"learning_rate": 0.01, **base}
    states, grads = random_states(seed=6)
    rng = np.random.default_rng(7)
    states.update(average=[rng.standard_normal(w.shape) for w in states["variable"]],
                  gradient_accumulator=[rng.standard_normal(w.shape)
                                        for w in states["variable"]])
    outs = []
    for rule in (reference.get_rule("keras", "Adam"), user("adam.py")):
        hp = rule.hyperparameters(config)
        kept = {"variable", *(spec.name for spec in rule.states(hp))}
        tracked = {name: [ar.exact(x) for x in xs] for name, xs in states.items()
                   if name in kept}
        outs.append(rule(ar, hp, tracked, [ar.exact(g) for g in grads],
                         ar.step_count(ITERATIONS), ["s0", "s1"]))
    builtin, got = outs
    assert set(got) == set(builtin)
    agree(builtin, got, ar, bit_for_bit=True)


INF_STEP = 2  # the step of the batch whose vector gradient holds +inf in its first element


def with_infinite_gradient(seed):
    """Random states and gradients (velocity small enough that epsilon's placement shows)
    with +inf in the vector's first gradient element at step INF_STEP."""
    states, grads = random_states(seed=seed, velocity_scale=1e-4)
    grads[1][INF_STEP, 0] = np.inf
    return states, grads


def scaled_at_the_infinite_step(expected, got):
    """The scaled errors (element_errors) of `expected` against `got` on the vector at
    INF_STEP, every state: NaN where got's bound cannot judge a difference."""
    return np.concatenate([element_errors(e[1].v[INF_STEP], g[1].v[INF_STEP],
                                          np.broadcast_to(g[1].e, g[1].v.shape)[INF_STEP])[2]
                           for e, g in ((expected[name], got[name]) for name in got)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_clipnorm_of_an_infinite_gradient_leaves_finite_bounds_as_around_keras_adam(backend,
                                                                                   dtype):
    """clipnorm=1.0 of a vector gradient holding +inf: the norm is inf (exact, bound 0),
    the clipped gradient NaN there and exactly 0 elsewhere.  The rule's values are the
    built-in keras Adam's, NaN at the same elements, and every bound is finite (0 at the
    NaN, IEEE's exact answer): rounding the inf norm to float32 (torch's ops.maximum of
    float64, min_max_float32) is exact, not a bound of inf - inf = NaN that left every
    finite element unjudgeable ("its error bound overflowed")."""
    ar = Arithmetic(dtype, PRECISIONS[backend])
    config = {"learning_rate": 0.01, "clipnorm": 1.0}
    states, grads = with_infinite_gradient(seed=8)
    builtin = step(reference.get_rule("keras", "Adam"), ar, config, states, grads)
    got = step(user("adam.py"), ar, config, states, grads)
    assert set(got) == set(builtin) == {"variable", "momentum", "velocity"}
    for name in got:
        for b, g in zip(builtin[name], got[name]):
            np.testing.assert_array_equal(np.isnan(b.v), np.isnan(g.v), err_msg=name)
            for x in (b, g):
                assert np.all(np.isfinite(np.broadcast_to(x.e, x.v.shape))), name
    assert np.isnan(got["variable"][1].v[INF_STEP, 0])
    assert np.all(np.isfinite(got["variable"][1].v[INF_STEP, 1:]))
    scaled = scaled_at_the_infinite_step(builtin, got)
    assert not np.any(np.isnan(scaled)) and np.max(scaled) <= 1
    assert worst_scaled(builtin, got) <= 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_clipnorm_of_an_infinite_gradient_still_tells_another_formula(backend, dtype,
                                                                     tmp_path):
    """Sensitivity beside it: at the step of the infinite gradient, beta_1 moved by 1e-4
    or epsilon inside the square root is outside the rule's bound on the finite elements
    (judged there, not unknown)."""
    ar = Arithmetic(dtype, PRECISIONS[backend])
    config = {"learning_rate": 0.01, "clipnorm": 1.0}
    states, grads = with_infinite_gradient(seed=9)
    builtin = step(reference.get_rule("keras", "Adam"), ar, config, states, grads)
    shifted = step(user("adam.py"), ar, {**config, "beta_1": 0.9 + 1e-4}, states, grads)
    inside = step(user("adam.py", path=edited(tmp_path, "adam.py", "np.sqrt(v) + epsilon",
                                              "np.sqrt(v + epsilon)")),
                  ar, config, states, grads)
    for other in (shifted, inside):
        scaled = scaled_at_the_infinite_step(builtin, other)
        assert not np.any(np.isnan(scaled))
        assert np.max(scaled) > TOLERANCE


def edited(tmp_path, file, old, new):
    text = RULES[file].read_text()
    assert old in text
    path = tmp_path / file
    path.write_text(text.replace(old, new))
    return path


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_adam_with_another_formula_is_outside_the_bound(backend, dtype, tmp_path):
    ar = Arithmetic(dtype, PRECISIONS[backend])
    states, grads = random_states(seed=2, velocity_scale=1e-4)
    builtin = step(reference.get_rule("keras", "Adam"), ar, {"learning_rate": 0.01}, states,
                   grads)
    shifted = step(user("adam.py"), ar, {"learning_rate": 0.01, "beta_1": 0.9 + 1e-4}, states,
                   grads)
    assert worst_scaled(builtin, shifted) > TOLERANCE
    inside = user("adam.py", path=edited(tmp_path, "adam.py", "np.sqrt(v) + epsilon",
                                         "np.sqrt(v + epsilon)"))
    assert worst_scaled(builtin, step(inside, ar, {"learning_rate": 0.01}, states, grads)) \
        > TOLERANCE


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ("exact", "torch"))
def test_a_trust_ratio_is_taken_per_step_over_the_weight_and_one_axis_is_not(backend, dtype,
                                                                             tmp_path):
    """Keras's Lamb in numpy, np.linalg.norm(weight) on one weight, evaluated on a batch
    of steps of a matrix and a vector: the built-in keras Lamb's per-step norms.
    Sensitivity: the norms over the first axis alone are outside the bound."""
    ar = Arithmetic(dtype, PRECISIONS[backend])
    states, grads = random_states(seed=3)
    config = {"learning_rate": 0.01}
    builtin = step(reference.get_rule("keras", "Lamb"), ar, config, states, grads)
    got = step(user("lamb.py", "Lamb"), ar, config, states, grads)
    agree(builtin, got, ar, bit_for_bit=backend == "exact")
    assert worst_scaled(builtin, got) <= 1
    by_column = user("lamb.py", "Lamb", path=edited(
        tmp_path, "lamb.py", "np.linalg.norm(weight), np.linalg.norm(r)",
        "np.linalg.norm(weight, axis=0), np.linalg.norm(r, axis=0)"))
    assert worst_scaled(builtin, step(by_column, ar, config, states, grads)) > TOLERANCE


@pytest.mark.parametrize("config,verdict", [({"learning_rate": 0.01}, "exact"),
                                            ({"learning_rate": 0.01, "beta_1": 0.9001},
                                             "mismatch")])
def test_the_harness_judges_a_rule_file_as_a_family(config, verdict):
    """verify.compare's RunComparison, lockstep in chunks over 8 steps, of the rule
    against the built-in keras Adam's states (standing for Keras's, test_compare)."""
    g, history = stream("Adam", {"learning_rate": 0.01}, steps=8)
    segments = Segments([f"s{i}" for i in range(S)], [N] * S)
    comparison = RunComparison("rule", user("adam.py"), config, "float64", PRECISIONS["jax"],
                               segments, g, ["momentum", "velocity"])
    as_batch = lambda states: {n: np.stack([h[n] for h in states]) for n in history[0]}
    comparison.start(as_batch(history[:1]), 0)
    for first in range(1, len(history), 3):
        part = history[first:first + 3]
        comparison.feed(first, as_batch(part), np.arange(first, first + len(part)))
    assert [comparison.verdict(s) for s in range(S)] == [verdict] * S


# --- the probe ---------------------------------------------------------------------
FACTORED = '''
import numpy as np

def initial_slots(weight, **hyperparameters):
    factored = {"rows": np.zeros(weight.shape[:-1]),
                "columns": np.zeros(weight.shape[:-2] + weight.shape[-1:])}
    return {"copy": weight, "count": 0.5, "fixed": 2.0, **factored}

def update(step, gradient, weight, slots, decay=0.5, **hyperparameters):
    squares = np.square(gradient)
    if np.ndim(weight) >= 2:
        rows = np.mean(squares, axis=-1)
        columns = np.mean(squares, axis=-2)
        new = {"rows": decay * slots["rows"] + rows, "columns": columns}
    else:
        new = {"full": slots["full"] + squares}
    new.update(copy=slots["copy"] * 1.0, count=slots["count"] + 1.0)
    return weight - slots["fixed"] * gradient, new
'''


def write(tmp_path, text, name="rule.py"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_probe_finds_each_slot_its_shape_and_initial_value(tmp_path):
    loaded = user_rule.load(write(tmp_path, FACTORED))
    specs = {s.name: s for s in loaded.probe.states}
    assert list(specs) == ["rows", "columns", "copy", "count", "full"]
    assert loaded.not_returned == ("fixed",) and loaded.probe.not_returned == {"fixed": 2.0}
    assert loaded.hyperparameters == {"decay": 0.5, "learning_rate": 0.001}
    shapes = {name: [spec.shape_for(shape, "") for shape in ((), (5,), (3, 4), (2, 3, 4))]
              for name, spec in specs.items()}
    assert shapes == {"rows": [None, None, (3,), (2, 3)],
                      "columns": [None, None, (4,), (2, 4)],
                      "copy": [(), (5,), (3, 4), (2, 3, 4)],
                      "count": [(), (), (), ()],
                      "full": [(), (5,), None, None]}
    assert specs["copy"].copies_variable and specs["count"].initial == 0.5
    assert specs["rows"].initial == 0.0 and not specs["rows"].copies_variable


def test_a_slot_read_but_not_returned_keeps_its_initial_value(tmp_path):
    """FACTORED's weight moves by the constant slot "fixed" (2.0) times the gradient,
    at every step; the slots of each rank are those the probe found."""
    loaded = user_rule.load(write(tmp_path, FACTORED))
    rule = user_rule.optimizer(loaded, "Custom", {"learning_rate": 0.01, "decay": 0.5}
                               ).rule("rule")
    ar = Arithmetic("float64", PRECISIONS["exact"])
    rng = np.random.default_rng(4)
    w, g = rng.standard_normal((4, 3, 4)), rng.standard_normal((4, 3, 4))
    state = {"variable": [ar.exact(w)], "rows": [ar.exact(np.zeros((4, 3)))],
             "columns": [ar.exact(np.zeros((4, 4)))], "copy": [ar.exact(w)],
             "count": [ar.exact(np.zeros(4))], "full": [None]}
    out = rule(ar, rule.hyperparameters({}), state, [ar.exact(g)], ar.step_count(ITERATIONS))
    np.testing.assert_array_equal(out["variable"][0].v, w - 2.0 * g)
    np.testing.assert_allclose(out["rows"][0].v, np.mean(g * g, axis=-1))
    np.testing.assert_array_equal(out["count"][0].v, np.ones(4))
    assert "full" not in out  # no variable of this rank has it


BAD_RULES = {
    "no update": ("def step(gradient):\n    return gradient\n",
                  "defines no function update(step, gradient, weight, slots, "
                  "**hyperparameters)"),
    "no **hyperparameters": ("def update(step, gradient, weight, slots):\n"
                             "    return weight, {}\n", "does not take"),
    "too few arguments": ("def update(gradient, weight, **hp):\n    return weight, {}\n",
                          "does not take"),
    "a hyperparameter without default": (
        "def update(step, gradient, weight, slots, *, beta, **hp):\n    return weight, {}\n",
        "does not take"),
    "the probe raises": ("import numpy as np\n\ndef update(step, gradient, weight, slots, "
                         "**hp):\n    m = slots['momentum']\n    return weight - hp['beta'] * m, "
                         "{'momentum': m}\n", "line 5: update raised KeyError: 'beta'"),
    "the file raises": ("import numpy as np\nraise RuntimeError('not a rule\\nat all')\n",
                        "line 2: running the file raised RuntimeError: not a rule at all"),
    "a syntax error": ("def update(step, gradient, weight, slots, **hp):\n    return (\n",
                       "running the file raised SyntaxError"),
    "not a pair": ("def update(step, gradient, weight, slots, **hp):\n    return weight\n",
                   "update returns ndarray, not (weight, slots)"),
    "a weight of another shape": (
        "import numpy as np\n\ndef update(step, gradient, weight, slots, **hp):\n"
        "    return np.sum(weight), {}\n",
        "update returns a weight of shape () for a weight of shape (3, 2)"),
    "a slot of another shape": (
        "import numpy as np\n\ndef update(step, gradient, weight, slots, **hp):\n"
        "    return weight, {'m': np.zeros(5)}\n",
        "slot 'm' has shape (5,) for a weight of shape (3, 2): neither the weight's, nor the "
        "weight's with one axis left out, nor ()"),
    "an initial value of its own": (
        "import numpy as np\n\ndef initial_slots(weight, **hp):\n    return {'m': weight ** 2}\n"
        "\ndef update(step, gradient, weight, slots, **hp):\n    return weight, "
        "{'m': slots['m']}\n", "initial_slots gives 'm' values that are neither one constant "
        "nor a copy of the weight"),
    "a copy read and not kept": (
        "def initial_slots(weight, **hp):\n    return {'z': weight}\n\n"
        "def update(step, gradient, weight, slots, **hp):\n    return slots['z'], {}\n",
        "slot 'z' starts as a copy of the weight and is read but not returned"),
}


@pytest.mark.parametrize("case", BAD_RULES)
def test_a_bad_rule_file_is_refused_in_one_line(case, tmp_path):
    text, expected = BAD_RULES[case]
    with pytest.raises(RuleError) as raised:
        user_rule.load(write(tmp_path, text))
    message = str(raised.value)
    assert expected in message and "\n" not in message
    assert message.startswith(str(tmp_path / "rule.py"))


def test_a_missing_file_is_refused_in_one_line(tmp_path):
    with pytest.raises(RuleError, match=r"no such rule file$"):
        user_rule.load(tmp_path / "absent.py")


def test_a_right_rule_file_loads(tmp_path):
    """The refusals above are of their defects: the same files made right load."""
    loaded = user_rule.load(write(tmp_path, "import numpy as np\n\ndef update(step, gradient, "
                                  "weight, slots, beta=0.5, **hp):\n    m = slots['momentum']\n"
                                  "    return weight - beta * m, {'momentum': m}\n"))
    assert [s.name for s in loaded.probe.states] == ["momentum"]
    assert "def update" in loaded.doc


def test_an_unsupported_numpy_function_in_a_rule_names_itself_and_its_line(tmp_path):
    """The probe computes in plain numpy, where np.cumsum works; the reference
    arithmetic refuses it, naming it and the line."""
    path = write(tmp_path, "import numpy as np\n\ndef update(step, gradient, weight, slots, "
                           "**hp):\n    return weight - np.cumsum(gradient, axis=0), {}\n")
    rule = user("adam.py", path=path)
    ar = Arithmetic("float32", PRECISIONS["exact"])
    states, grads = random_states(seed=5)
    with pytest.raises(RuleError) as raised:
        step(rule, ar, {}, {"variable": states["variable"]}, grads)
    message = str(raised.value)
    assert "line 4: update raised UnsupportedOperation: numpy.cumsum is not supported in a " \
           "rule (supported: " in message and "\n" not in message
