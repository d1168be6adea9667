"""The diff engine: scaled error, verdicts, step 0, ties, on synthetic streams.

A "Keras" stream here is produced by running a reference rule without bounds
(the same arithmetic Keras would do), then optionally altered.
"""

import numpy as np
import pytest

import reference
from reference import PRECISIONS, Arithmetic
from verify import compare
from verify.configurations import Configuration

N, S = 8, 2  # elements per scenario, scenarios


def one_step(rule, ar, hp, state, g, t):
    """One step of S variables of N elements from flat [N * S] arrays (a global
    state: [1]), through the rule's per-variable interface; flat results."""
    specs = {sp.name: sp for sp in rule.states(hp)}
    split = lambda a: [ar.exact(p[None]) for p in np.split(np.asarray(a), S)]
    tracked = {k: split(v) if k == "variable" or specs[k].per_variable else ar.exact(v)
               for k, v in state.items()}
    out = rule(ar, hp, tracked, split(g), ar.step_count([float(t)]))
    return {k: np.concatenate([np.ravel(p.v) for p in v]) if isinstance(v, list)
            else np.ravel(v.v) for k, v in out.items()}


def stream(class_name, config, steps, dtype="float64", precision="jax", seed=0,
           initial=None, grads=None, alter=None):
    """States after each step (index 0 = before any step) from the keras rule;
    `alter(step, states)` may change the states in place after a step, and the
    stream continues from the altered states (a Keras that computed them)."""
    rule = reference.get_rule("keras", class_name)
    hp = rule.hyperparameters(config)
    ar = Arithmetic(dtype, PRECISIONS[precision], track=False)
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((steps, N * S)) if grads is None else grads
    state = {"variable": rng.standard_normal(N * S).astype(dtype)}
    for spec in rule.states(hp):
        shape = (N * S,) if spec.per_variable else (1,)
        value = spec.initial if initial is None else initial.get(spec.name, spec.initial)
        state[spec.name] = np.full(shape, value, dtype=dtype)
    history = [{k: v.copy() for k, v in state.items()}]
    for t in range(steps):
        state = one_step(rule, ar, hp, state, g[t].astype(dtype), t)
        if alter:
            alter(t + 1, state)
        history.append({k: v.copy() for k, v in state.items()})
    return g, history


def judge(class_name, config, g, history, dtype="float64", precision="jax", chunk=4):
    rule = reference.get_rule("keras", class_name)
    segments = compare.Segments([f"s{i}" for i in range(S)], [N] * S)
    names = [n for n in history[0] if n != "variable"]
    c = compare.RunComparison("keras", rule, config, dtype, PRECISIONS[precision], segments,
                              g, names)
    as_batch = lambda states: {n: np.stack([h[n] for h in states]) for n in history[0]}
    c.start(as_batch(history[:1]), 0)
    for t0 in range(1, len(history), chunk):
        part = history[t0:t0 + chunk]
        c.feed(t0, as_batch(part), np.arange(t0, t0 + len(part)))
    return c


ADAM = ("Adam", {"learning_rate": 0.01})


def test_identical_stream_is_exact():
    g, h = stream(*ADAM, steps=10)
    c = judge(*ADAM, g, h)
    assert [c.verdict(s) for s in range(S)] == ["exact", "exact"]
    assert c.summary(0)["max_scaled_error"] == 0.0


def test_change_beyond_rounding_is_a_mismatch_at_its_step_and_state():
    g, h = stream(*ADAM, steps=10)
    h[6]["momentum"][N + 3] *= 1 + 1e-10  # scenario 1, element 3, after step 6
    c = judge(*ADAM, g, h)
    assert c.verdict(0) == "exact"
    assert c.verdict(1) == "mismatch"
    d = c.divergence[1]
    assert (d.step, d.state) == (6, "momentum")
    assert d.scaled_error > compare.TOLERANCE
    assert c.summary(1)["mismatch_steps"] >= 1


def test_change_within_rounding_is_a_match():
    g, h = stream(*ADAM, steps=10)
    v = h[6]["variable"]
    v[2] = np.nextafter(v[2], np.inf)  # one ulp: far below the bound of an Adam step
    c = judge(*ADAM, g, h)
    assert c.verdict(0) == "match"
    assert 0 < c.summary(0)["max_scaled_error"] <= compare.TOLERANCE


def test_lockstep_resynchronises_so_one_bad_step_is_one_mismatch_step():
    def alter(step, state):
        if step == 3:
            state["variable"][0] += 1e-3

    g, h = stream(*ADAM, steps=12, alter=alter)
    c = judge(*ADAM, g, h)
    assert c.verdict(0) == "mismatch" and c.summary(0)["mismatch_steps"] == 1


