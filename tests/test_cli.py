"""The command line: bad input, exit codes, determinism, nothing half-written."""

import gzip
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest

import reference
from reference.rule import REGISTRY
from conftest import in_process, own_modes, verify_optimizers
from verify import cli, output, selection

ROOT = Path(__file__).resolve().parent.parent




@pytest.fixture()
def gradient_files(tmp_path):
    files = {}
    np.save(tmp_path / "ok.npy", np.random.default_rng(0).standard_normal((4, 3)))
    np.save(tmp_path / "three_d.npy", np.zeros((2, 3, 4)))
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan]]))
    np.save(tmp_path / "strings.npy", np.array([["a", "b"]]))
    np.save(tmp_path / "objects.npy", np.array([[1, None]], dtype=object), allow_pickle=True)
    (tmp_path / "text.npy").write_text("not an array")
    for name in ("ok", "three_d", "nan", "strings", "objects", "text"):
        files[name] = str(tmp_path / f"{name}.npy")
    files["missing"] = str(tmp_path / "missing.npy")
    rng = np.random.default_rng(1)
    archives = {
        "npz_steps_disagree": {"a": rng.standard_normal((4, 2)), "b": rng.standard_normal((5, 2))},
        "npz_bad_name": {"my/weight": rng.standard_normal((4, 2))},
        "npz_nan": {"a": np.array([[1.0, np.nan]])},
        "npz_strings": {"a": np.array([["x", "y"]])},
        "npz_empty_axis": {"a": np.zeros((4, 0))},
    }
    for name, arrays in archives.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        files[name] = str(tmp_path / f"{name}.npz")
    (tmp_path / "npz_not_zip.npz").write_text("not an archive")
    files["npz_not_zip"] = str(tmp_path / "npz_not_zip.npz")
    return files


BAD = {
    "unknown-optimizer": ["--optimizer", "adamax_typo"],
    "unknown-scenario": ["--scenario", "gaussian,nope"],
    "unknown-backend": ["--backend", "mxnet"],
    "unknown-dtype": ["--dtype", "float8"],
    "unknown-family": ["--family", "textbook_typo"],
    "unknown-mode": ["--mode", "lazy"],
    "unknown-format": ["--format", "xlsx"],
    "zero-steps": ["--steps", "0"],
    "negative-size": ["--size", "-5"],
    "huge-size": ["--steps", "1000000", "--size", "1000000"],
    "not-a-number": ["--steps", "ten"],
    "negative-seed": ["--seed", "-1"],
    "unknown-flag": ["--frobnicate"],
    "list-with-args": ["list", "extra"],
}
BAD_FILES = ["three_d", "nan", "strings", "objects", "text", "missing", "npz_steps_disagree",
             "npz_bad_name", "npz_nan", "npz_strings", "npz_empty_axis", "npz_not_zip"]


