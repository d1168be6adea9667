"""Running error bounds of the operations over axes (reference/arithmetic.py).

Specificity: the bound covers the actual error of the float32 result against
the exact value of the same formula on the same float32 inputs (products of
float32 numbers are exact in float64, and math.fsum rounds a float64 sum
correctly once), on random and on cancelling inputs, and with inputs that
carry bounds of their own.  Sensitivity: a result off by a real change (one
input moved by a relative 1e-4, one term left out) is outside the bound.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from reference import PRECISIONS, Arithmetic
from reference.arithmetic import (gamma, matmul, maximum, mean_over, minimum,
                                  norm, ops_mean, sqrt, to_float32,
                                  sum_over)

F32 = Arithmetic("float32", PRECISIONS["exact"])
FTZ = Arithmetic("float32", PRECISIONS["tensorflow"])
SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


def exact_sum(values) -> float:
    return math.fsum(float(v) for v in np.ravel(values))


def exact_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    out = np.empty((a.shape[0], b.shape[1]))
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            out[i, j] = math.fsum(a[i] * b[:, j])  # float32 products: exact in float64
    return out


def cancelling(rng, n) -> np.ndarray:
    """Large terms that cancel pairwise, small ones in between, shuffled: the
    exact sum is tiny next to sum |x_i|."""
    big = rng.standard_normal(n // 2) * 1e6
    x = np.concatenate([big, -big * (1 + rng.standard_normal(n // 2) * 1e-7),
                        rng.standard_normal(n - 2 * (n // 2))])
    rng.shuffle(x)
    return x.astype(np.float32)


finite32 = st.floats(-1e4, 1e4, width=32, allow_subnormal=False)


@SETTINGS
@given(hnp.arrays(np.float32, st.integers(1, 300), elements=finite32))
def test_sum_bound_covers_the_error(x):
    s = sum_over(F32.exact(x))
    assert abs(float(s.v) - exact_sum(x)) <= float(s.e)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [257, 4097])
def test_sum_of_cancelling_terms_is_covered(seed, n):
    x = cancelling(np.random.default_rng(seed), n)
    s = sum_over(F32.exact(x))
    assert abs(float(s.v) - exact_sum(x)) <= float(s.e)
    assert abs(exact_sum(x)) < 1e-3 * float(np.sum(np.abs(x)))  # it did cancel


@pytest.mark.parametrize("seed", range(5))
def test_sum_sensitivity(seed):
    # gamma_256 sum |x_i| is about 1.5e-5 of the magnitudes: a term moved by a
    # relative 1e-2, or left out, is outside
    x = cancelling(np.random.default_rng(seed), 257)
    s = sum_over(F32.exact(x))
    i = int(np.argmax(np.abs(x)))
    moved = x.astype(np.float64)
    moved[i] *= 1 + 1e-2
    assert abs(float(s.v) - exact_sum(moved)) > float(s.e)
    assert abs(float(s.v) - (exact_sum(x) - float(x[i]))) > float(s.e)


def test_sum_bound_is_gamma_n_minus_1_of_the_magnitudes():
    x = np.ones(1000, np.float32)
    s = sum_over(F32.exact(x))
    assert float(s.e) == pytest.approx(float(gamma(999, F32.u)) * 1000)


def test_sum_over_axes_keeps_the_others_and_propagates_input_bounds():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 4, 5)).astype(np.float32)
    e = np.abs(rng.standard_normal((3, 4, 5))) * 1e-3
    t = F32.exact(x)
    t.e = e
    s = sum_over(t, axis=(1, 2))
    assert s.v.shape == (3,) and s.e.shape == (3,)
    # inputs anywhere within their bounds: the exact sums stay within the bound
    for sign in (-1.0, 1.0):
        shifted = x.astype(np.float64) + sign * e
        for j in range(3):
            assert abs(float(s.v[j]) - exact_sum(shifted[j])) <= float(s.e[j])
    # sensitivity: twice the input bounds is outside
    far = x.astype(np.float64) + 2.5 * e
    assert abs(float(s.v[0]) - exact_sum(far[0])) > float(s.e[0])
    kept = sum_over(t, axis=-1, keepdims=True)
    assert kept.v.shape == (3, 4, 1)


def test_mean_is_the_sum_over_the_count():
    rng = np.random.default_rng(2)
    x = cancelling(rng, 999).reshape(9, 111)
    m = mean_over(F32.exact(x), axis=1)
    for i in range(9):
        assert abs(float(m.v[i]) - exact_sum(x[i]) / 111) <= float(m.e[i])
    wrong = m.v.astype(np.float64) + 3 * m.e
    assert np.all(np.abs(wrong - [exact_sum(r) / 111 for r in x]) > m.e)


@pytest.mark.parametrize("op,ref", [(minimum, np.minimum), (maximum, np.maximum)])
def test_elementwise_min_max_are_within_the_larger_input_bound(op, ref):
    """min(x, y) and max(x, y) are exact and 1-Lipschitz in each argument: moving
    the inputs within their bounds moves the result by at most the larger bound,
    including where x and y cross."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal(200).astype(np.float32)
    y = (x + rng.standard_normal(200) * 1e-3).astype(np.float32)  # many crossings
    tx, ty = F32.exact(x), F32.exact(y)
    tx.e, ty.e = np.full(200, 1e-3), rng.uniform(0, 2e-3, 200)
    m = op(tx, ty)
    assert np.array_equal(m.v, ref(x, y))
    for _ in range(20):
        mx = x + rng.uniform(-1, 1, 200) * tx.e
        my = y + rng.uniform(-1, 1, 200) * ty.e
        assert np.all(np.abs(m.v - ref(mx, my)) <= m.e)
    assert np.all(np.abs(m.v - (ref(x, y) + 3e-3)) > m.e)  # sensitivity


