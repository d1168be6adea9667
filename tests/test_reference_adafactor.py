"""Adafactor's reference (reference/optimizers/adafactor.py), in pure numpy:
the slots Keras keeps, the factored second moment (exact for a rank-1 squared
gradient, Shazeer and Stern 2018, section 3), the relative step size, the
update clip, and where the paper's point departs from Keras's."""

import numpy as np
import pytest

import reference
from reference import PRECISIONS, Arithmetic

AR = Arithmetic("float64", PRECISIONS["exact"])
SHAPES = [(), (7,), (5, 9), (3, 3, 4, 6)]


def rule(family):
    return reference.get_rule(family, "Adafactor")


def step(family, config, weights, grads, iteration=0, state=None):
    """One step of a point on variables given as arrays (k = 1): the states after it."""
    r = rule(family)
    hp = r.hyperparameters(config)
    specs = {s.name: s for s in r.states(hp)}
    full = {"variable": [AR.exact(np.asarray(w, float)[None]) for w in weights]}
    for name, spec in specs.items():
        full[name] = [AR.exact(np.full((1,) + spec.shape_for(np.shape(w), ""), spec.initial))
                      for w in weights]
    for name, values in (state or {}).items():
        full[name] = [AR.exact(np.asarray(v, float)[None]) for v in values]
    out = r(AR, hp, full, [AR.exact(np.asarray(g, float)[None]) for g in grads],
            AR.step_count([float(iteration)]))
    return {n: [x.v[0] for x in v] for n, v in out.items()}


@pytest.mark.parametrize("family", ["keras", "textbook"])
def test_slots_are_the_ones_keras_keeps(family):
    specs = {s.name: s for s in rule(family).states(rule(family).hyperparameters({}))}
    assert set(specs) == {"r", "c", "velocity"}
    shape = lambda name, s: specs[name].shape_for(s, "v")
    # rank >= 2: factored over the last two axes
    assert shape("r", (5, 9)) == (5,) and shape("c", (5, 9)) == (9,)
    assert shape("r", (3, 3, 4, 6)) == (3, 3, 4) and shape("c", (3, 3, 4, 6)) == (3, 3, 6)
    # rank < 2: Keras's scalar placeholders backend.Variable(0)
    assert shape("r", (7,)) == () and shape("c", ()) == ()
    assert all(shape("velocity", s) == s for s in SHAPES)
    assert all(specs[n].initial == 0 for n in specs)


def test_every_rank_gives_states_of_their_own_shape_and_placeholders_stay_zero():
    rng = np.random.default_rng(0)
    out = step("keras", {}, [rng.standard_normal(s) for s in SHAPES],
               [rng.standard_normal(s) for s in SHAPES])
    assert [np.shape(x) for x in out["variable"]] == SHAPES
    assert [np.shape(x) for x in out["r"]] == [(), (), (5,), (3, 3, 4)]
    assert [np.shape(x) for x in out["c"]] == [(), (), (9,), (3, 3, 6)]
    assert out["r"][0] == 0 and out["c"][1] == 0


@pytest.mark.parametrize("family", ["keras", "textbook"])
def test_factored_moment_of_a_rank_one_square_is_exact(family):
    """G^2 = a b^T (G = x y^T) is its own best rank-1 approximation: the factored
    V of a constant rank-1 gradient is G^2 at every step (epsilon_1 = 0)."""
    rng = np.random.default_rng(1)
    g = np.outer(rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 9)) * rng.choice([-1, 1], (5, 9))
    w = rng.standard_normal((5, 9))
    state = None
    for t in range(4):
        out = step(family, {"epsilon_1": 0.0}, [w], [g], t, state)
        np.testing.assert_allclose(out["velocity"][0], g ** 2, rtol=1e-13)
        state = {n: out[n] for n in ("r", "c", "velocity")}
        w = out["variable"][0]
    # and a full-rank square is not reproduced (the test can fail)
    h = rng.standard_normal((5, 9))
    out = step(family, {"epsilon_1": 0.0}, [w], [h])
    assert not np.allclose(out["velocity"][0], h ** 2, rtol=1e-3)


def test_unfactored_moment_is_the_moving_average_with_increasing_decay():
    """Algorithm 5: v = beta v + (1 - beta)(g^2 + epsilon_1), beta = 1 - t^-0.8."""
    g, v0 = np.array([0.5, -2.0, 0.0]), np.array([1.0, 3.0, 0.25])
    t = 7  # iteration 6
    beta = 1 - t ** -0.8
    out = step("keras", {"epsilon_1": 1e-3}, [np.ones(3)], [g], t - 1, {"velocity": [v0]})
    np.testing.assert_allclose(out["velocity"][0], beta * v0 + (1 - beta) * (g ** 2 + 1e-3),
                               rtol=1e-14)