@pytest.mark.parametrize("args", list(BAD.values()), ids=list(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, args):
    out = tmp_path / "report"
    r = in_process(*args, "--output", str(out), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("verify-optimizers: error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists() and not list(tmp_path.glob(".report-*"))


def test_the_console_gives_bad_input_one_line_and_exit_2(tmp_path):
    """The same, through the interpreter: nothing printed before the CLI takes over."""
    for args in (BAD["unknown-flag"], BAD["unknown-optimizer"]):
        r = verify_optimizers(*args, "--output", str(tmp_path / "report"), cwd=tmp_path)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("verify-optimizers: error:") and not r.stdout


@pytest.mark.parametrize("name", BAD_FILES)
def test_bad_gradient_file_is_exit_2(tmp_path, gradient_files, name):
    out = tmp_path / "report"
    r = in_process("--gradients", gradient_files[name], "--output", str(out),
                          cwd=tmp_path)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_gradient_file_with_scenario_or_other_shape_is_exit_2(tmp_path, gradient_files):
    for extra in (["--scenario", "tiny"], ["--steps", "5"], ["--size", "7"]):
        r = in_process("--gradients", gradient_files["ok"], *extra, cwd=tmp_path)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_backend_not_installed_is_exit_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(selection, "installed_backends", lambda: ["jax"])
    code = cli.main(["--backend", "torch", "--output", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["verify-optimizers: error: backend not installed: torch"]
    assert not (tmp_path / "r").exists()


def test_existing_report_survives_bad_input(tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "keep.txt").write_text("old report")
    r = in_process("--optimizer", "nope", "--output", str(out), cwd=tmp_path)
    assert r.returncode == 2 and (out / "keep.txt").read_text() == "old report"


def test_list_names_configurations_families_and_scenarios(tmp_path):
    r = in_process("list", cwd=tmp_path)
    assert r.returncode == 0
    for word in ("sgd_nesterov", "rmsprop_momentum_centered", "article", "keras", "alternating"):
        assert word in r.stdout


SMALL = ["--optimizer", "sgd,adam", "--scenario", "gaussian,sparse", "--steps", "6",
         "--size", "5", "--quiet"]


def _without_environment(out: Path) -> dict:
    files = {}
    for path in sorted(out.rglob("*")):
        if path.is_dir():
            continue
        data = path.read_bytes()
        if path.name == "summary.json":
            doc = json.loads(data)
            doc.pop("environment")
            data = json.dumps(doc, sort_keys=True).encode()
        elif path.name == "summary.md":
            data = data.split(b"\n---\n")[0]
        elif path.name == output.MARKER:  # the digests of the files above, environment included
            doc = json.loads(data)
            assert set(doc.pop("sha256")) == set(doc["files"])
            data = json.dumps(doc, sort_keys=True).encode()
        files[str(path.relative_to(out))] = data
    return files


def test_run_exit_0_reports_and_byte_identical_rerun(tmp_path, backends):
    backend = backends[0]
    a, b = tmp_path / "a", tmp_path / "b"
    r1 = in_process("--backend", backend, *SMALL, "--output", str(a), cwd=tmp_path)
    r2 = in_process("--backend", backend, *SMALL, "--output", str(b), cwd=tmp_path)
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr[-2000:]
    assert "Full tables in" in r1.stdout and "keras" in r1.stdout
    fa, fb = _without_environment(a), _without_environment(b)
    assert fa == fb
    assert {"summary.md", "steps.md", "summary.csv", "summary.json", "report.html"} <= set(fa)
    doc = json.loads((a / "summary.json").read_text())
    assert set(doc) == {"environment", "settings", "rows"}
    # families x optimizers x dtypes x modes x scenarios
    assert len(doc["rows"]) == len(reference.FAMILIES) * 2 * 2 * len(own_modes(backend)) * 2
    for field in ("family", "optimizer", "backend", "dtype", "mode", "scenario", "steps",
                  "verdict", "first_divergent_step", "divergent_state", "max_abs_error",
                  "max_rel_error", "max_scaled_error", "drift"):
        assert field in doc["rows"][0]
    steps = sorted((a / "steps").rglob("*.csv.gz"))
    assert len(steps) == len(doc["rows"])
    with gzip.open(steps[0], "rt") as f:
        assert len(f.read().strip().splitlines()) == 1 + 7  # header, steps 0..6


def test_gradient_file_runs_as_scenario_file(tmp_path, gradient_files, backends):
    out = tmp_path / "r"
    r = in_process("--gradients", gradient_files["ok"], "--backend", backends[0],
                          "--optimizer", "rmsprop", "--quiet", "--format", "json",
                          "--output", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((out / "summary.json").read_text())
    assert {row["scenario"] for row in doc["rows"]} == {"file"}
    assert doc["settings"]["steps"] == 4 and doc["settings"]["size"] == 3
    assert sorted(p.name for p in out.iterdir()) == [".verify-optimizers", "summary.json"]


def test_keras_family_mismatch_exits_1(monkeypatch, tmp_path, backends, capsys):
    import perturbations  # noqa: F401  (registers the perturbed rules)

    monkeypatch.setitem(REGISTRY, ("keras", "Adam"),
                        reference.get_rule("eps-inside-sqrt", "Adam"))
    code = cli.main(["--backend", backends[0], "--optimizer", "adam", "--dtype", "float64",
                     "--scenario", "gaussian", "--steps", "4", "--size", "3", "--quiet",
                     "--output", str(tmp_path / "r")])
    assert code == 1
    assert "mismatch" in capsys.readouterr().out


def test_article_mismatch_alone_exits_0(tmp_path, backends, capsys):
    code = cli.main(["--backend", backends[0], "--optimizer", "adagrad", "--dtype", "float64",
                     "--scenario", "gaussian", "--steps", "3", "--size", "3", "--quiet",
                     "--output", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert code == 0 and "mismatch" in out


def test_progress_in_a_log_is_a_line_per_tenth(tmp_path, backends):
    args = [a for a in SMALL if a != "--quiet"]
    r = in_process("--backend", backends[0], "--dtype", "float32", "--mode", "eager",
                          *args, "--output", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("optimizer steps:")]
    assert 1 <= len(lines) <= 10 and lines[-1].startswith("optimizer steps: 12/12 (100%)")


def test_line_progress_prints_each_tenth_once():
    stream = io.StringIO()
    progress = cli.LineProgress(100, time.perf_counter(), stream)
    for _ in range(20):
        progress(3)
    percents = [ln.split("(")[1].split(")")[0] for ln in stream.getvalue().splitlines()]
    assert percents == [f"{p}%" for p in range(10, 70, 10)]
    progress(40)  # a jump past several tenths prints the one it lands on
    assert stream.getvalue().splitlines()[6].startswith("optimizer steps: 100/100 (100%)")
    assert len(stream.getvalue().splitlines()) == 7


def test_an_npz_gives_one_weight_per_array_with_its_shape(tmp_path):
    rng = np.random.default_rng(2)
    arrays = {"scale": rng.standard_normal(6), "kernel": rng.standard_normal((6, 3, 3, 1, 2)),
              "token_embedding": rng.standard_normal((6, 5, 2))}
    np.savez(tmp_path / "g.npz", **arrays)
    out = tmp_path / "r"
    r = in_process("--gradients", str(tmp_path / "g.npz"), "--backend",
                          selection.installed_backends()[0], "--family", "keras", "--optimizer",
                          "adam,lamb", "--format", "json", "--quiet", "--output", str(out),
                          cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["weights"] == {"scale": [], "kernel": [3, 3, 1, 2],
                                              "token_embedding": [5, 2]}
    assert summary["settings"]["steps"] == 6 and summary["settings"]["size"] == 1 + 18 + 10
    assert {row["verdict"] for row in summary["rows"]} <= {"exact", "match"}
