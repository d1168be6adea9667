"""Gradients at both ends of a dtype's range (issue 30): subnormal inputs on a backend
that flushes them (TensorFlow and XLA read a subnormal operand as 0), and gradients so
large that the reference's error bound overflows.  No false alarm (a flushed subnormal
is not a change in Keras's math) and no false pass (a bound that cannot be computed
never accepts a changed value).

In-process: synthetic "Keras" streams from the keras rule (test_compare's `stream`),
faithful or with the weights decayed by 0.1% every step.  Through the workers: a
gradient file of each end on each backend, against real Keras and against a Keras
edited to decay the weights (check_edits' machinery)."""

import contextlib
import io
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from check_edits import BASE, TORCH, Edit, edited_keras
from conftest import needs
from test_compare import N, S, judge, stream

import reference
from reference import PRECISIONS, Arithmetic
from verify import api, cli, compare
from verify.configurations import CONFIGURATIONS

OPTIMIZERS = ("sgd", "adam", "adamax", "adagrad", "rmsprop")
FLUSHING = [b for b, p in PRECISIONS.items() if p.flushes_subnormals]
# the ends of each dtype's range: its smallest subnormal and (about) its largest value
ENDS = {("float32", "tiny"): float(np.finfo(np.float32).smallest_subnormal),
        ("float32", "huge"): 3e38,
        ("float64", "tiny"): float(np.finfo(np.float64).smallest_subnormal),
        ("float64", "huge"): 1e308}
PASS = ("exact", "match")


def rule_of(optimizer):
    c = CONFIGURATIONS[optimizer]
    return c.class_name, c.config


def read_by(precision, g, dtype):
    """The gradients as a backend of that precision setting computes with them: a
    flushing one reads a subnormal as 0 (measured: max(0, s) and s + 0 give 0 for
    a subnormal s on TensorFlow and JAX, float32 and float64, eager and compiled)."""
    v = g.astype(dtype)
    if not PRECISIONS[precision].flushes_subnormals:
        return v.astype(np.float64)
    return np.where(np.abs(v) < np.finfo(dtype).smallest_normal, 0, v).astype(np.float64)


def decay(step, state):
    state["variable"] *= 0.999


def verdicts(optimizer, g, dtype, precision, alter=None):
    class_name, config = rule_of(optimizer)
    rule, ar = reference.get_rule("keras", class_name), Arithmetic(dtype, PRECISIONS[precision])
    initial = {spec.name: float((ar.cast if spec.initial_via_cast else ar.const)(spec.initial).v)
               for spec in rule.states(rule.hyperparameters(config))}  # as Keras starts them
    _, history = stream(class_name, config, len(g), dtype=dtype, precision=precision,
                        initial=initial, grads=read_by(precision, g, dtype), alter=alter)
    c = judge(class_name, config, g, history, dtype=dtype, precision=precision)
    return [c.verdict(s) for s in range(S)], c


