"""--config and --config-file: a user's own configuration, as
keras.optimizers.serialize returns it, verified with one flag; bad input is one
line, exit 2, nothing written, before any run."""

import contextlib
import io
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from verify import cli, configurations, selection
from verify.configurations import ConfigError, derived_id, from_keras, parse_json

from conftest import fast_backend

# keras.optimizers.serialize(keras.optimizers.Adam(learning_rate=3e-4, beta_2=0.98,
# clipnorm=1.0, weight_decay=0.05)) with Keras 3.15.1, as JSON
SERIALIZED_ADAM = {
    "module": "keras.optimizers", "class_name": "Adam", "registered_name": None,
    "config": {"name": "adam", "learning_rate": 0.0003000000142492354, "weight_decay": 0.05,
               "clipnorm": 1.0, "global_clipnorm": None, "clipvalue": None, "use_ema": False,
               "ema_momentum": 0.99, "ema_overwrite_frequency": None,
               "loss_scale_factor": None, "gradient_accumulation_steps": None,
               "beta_1": 0.9, "beta_2": 0.98, "epsilon": 1e-07, "amsgrad": False}}
# the same with a schedule, as Keras 3.15.1 serializes ExponentialDecay(0.01, 10, 0.9)
SCHEDULE = {"module": "keras.optimizers.schedules", "class_name": "ExponentialDecay",
            "config": {"initial_learning_rate": 0.01, "decay_steps": 10, "decay_rate": 0.9,
                       "staircase": False, "name": "ExponentialDecay"},
            "registered_name": None}
SCHEDULED_ADAM = {**SERIALIZED_ADAM, "id": "adam_scheduled",
                  "config": {**SERIALIZED_ADAM["config"], "learning_rate": SCHEDULE}}
SMALL = ["--family", "keras", "--dtype", "float32", "--mode", "eager", "--scenario",
         "gaussian", "--steps", "4", "--size", "8", "--quiet"]


