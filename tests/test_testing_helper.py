"""verify.testing.assert_matches_keras_reference in a user's suite: it passes for
a configuration Keras computes as the reference states, and fails naming the
first divergent step, state, weight and values where they differ (a real
formula change, caught by the comparison), or why a cell could not run."""

import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import pytest

import perturbations
from reference.rule import REGISTRY
from verify.configurations import ConfigError
from verify.testing import assert_matches_keras_reference

from conftest import ROOT, fast_backend
from test_config_flag import SERIALIZED_ADAM

SMALL = dict(modes=["eager"], scenarios=["gaussian", "tiny"], steps=12, size=16)


def test_passes_for_a_configuration_keras_computes_as_stated(tmp_path):
    result = assert_matches_keras_reference(SERIALIZED_ADAM, backends=[fast_backend()],
                                            **SMALL)
    assert set(result.rows.family) == {"keras"} and len(result.rows) == 4
    assert set(result.tables) == {tuple(r) for r in result.rows[
        ["family", "optimizer", "backend", "dtype", "mode", "scenario"]].values}
    # the report writer and the harness's safe write
    result.write(tmp_path / "report")
    assert (tmp_path / "report" / "summary.md").exists()
    assert len(list((tmp_path / "report" / "steps").rglob("*.csv.gz"))) == 4
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(ValueError, match="did not write"):
        result.write(tmp_path / "mine")


def test_fails_at_the_first_divergent_step_when_the_formula_differs(monkeypatch):
    """The reference's Adam with epsilon inside the square root (tests/perturbations.py)
    stands in for the keras family: Keras is unchanged, so every cell must fail at
    step 1 in the weights, and the message must say where and by how much."""
    assert "eps-inside-sqrt" in perturbations.FAMILIES
    monkeypatch.setitem(REGISTRY, ("keras", "Adam"),
                        replace(REGISTRY[("eps-inside-sqrt", "Adam")], family="keras"))
    with pytest.raises(AssertionError) as failure:
        assert_matches_keras_reference(SERIALIZED_ADAM, backends=[fast_backend()], **SMALL)
    message = str(failure.value)
    assert message.startswith("4 of 4 keras-family comparisons are not exact or match:")
    lines = message.splitlines()[1:]
    assert len(lines) == 4
    for line in lines:
        assert re.fullmatch(
            r"adam_[0-9a-f]{8} \w+ float(32|64) eager (gaussian|tiny): mismatch at step 1 in "
            r"variable of weight \w+: Keras \S+, reference \S+ \(rounding bound \S+\); "
            r"largest scaled error \S+ > 16", line), line


def test_a_cell_that_cannot_run_fails_with_its_reason():
    """Keras refuses clipnorm together with global_clipnorm: every cell fails with that."""
    both = {"class_name": "SGD", "config": {"clipnorm": 1.0, "global_clipnorm": 1.0}}
    with pytest.raises(AssertionError, match=r"(?s)could not be verified: Keras raises "
                                             r"ValueError: .*clipnorm"):
        assert_matches_keras_reference(both, backends=[fast_backend()], dtypes=["float32"],
                                       **SMALL)


def test_a_class_the_reference_does_not_have_is_a_clear_error_before_any_run():
    with pytest.raises(ConfigError, match=r"unknown optimizer class 'MyAdam': the reference "
                                          r"models Adadelta, .*SGD"):
        assert_matches_keras_reference({"class_name": "MyAdam", "config": {}})


def test_a_keras_optimizer_object_in_the_users_process(tmp_path):
    """As a user's test file calls it, with keras imported there."""
    backend = fast_backend()
    test = tmp_path / "test_users_optimizer.py"
    test.write_text(
        "import keras\n"
        "from verify.testing import assert_matches_keras_reference\n\n"
        "def test_adam():\n"
        "    assert_matches_keras_reference(\n"
        "        keras.optimizers.Adam(learning_rate=3e-4, beta_2=0.98, clipnorm=1.0),\n"
        f"        backends=[{backend!r}], modes=['eager'], scenarios=['gaussian'], "
        "steps=8, size=8)\n")
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           str(test)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "1 passed" in done.stdout
    assert {p.name for p in tmp_path.iterdir()} <= {test.name, "__pycache__"}  # nothing written


EXCLUSION_PROBE = r"""
import json, keras
from verify import api
from verify.configurations import ConfigError
named = keras.optimizers.AdamW(weight_decay=0.1)
named.exclude_from_weight_decay(var_names=["vector", "kernel"])
listed = keras.optimizers.AdamW(weight_decay=0.1)
listed.exclude_from_weight_decay(var_list=[keras.Variable(1.0)])
try:
    api.configurations(listed)
    refused = None
except ConfigError as exc:
    refused = str(exc)
print(json.dumps({"named": api.configurations(named)[0].config, "refused": refused}))
"""


def test_an_optimizer_objects_exclusion_from_weight_decay_is_kept():
    """Serialization drops it; the API reads it from the object (var_names), and
    refuses a var_list, whose variables the harness does not have."""
    env = {**os.environ, "KERAS_BACKEND": fast_backend(), "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", EXCLUSION_PROBE], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.splitlines()[-1])
    (pattern,) = got["named"]["exclude_from_weight_decay"]["var_names"]
    assert set(pattern.split("|")) == {"vector", "kernel"}
    assert "var_list" in got["refused"] and "var_names" in got["refused"]