def extreme_rows(dtype, value, steps=3, seed=0):
    """N(0, 1) gradients, the first step all `value` with random signs."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((steps, N * S))
    g[0] = value * rng.choice([-1.0, 1.0], N * S)
    return g


# --- the comparison of one element -----------------------------------------------

@pytest.mark.parametrize("keras,ref,bound,expected", [
    (1.0, 1.001, np.nan, np.nan),   # a bound from inf * 0: a change is not judged
    (1.0, 1.0, np.nan, 0.0),        # ... identical values still pass
    (1.0, 2.0, np.inf, np.nan),     # a bound beyond float64 judges nothing either
    (np.inf, np.inf, np.nan, 0.0),  # a non-finite reference is the exact IEEE result
    (1.0, np.inf, np.nan, np.inf),
])
def test_a_bound_that_overflowed_judges_no_difference(keras, ref, bound, expected):
    _, _, scaled = compare.element_errors(np.array([keras]), np.array([ref]),
                                          np.array([bound]))
    assert scaled[0] == expected or (np.isnan(expected) and np.isnan(scaled[0]))


# --- the small end: subnormal gradients ---------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("precision", FLUSHING)
def test_a_flushed_subnormal_gradient_is_no_mismatch_where_the_backend_flushes(precision,
                                                                              dtype):
    """Adamax's norm max(beta_2 u, |g|) is 0 where the backend reads a subnormal g
    as 0 and the smallest subnormal in numpy: within the bound |g| of reading it."""
    g = extreme_rows(dtype, ENDS[dtype, "tiny"])
    assert (read_by(precision, g, dtype)[0] == 0).all()
    found, _ = verdicts("adamax", g, dtype, precision)
    assert all(v in PASS for v in found), found


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_a_backend_that_does_not_flush_must_keep_the_subnormal(dtype):
    """torch keeps subnormals (measured): a Keras that flushed one there is caught."""
    g = extreme_rows(dtype, ENDS[dtype, "tiny"])
    class_name, config = rule_of("adamax")
    _, flushed = stream(class_name, config, len(g), dtype=dtype, precision="jax",
                        grads=read_by("jax", g, dtype))
    c = judge(class_name, config, g, flushed, dtype=dtype, precision="torch")
    assert [c.verdict(s) for s in range(S)] == ["mismatch"] * S
    assert c.divergence[0].step == 1 and c.divergence[0].state == "norm"


def test_the_flush_allowance_is_only_at_subnormal_values():
    ar = Arithmetic("float32", PRECISIONS["jax"])
    tiny = float(np.finfo(np.float32).smallest_normal)
    x = ar.exact(np.array([tiny / 4, tiny, 1.0, 0.0]))
    assert list(x.e) == [tiny / 4, 0.0, 0.0, 0.0]
    assert Arithmetic("float32", PRECISIONS["torch"]).exact(x.v).e == 0.0


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_real_change_is_still_caught_beside_subnormal_gradients(optimizer, dtype):
    g = extreme_rows(dtype, ENDS[dtype, "tiny"])
    for precision in ("tensorflow", "jax", "torch"):
        found, c = verdicts(optimizer, g, dtype, precision, alter=decay)
        assert found == ["mismatch"] * S, (precision, found)
        assert c.divergence[0].step == 1 and c.divergence[0].state == "variable"


# --- the large end: the bound overflows ------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_huge_gradient_is_no_false_alarm(optimizer, dtype):
    g = extreme_rows(dtype, ENDS[dtype, "huge"])
    for precision in ("tensorflow", "jax", "torch"):
        found, _ = verdicts(optimizer, g, dtype, precision)
        assert all(v in PASS for v in found), (precision, found)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_a_change_is_never_a_pass_where_the_bound_overflowed(optimizer, dtype):
    """Adam's, Adagrad's and RMSprop's g * g overflows: the weights' bound is NaN
    (m / inf, inf * 0).  The decayed weights were a match; now they are an error
    naming the state and step, or a mismatch where another element still judges."""
    g = extreme_rows(dtype, ENDS[dtype, "huge"])
    for precision in ("tensorflow", "jax", "torch"):
        found, c = verdicts(optimizer, g, dtype, precision, alter=decay)
        assert not set(found) & set(PASS), (precision, found)
        for s in range(S):
            if found[s] == "error":
                assert c.unverified[s].startswith("cannot verify variable at step 1 ")
                assert "overflowed" in c.unverified[s] and c.unverified[s] in c.notes[s]


def test_adam_at_the_top_of_float32_is_an_error_not_a_match():
    """The issue's case: every gradient 3e38 at step 1."""
    found, c = verdicts("adam", extreme_rows("float32", 3e38), "float32", "jax", alter=decay)
    assert found == ["error"] * S
    assert c.unverified[0].startswith("cannot verify variable at step 1 (s0): its error bound "
                                      "overflowed in the reference's float32 arithmetic")


def test_a_mismatch_found_elsewhere_is_still_a_mismatch():
    """An element the bound cannot judge does not hide one it can."""
    g = extreme_rows("float32", 3e38)
    g[0, :N // 2] = 0.5  # half of scenario 0 at normal gradients
    found, c = verdicts("adam", g, "float32", "jax", alter=decay)
    assert found == ["mismatch", "error"]
    assert c.divergence[0].step == 1 and c.unverified[0] is not None


# --- any gradients in a dtype's range (hypothesis) -------------------------------------

def extreme_arrays(dtype):
    info = np.finfo(dtype)
    low, high = np.log2(float(info.smallest_subnormal)), np.log2(float(info.max))
    magnitude = st.one_of(
        st.sampled_from([float(info.smallest_subnormal), float(info.smallest_normal) / 3,
                         float(info.smallest_normal), float(info.max) / 2, float(info.max)]),
        st.floats(low, high - 1).map(lambda e: 2.0 ** e),
        st.floats(-3, 3))
    signs = st.lists(st.sampled_from([-1.0, 1.0]), min_size=N * S, max_size=N * S)
    # a step of independent magnitudes, or of one magnitude everywhere (nothing else
    # in it to judge a change by)
    row = st.one_of(st.lists(magnitude, min_size=N * S, max_size=N * S),
                    magnitude.map(lambda m: [m] * (N * S)))
    step = st.tuples(row, signs).map(lambda p: np.multiply(p[0], p[1]))
    return st.lists(step, min_size=3, max_size=3).map(lambda rows: np.asarray(rows, np.float64))


PROPERTY_SETTINGS = settings(max_examples=20, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.too_slow])


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(["float32", "float64"]))
    return (dtype, draw(extreme_arrays(dtype)), draw(st.sampled_from(OPTIMIZERS)),
            draw(st.sampled_from(["tensorflow", "jax", "torch"])))