@pytest.mark.parametrize("iteration,lr,rho", [(0, 0.5, 0.5), (99, 0.5, 0.1), (3, 0.01, 0.01)])
@pytest.mark.parametrize("scale,alpha_scale", [(2.0, 2.0), (1e-5, 1e-3)])
def test_relative_step_size(iteration, lr, rho, scale, alpha_scale):
    """alpha = max(epsilon_2, RMS(w)) min(lr, 1/sqrt(t)); at the first step
    v = g^2, so u = sign(g) and, unclipped, w moves by alpha exactly."""
    w = np.full(4, scale) * [1, -1, 1, -1]  # RMS(w) = scale
    g = np.array([3.0, -0.5, 2.0, 1.0])
    config = {"learning_rate": lr, "epsilon_1": 0.0, "clip_threshold": 10.0}
    v = {"velocity": [g ** 2]}  # v stays g^2 whatever the decay
    out = step("keras", config, [w], [g], iteration, v)
    np.testing.assert_allclose(out["variable"][0], w - alpha_scale * rho * np.sign(g),
                               rtol=1e-12)


def test_update_clip_binds_at_rms_d():
    """U_hat = U / max(1, RMS(U)/d).  At t = 2 from v = 0, v = 2^-0.8 g^2, so
    U = 2^0.4 sign(g) and RMS(U) = 2^0.4 ~ 1.32: clipped to RMS d below that."""
    g = np.array([1.0, -2.0, 3.0, -4.0])
    w = np.ones(4)  # RMS(w) = epsilon_2 = 1: alpha = min(0.1, 1/sqrt(2)) = 0.1
    config = {"learning_rate": 0.1, "epsilon_1": 0.0, "epsilon_2": 1.0}
    for d, expected_rms in [(1.0, 1.0), (0.5, 0.5), (2.0, 2 ** 0.4)]:
        out = step("keras", dict(config, clip_threshold=d), [w], [g], 1,
                   {"velocity": [np.zeros(4)]})
        u_hat = (w - out["variable"][0]) / 0.1
        np.testing.assert_allclose(u_hat, expected_rms * np.sign(g), rtol=1e-12)


def test_keras_ignores_relative_step_and_the_paper_takes_the_absolute_step():
    rng = np.random.default_rng(2)
    w, g = [rng.standard_normal((5, 9)) * 3], [rng.standard_normal((5, 9))]
    config = {"learning_rate": 0.1, "relative_step": False}
    on = step("keras", dict(config, relative_step=True), w, g, 5)
    off = step("keras", config, w, g, 5)
    assert np.array_equal(on["variable"][0], off["variable"][0])
    paper_on = step("textbook", dict(config, relative_step=True), w, g, 5)
    paper_off = step("textbook", config, w, g, 5)
    np.testing.assert_allclose(paper_on["variable"][0], on["variable"][0], rtol=1e-12)
    # without relative steps alpha = lr = 0.1; with them max(eps_2, RMS(w)) * 0.1
    # (t = 6: min(0.1, 1/sqrt(6)) = 0.1)
    moved_on = np.sqrt(np.mean((paper_on["variable"][0] - w[0]) ** 2))
    moved_off = np.sqrt(np.mean((paper_off["variable"][0] - w[0]) ** 2))
    np.testing.assert_allclose(moved_off / moved_on, 1 / np.sqrt(np.mean(w[0] ** 2)),
                               rtol=1e-12)


def test_the_paper_keeps_row_and_column_sums_keras_means():
    """Same V and weights; the paper's R and C are m and n times Keras's r and c."""
    rng = np.random.default_rng(3)
    w, state = [rng.standard_normal((3, 4, 6))], None
    paper_state = None
    for t in range(3):
        g = [rng.standard_normal((3, 4, 6))]
        keras = step("keras", {}, w, g, t, state)
        paper = step("textbook", {}, w, g, t, paper_state)
        np.testing.assert_allclose(paper["r"][0], 6 * keras["r"][0], rtol=1e-13)
        np.testing.assert_allclose(paper["c"][0], 4 * keras["c"][0], rtol=1e-13)
        np.testing.assert_allclose(paper["velocity"][0], keras["velocity"][0], rtol=1e-13)
        np.testing.assert_allclose(paper["variable"][0], keras["variable"][0], rtol=1e-13)
        state = {n: keras[n] for n in ("r", "c", "velocity")}
        paper_state = {n: paper[n] for n in ("r", "c", "velocity")}
        w = keras["variable"]


def test_explained_pieces_and_points():
    space = reference.SPACES["Adafactor"]
    assert space.keras == {"factored_moments": "mean", "relative_step": "always"}
    assert space.paper({}) == {"factored_moments": "sum", "relative_step": "configured"}
    assert not rule("keras").elementwise({})
