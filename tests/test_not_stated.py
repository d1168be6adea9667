"""`n/a`: a family that does not state a configuration is not an error, is counted
apart, and is its own class in `check`; the keras family can never be `n/a`."""

import json

from reference.rule import REGISTRY
from verify import cli
from verify.commands import baseline, check
from verify.configurations import CONFIGURATIONS, Configuration

from conftest import fast_backend

TINY = ["--optimizer", "sgd", "--dtype", "float32", "--mode", "eager", "--scenario",
        "gaussian", "--steps", "3", "--size", "4", "--quiet", "--format", "json"]


def rows(out):
    return json.loads((out / "summary.json").read_text())["rows"]


def test_a_family_that_does_not_state_a_configuration_is_n_a(monkeypatch, tmp_path, capsys):
    monkeypatch.delitem(REGISTRY, ("article", "SGD"))
    code = cli.main(["--backend", fast_backend(), "--family", "article,keras", *TINY,
                     "--output", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 0
    by_family = {r["family"]: r for r in rows(tmp_path / "r")}
    assert by_family["article"]["verdict"] == "n/a"
    assert "SGD" in by_family["article"]["reason"]
    assert by_family["keras"]["verdict"] in ("exact", "match")
    assert "article n/a: 1" in out


def test_the_keras_family_is_never_n_a(monkeypatch, tmp_path, capsys):
    monkeypatch.delitem(REGISTRY, ("keras", "SGD"))
    code = cli.main(["--backend", fast_backend(), "--family", "article,keras", *TINY,
                     "--output", str(tmp_path / "r")])
    assert code == 2 and "could not run" in capsys.readouterr().err
    by_family = {r["family"]: r for r in rows(tmp_path / "r")}
    assert by_family["keras"]["verdict"] == "error"
    assert by_family["article"]["verdict"] in ("exact", "match")


def cell(verdict, reason=""):
    return {"family": "article", "optimizer": "sgd", "backend": "torch", "dtype": "float32",
            "mode": "eager", "scenario": "gaussian", "verdict": verdict,
            "first_divergent_step": "", "divergent_state": "",
            "magnitude": baseline.magnitude(verdict, None), "reason": reason}


def test_n_a_is_its_own_class_in_check_and_not_a_change_in_keras():
    assert baseline.magnitude("n/a", None) == "n/a"
    assert baseline.compare_cells([cell("n/a", "a")], [cell("n/a", "b")]) == []
    for before, after in (("n/a", "match"), ("match", "n/a")):
        changes = baseline.compare_cells([cell(before)], [cell(after)])
        assert [c.what for c in changes] == ["verdict"] and changes[0].fails
        assert check.unverified(changes[0])  # the harness changed, not Keras: exit 2
    changes = baseline.compare_cells([cell("match")], [cell("mismatch")])
    assert not check.unverified(changes[0])


def test_a_configuration_keras_refuses_is_reported_not_a_harness_failure(
        monkeypatch, tmp_path, capsys):
    # Keras's base optimizer raises ValueError when two clip arguments are given
    monkeypatch.setitem(CONFIGURATIONS, "two_clips", Configuration(
        "two_clips", "SGD", {"learning_rate": 0.01, "clipnorm": 1.0, "clipvalue": 0.5}))
    code = cli.main(["--backend", fast_backend(), "--family", "keras", *TINY,
                     "--optimizer", "two_clips", "--output", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 0 and "note: 1 keras-family comparison(s) could not run" in err, err
    by_optimizer = {r["optimizer"]: r for r in rows(tmp_path / "r")}
    assert by_optimizer["two_clips"]["verdict"] == "error"
    assert by_optimizer["two_clips"]["reason"].startswith("Keras raises ValueError")
    assert by_optimizer["sgd"]["verdict"] in ("exact", "match")
