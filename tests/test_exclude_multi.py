"""exclude_from_weight_decay and MultiOptimizer (issue 10, items 1 and 7).

The reference alone (which variables decay, which inner optimizer a path goes to),
the configuration forms and their bad input, and real Keras on every installed
backend: the keras family must agree (specificity), a reference that ignores the
exclusion, sends a weight to the wrong optimizer or drops the MultiOptimizer's
loss_scale_factor must not (sensitivity)."""

import json
from dataclasses import replace

import numpy as np
import pytest

import check_edits
import reference
from conftest import DESIGNS, designed, fast_backend, make_selection, run_selection
from reference import PRECISIONS, Arithmetic, multi
from reference.rule import REGISTRY
from verify import api, cli, scenarios, selection
from verify.configurations import (CONFIGURATIONS, EXCLUDE, from_keras, parse_json,
                                   parse_toml)
from verify.worker.messages import UNSUPPORTED

ADAMW_EXCLUDE = CONFIGURATIONS["adamw_exclude"]
MULTI = CONFIGURATIONS["multi_optimizer"]
PATHS = ["g_scalar", "g_vector", "g_matrix"]
SHAPES = [(), (3,), (4, 2)]


def one_step(rule, config, paths=PATHS):
    """One step of `rule` from fixed weights and gradients: (hp, state, out)."""
    ar = Arithmetic("float64", PRECISIONS["exact"])
    hp = rule.hyperparameters(config)
    rng = np.random.default_rng(0)
    state = {"variable": [ar.exact(1 + rng.random((1,) + s)) for s in SHAPES]}
    for spec in rule.states(hp):
        if spec.per_variable:
            state[spec.name] = [None if (s := spec.shape_for(shape, p)) is None
                                else ar.exact(np.full((1,) + s, spec.initial))
                                for shape, p in zip(SHAPES, paths)]
        else:
            state[spec.name] = ar.exact([spec.initial])
    grads = [ar.exact(rng.standard_normal((1,) + s)) for s in SHAPES]
    return hp, state, rule(ar, hp, state, grads, ar.step_count([0.0]), paths)


# --- the reference: which variables decay -------------------------------------------
def test_excluded_variables_keep_their_weights_through_the_decay():
    rule = reference.get_rule("keras", "SGD")
    config = {"learning_rate": 0.1, "weight_decay": 0.5}
    _, _, plain = one_step(rule, config)

    def excluded(var_names):
        _, _, out = one_step(rule, {**config, EXCLUDE: {"var_names": var_names}})
        return [not np.array_equal(a.v, b.v)
                for a, b in zip(plain["variable"], out["variable"])]
    assert excluded(["vec"]) == [False, True, False]
    # Keras searches "|".join(var_names) as a regular expression anywhere in the name
    assert excluded(["^g_s", "trix$"]) == [True, False, True]
    assert excluded(["^vec"]) == [False, False, False]


def test_an_exclusion_makes_the_rule_per_variable_and_other_families_not_state_it():
    rule = reference.get_rule("keras", "AdamW")
    assert rule.elementwise(rule.hyperparameters({"weight_decay": 0.1}))
    assert not rule.elementwise(rule.hyperparameters(ADAMW_EXCLUDE.config))
    for family in ("textbook", "article"):
        with pytest.raises(reference.Unsupported, match=EXCLUDE):
            reference.get_rule(family, "AdamW").hyperparameters(ADAMW_EXCLUDE.config)


def test_muon_honours_the_exclusion_in_its_own_decay():
    rule = reference.get_rule("keras", "Muon")
    config = {"weight_decay": 0.5, "adam_weight_decay": 0.5}
    _, _, plain = one_step(rule, config)
    _, _, excluded = one_step(rule, {**config, EXCLUDE: {"var_names": ["matrix"]}})
    assert np.array_equal(plain["variable"][0].v, excluded["variable"][0].v)
    assert not np.array_equal(plain["variable"][2].v, excluded["variable"][2].v)


# --- the reference: MultiOptimizer ------------------------------------------------------
def serialized_map(mapping, default=("SGD", {"learning_rate": 0.1, "momentum": 0.9})):
    return {"class_name": "OptimizerMap", "config": {
        "default_optimizer": {"class_name": default[0], "config": default[1]},
        "optimizer_map": {p: {"class_name": c, "config": k} for p, (c, k) in mapping.items()}}}