F64_MEAN32 = Arithmetic("float64", PRECISIONS["torch"])  # mean_float32, min_max_float32


@pytest.mark.parametrize("n", [1, 7, 300])
def test_ops_mean_in_float32_is_covered_and_only_under_its_setting(n):
    """Keras's ops.mean of float64 on JAX and torch: inputs rounded to float32 and
    averaged in float32; the bound covers it against the exact float64 mean, and
    a float64 mean moved by a few float32 roundings is outside it."""
    rng = np.random.default_rng(n)
    x = rng.standard_normal((3, n)) * np.logspace(-3, 3, n)
    m = ops_mean(F64_MEAN32.exact(x), axis=1)
    assert np.array_equal(m.v, (x.astype(np.float32).sum(axis=1, dtype=np.float32)
                                / np.float32(n)).astype(np.float64))
    exact = np.array([exact_sum(r) / n for r in x])
    assert np.all(np.abs(m.v - exact) <= m.e)
    u32 = np.finfo(np.float32).eps / 2
    assert np.all(m.e < 1.01 * (n + 2) * u32 * np.abs(x).mean(axis=1))  # float32-sized
    # elsewhere a float64 mean, whose bound does not cover the float32 result
    plain = ops_mean(Arithmetic("float64", PRECISIONS["tensorflow"]).exact(x), axis=1)
    assert np.all(np.abs(plain.v - m.v) > 2 * plain.e)


def test_to_float32_rounds_and_bounds_and_is_exact_in_float32():
    x = np.array([1 / 3, -2e-40, 0.0, 1e30 / 7])
    t = to_float32(F64_MEAN32.exact(x))
    assert np.array_equal(t.v, x.astype(np.float32).astype(np.float64))
    assert np.all(np.abs(t.v - x) <= t.e) and t.e[2] == 0
    assert not np.all(np.abs(t.v - x * (1 + 1e-6)) <= t.e)  # sensitivity
    y = F32.exact(np.float32([1 / 3]))
    assert to_float32(y) is y


@SETTINGS
@given(hnp.arrays(np.float32, st.integers(1, 200), elements=finite32))
def test_norm_bound_covers_the_error(x):
    n = norm(F32.exact(x))
    exact = math.sqrt(exact_sum(x.astype(np.float64) ** 2))
    assert abs(float(n.v) - exact) <= float(n.e) * (1 + 1e-9)


