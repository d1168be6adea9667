"""LossScaleOptimizer (loss_scale_adam) and the `nonfinite` scenario.

The reference rule's dynamic scale on the nonfinite scenario's steps (numpy);
the comparison with NaN and infinities beside finite values; real Keras on
every backend (specificity) beside rules with the scale not halved or the step
not skipped (sensitivity); every configuration through `nonfinite` on one
backend, without a crash, a warning or a mismatch."""

from dataclasses import replace

import numpy as np
import pytest

import reference
from conftest import fast_backend, make_selection, nonempty, refused_by_keras, run_selection
from reference import PRECISIONS, Arithmetic
from reference.arithmetic import where
from reference.rule import REGISTRY
from verify import compare, scenarios
from verify.configurations import CONFIGURATIONS
from verify.selection import installed_backends

RULE = reference.get_rule("keras", "LossScaleOptimizer")
CONFIG = CONFIGURATIONS["loss_scale_adam"].config
HP = RULE.hyperparameters(CONFIG)
STEPS = 30
NONFINITE_STEPS = [t for t in range(1, STEPS + 1)
                   if t % scenarios.NONFINITE_PERIOD in {s for s, _, _ in scenarios.NONFINITE}]


def trajectory(grads, rule=RULE):
    """The rule run on its own from the initial states over grads [steps, N]:
    the states after each step."""
    ar = Arithmetic("float64", PRECISIONS["exact"], track=False)
    n = grads.shape[1]
    state = {"variable": [ar.exact(np.ones((1, n)))]}
    for spec in rule.states(HP):
        value = np.full((1, n) if spec.per_variable else (1,), spec.initial)
        state[spec.name] = [ar.exact(value)] if spec.per_variable else ar.exact(value)
    out = []
    for g in grads:
        with compare.ieee():
            state = rule(ar, HP, state, [ar.exact(g[None])], ar.step_count([0.0]))
        out.append({k: (v[0] if isinstance(v, list) else v).v[0] for k, v in state.items()})
    return out


def nonfinite(steps=STEPS, size=8):
    return scenarios.gradients("nonfinite", steps, size, seed=0)


def test_the_nonfinite_scenario_puts_nan_and_inf_where_its_description_says():
    g = nonfinite(60, 26)
    bad = {(int(t) + 1, int(i)) for t, i in np.argwhere(~np.isfinite(g))}
    assert bad == {(t, i % 26) for t in range(1, 61) for s, i, _ in scenarios.NONFINITE
                   if t % 25 == s}
    assert np.isnan(g[7, 0]) and g[8, 1] == np.inf and g[19, -1] == -np.inf
    assert np.array_equal(g, nonfinite(60, 26), equal_nan=True)  # deterministic


def test_the_scale_halves_and_the_step_is_skipped_exactly_at_the_nonfinite_steps():
    states = trajectory(nonfinite())
    scale = [s["dynamic_scale"] for s in states]
    previous = [HP["initial_scale"]] + scale[:-1]
    halved = [t for t in range(1, STEPS + 1) if scale[t - 1] == previous[t - 1] / 2]
    doubled = [t for t in range(1, STEPS + 1) if scale[t - 1] == previous[t - 1] * 2]
    assert halved == NONFINITE_STEPS == [8, 9, 20]
    # dynamic_growth_steps = 10 finite steps since the last change: 19 (10..19), 30 (21..30)
    assert doubled == [19, 30]
    assert all(s["dynamic_scale"].dtype == np.float32 for s in states)
    for t in NONFINITE_STEPS:
        before, after = states[t - 2], states[t - 1]
        for name in ("variable", "momentum", "velocity", "iteration"):
            assert np.array_equal(before[name], after[name]), (t, name)
        assert after["step_counter"] == 0
    assert states[-1]["iteration"] == STEPS - len(NONFINITE_STEPS)
    assert all(np.isfinite(s["variable"]).all() for s in states)


def test_without_nonfinite_steps_the_scale_doubles_every_dynamic_growth_steps():
    states = trajectory(scenarios.gradients("gaussian", STEPS, 8, seed=0))
    assert [s["dynamic_scale"] for s in states][9::10] == [2.0 ** 11, 2.0 ** 12, 2.0 ** 13]
    assert states[-1]["iteration"] == STEPS


def test_the_inner_adam_sees_the_scenarios_gradient():
    g = scenarios.gradients("gaussian", STEPS, 8, seed=0)
    adam = reference.get_rule("keras", "Adam")
    wrapped = trajectory(g)
    ar = Arithmetic("float64", PRECISIONS["exact"], track=False)
    state = {"variable": [ar.exact(np.ones((1, 8)))], "momentum": [ar.exact(np.zeros((1, 8)))],
             "velocity": [ar.exact(np.zeros((1, 8)))]}
    hp = adam.hyperparameters({"learning_rate": 0.01})
    for t, row in enumerate(g):
        state = adam(ar, hp, state, [ar.exact(row[None])], ar.step_count([float(t)]))
        assert np.array_equal(state["variable"][0].v[0], wrapped[t]["variable"])