def test_different_initial_slot_is_a_mismatch_at_step_0():
    config = {"learning_rate": 0.01}
    g, h = stream("Adagrad", config, steps=5, initial={"accumulator": 0.0})
    c = judge("Adagrad", config, g, h)
    d = c.divergence[0]
    assert (d.step, d.state) == (0, "accumulator")
    assert d.keras == 0.0 and d.reference == pytest.approx(0.1)


def test_sign_tie_within_rounding_is_not_a_mismatch_but_a_real_change_is():
    config = {"learning_rate": 0.001}
    rng = np.random.default_rng(1)
    steps = 6
    g = rng.standard_normal((steps, N * S))
    # make the Lion interpolation c = 0.9 m + 0.1 g vanish up to rounding at
    # element 0 of step 3: choose g from the momentum the stream will have
    _, h = stream("Lion", config, steps, grads=g)
    m = h[2]["momentum"][0]
    g[2, 0] = -0.9 * m / (1 - 0.9)
    _, h = stream("Lion", config, steps, grads=g)
    ar = Arithmetic("float64", PRECISIONS["jax"])
    c_val = ar.exact(m) * ar.cast(0.9) + ar.exact(g[2, 0]) * (1.0 - ar.cast(0.9))
    assert abs(c_val.v) <= 2 * compare.TOLERANCE * c_val.e  # a genuine tie
    lr = float(np.float32(0.001))
    jump = 2 * lr * (np.sign(c_val.v) or 1.0)  # the other branch of the sign

    def other_branch(element):
        def alter(step, state):
            if step == 3:
                state["variable"][element] += jump
        return alter

    _, tie = stream("Lion", config, steps, grads=g, alter=other_branch(0))
    assert judge("Lion", config, g, tie).verdict(0) == "match"
    # the same jump on an element that is not at a tie is caught
    _, no_tie = stream("Lion", config, steps, grads=g, alter=other_branch(1))
    c = judge("Lion", config, g, no_tie)
    assert c.verdict(0) == "mismatch" and c.divergence[0].step == 3


@pytest.mark.parametrize("keras,ref,bound,expected", [
    (1.0, 1.0, 0.0, 0.0),
    (1.0, 1.0 + 2e-16, 0.0, np.inf),
    (1.0, 1.0 + 4e-16, 1e-16, 2.0),  # 4e-16 / (2 * 1e-16), up to rounding of 1 + 4e-16
    (np.nan, np.nan, 0.0, 0.0),
    (np.nan, 1.0, 1.0, np.inf),
    (np.inf, np.inf, 0.0, 0.0),
    (np.nan, 1.0, np.inf, np.nan),  # a bound that overflowed judges nothing (unknown)
], ids=["equal", "zero-bound", "scaled", "both-nan", "one-nan", "both-inf", "unbounded"])
def test_element_errors(keras, ref, bound, expected):
    _, _, scaled = compare.element_errors(np.array([keras]), np.array([ref]),
                                          np.array([bound]))
    if np.isinf(expected) or expected == 0.0:
        assert scaled[0] == expected
    else:
        assert scaled[0] == pytest.approx(expected, rel=0.2, nan_ok=True)


def test_worst_verdict_order():
    assert compare.worst(["exact", "match"]) == "match"
    assert compare.worst(["match", "mismatch", "exact"]) == "mismatch"
    assert compare.worst(["mismatch", "error"]) == "error"


def test_unsupported_configuration_becomes_an_error_reason():
    cfg = Configuration("x", "Adam", {"learning_rate": 0.01, "clipnorm": 1.0})
    # the keras family models clipnorm (reference/base.py); the article does not
    comparison, reason = compare.build("article", reference.get_rule, cfg, "float64",
                                       PRECISIONS["jax"], compare.Segments(["a"], [1]),
                                       np.zeros((1, 1)), [])
    assert comparison is None and "clipnorm" in reason