def test_norm_sensitivity():
    x = np.random.default_rng(4).standard_normal(500).astype(np.float32)
    n = norm(F32.exact(x))
    exact = math.sqrt(exact_sum(x.astype(np.float64) ** 2))
    # the bound is about gamma_499 / 2 = 1.5e-5 of the norm: 1e-4 is outside
    assert abs(float(n.v) - exact * (1 + 1e-4)) > float(n.e)


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 40), st.integers(1, 6), st.integers(0, 2 ** 32 - 1),
       st.booleans())
def test_matmul_bound_covers_the_error(m, n, p, seed, cancel):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((m, n)).astype(np.float32)
    b = rng.standard_normal((n, p)).astype(np.float32)
    if cancel and n > 1:  # the second half of each inner product cancels the first
        h = n // 2
        b[h:2 * h] = (-b[:h] * (1 + 1e-6 * rng.standard_normal((h, p)))).astype(np.float32)
        a[:, h:2 * h] = a[:, :h]
    c = matmul(F32.exact(a), F32.exact(b))
    assert np.all(np.abs(c.v.astype(np.float64) - exact_matmul(a, b)) <= c.e)


def test_matmul_with_bounded_inputs_and_batch_axis():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((3, 4, 8)).astype(np.float32)
    b = rng.standard_normal((3, 8, 2)).astype(np.float32)
    ta, tb = F32.exact(a), F32.exact(b)
    ta.e, tb.e = np.full(a.shape, 1e-4), np.full(b.shape, 2e-4)
    c = ta @ tb
    assert c.v.shape == (3, 4, 2)
    for k in range(3):
        for sa, sb in ((1, 1), (1, -1), (-1, 1), (-1, -1)):
            exact = exact_matmul(a[k] + sa * 1e-4 * np.sign(b[k].sum(1)),
                                 b[k] + sb * 2e-4)
            assert np.all(np.abs(c.v[k].astype(np.float64) - exact) <= c.e[k])


def test_matmul_sensitivity():
    rng = np.random.default_rng(6)
    a = rng.standard_normal((5, 30)).astype(np.float32)
    b = rng.standard_normal((30, 4)).astype(np.float32)
    a[:, 0], b[0, :] = 1.0, 1.0
    c = matmul(F32.exact(a), F32.exact(b))
    assert np.all(c.e < 1e-4)  # gamma_30 sum |a||b|
    wrong = a.astype(np.float64).copy()
    wrong[:, 0] *= 1 + 1e-3  # one term of every inner product moved by 1e-3
    assert np.all(np.abs(c.v - exact_matmul(wrong, b)) > c.e)


def test_flushed_subnormals_add_the_smallest_normal_per_operation():
    x = np.full(10, 1e-39, np.float32)  # subnormal in float32
    s_ftz, s = sum_over(FTZ.exact(x)), sum_over(F32.exact(x))
    assert float(s_ftz.e) >= 9 * float(np.finfo(np.float32).smallest_normal)
    assert float(s.e) < float(np.finfo(np.float32).smallest_normal)


def test_abs_transpose_reshape_are_exact_and_keep_bounds_and_ties_aligned():
    x = F32.exact(np.arange(-6, 6, dtype=np.float32).reshape(3, 4))
    x.e = np.arange(12, dtype=np.float64).reshape(3, 4)
    x.tie = np.arange(12).reshape(3, 4) == 5
    for y, expect in ((abs(x), np.abs(x.v)), (x.transpose(), x.v.T),
                      (x.reshape((2, 6)), x.v.reshape(2, 6))):
        assert np.array_equal(y.v, expect)
    t = x.transpose()
    assert t.e[1, 0] == x.e[0, 1] and t.tie[1, 1] and not t.tie[0, 1]
    r = x.reshape((12,))
    assert r.e[5] == 5 and r.tie[5]
    assert np.array_equal(abs(x).e, x.e)


def test_sqrt_of_a_norm_of_exact_zeros_is_exact():
    z = norm(F32.exact(np.zeros(7, np.float32)))
    assert float(z.v) == 0.0 and float(z.e) == 0.0
    assert float(sqrt(sum_over(F32.exact(np.zeros(3, np.float32)))).e) == 0.0