@PROPERTY_SETTINGS
@given(case=cases())
def test_any_extreme_gradients_are_no_false_alarm(case):
    dtype, g, optimizer, precision = case
    found, _ = verdicts(optimizer, g, dtype, precision)
    assert "mismatch" not in found, found


@PROPERTY_SETTINGS
@given(case=cases())
def test_any_extreme_gradients_are_no_false_pass(case):
    dtype, g, optimizer, precision = case
    found, _ = verdicts(optimizer, g, dtype, precision, alter=decay)
    assert not set(found) & set(PASS), found


# --- through the workers, on every backend -------------------------------------------

# Keras with the weights decayed by 0.1% at every step: where weight_decay is None,
# the base optimizer's _apply_weight_decay (JAX), TensorFlow's and torch's own decay
# the weights instead of returning
DECAY_EVERY_STEP = Edit("decay-every-step", (
    (BASE, "        if self.weight_decay is None:\n            return\n"
           "        for variable in variables:\n",
     "        if self.weight_decay is None:\n            for variable in variables:\n"
     "                variable.assign(variable * 0.999)\n            return\n"
     "        for variable in variables:\n"),
    ("src/backend/tensorflow/optimizer.py",
     "        if self.weight_decay is None:\n            return\n\n"
     "        def distributed_apply_weight_decay",
     "        if self.weight_decay is None:\n            for variable in variables:\n"
     "                variable.assign(variable * 0.999)\n            return\n\n"
     "        def distributed_apply_weight_decay"),
    (TORCH + "torch_optimizer.py", "        if self.weight_decay is None:\n            return\n",
     "        if self.weight_decay is None:\n"
     "            torch._foreach_mul_([v.value for v in variables], 0.999)\n"
     "            return\n")))


@pytest.fixture(scope="module")
def decaying_keras(tmp_path_factory):
    return edited_keras(DECAY_EVERY_STEP, tmp_path_factory.mktemp("decay"))


def gradient_file(tmp_path, dtype, ends):
    """An .npz of one 8-element weight per end, its first step at that end."""
    path = tmp_path / f"{dtype}.npz"
    np.savez(path, **{end: extreme_rows(dtype, ENDS[dtype, end], seed=1)[:, :8]
                      for end in ends})
    return path


def verdicts_of(path, backend, dtype, optimizers, site=None):
    sel = api.selection(list(optimizers), backends=backend, dtypes=dtype, families="keras",
                        gradients=str(path))
    sel.python_path = [] if site is None else [str(site)]
    found = api.execute(sel).rows
    assert len(found) == len(optimizers) * (1 if backend == "torch" else 2)  # both modes
    return found


# Adamax's norm takes a subnormal gradient as it is; Adam squares a huge one
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_both_ends_on_each_backend_are_no_false_alarm(tmp_path, backend, dtype):
    needs(backend)
    path = gradient_file(tmp_path, dtype, ["tiny", "huge"])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["--gradients", str(path), "--backend", backend, "--dtype", dtype,
                         "--family", "keras", "--optimizer", "adamax,adam", "--quiet",
                         "--output", str(tmp_path / "report"), "--format", "json"])
    doc = json.loads((tmp_path / "report" / "summary.json").read_text())
    found = [r["verdict"] for r in doc["rows"]]
    assert code == 0 and len(found) and set(found) <= set(PASS), (found, err.getvalue())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_the_top_end_on_each_backend_is_no_false_pass(tmp_path, decaying_keras, backend,
                                                      dtype):
    needs(backend)
    found = verdicts_of(gradient_file(tmp_path, dtype, ["huge"]), backend, dtype, ["adam"],
                        decaying_keras)
    assert not found.verdict.isin(PASS).any(), found[["mode", "verdict"]]
    errors = found[found.verdict == "error"]  # a mismatch: an element its bound still judges
    assert errors.reason.str.startswith("cannot verify variable at step 1 (huge)").all()
    if backend == "jax":  # the case
        assert (found.verdict == "error").all()
