"""`verify-optimizers matrix`: the report (a changed cell is found and marked,
identical releases show none, an unsupported release is a column) and the whole
command with the installed Keras as one release and an uninstallable one."""

import importlib.metadata
import json
import sys
from pathlib import Path

import pandas as pd
import pytest

from verify import cli
from verify.commands import baseline, matrix
from verify.runner import distinct
from verify.selection import installed_backends

SETTINGS = {"families": ["keras"], "optimizers": ["adam"], "backends": ["torch"],
            "dtypes": ["float32"], "modes": ["eager"], "scenarios": ["gaussian", "tiny"],
            "steps": 10, "size": 8}


def cell(verdict="match", step="", state="", magnitude=None, scenario="gaussian"):
    return {"family": "keras", "optimizer": "adam", "backend": "torch", "dtype": "float32",
            "mode": "eager", "scenario": scenario, "verdict": verdict,
            "first_divergent_step": step, "divergent_state": state,
            "magnitude": magnitude or baseline.magnitude(verdict, None), "reason": ""}


def column(*cells):
    return {tuple(c[f] for f in baseline.CELL): c for c in cells}


def report(tmp_path, columns):
    versions = list(columns)
    releases = {v: ({"status": "ran"} if columns[v] is not None
                    else {"status": matrix.UNSUPPORTED, "reason": "pip install failed"})
                for v in versions}
    cells = [dict(zip(baseline.CELL, k)) for k in next(c for c in columns.values() if c)]
    matrix.write_report(tmp_path, SETTINGS, versions, releases, columns, cells)
    return (tmp_path / "matrix.md").read_text(), pd.read_csv(tmp_path / "matrix.csv", dtype=str)


def test_identical_releases_show_no_change(tmp_path):
    same = [cell("exact"), cell("mismatch", 3, "velocity", "1e-04", scenario="tiny")]
    md, csv = report(tmp_path, {"3.1": column(*same), "3.2": column(*[dict(c) for c in same])})
    assert "## Changes between consecutive releases\n\nCells whose" in md
    assert md.split("## Changes between consecutive releases")[1].count("None.") == 1
    assert list(csv["3.1"]) == list(csv["3.2"]) == ["exact", "mismatch@3 velocity 1e-04"]


def test_a_changed_cell_is_listed_and_marked(tmp_path):
    before = [cell("exact"), cell("mismatch", 3, "velocity", "1e-04", scenario="tiny")]
    after = [cell("exact"), cell("mismatch", 1, "momentum", "1e-02", scenario="tiny")]
    md, _ = report(tmp_path, {"3.1": column(*before), "3.2": column(*after)})
    changes = md.split("## Changes between consecutive releases")[1]
    assert "None." not in changes
    assert "| 3.1 -> 3.2 |" in changes and "scenario: tiny" in changes
    assert "**mismatch@1 momentum 1e-02**" in changes
    assert "gaussian" not in changes.split("### Changed cells")[1]


def test_an_exact_match_flip_is_a_change_in_the_matrix(tmp_path):
    md, _ = report(tmp_path, {"3.1": column(cell("exact")), "3.2": column(cell("match"))})
    assert "**match**" in md


def test_an_unsupported_release_is_a_column_and_changes_skip_it(tmp_path):
    md, csv = report(tmp_path, {"3.1": column(cell("exact")), "3.2": None,
                                "3.3": column(cell("mismatch", 0, "variable", "1e+00"))})
    assert list(csv["3.2"]) == [matrix.UNSUPPORTED]
    assert "| 3.1 -> 3.3 |" in md and "pip install failed" in md


def test_a_class_a_release_lacks_is_unsupported_there_not_an_error(tmp_path):
    missing = dict(cell("error"), reason="unsupported: keras.optimizers has no class Adam "
                                         "(Keras 3.1)")
    failed = dict(cell("error"), reason="Keras raises ValueError: something")
    md, csv = report(tmp_path, {"3.1": column(missing), "3.2": column(cell("match")),
                                "3.3": column(failed)})
    assert list(csv.iloc[0][["3.1", "3.2", "3.3"]]) == [matrix.UNSUPPORTED, "match", "error"]


@pytest.mark.parametrize("argv", [["matrix"], ["matrix", "--keras", ","],
                                  ["matrix", "--keras", "3.15.1", "--backend", "theano"]],
                         ids=["no-releases", "empty-release-list", "unknown-backend"])
def test_bad_input_is_one_line_and_exit_2(argv, tmp_path, capsys):
    assert cli.main(argv + ["--output", str(tmp_path / "out"),
                            "--work", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "error" in err[0], err
    assert not (tmp_path / "out").exists()


def test_the_command_with_an_installed_and_an_uninstallable_release(tmp_path, monkeypatch,
                                                                       capsys):
    installed = importlib.metadata.version("keras")
    backend = "torch" if "torch" in installed_backends() else installed_backends()[0]

    def prepare(version, work, timeout):
        if version == installed:
            return Path(sys.executable), None
        return None, f"pip install keras=={version} failed: no such release"

    monkeypatch.setattr(matrix, "prepare", prepare)
    argv = ["matrix", "--keras", f"0.0.0,{installed}", "--backend", backend,
            "--family", "keras,article", "--optimizer", "sgd_momentum,adagrad",
            "--dtype", "float64", "--mode", "eager,compiled", "--scenario", "gaussian",
            "--steps", "5", "--size", "4", "--work", str(tmp_path / "work"),
            "--output", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    csv = pd.read_csv(tmp_path / "out" / "matrix.csv", dtype=str)
    # a mode that is another's run on this backend (torch's compiled) has no cells
    assert set(csv["mode"]) == {m for m in ("eager", "compiled") if distinct(backend, m)}
    assert set(csv["0.0.0"]) == {matrix.UNSUPPORTED}
    keras_cells = csv[csv["family"] == "keras"][installed]
    assert set(keras_cells) <= {"exact", "match"}
    # the article's Adagrad starts its accumulator at 0, Keras at 0.1: differs before step 1
    article = csv[(csv["family"] == "article") & (csv["optimizer"] == "adagrad")][installed]
    assert list(article.str.split(" ").str[:2].str.join(" ")) == ["mismatch@0 accumulator"]
    releases = json.loads((tmp_path / "out" / "releases.json").read_text())["releases"]
    assert releases["0.0.0"] == {"status": matrix.UNSUPPORTED,
                                 "reason": "pip install keras==0.0.0 failed: no such release"}

    summary = tmp_path / "work" / "runs" / installed / "all" / "summary.json"
    first = summary.stat().st_mtime_ns
    ran = json.loads((tmp_path / "work" / "runs" / installed / "all" / "result.json")
                     .read_text())["wall_seconds"]
    assert releases[installed]["wall_seconds"] == ran
    assert cli.main(argv) == 0  # the finished run is reused, with the time it took
    assert summary.stat().st_mtime_ns == first
    again = json.loads((tmp_path / "out" / "releases.json").read_text())["releases"]
    assert again[installed]["wall_seconds"] == ran
    monkeypatch.setattr(matrix, "harness_fingerprint", lambda: "edited harness")
    assert cli.main(argv) == 0  # another harness: run again
    assert summary.stat().st_mtime_ns != first
    capsys.readouterr()
