"""Property-based hostile input (hypothesis, fixed seed, bounded examples): for
any command line, gradient file or baseline edit, the exit code is 0, 1 or 2;
1 only with a report that shows a verified change; 2 with exactly one line on
standard error; nothing outside the output folder touched; and an earlier
report left whole unless the run succeeded."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from conftest import fast_backend

from verify import cli, output

PROPERTY_SETTINGS = settings(max_examples=25, deadline=None, derandomize=True, database=None,
                             suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                    HealthCheck.too_slow])


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def invoke(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A folder holding a user's file and an earlier report of the harness."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "user.txt").write_text("the user's own file")
    code, _, err = invoke(["--backend", fast_backend(), "--family", "keras", "--optimizer",
                           "sgd", "--dtype", "float32", "--mode", "eager", "--scenario",
                           "gaussian", "--steps", "2", "--size", "2", "--quiet", "--output",
                           str(root / "report")])
    assert code == 0, err
    return root


def assert_contract(code, err, root, written, before):
    """`written`: the folder (relative to root) the command may write."""
    assert code in (0, 1, 2), (code, err)
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in err, err
    if code == 1:  # only with a verified change: a keras-family mismatch in the report
        doc = json.loads((root / written / "summary.json").read_text())
        assert any(r["family"] == "keras" and r["verdict"] == "mismatch" for r in doc["rows"])
    after = snapshot(root)

    def outside(files):
        return {k: v for k, v in files.items() if not k.startswith(written.rstrip("/") + "/")}
    assert outside(after) == outside(before)
    if code == 2:  # nothing written at all, an earlier report intact
        assert after == before
    assert not [p for p in root.rglob(".*-partial-*")]


# --- command lines ------------------------------------------------------------
VALUES = {
    "--backend": ["torch", "jax", "tensorflow", "mxnet", "", ","],
    "--dtype": ["float32", "float64", "float16", "int8"],
    "--family": ["keras", "article", "textbook", "nope"],
    "--optimizer": ["sgd", "adam", "lion", "adamax_typo", "sgd,sgd"],
    "--scenario": ["gaussian", "tiny", "moons", "nope"],
    "--mode": ["eager", "compiled", "lazy"],
    "--steps": ["1", "2", "0", "-3", "ten", str(10 ** 13), "1e3"],
    "--size": ["1", "3", "0", "-1", str(2 ** 40)],
    "--seed": ["0", "7", "-1", str(2 ** 64), "x"],
    "--format": ["md", "csv", "json", "xlsx"],
    "--gradients": ["missing.npy", "user.txt", "report/summary.json"],
    "--output": ["report", ".", "user.txt", "report/inner", "new"],
}
flag = st.sampled_from(sorted(VALUES)).flatmap(
    lambda f: st.tuples(st.just(f), st.sampled_from(VALUES[f]) | st.text(max_size=6)))
junk = st.sampled_from(["--frobnicate", "list", "--quiet", "--debug", "check", "explain"])


@PROPERTY_SETTINGS
@given(flags=st.lists(flag, max_size=5), extra=st.lists(junk, max_size=1))
def test_any_command_line_keeps_the_contract(workspace, monkeypatch, flags, extra):
    monkeypatch.chdir(workspace)
    argv = [x for pair in flags for x in pair] + extra
    # every run small, on the fast backend, writing into ./report unless told otherwise
    defaults = {"--backend": fast_backend(), "--steps": "2", "--size": "2",
                "--optimizer": "sgd", "--family": "keras", "--mode": "eager",
                "--scenario": "gaussian", "--output": "report"}
    given_flags = {f for f, _ in flags}
    if not ({"check", "explain", "list"} & set(extra)):
        for f, v in defaults.items():
            if f not in given_flags and not (f in ("--steps", "--size", "--scenario")
                                             and "--gradients" in given_flags):
                argv += [f, v]
        argv.append("--quiet")
    else:  # subcommands: keep them from running for long
        argv = extra + ["--steps", "2", "--size", "2"] + argv
    outputs = [argv[i + 1] for i in range(len(argv) - 1) if argv[i] == "--output"]
    written = outputs[-1] if outputs else "report"
    before = snapshot(workspace)
    code, out, err = invoke(argv)
    assert_contract(code, err, workspace, written, before)
    if written != "report" and (workspace / written / output.MARKER).exists():
        shutil.rmtree(workspace / written)  # a successful run's own new folder: tidy up


# --- gradient files -------------------------------------------------------------
special = st.sampled_from([0.0, -0.0, 5e-324, -2.2e-308, 1e-45, 3.4e38, 3.5e38, 1e300,
                           np.inf, -np.inf, np.nan, 1.0, -1.0])
arrays = st.one_of(
    hnp.arrays(dtype=st.sampled_from([np.float64, np.float32, np.float16, np.int32, np.uint8]),
               shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=3),
               elements=None),
    hnp.arrays(dtype=np.float64, shape=st.tuples(st.integers(1, 3), st.integers(1, 3)),
               elements=special),
    hnp.arrays(dtype=st.sampled_from([np.complex64, np.bool_, "U2"]),
               shape=st.tuples(st.integers(1, 2), st.integers(1, 2))),
)


@PROPERTY_SETTINGS
@given(array=arrays, optimizer=st.sampled_from(["sgd", "adam"]),
       dtype=st.sampled_from(["float32", "float64"]), cut=st.integers(0, 40))
def test_any_gradient_file_keeps_the_contract(workspace, monkeypatch, array, optimizer, dtype,
                                              cut):
    monkeypatch.chdir(workspace)
    path = workspace / "g.npy"
    np.save(path, array)
    if cut:  # a torn file
        data = path.read_bytes()
        path.write_bytes(data[:max(0, len(data) - cut)])
    before = snapshot(workspace)
    code, out, err = invoke(["--gradients", str(path), "--backend", fast_backend(),
                             "--family", "keras", "--optimizer", optimizer, "--dtype", dtype,
                             "--mode", "eager", "--quiet", "--output", "report"])
    assert_contract(code, err, workspace, "report", before)
    valid = (not cut and array.ndim == 2 and array.dtype.kind in "fiu"
             and np.all(np.isfinite(array.astype(np.float64)))
             and np.all(np.isfinite(array.astype(np.float64).astype(dtype))))
    assert code == (0 if valid else 2), (array, err)
    path.unlink()


# --- baseline edits -----------------------------------------------------------------
@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile-baseline")
    code, _, err = invoke(["check", "--update-baseline", "--baseline", str(root / "baseline"),
                           "--output", str(root / "run"), "--backend", fast_backend(),
                           "--family", "keras", "--optimizer", "sgd", "--dtype", "float32",
                           "--mode", "eager", "--scenario", "gaussian", "--steps", "2",
                           "--size", "2", "--quiet"])
    assert code == 0, err
    return root / "baseline"


json_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 10 ** 6)
                           | st.floats(allow_nan=False) | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                           max_leaves=6)


def _paths(doc, prefix=()):
    yield prefix
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, prefix + (k,))


@PROPERTY_SETTINGS
@given(data=st.data(), where=st.sampled_from(["json", "csv"]))
def test_any_baseline_edit_keeps_the_contract(baseline, tmp_path_factory, data, where):
    root = tmp_path_factory.mktemp("edit")
    b = root / "baseline"
    shutil.copytree(baseline, b)
    if where == "json":
        meta = json.loads((b / "baseline.json").read_text())
        path = data.draw(st.sampled_from([p for p in _paths(meta) if p]))
        value = data.draw(json_values)
        target = meta
        for k in path[:-1]:
            target = target[k]
        target[path[-1]] = value
        (b / "baseline.json").write_text(json.dumps(meta))
    else:
        rows = (b / "cells.csv").read_text().splitlines()
        line = data.draw(st.integers(0, len(rows) - 1))
        fields = rows[line].split(",")
        i = data.draw(st.integers(0, len(fields) - 1))
        fields[i] = data.draw(st.sampled_from(["", "exact", "match", "mismatch", "error",
                                               "1e-03", "x", "3", "-1", "inf"])
                              | st.text(alphabet="abc,\"\n", max_size=4))
        rows[line] = ",".join(fields)
        (b / "cells.csv").write_text("\n".join(rows) + "\n")
    (root / "report").mkdir()
    before_root, before_report = snapshot(root), snapshot(root / "report")
    code, out, err = invoke(["check", "--baseline", str(b), "--output", str(root / "report"),
                             "--quiet"])
    assert code in (0, 1, 2), err
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    if code == 1:  # a verified change against the edited baseline, cell by cell
        changes = pd.read_csv(root / "report" / "changes.csv", keep_default_na=False)
        failing = changes[changes.fails.astype(str) == "True"]
        assert len(failing) and (failing.now_verdict != "error").any()
    assert {k: v for k, v in snapshot(root).items() if not k.startswith("report/")} == {
        k: v for k, v in before_root.items() if not k.startswith("report/")}
    if code == 2 and not (root / "report" / "check.md").exists():
        assert snapshot(root / "report") == before_report