# --- the comparison with NaN and infinities -----------------------------------
def test_nan_and_infinities_are_equal_only_to_themselves():
    k = np.array([np.nan, np.inf, -np.inf, np.nan, np.inf, 1.0, 1.0])
    r = np.array([np.nan, np.inf, -np.inf, 1.0, -np.inf, np.nan, 1.0 + 1e-15])
    with np.errstate(all="raise"):
        diff, rel, scaled = compare.element_errors(k, r, np.full(7, 1e-16))
    assert diff[:3].tolist() == [0, 0, 0] and scaled[:3].tolist() == [0, 0, 0]
    assert np.isinf(scaled[3:6]).all()  # NaN on one side, or infinities of opposite signs
    assert 0 < scaled[6] < compare.TOLERANCE


def test_a_finite_element_beside_nan_keeps_its_verdict():
    """A NaN elsewhere in the weights changes neither a finite element's error
    nor the step a wrong finite value is found at."""
    k = np.array([[np.nan, 1.0, 2.0]])
    good = compare.element_errors(k, np.array([[np.nan, 1.0, 2.0]]), np.full((1, 3), 1e-16))[2]
    bad = compare.element_errors(k, np.array([[np.nan, 1.0, 2.001]]), np.full((1, 3), 1e-16))[2]
    assert good.tolist() == [[0, 0, 0]]
    assert bad[0, 2] > compare.TOLERANCE and bad[0, :2].tolist() == [0, 0]


# --- real Keras ----------------------------------------------------------------
def _skip_not_halved(rule):
    """The scale kept, not halved, on a non-finite step."""
    def step(ar, hp, s, g, t, paths):
        out = rule.step(ar, hp, s, g, t, paths)
        kept = Arithmetic("float32", ar.precision, track=ar.track).exact(s["dynamic_scale"].v)
        halved = out["dynamic_scale"].v < s["dynamic_scale"].v
        out["dynamic_scale"] = where(halved, kept, out["dynamic_scale"])
        return out
    return step


def _step_not_skipped(rule):
    """The scale halved, but the inner optimizer's step taken on a non-finite
    step too (on the gradient's finite values, the others read as 0)."""
    def step(ar, hp, s, g, t, paths):
        taken = rule.step(ar, hp, s, [ar.exact(np.nan_to_num(x.v, nan=0.0, posinf=0.0,
                                                             neginf=0.0)) for x in g], t, paths)
        out = rule.step(ar, hp, s, g, t, paths)
        return {**taken, "dynamic_scale": out["dynamic_scale"],
                "step_counter": out["step_counter"]}
    return step


PERTURBED = {"loss-scale-not-halved": _skip_not_halved,
             "loss-scale-step-not-skipped": _step_not_skipped}
for _family, _make in PERTURBED.items():
    REGISTRY[(_family, "LossScaleOptimizer")] = replace(RULE, family=_family,
                                                        step=_make(RULE))


@pytest.fixture(scope="module")
def loss_scale_runs(tmp_path_factory):
    sel = make_selection(installed_backends(), ["keras", *PERTURBED],
                         configurations=["loss_scale_adam"], names=["gaussian", "nonfinite"],
                         steps=STEPS, size=64)
    return run_selection(sel, tmp_path_factory.mktemp("loss_scale"))


def test_real_keras_is_the_keras_loss_scale_rule_on_every_backend(loss_scale_runs):
    got = loss_scale_runs[loss_scale_runs.family == "keras"]
    assert set(got.backend) == set(installed_backends())
    # JAX eager: Keras raises (tests/keras_refusals.toml)
    refused, ran = refused_by_keras(got)
    assert len(refused) == ("jax" in installed_backends()) * 2 * 2  # dtypes x scenarios
    assert len(ran) and ran.verdict.isin(["exact", "match"]).all(), ran[
        ["backend", "dtype", "mode", "scenario", "verdict", "divergent_state"]].to_string()


@pytest.mark.parametrize("family", list(PERTURBED))
def test_a_scale_not_halved_or_a_step_not_skipped_is_a_mismatch_where_it_happens(
        loss_scale_runs, family):
    got = loss_scale_runs[(loss_scale_runs.family == family)
                          & (loss_scale_runs.verdict != "error")]
    assert len(got)
    hit = nonempty(got[got.scenario == "nonfinite"])
    assert (hit.verdict == "mismatch").all(), hit.verdict.tolist()
    assert (hit.first_divergent_step == NONFINITE_STEPS[0]).all()
    # no nonfinite step, nothing to tell them apart
    assert nonempty(got[got.scenario == "gaussian"]).verdict.isin(["exact", "match"]).all()


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_every_configuration_runs_through_nonfinite_without_a_crash(tmp_path):
    sel = make_selection([fast_backend()], ["keras"], names=["nonfinite"], steps=STEPS,
                         size=64, modes=["eager"])
    got = run_selection(sel, tmp_path)
    assert set(got.optimizer) == set(CONFIGURATIONS)
    _, ran = refused_by_keras(got)
    assert ran.verdict.isin(["exact", "match"]).all(), ran[ran.verdict != "match"][
        ["optimizer", "dtype", "verdict", "first_divergent_step", "divergent_state",
         "reason"]].to_string()


def test_nonfinite_runs_in_an_optimizer_of_its_own():
    sel = make_selection(["torch"], ["keras"], configurations=["adam_global_clipnorm"],
                         names=["gaussian", "nonfinite", "tiny"], steps=3, size=8)
    assert sel.scenario_groups() == [("gaussian", "tiny"), ("nonfinite",)]
    assert make_selection(["torch"], ["keras"], names=["nonfinite"], steps=3,
                          size=8).scenario_groups() == [("nonfinite",)]