def test_a_path_goes_to_its_exact_key_else_the_one_fullmatch_else_the_default():
    inners = multi.inner_optimizers(serialized_map({
        "g_matrix": ("Adam", {}), ".*_s.*": ("Adam", {}), ".*x": ("Lion", {})}))
    assert [label for label, _, _ in inners] == ["adam0", "adam1", "lion2", "sgd3"]
    assert multi.owner(inners, "g_matrix") == 0  # also fullmatched by ".*x": the key wins
    assert multi.owner(inners, "g_scalar") == 1
    assert multi.owner(inners, "g_vector") == 3  # ".*_s.*" does not fullmatch it
    assert multi.owner(inners, "g_ux") == 2
    with pytest.raises(reference.Unsupported, match="Multiple optimizers"):
        multi.owner(inners, "g_sx")


def test_each_inner_rule_updates_its_own_variables_and_counts_its_own_steps():
    rule = reference.get_rule("keras", "MultiOptimizer")
    config = {"loss_scale_factor": 4.0,
              "optimizer_map": serialized_map({".*matrix": ("Adam", {"learning_rate": 0.1}),
                                               "nothing": ("Lion", {})})}
    hp, state, out = one_step(rule, config)
    assert [s.name for s in rule.states(hp)] == [
        "adam0.iteration", "adam0.momentum", "adam0.velocity", "lion1.iteration",
        "lion1.momentum", "sgd2.iteration", "sgd2.momentum"]
    assert [x is None for x in out["adam0.momentum"]] == [True, True, False]
    assert [x is None for x in out["sgd2.momentum"]] == [False, False, True]
    assert float(out["adam0.iteration"].v[0]) == 1 and float(out["sgd2.iteration"].v[0]) == 1
    assert float(out["lion1.iteration"].v[0]) == 0  # no variable: never applied
    # SGD with momentum on the scalar and the vector: w + m, m its new momentum
    for i in (0, 1):
        assert np.array_equal(out["variable"][i].v,
                              state["variable"][i].v + out["sgd2.momentum"][i].v)


def test_the_loss_scale_factor_reaches_the_inner_optimizers():
    rule = reference.get_rule("keras", "MultiOptimizer")
    config = {"optimizer_map": serialized_map({}, default=("SGD", {"learning_rate": 0.1}))}
    _, state, scaled = one_step(rule, {**config, "loss_scale_factor": 4.0})
    _, _, plain = one_step(rule, config)
    for w0, a, b in zip(state["variable"], scaled["variable"], plain["variable"]):
        np.testing.assert_allclose(w0.v - a.v, (w0.v - b.v) / 4, rtol=1e-12)


# --- the configuration forms -------------------------------------------------------------
EXCLUDE_JSON = {"class_name": "AdamW", "config": {"learning_rate": 0.01, "weight_decay": 0.1},
                EXCLUDE: {"var_names": ["vector"]}}


def test_toml_and_json_forms_give_the_built_in_configurations(tmp_path):
    toml = tmp_path / "mine.toml"
    toml.write_text('[mine]\nclass_name = "AdamW"\n'
                    'config = { learning_rate = 0.01, weight_decay = 0.1 }\n'
                    'exclude_from_weight_decay = { var_names = ["vector"] }\n')
    assert parse_toml(str(toml))[0].config == ADAMW_EXCLUDE.config
    assert parse_json(json.dumps(EXCLUDE_JSON), "--config")[0].config == ADAMW_EXCLUDE.config
    for c in (ADAMW_EXCLUDE, MULTI):  # what the reports record reads back the same
        assert from_keras(c.keras_config(), explicit_id=c.id) == c
    assert ADAMW_EXCLUDE.keras_config()["config"] == {"learning_rate": 0.01,
                                                       "weight_decay": 0.1}
    assert ADAMW_EXCLUDE.describe().endswith(".exclude_from_weight_decay(var_names=['vector'])")
    # as keras.optimizers.serialize writes a MultiOptimizer (torch's module names)
    written = {"module": "keras.optimizers", "class_name": "MultiOptimizer",
               "registered_name": None, "config": {
                   "loss_scale_factor": None, "name": "multi_optimizer", "optimizer_map": {
                       "module": "keras.optimizers", "class_name": "OptimizerMap",
                       "registered_name": None, "config": {
                           "default_optimizer": {
                               "module": "keras.src.backend.torch.optimizers.torch_sgd",
                               "class_name": "SGD", "registered_name": "SGD",
                               "config": {"name": "sgd", "learning_rate": 0.01}},
                           "optimizer_map": {}}}}}
    assert from_keras(written).class_name == "MultiOptimizer"