def test_per_variable_evaluation_gives_the_flat_evaluation_bit_for_bit():
    """An elementwise rule is evaluated as one flat variable; the same rule
    evaluated variable by variable gives the same tables, bit for bit."""
    from dataclasses import replace

    config = {"learning_rate": 0.01}
    g, h = stream("Nadam", config, steps=9)
    h[5]["velocity"][N + 1] *= 1 + 1e-9
    rule = reference.get_rule("keras", "Nadam")
    tables = []
    for r in (rule, replace(rule, elementwise=lambda hp: False)):
        c = compare.RunComparison("keras", r, config, "float64", PRECISIONS["jax"],
                                  compare.Segments([f"s{i}" for i in range(S)], [N] * S), g,
                                  [n for n in h[0] if n != "variable"])
        assert len(c.layout.layouts["variable"].names) == (S if r is not rule else 1)
        batch = lambda hs: {n: np.stack([x[n] for x in hs]) for n in h[0]}
        c.start(batch(h[:1]), 0)
        c.feed(1, batch(h[1:]), np.arange(1, len(h)))
        tables.append((c.tables, [c.verdict(s) for s in range(S)]))
    (a, va), (b, vb) = tables
    assert va == vb == ["exact", "mismatch"]
    for ta, tb in zip(a, b):
        assert ta.keys() == tb.keys()
        assert all(np.array_equal(ta[k], tb[k], equal_nan=True) for k in ta)


# --- weights of several shapes per scenario ------------------------------------
SHAPED = compare.Segments(["a0", "b0", "a1", "b1"], [(2, 3), (4,), (2, 3), (4,)],
                          groups=[0, 0, 1, 1], group_count=2, labels=["a", "b", "a", "b"])


def test_per_scenario_maxima_span_every_weight_of_the_scenario():
    values = np.arange(20.0)[None]  # a0: 0-5, b0: 6-9, a1: 10-15, b1: 16-19
    np.testing.assert_array_equal(SHAPED.reduce_max(values), [[9.0, 19.0]])
    assert SHAPED.argmax(values[0], 0) == (9, "b0") and SHAPED.label("b0") == "b"
    # a slot only some weights have: the others hold nothing, and a scenario with
    # none of it has no error
    factored = SHAPED.with_shapes([(2,), None, None, None])
    np.testing.assert_array_equal(factored.reduce_max(np.array([[3.0, 5.0]])), [[5.0, 0.0]])
    assert [None if p is None else p.shape for p in factored.split(np.zeros((1, 2)))] == [
        (1, 2), None, None, None]


def shaped_run(alter=None, layout=None):
    rule = reference.get_rule("keras", "Adam")
    rng = np.random.default_rng(3)
    g = rng.standard_normal((3, 20))
    c = compare.RunComparison("keras", rule, {"learning_rate": 0.01}, "float64",
                              PRECISIONS["jax"], SHAPED, g, ["momentum", "velocity"])
    ar = Arithmetic("float64", PRECISIONS["jax"], track=False)
    hp = rule.hyperparameters({"learning_rate": 0.01})
    state = {"variable": rng.standard_normal(20), "momentum": np.zeros(20),
             "velocity": np.zeros(20)}
    c.start({k: v[None] for k, v in state.items()}, 0, layout)
    for t in range(3):
        tracked = {k: [ar.exact(p) for p in SHAPED.split(v[None])] for k, v in state.items()}
        out = rule(ar, hp, tracked, [ar.exact(p) for p in SHAPED.split(g[t][None])],
                   ar.step_count([float(t)]), SHAPED.names)
        state = {k: np.concatenate([p.v.reshape(-1) for p in v]) for k, v in out.items()}
        if alter:
            alter(t + 1, state)
        c.feed(t + 1, {k: v[None] for k, v in state.items()}, np.array([t + 1]))
    return c


def test_a_change_in_one_weight_is_its_scenarios_mismatch_and_names_the_weight():
    assert [shaped_run().verdict(s) for s in (0, 1)] == ["exact", "exact"]

    def alter(step, state):
        if step == 2:
            state["variable"][17] += 1e-6  # b1: scenario 1's vector
    c = shaped_run(alter)
    assert [c.verdict(s) for s in (0, 1)] == ["exact", "mismatch"]
    d = c.divergence[1]
    assert (d.step, d.state, d.weight) == (2, "variable", "b")


def test_a_slot_keras_keeps_in_another_shape_is_not_compared_as_the_same_state():
    layout = {"momentum": [(0, (2, 3)), (1, (4,)), (2, (2, 3)), (3, (4,))],
              "velocity": [(0, (6,)), (1, (4,)), (2, (2, 3)), (3, (4,))]}
    assert not shaped_run(layout={"momentum": layout["momentum"]}).layout.unmatched
    c = shaped_run(layout=layout)
    assert list(c.layout.unmatched) == ["velocity"]
    assert "Keras keeps velocity as" in c.layout.unmatched["velocity"]
    assert [c.verdict(s) for s in (0, 1)] == ["mismatch", "mismatch"]
