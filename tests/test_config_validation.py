"""Configuration validation before anything runs (issue 30, items 2, 5 and 6): the
harness's own imports, learning-rate schedules inside --config, and numbers a dtype
rounds to infinity.  Bad input is exit 2 with one line and nothing written; what
passes is taken."""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import fast_backend, needs

import reference
from verify import api, cli, configurations, processes, selection
from verify.configurations import CONFIGURATIONS, ConfigError, check_magnitudes, from_keras

ROOT = Path(__file__).resolve().parent.parent
PROPERTY = settings(max_examples=40, deadline=None, derandomize=True, database=None)


def invoke(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def refused_before_running(argv, tmp_path) -> str:
    """Exit 2, one line on stderr, and no report folder: the line."""
    output = tmp_path / "report"
    code, out, err = invoke([*argv, "--output", str(output), "--quiet"])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    assert not output.exists() and not out
    return lines[0]


def toml(value) -> str:
    """A TOML inline value."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    return json.dumps(value)


def sgd(learning_rate, **config):
    return {"class_name": "SGD", "config": {"learning_rate": learning_rate, **config}}


# --- 2. the harness's own imports -----------------------------------------------
def run_python(args, *, cwd, pythonpath, **kwargs):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in pythonpath))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300, **kwargs)


def console_script():
    script = Path(sys.executable).parent / "verify-optimizers"
    assert script.exists(), "pip install -e . installs the console script"
    return str(script)


@pytest.mark.parametrize("shadow", ["module", "package", "namespace"])
def test_a_users_reference_module_first_on_pythonpath_is_exit_2_in_one_line(tmp_path, shadow):
    user = tmp_path / "user"
    if shadow == "module":
        user.mkdir()
        (user / "reference.py").write_text("X = 1\n")
    else:
        (user / "reference").mkdir(parents=True)
        if shadow == "package":
            (user / "reference" / "__init__.py").write_text("X = 1\n")
    for command in ([console_script(), "list"], [sys.executable, "-m", "verify.cli", "list"]):
        env = dict(os.environ, PYTHONPATH=str(user))  # the harness as installed
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=300)
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(lines) == 1, (command, done.returncode, done.stderr)
        assert "'reference'" in lines[0] and str(user / "reference") in lines[0]
        assert "rename it" in lines[0] and "PYTHONPATH" in lines[0]


def test_a_users_unrelated_module_on_pythonpath_is_no_obstacle(tmp_path):
    (tmp_path / "references.py").write_text("X = 1\n")
    done = run_python(["-m", "verify.cli", "list"], cwd=tmp_path, pythonpath=[tmp_path, ROOT])
    assert done.returncode == 0 and "families:" in done.stdout, done.stderr
    done = subprocess.run([console_script(), "list"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert done.returncode == 0, done.stderr


def test_the_api_raises_import_error_naming_the_users_module(tmp_path):
    (tmp_path / "reference.py").write_text("X = 1\n")
    done = run_python(["-c", "from verify import api"], cwd=tmp_path, pythonpath=[ROOT])
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: the harness's package 'reference'"), done.stderr
    assert str(tmp_path / "reference.py") in last


def test_a_worker_imports_the_harnesss_reference_despite_pythonpath(tmp_path, monkeypatch):
    """Workers start as `python -m` in the harness's folder with it first on
    PYTHONPATH: a user's `reference` there is not the one they import."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "reference.py").write_text("X = 1\n")
    (user / "probe_origin.py").write_text("import reference\nprint(reference.__file__)\n")
    monkeypatch.setenv("PYTHONPATH", str(user))
    env = processes.pinned_environment(fast_backend(), tmp_path / "home")
    proc, log = processes.start("probe_origin", tmp_path / "job.json", tmp_path / "log", env,
                              sys.executable)
    out, _ = proc.communicate(timeout=120)
    log.close()
    assert proc.returncode == 0, (tmp_path / "log").read_text()
    assert Path(out.decode().strip()) == ROOT / "reference" / "__init__.py"


def test_a_worker_that_cannot_import_is_exit_2_in_one_line(tmp_path):
    """A user's keras.py on PYTHONPATH breaks the workers' `import keras`: the run
    could not verify (2), never a change in Keras's math (1)."""
    user = tmp_path / "user"
    user.mkdir()
    (user / "keras.py").write_text("raise ImportError('not the real keras')\n")
    done = run_python(["-m", "verify.cli", "--backend", fast_backend(), "--family", "keras",
                       "--optimizer", "sgd", "--dtype", "float32", "--mode", "eager",
                       "--scenario", "constant", "--steps", "2", "--size", "4", "--quiet",
                       "--output", str(tmp_path / "out")],
                      cwd=tmp_path, pythonpath=[ROOT, user])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert "not the real keras" in lines[0]


# --- 5. learning-rate schedules inside --config ----------------------------------
EXPONENTIAL = {"initial_learning_rate": 0.1, "decay_steps": 5, "decay_rate": 0.5}
BAD_SCHEDULES = {
    "unknown class": {"class_name": "FooDecay", "config": {"initial_learning_rate": 0.1}},
    "the abstract base": {"class_name": "LearningRateSchedule", "config": {}},
    "an argument it does not take": {"class_name": "ExponentialDecay",
                                     "config": {**EXPONENTIAL, "bogus": 1}},
    "a missing argument": {"class_name": "ExponentialDecay",
                           "config": {"initial_learning_rate": 0.1, "decay_steps": 5}},
    "decay_steps 0": {"class_name": "ExponentialDecay",
                      "config": {**EXPONENTIAL, "decay_steps": 0}},
    "first_decay_steps negative": {"class_name": "CosineDecayRestarts",
                                   "config": {"initial_learning_rate": 0.1,
                                              "first_decay_steps": -3}},
    "boundaries and values": {"class_name": "PiecewiseConstantDecay",
                              "config": {"boundaries": [1, 2], "values": [0.1, 0.2]}},
}
WRONG_KINDS = {
    "a string rate": {"class_name": "ExponentialDecay",
                      "config": {**EXPONENTIAL, "initial_learning_rate": "0.1"}},
    "a number staircase": {"class_name": "InverseTimeDecay",
                           "config": {**EXPONENTIAL, "staircase": 1}},
    "a boolean in values": {"class_name": "PiecewiseConstantDecay",
                            "config": {"boundaries": [1], "values": [0.1, True]}},
    "a foreign module": {"class_name": "ExponentialDecay", "config": EXPONENTIAL,
                         "module": "mylib.schedules", "registered_name": "Mine"},
}


@pytest.mark.parametrize("case", [*BAD_SCHEDULES, *WRONG_KINDS])
@pytest.mark.parametrize("flag", ["--config", "--config-file", "callable"])
def test_a_bad_schedule_is_exit_2_before_anything_runs(tmp_path, case, flag):
    schedule = {**BAD_SCHEDULES, **WRONG_KINDS}[case]
    if flag == "--config-file":
        (tmp_path / "mine.toml").write_text(
            f'[mine]\nclass_name = "SGD"\nconfig = {{ learning_rate = {toml(schedule)} }}\n')
        argv = ["--config-file", str(tmp_path / "mine.toml")]
    else:
        lr = {"callable": schedule} if flag == "callable" else schedule
        argv = ["--config", json.dumps(sgd(lr))]
    line = refused_before_running(["--backend", fast_backend(), *argv], tmp_path)
    assert schedule["class_name"] in line or "module" in line, line


def test_a_bad_schedule_is_refused_by_the_api_too():
    for schedule in {**BAD_SCHEDULES, **WRONG_KINDS}.values():
        with pytest.raises(ConfigError):
            api.selection([sgd(schedule)], backends=fast_backend())
        with pytest.raises(ConfigError):
            api.selection([configurations.Configuration("mine", "SGD", {"learning_rate":
                                                                        schedule})],
                          backends=fast_backend())


def test_every_built_in_schedule_passes_as_a_users_configuration():
    """Specificity: the shipped schedules, given as --config, are taken unchanged."""
    shipped = [c for c in CONFIGURATIONS.values()
               if isinstance(c.config.get("learning_rate"), dict)]
    assert len(shipped) >= 6
    for c in shipped:
        mine = from_keras({**c.keras_config(), "id": f"mine_{c.id}"})
        assert mine.config == c.config
        api.selection([mine], backends=fast_backend(), dtypes=["float32", "float64"])


KERAS_CONSTRUCTS = """
import json, sys, keras
out = []
for schedule in json.loads(sys.stdin.read()):
    try:
        optimizer = keras.optimizers.SGD(
            learning_rate=keras.optimizers.schedules.deserialize(schedule))
        float(optimizer.learning_rate)  # the schedule at step 0
        out.append(None)
    except Exception as exc:
        out.append(type(exc).__name__)
print(json.dumps(out))
"""


def test_keras_refuses_what_is_refused_and_builds_the_shipped_ones():
    """The checks stand for Keras: each refused schedule (but a value of the wrong
    kind, which Keras would take and compute with) raises in Keras as the worker
    builds it (deserialized, given to the optimizer, called), each shipped one is
    built."""
    backend = fast_backend()
    needs(backend)
    shipped = [c.config["learning_rate"] for c in CONFIGURATIONS.values()
               if isinstance(c.config.get("learning_rate"), dict)]
    bad = list(BAD_SCHEDULES.values())
    done = subprocess.run([sys.executable, "-c", KERAS_CONSTRUCTS], input=json.dumps(
        bad + shipped), env=dict(os.environ, KERAS_BACKEND=backend), capture_output=True,
        text=True, timeout=300, check=True)
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(answers[:len(bad)]), dict(zip(BAD_SCHEDULES, answers))
    assert not any(answers[len(bad):]), answers[len(bad):]


NAMES = sorted({k for d in reference.schedules.DEFAULTS.values() for k in d} | {"bogus"})
VALUES = st.one_of(st.none(), st.booleans(), st.integers(-3, 50),
                   st.floats(-1e3, 1e3, allow_nan=False), st.sampled_from(["x", "ExponentialDecay"]),
                   st.lists(st.one_of(st.integers(0, 40), st.floats(0, 1)), max_size=4))
SCHEDULES = st.fixed_dictionaries(
    {"class_name": st.sampled_from([*reference.schedules.DEFAULTS, "FooDecay", "",
                                    "LearningRateSchedule"]),
     "config": st.dictionaries(st.sampled_from(NAMES), VALUES, max_size=7)})


@PROPERTY
@given(schedule=SCHEDULES, wrap=st.sampled_from(["schedule", "callable"]))
def test_any_schedule_is_taken_and_computable_or_refused_in_one_line(schedule, wrap):
    lr = {"callable": schedule} if wrap == "callable" else schedule
    try:
        c = from_keras(sgd(lr))
    except ConfigError as exc:
        assert "\n" not in str(exc) and "SGD" in str(exc)
        return
    assert reference.schedules.unsupported(c.config["learning_rate"]) is None
    values = reference.schedules.values(schedule, 4)  # the formula takes it
    assert values.shape == (4,)


# --- 6. numbers a dtype rounds to infinity -----------------------------------
F32, F64 = float(np.finfo(np.float32).max), float(np.finfo(np.float64).max)
# the largest double that float32 still rounds to its finite maximum, and the next one
F32_EDGE = float(np.nextafter(np.float64(F32) + 2.0 ** 103, 0.0))
AROUND = [0.5 * F32, F32, F32_EDGE, float(np.nextafter(F32_EDGE, np.inf)), 2 * F32, 1e39,
          0.5 * F64, F64, 1e300]


def test_the_float32_edge_is_where_float32_rounds_to_infinity():
    with np.errstate(over="ignore"):
        assert np.isfinite(np.float32(F32_EDGE))
        assert np.isinf(np.float32(np.nextafter(F32_EDGE, np.inf)))


def expected_refusal(where, value, backend, dtype) -> bool:
    """The rule, stated apart from the code: every number must be finite in the
    weights' dtype; the learning rate in float32 as well (Keras's float32 variable),
    a schedule's numbers too unless JAX computes the schedule in float64; any other
    number in float32 on TensorFlow (tf.cast) and torch (float32 operands)."""
    with np.errstate(over="ignore"):
        f32 = bool(np.isinf(np.float32(value)))
    if dtype == "float32" and f32:
        return True
    if where == "learning_rate":
        return f32
    if where == "schedule":
        return f32 and backend != "jax"
    return f32 and backend in ("tensorflow", "torch")


def placed(where, value):
    if where == "learning_rate":
        return sgd(value)
    if where == "schedule":
        return sgd({"class_name": "ExponentialDecay",
                    "config": {**EXPONENTIAL, "initial_learning_rate": value}})
    return {"class_name": "Adam", "config": {"epsilon": value}}


@PROPERTY
@given(where=st.sampled_from(["learning_rate", "schedule", "epsilon"]),
       value=st.sampled_from(AROUND), sign=st.sampled_from([1, -1]),
       backend=st.sampled_from(selection.BACKENDS), dtype=st.sampled_from(["float32", "float64"]))
def test_a_number_is_refused_iff_a_dtype_it_passes_through_overflows(where, value, sign,
                                                                     backend, dtype):
    c = from_keras(placed(where, sign * value))
    try:
        check_magnitudes([c], [dtype], [backend])
        refused = False
    except ConfigError as exc:
        assert "\n" not in str(exc) and "overflows" in str(exc)
        refused = True
    assert refused == expected_refusal(where, sign * value, backend, dtype)


@pytest.mark.parametrize("argv", [
    ["--dtype", "float32", "--config", json.dumps(sgd(1e39))],
    ["--dtype", "float64", "--config", json.dumps(sgd(1e300))],
    ["--dtype", "float64", "--config", json.dumps(sgd(
        {"class_name": "ExponentialDecay", "config": {**EXPONENTIAL,
                                                       "initial_learning_rate": 1e300}}))],
    ["--dtype", "float64", "--config", json.dumps(sgd(0.1, clipnorm=10 ** 400))],
    ["--dtype", "float16", "--config", json.dumps(sgd(0.1, clipnorm=1e5))],
])
def test_an_overflowing_hyperparameter_is_exit_2_before_anything_runs(tmp_path, argv):
    line = refused_before_running(["--backend", fast_backend(), *argv], tmp_path)
    assert "overflows" in line and "largest finite" in line


def test_an_overflowing_hyperparameter_in_a_toml_file_is_exit_2(tmp_path):
    (tmp_path / "big.toml").write_text(
        '[big]\nclass_name = "Adam"\nconfig = { learning_rate = 1e39 }\n')
    line = refused_before_running(["--backend", fast_backend(), "--config-file",
                                   str(tmp_path / "big.toml")], tmp_path)
    assert "'big'" in line and "learning_rate" in line


def test_the_api_refuses_an_overflowing_hyperparameter():
    with pytest.raises(ConfigError, match="overflows float32"):
        api.selection([sgd(1e39)], backends=fast_backend(), dtypes="float64")


def test_every_built_in_configuration_is_within_every_dtype():
    """Specificity: no shipped configuration is refused, on any backend and dtype."""
    check_magnitudes(list(CONFIGURATIONS.values()), list(selection.DTYPES), list(selection.BACKENDS))
    check_magnitudes([from_keras(sgd(F32)), from_keras(placed("epsilon", 1e300))],
                     ["float64"], ["jax"])


# --- the rule on both sides: refused up front (2) vs Keras raising in a run (0) ----
def test_a_built_in_configuration_keras_raises_on_is_a_reported_cell_exit_0(tmp_path):
    """Muon on TensorFlow float64: Keras raises while running a configuration that
    passed the checks; the cell says so, stderr notes it, exit 0."""
    needs("tensorflow")
    code, out, err = invoke(["--backend", "tensorflow", "--dtype", "float64", "--family",
                             "keras", "--optimizer", "muon", "--mode", "eager", "--scenario",
                             "constant", "--steps", "2", "--size", "4", "--quiet",
                             "--output", str(tmp_path / "report")])
    rows = json.loads((tmp_path / "report" / "summary.json").read_text())["rows"]
    assert code == 0, err
    assert rows and all(r["verdict"] == "error" and r["reason"].startswith("Keras raises")
                        for r in rows)
    assert err.strip().startswith("verify-optimizers: note:") and len(err.strip().splitlines()) == 1