BAD = {
    "exclusion inside config": (
        {"class_name": "AdamW", "config": {EXCLUDE: {"var_names": ["vector"]}}},
        "is a method of the optimizer, not an argument"),
    "var_list": ({**EXCLUDE_JSON, EXCLUDE: {"var_list": ["vector"]}}, "var_list takes Keras"),
    "not a regex": ({**EXCLUDE_JSON, EXCLUDE: {"var_names": ["("]}},
                    "is not a regular expression"),
    "exclusion naming no weight": ({**EXCLUDE_JSON, EXCLUDE: {"var_names": ["bias"]}},
                                   "match no variable of this run"),
    "unknown field": ({**EXCLUDE_JSON, "exclude": ["vector"]}, "unknown key 'exclude'"),
    "exclusion of a MultiOptimizer": ({**MULTI.keras_config(), EXCLUDE: {"var_names": ["v"]}},
                                      "no weight decay of its own"),
    "no optimizer_map": ({"class_name": "MultiOptimizer", "config": {}},
                         "MultiOptimizer needs optimizer_map"),
    "no default": ({"class_name": "MultiOptimizer", "config": {"optimizer_map": {
        "class_name": "OptimizerMap", "config": {"optimizer_map": {}}}}},
        "needs a default_optimizer"),
    "unknown map key": ({"class_name": "MultiOptimizer", "config": {"optimizer_map": {
        "class_name": "OptimizerMap", "config": {"default": {}}}}}, "unknown key 'default'"),
    "nested MultiOptimizer": ({"class_name": "MultiOptimizer", "config": {
        "optimizer_map": serialized_map({}, default=("MultiOptimizer", MULTI.config))}},
        "cannot be inside a MultiOptimizer"),
    "nested exclusion": ({"class_name": "MultiOptimizer", "config": {"optimizer_map": {
        "class_name": "OptimizerMap", "config": {"default_optimizer": {
            **EXCLUDE_JSON}}}}}, "is not taken inside a MultiOptimizer"),
    "unknown inner class": ({"class_name": "MultiOptimizer", "config": {
        "optimizer_map": serialized_map({".*": ("Nope", {})})}}, "unknown optimizer class"),
    "a pattern that misses every weight": ({"class_name": "MultiOptimizer", "config": {
        "optimizer_map": serialized_map({"dense/.*": ("Adam", {})})}},
        "fullmatches no variable of this run"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_configuration_is_one_line_exit_2_and_nothing_written(case, tmp_path, capsys):
    config, message = BAD[case]
    out = tmp_path / "out"
    code = cli.main(["--backend", selection.installed_backends()[0], "--family", "keras",
                     "--steps", "3", "--size", "8", "--config", json.dumps(config),
                     "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert not out.exists()


# --- real Keras ------------------------------------------------------------------------------
def _ignoring_exclusion(rule):
    def step(ar, hp, s, g, t, paths):
        return rule.step(ar, {**hp, EXCLUDE: None}, s, g, t, paths)
    return step


def _embedding_to_default(hp):
    """The built-in map with the embedding sent to SGD instead of Adam."""
    mapping = hp["optimizer_map"]["config"]
    (pattern, adam), = mapping["optimizer_map"].items()
    moved = {"class_name": "OptimizerMap", "config": {
        **mapping, "optimizer_map": {pattern.replace("|embedding", ""): adam}}}
    return {**hp, "optimizer_map": moved}


KERAS_MULTI = reference.get_rule("keras", "MultiOptimizer")
PERTURBED = {  # family: (rule, configuration whose math it changes)
    "exclusion-ignored": (replace(reference.get_rule("keras", "AdamW"),
                                  family="exclusion-ignored",
                                  step=_ignoring_exclusion(reference.get_rule("keras", "AdamW"))),
                          "adamw_exclude"),
    "embedding-to-sgd": (replace(
        KERAS_MULTI, family="embedding-to-sgd",
        step=lambda ar, hp, *a: KERAS_MULTI.step(ar, _embedding_to_default(hp), *a),
        states=lambda hp: KERAS_MULTI.states(_embedding_to_default(hp))), "multi_optimizer"),
    "inner-loss-scale-kept": (replace(
        KERAS_MULTI, family="inner-loss-scale-kept",
        step=lambda ar, hp, *a: KERAS_MULTI.step(ar, {**hp, "loss_scale_factor": None}, *a)),
        "multi_optimizer"),
}


@pytest.fixture(scope="module", params=DESIGNS)
def verified(backends, tmp_path_factory, request):
    for family, (rule, _) in PERTURBED.items():
        REGISTRY[(family, rule.class_name)] = rule
    try:
        sel = designed(make_selection(backends, ["article", "textbook", "keras", *PERTURBED],
                                      configurations=["adamw_exclude", "multi_optimizer"],
                                      steps=30, size=64), request.param)
        frame = run_selection(sel, tmp_path_factory.mktemp(f"exclude-multi-{request.param}"))
        frame.attrs["runs"] = len(sel.runs())
        return frame
    finally:
        for family, (rule, _) in PERTURBED.items():
            del REGISTRY[(family, rule.class_name)]


def test_keras_family_is_exact_or_match_on_every_backend(verified, backends):
    keras = verified[verified.family == "keras"]
    assert set(keras.backend) == set(backends)
    assert len(keras) == verified.attrs["runs"] * len(scenarios.SCENARIOS)
    assert keras.verdict.isin(["exact", "match"]).all(), keras[~keras.verdict.isin(
        ["exact", "match"])][["optimizer", "backend", "dtype", "mode", "scenario", "verdict",
                              "divergent_state", "reason"]].to_string()
    assert (keras.max_scaled_error <= 16).all()
    others = verified[verified.family.isin(["article", "textbook"])]
    assert (others.verdict == "n/a").all()


def test_the_round_trip_loses_the_exclusion_and_keeps_the_multi_optimizer(verified):
    keras = verified[verified.family == "keras"]
    lost = keras[keras.optimizer == "adamw_exclude"].serialization
    assert lost.str.startswith("keras.optimizers.serialize does not keep "
                               "exclude_from_weight_decay").all()
    assert lost.str.contains("decays gaussian_vector and 6 more variables").all()
    assert keras[keras.optimizer == "multi_optimizer"].serialization.fillna("").eq("").all()


@pytest.mark.parametrize("family", list(PERTURBED))
def test_a_perturbed_reference_is_a_mismatch_on_every_backend_and_mode(verified, family):
    """In every run of the optimizer (on the product: every backend, dtype and mode)."""
    optimizer = PERTURBED[family][1]
    got = verified[(verified.family == family) & (verified.optimizer == optimizer)]
    runs = verified[(verified.family == "keras") & (verified.optimizer == optimizer)]
    keys = ["backend", "dtype", "mode"]
    assert len(got) and set(map(tuple, got[keys].values)) == set(map(tuple, runs[keys].values))
    for key, cell in got.groupby(keys):
        assert (cell.verdict == "mismatch").any(), (key, cell.verdict.tolist())


OVERLAPPING = {"class_name": "MultiOptimizer", "config": {
    "optimizer_map": serialized_map({".*matrix": ("Adam", {}), "gaussian_.*": ("Adam", {})})}}


def test_a_weight_two_patterns_match_is_an_error_cell_with_keras_message():
    result = api.run(OVERLAPPING, backends=[fast_backend()], families=["keras"],
                     dtypes=["float32"], modes=["eager"], scenarios=["gaussian"], steps=3,
                     size=16)
    assert (result.rows.verdict == "error").all()
    assert result.rows.reason.str.startswith(
        "Keras raises ValueError: Multiple optimizers assigned to variable").all()


WITHOUT_MULTI = check_edits.Edit("no-multi-optimizer", ((
    "optimizers/__init__.py",
    "from keras.src.optimizers.multi_optimizer import (\n"
    "    MultiOptimizer as MultiOptimizer,\n)\n", ""),))


def test_a_keras_without_multi_optimizer_is_unsupported(tmp_path):
    from verify.commands.matrix import cell_text

    site = check_edits.edited_keras(WITHOUT_MULTI, tmp_path)
    sel = make_selection([fast_backend()], ["keras"], configurations=["multi_optimizer"],
                         dtypes=["float32"], modes=["eager"], names=["gaussian"], steps=3,
                         size=16, python_path=[str(site)])
    rows = run_selection(sel, tmp_path / "out")
    assert rows.reason.str.startswith(
        f"{UNSUPPORTED}: keras.optimizers has no class MultiOptimizer").all()
    assert {cell_text(dict(r)) for _, r in rows.iterrows()} == {"unsupported"}