def invoke(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


# --- parsing ----------------------------------------------------------------
def test_serialized_config_is_taken_whole_and_its_id_is_stable():
    c = from_keras(SERIALIZED_ADAM)
    assert c.class_name == "Adam" and c.config == SERIALIZED_ADAM["config"]
    shuffled = {**SERIALIZED_ADAM, "config": dict(reversed(SERIALIZED_ADAM["config"].items()))}
    assert from_keras(shuffled).id == c.id == derived_id("Adam", c.config)
    assert c.id.startswith("adam_") and len(c.id) == len("adam_") + 8
    # any change of the config changes the id
    assert from_keras({**SERIALIZED_ADAM, "config": {**c.config, "beta_2": 0.99}}).id != c.id
    assert from_keras({**SERIALIZED_ADAM, "id": "ours"}).id == "ours"
    # a backend's subclass, as serialize gives it for an optimizer built under torch
    torch_adam = {**SERIALIZED_ADAM, "registered_name": "Adam",
                  "module": "keras.src.backend.torch.optimizers.torch_adam"}
    assert from_keras(torch_adam) == c


def test_a_keras_2_config_key_at_its_neutral_value_is_dropped():
    legacy = {**SERIALIZED_ADAM, "config": {**SERIALIZED_ADAM["config"],
                                           "is_legacy_optimizer": False}}
    assert from_keras(legacy).config == SERIALIZED_ADAM["config"]
    with pytest.raises(ConfigError, match="is_legacy_optimizer=true is not a Keras 3"):
        from_keras({**legacy, "config": {**legacy["config"], "is_legacy_optimizer": True}})


def test_a_schedule_is_kept_as_serialized():
    c = parse_json(json.dumps(SCHEDULED_ADAM), "--config")[0]
    assert c.config["learning_rate"] == SCHEDULE and c.id == "adam_scheduled"
    with pytest.raises(ConfigError, match="serialized object needs"):
        from_keras({**SCHEDULED_ADAM, "config": {"learning_rate": {"class_name": 3}}})
    with pytest.raises(ConfigError, match="beta_1=.* is an object"):
        from_keras({**SCHEDULED_ADAM, "config": {"beta_1": SCHEDULE}})


def test_toml_file_in_the_configurations_format(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[mine]\nclass_name = "SGD"\nconfig = { learning_rate = 0.1, '
                    'momentum = 0.5 }\n\n[sched]\nclass_name = "Adam"\nconfig = { '
                    'learning_rate = { class_name = "ExponentialDecay", config = { '
                    'initial_learning_rate = 0.01, decay_steps = 10, decay_rate = 0.9 } } }\n')
    mine, sched = configurations.parse_toml(str(path))
    assert (mine.id, mine.class_name, mine.config) == ("mine", "SGD", {"learning_rate": 0.1,
                                                                        "momentum": 0.5})
    assert sched.config["learning_rate"]["class_name"] == "ExponentialDecay"


BAD = [
    (["--config", "{not json"], "invalid JSON"),
    (["--config", '{"class_name": "Adam", "config": {"learning_rate": NaN}}'], "NaN is not JSON"),
    (["--config", '{"class_name": "Adam", "class_name": "SGD"}'], "key 'class_name' given twice"),
    (["--config", '{"class_name": "MyAdam", "config": {}}'], "unknown optimizer class 'MyAdam'"),
    (["--config", '{"class_name": "Adam", "config": {"beta_3": 0.9}}'],
     "unknown argument 'beta_3'"),
    (["--config", '{"class_name": "Adam", "config": {"beta_1": "0.9"}}'],
     "beta_1=\"0.9\" is a string, expected a number"),
    (["--config", '{"class_name": "Adam", "config": {"amsgrad": 1}}'],
     "amsgrad=1 is a number, expected a boolean"),
    (["--config", '{"class_name": "Adam", "config": {"clipnorm": "1"}}'],
     "clipnorm=\"1\" is a string, expected a number or a list or null"),
    (["--config", '{"class_name": "Adam", "config": {}, "registered_name": "Custom>A"}'],
     "not a built-in Keras optimizer"),
    (["--config", '{"class_name": "Adam", "config": {}, "module": "mylib"}'],
     "not a built-in Keras optimizer"),
    (["--config", '{"class_name": "Adam", "config": {}, "extra": 1}'], "unknown key 'extra'"),
    (["--config", '[{"class_name": "Adam", "id": "a"}, {"class_name": "SGD", "id": "a"}]'],
     "configuration id 'a' given twice"),
    (["--config", '{"class_name": "SGD"}', "--config", '{"class_name": "SGD"}'],
     "given twice"),
    (["--config", '{"class_name": "Adam", "id": "adam"}'],
     "id 'adam' is a built-in configuration's"),
    (["--config", '{"class_name": "Adam", "id": "../x"}'], "must be 1 to 64 letters"),
    (["--config", "[]"], "an empty list"),
    (["--config", "[1]"], "expected an object with class_name and config, got a number"),
    (["--config", "no-such-file.json"], "no such file"),
    (["--config-file", "no-such-file.toml"], "no such file"),
]


COMMANDS = {"main": ["--output", "out"],
            "check": ["check", "--update-baseline", "--output", "out", "--baseline", "base"],
            "matrix": ["matrix", "--keras", "3.15.1", "--output", "out", "--work", "work"]}


@pytest.mark.parametrize("args,message", BAD, ids=[m for _, m in BAD])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_config_is_one_line_exit_2_nothing_written(tmp_path, monkeypatch, command, args,
                                                       message):
    monkeypatch.chdir(tmp_path)
    code, out, err = invoke(COMMANDS[command] + args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_bad_toml_is_exit_2(tmp_path):
    for text, message in (('[a]\nclass_name = "SGD"\nconfig = { learning_rate = nan }\n',
                           "nan is not a finite number"),
                          ("[a\n", "invalid TOML"),
                          ('[a]\nid = "b"\nclass_name = "SGD"\n', "the table name is the id"),
                          ('[a]\nclass_name = "SGD"\nconfig = { momentum = 1979-05-27 }\n',
                           "momentum: 1979-05-27 is date, not JSON data")):
        path = tmp_path / "c.toml"
        path.write_text(text)
        code, _, err = invoke(["--config-file", str(path), "--output", str(tmp_path / "o")])
        assert code == 2 and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "o").exists()


def test_plain_check_refuses_config(tmp_path):
    code, _, err = invoke(["check", "--config", json.dumps(SERIALIZED_ADAM), "--baseline",
                           str(tmp_path / "b"), "--output", str(tmp_path / "o")])
    assert code == 2 and "--config and --config-file are for --update-baseline" in err


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
KEYS = sorted(SERIALIZED_ADAM["config"]) + ["class_name", "id", "config", "module", "x"]


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(
    JSON,
    st.tuples(st.sampled_from(KEYS), JSON).map(
        lambda kv: {**SERIALIZED_ADAM, "config": {**SERIALIZED_ADAM["config"], kv[0]: kv[1]}}),
    st.tuples(st.sampled_from(KEYS), JSON).map(lambda kv: {**SERIALIZED_ADAM, kv[0]: kv[1]})))
def test_any_json_is_a_configuration_or_one_line_exit_2(tmp_path, doc):
    """Whatever the JSON, the selection is built or refused with one line; nothing
    is written (the run itself is not started)."""
    args = cli.build_parser().parse_args(["--config", json.dumps(doc), "--backend",
                                          fast_backend(), "--steps", "2", "--size", "2",
                                          "--output", str(tmp_path / "o")])
    try:
        sel, _, _ = cli.selection_from_args(args)
    except selection.UsageError as exc:
        assert "\n" not in cli.one_line(exc) and str(exc)
    else:
        user = sel.configurations[-1]
        assert user.class_name == doc["class_name"] and user.id not in configurations.CONFIGURATIONS
    assert not (tmp_path / "o").exists()


# --- runs ---------------------------------------------------------------------
def summary(folder):
    return json.loads((Path(folder) / "summary.json").read_text())


def test_config_alone_verifies_just_it_and_joins_optimizer(tmp_path):
    backend = fast_backend()
    (tmp_path / "adam.json").write_text(json.dumps(SERIALIZED_ADAM))
    (tmp_path / "mine.toml").write_text('[mine]\nclass_name = "SGD"\n'
                                        'config = { learning_rate = 0.1, momentum = 0.5 }\n')
    code, _, err = invoke(["--backend", backend, "--config", str(tmp_path / "adam.json"),
                           "--config-file", str(tmp_path / "mine.toml"),
                           "--output", str(tmp_path / "alone")] + SMALL)
    assert code == 0, err
    doc = summary(tmp_path / "alone")
    adam = from_keras(SERIALIZED_ADAM).id
    assert doc["settings"]["optimizers"] == [adam, "mine"]
    assert doc["settings"]["configurations"][adam]["config"] == SERIALIZED_ADAM["config"]
    assert {(r["optimizer"], r["verdict"]) for r in doc["rows"]} <= {
        (adam, "exact"), (adam, "match"), ("mine", "exact"), ("mine", "match")}
    code, _, err = invoke(["--backend", backend, "--optimizer", "sgd", "--config",
                           json.dumps(SERIALIZED_ADAM), "--output",
                           str(tmp_path / "joined")] + SMALL)
    assert code == 0, err
    assert summary(tmp_path / "joined")["settings"]["optimizers"] == ["sgd", adam]


def test_baseline_of_a_user_config_is_checked_again(tmp_path):
    """check --update-baseline --config records it; a plain check re-runs it from the
    baseline alone and finds no change."""
    backend = fast_backend()
    base, out = str(tmp_path / "base"), str(tmp_path / "out")
    code, _, err = invoke(["check", "--update-baseline", "--backend", backend, "--config",
                           json.dumps({**SERIALIZED_ADAM, "id": "ours"}), "--baseline", base,
                           "--output", out] + SMALL)
    assert code == 0, err
    recorded = json.loads((tmp_path / "base" / "baseline.json").read_text())["settings"]
    assert recorded["optimizers"] == ["ours"]
    code, text, err = invoke(["check", "--baseline", base, "--output", out, "--quiet"])
    assert code == 0 and "no change" in text, err


def test_a_schedule_reaches_the_worker_as_serialized(tmp_path):
    """The schedule in a config is handed to the worker whole, and Keras's steps under it
    are the reference's."""
    from verify import api
    result = api.run(SCHEDULED_ADAM, backends=[fast_backend()], families=["keras"],
                     dtypes=["float32"], modes=["eager"], scenarios=["gaussian"], steps=4,
                     size=8)
    assert result.settings["configurations"]["adam_scheduled"]["config"]["learning_rate"] == \
        SCHEDULE
    rows = result.rows
    assert len(rows) and set(rows.verdict) <= {"exact", "match"}, rows.reason.tolist()


def test_matrix_hands_a_user_config_to_its_per_release_runs(tmp_path):
    """matrix runs each release in a child process from a JSON request: a user's
    configuration must reach it whole, alone or beside built-in ones, and one at a
    time; and a request that loses it is told apart."""
    from verify import api
    from verify.commands import matrix
    parser = cli.build_parser()
    for extra in ([], ["--optimizer", "sgd"]):
        args = parser.parse_args(extra + ["--config", json.dumps(SCHEDULED_ADAM), "--backend",
                                          fast_backend(), "--steps", "2", "--size", "2",
                                          "--output", str(tmp_path / "o")])
        sel, _, _ = cli.selection_from_args(args)
        for only in (None, ["adam_scheduled"]):
            request = json.loads(json.dumps(matrix.selection_request(sel, only)))
            again = api.selection(**request)
            assert again.configurations == [c for c in sel.configurations
                                            if only is None or c.id in only]
            for key in ("steps", "size", "seed", "backends", "dtypes", "families",
                        "scenarios", "modes"):
                assert getattr(again, key) == getattr(sel, key), key
            changed = json.loads(json.dumps(request))
            changed["optimizers"][-1]["config"]["learning_rate"]["config"]["decay_rate"] = 0.5
            assert api.selection(**changed).configurations != again.configurations


@pytest.mark.parametrize("inner,problem", [
    ({"class_name": "Adam", "config": {"bogus": 0.01}}, "unknown argument 'bogus'"),
    ({"class_name": "LossScaleOptimizer", "config": {"inner_optimizer": {
        "class_name": "Adam", "config": {}}}}, "cannot be the inner optimizer"),
    (None, "needs inner_optimizer"),
], ids=["unknown-inner-key", "wrapper-in-wrapper", "no-inner"])
def test_a_loss_scale_optimizers_inner_optimizer_is_checked(inner, problem):
    config = {"initial_scale": 1024.0} if inner is None else {"inner_optimizer": inner}
    with pytest.raises(configurations.ConfigError, match=problem):
        configurations.parse_json(json.dumps({"class_name": "LossScaleOptimizer",
                                              "config": config}), "--config")


def test_a_loss_scale_optimizer_of_your_own_is_taken():
    [c] = configurations.parse_json(json.dumps({"class_name": "LossScaleOptimizer", "config": {
        "inner_optimizer": {"class_name": "Adam", "config": {"learning_rate": 0.01}}}}),
        "--config")
    assert c.class_name == "LossScaleOptimizer" and c.config["inner_optimizer"]["class_name"] == "Adam"
