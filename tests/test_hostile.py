"""A careless or hostile user: nothing the harness did not write is deleted or
overwritten, exit code 1 only for a verified change, one line (and 2) for bad
input and harness failures, signals clean up, and a dead worker is named by
how it died.  Each case is one that an earlier version got wrong."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from verify import cli, output, processes
from verify.worker.pinned import check_pinned
from conftest import fast_backend, in_process, make_selection, run_selection
from conftest import verify_optimizers as in_a_process

ROOT = Path(__file__).resolve().parent.parent


TINY = ["--family", "keras", "--optimizer", "sgd", "--dtype", "float32", "--mode", "eager",
        "--scenario", "gaussian", "--steps", "3", "--size", "4", "--quiet"]


def verify_optimizers(*args, cwd, env=None, **kw):
    """In this process, but where the environment is the subject (a fresh process)."""
    if env is None and not kw:
        return in_process(*args, cwd=cwd)
    return in_a_process(*args, cwd=cwd, env=env, **kw)


def one_error_line(stderr):
    lines = stderr.strip().splitlines()
    return len(lines) == 1 and "Traceback" not in stderr


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def earlier_report(tmp_path_factory):
    """A report written by the harness, to be left intact by what follows."""
    root = tmp_path_factory.mktemp("earlier")
    r = verify_optimizers("--backend", fast_backend(), *TINY, "--output",
                          str(root / "report"), cwd=root)
    assert r.returncode == 0, r.stderr
    return root / "report"


def copy_report(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


# --- 1. never delete what the harness did not write ---------------------------
def test_a_folder_of_the_user_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    r = verify_optimizers("--backend", fast_backend(), *TINY, "--output", str(out),
                          cwd=tmp_path)
    assert r.returncode == 2 and one_error_line(r.stderr), r.stderr
    assert "did not write" in r.stderr
    assert snapshot(out) == {"thesis.tex": b"years of work"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_an_empty_folder_is_used_and_marked(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    r = verify_optimizers("--backend", fast_backend(), *TINY, "--output", str(out),
                          cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    marker = json.loads((out / output.MARKER).read_text())
    assert marker["written_by"] == "verify-optimizers"
    assert set(marker["files"]) == set(snapshot(out)) - {output.MARKER}


def test_a_report_folder_holding_a_file_of_the_user_is_not_replaced(tmp_path, earlier_report):
    out = copy_report(earlier_report, tmp_path / "report")
    (out / "notes.txt").write_text("my notes")
    before = snapshot(out)
    r = verify_optimizers("--backend", fast_backend(), *TINY, "--output", str(out),
                          cwd=tmp_path)
    assert r.returncode == 2 and one_error_line(r.stderr) and "notes.txt" in r.stderr
    assert snapshot(out) == before


def test_a_report_folder_of_the_harness_is_replaced(tmp_path, earlier_report):
    out = copy_report(earlier_report, tmp_path / "report")
    r = verify_optimizers("--backend", fast_backend(), *TINY, "--seed", "3", "--output",
                          str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "summary.json").read_text())["settings"]["seed"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


@pytest.mark.parametrize("where", ["same folder", "inside the output"])
def test_an_output_holding_the_gradient_file_is_refused(tmp_path, earlier_report, where):
    if where == "same folder":
        out = tmp_path / "data"
        out.mkdir()
    else:
        out = copy_report(earlier_report, tmp_path / "report")
    gradients = out / "g.npy"
    np.save(gradients, np.ones((3, 2)))
    before = snapshot(out)
    r = verify_optimizers("--backend", fast_backend(), "--gradients", str(gradients),
                          "--quiet", "--output", str(out), cwd=tmp_path)
    assert r.returncode == 2 and one_error_line(r.stderr) and "overlaps" in r.stderr
    assert snapshot(out) == before


@pytest.fixture(scope="module")
def tiny_baseline(tmp_path_factory):
    root = tmp_path_factory.mktemp("baseline")
    code = cli.main(["check", "--update-baseline", "--baseline", str(root / "baseline"),
                     "--output", str(root / "run"), "--backend", fast_backend(), *TINY])
    assert code == 0
    return root / "baseline"


@pytest.mark.parametrize("relation", ["same", "output inside", "baseline inside"])
@pytest.mark.parametrize("update", [False, True], ids=["check", "update-baseline"])
def test_check_never_writes_over_its_baseline(tmp_path, tiny_baseline, relation, update,
                                              capsys):
    baseline = copy_report(tiny_baseline, tmp_path / "b")
    out = {"same": baseline, "output inside": baseline / "run",
           "baseline inside": tmp_path}[relation]
    before = snapshot(baseline)
    code = cli.main(["check", "--baseline", str(baseline), "--output", str(out), "--quiet"]
                    + (["--update-baseline"] if update else []))
    err = capsys.readouterr().err
    assert code == 2 and one_error_line(err) and "overlaps" in err, err
    assert snapshot(baseline) == before


def test_a_baseline_folder_of_the_user_is_not_replaced(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.csv").write_text("1,2\n")
    code = cli.main(["check", "--update-baseline", "--baseline", str(mine), "--output",
                     str(tmp_path / "run"), "--backend", fast_backend(), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and one_error_line(err) and "did not write" in err
    assert snapshot(mine) == {"data.csv": b"1,2\n"}


def test_explain_does_not_overwrite_a_file_of_the_user(tmp_path, capsys):
    mine = tmp_path / "explain.md"
    mine.write_text("my own notes")
    code = cli.main(["explain", "sgd", "--steps", "2", "--size", "2", "--output", str(mine)])
    err = capsys.readouterr().err
    assert code == 2 and one_error_line(err) and "not written by" in err
    assert mine.read_text() == "my own notes"


# --- atomic replacement -----------------------------------------------------
def _failing_rename(monkeypatch, which):
    real = Path.rename
    calls = []

    def rename(self, target):
        calls.append(self)
        if len(calls) == which:
            raise OSError("disk trouble")
        return real(self, target)
    monkeypatch.setattr(Path, "rename", rename)


@pytest.mark.parametrize("which", [1, 2], ids=["moving the old aside", "moving the new in"])
def test_a_failed_swap_leaves_the_earlier_report_whole(tmp_path, earlier_report, monkeypatch,
                                                       which):
    out = copy_report(earlier_report, tmp_path / "report")
    before = snapshot(out)
    _failing_rename(monkeypatch, which)
    with pytest.raises(OSError, match="disk trouble"):
        with output.replacing_folder(out) as tmp:
            (tmp / "summary.md").write_text("new")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_a_successful_swap_leaves_no_trace(tmp_path, earlier_report):
    out = copy_report(earlier_report, tmp_path / "report")
    with output.replacing_folder(out) as tmp:
        (tmp / "summary.md").write_text("new")
    assert set(snapshot(out)) == {"summary.md", output.MARKER}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


# --- 2. exit codes --------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["explain", "--seed", "-1"], "--seed"),
    (["explain", "--steps", str(10 ** 12)], "GiB"),
    (["explain", "--size", "0"], "at least 1"),
    (["convergence", "--seeds", str(10 ** 9)], "--seeds"),
])
def test_bad_subcommand_values_are_exit_2(args, message, capsys):
    code = cli.main(args)
    err = capsys.readouterr().err
    assert code == 2 and one_error_line(err) and message in err, err


@pytest.mark.parametrize("edit", [
    lambda m: m["settings"].update(configurations=[]),
    lambda m: m["settings"].update(precision="fast"),
    lambda m: m["settings"].update(tolerance="16"),
    lambda m: m["settings"]["precision"].update(torch=5),
    lambda m: m["environment"].update(backends=["torch"]),
    lambda m: m.update(settings=None),
], ids=["configurations", "precision", "tolerance", "precision-value", "backends", "null"])
def test_malformed_values_in_a_baseline_are_exit_2(tmp_path, tiny_baseline, capsys, edit):
    baseline = copy_report(tiny_baseline, tmp_path / "b")
    meta = json.loads((baseline / "baseline.json").read_text())
    edit(meta)
    (baseline / "baseline.json").write_text(json.dumps(meta))
    code = cli.main(["check", "--baseline", str(baseline), "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and one_error_line(err) and "malformed baseline" in err, err


def test_an_internal_error_is_exit_2_with_its_traceback_in_a_log(monkeypatch, tmp_path, capsys):
    def broken(*a, **k):
        raise RuntimeError("a bug of the harness")
    monkeypatch.setattr(cli, "run", broken)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", None)
    code = cli.main(["--backend", fast_backend(), *TINY, "--output", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and one_error_line(err), err
    assert "internal error: RuntimeError: a bug of the harness" in err
    log = Path(err.split("traceback in ")[1].rstrip(")\n"))
    assert log.parent == tmp_path and "Traceback" in log.read_text()
    code = cli.main(["--debug", "--backend", fast_backend(), *TINY, "--output",
                     str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" in err and "a bug of the harness" in err


def test_keras_comparisons_that_cannot_run_are_exit_2_not_1(monkeypatch, tmp_path, capsys):
    real = processes.start
    monkeypatch.setattr(processes, "start", lambda module, *args: real("no_such_worker", *args))
    code = cli.main(["--backend", fast_backend(), *TINY, "--output", str(tmp_path / "r")])
    captured = capsys.readouterr()
    assert code == 2 and one_error_line(captured.err) and "could not run" in captured.err
    assert "error" in captured.out  # the report is written and says so


# --- 3. pinned environment --------------------------------------------------------
def test_a_users_keras_config_changes_nothing_and_is_recorded(tmp_path):
    home = tmp_path / "home"
    (home / ".keras").mkdir(parents=True)
    user_config = json.dumps({"floatx": "float64", "epsilon": 1e-3, "backend": "jax",
                              "image_data_format": "channels_first"})
    (home / ".keras" / "keras.json").write_text(user_config)
    env = {k: v for k, v in os.environ.items() if k != "KERAS_HOME"}
    env.update(HOME=str(home), XLA_FLAGS="--xla_cpu_enable_fast_math=true")
    out = tmp_path / "r"
    r = verify_optimizers("--backend", fast_backend(), "--optimizer", "adam,sgd_momentum",
                          "--family", "keras", "--steps", "5", "--size", "6", "--quiet",
                          "--format", "json", "--output", str(out), cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads((out / "summary.json").read_text())
    assert {row["verdict"] for row in doc["rows"]} <= {"exact", "match"}
    environment = doc["environment"]
    assert environment["user_settings_not_used"] == {
        "keras.json floatx": "float64", "keras.json epsilon": 0.001,
        "keras.json image_data_format": "channels_first",
        "XLA_FLAGS": "--xla_cpu_enable_fast_math=true"}
    seen = environment["backends"][fast_backend()]["keras_config"]
    assert seen["floatx"] == "float32" and seen["epsilon"] == 1e-07
    assert snapshot(home) == {".keras/keras.json": user_config.encode()}


def test_a_worker_that_runs_with_another_floatx_refuses():
    class FakeConfig:
        floatx = staticmethod(lambda: "float64")
        epsilon = staticmethod(lambda: 1e-07)
        image_data_format = staticmethod(lambda: "channels_last")

    class FakeKeras:
        config = FakeConfig
        backend = type("B", (), {"backend": staticmethod(lambda: "torch")})

    with pytest.raises(RuntimeError, match="floatx='float64'"):
        check_pinned(FakeKeras)
    FakeConfig.floatx = staticmethod(lambda: "float32")
    assert check_pinned(FakeKeras)["floatx"] == "float32"


def test_a_home_without_keras_config_stays_without_one(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "KERAS_HOME"}
    env["HOME"] = str(home)
    r = verify_optimizers("--backend", fast_backend(), *TINY, "--output",
                          str(tmp_path / "r"), cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert list(home.iterdir()) == []


# --- 4. values ---------------------------------------------------------------
def test_gradients_that_overflow_the_dtype_are_refused_with_the_element(tmp_path):
    g = np.ones((4, 3))
    g[2, 1] = 1e39
    np.save(tmp_path / "g.npy", g)
    r = verify_optimizers("--backend", fast_backend(), "--gradients", str(tmp_path / "g.npy"),
                          "--output", str(tmp_path / "r"), cwd=tmp_path)
    assert r.returncode == 2 and one_error_line(r.stderr)
    assert "1e+39 at step 3, element 1" in r.stderr and "float32" in r.stderr
    r = verify_optimizers("--backend", fast_backend(), "--gradients", str(tmp_path / "g.npy"),
                          "--dtype", "float64", "--family", "keras", "--optimizer", "sgd",
                          "--quiet", "--output", str(tmp_path / "r"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def _npy_with_header(path, shape, payload=b"\0" * 16, dtype="<f8"):
    header = {"descr": dtype, "fortran_order": False, "shape": shape}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.write(payload)


@pytest.mark.parametrize("shape,message", [
    ((10 ** 12, 10 ** 12), "GiB"),
    ((1000, 1000), "holds 16 bytes"),
])
def test_a_header_claiming_an_absurd_size_is_refused_before_reading(tmp_path, shape, message):
    _npy_with_header(tmp_path / "g.npy", shape)
    started = time.perf_counter()
    r = verify_optimizers("--gradients", str(tmp_path / "g.npy"), "--output",
                          str(tmp_path / "r"), cwd=tmp_path)
    assert r.returncode == 2 and one_error_line(r.stderr) and message in r.stderr, r.stderr
    assert time.perf_counter() - started < 60 and not (tmp_path / "r").exists()


# --- 5. signals -----------------------------------------------------------------
def _workers_of(tmpdir: Path) -> list:
    """PIDs of processes whose command line names a file under tmpdir."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(tmpdir) in cmd:
                pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc to find the workers")
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_workers_removes_partial_files_and_keeps_the_earlier_report(
        tmp_path, earlier_report, sig, code):
    out = copy_report(earlier_report, tmp_path / "report")
    before = snapshot(out)
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = dict(os.environ, TMPDIR=str(tmpdir), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "verify.cli", "--backend", fast_backend(), "--family", "keras",
         "--steps", "20000", "--size", "64", "--quiet", "--output", str(out)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not _workers_of(tmpdir):
        time.sleep(0.2)
    time.sleep(3)  # the workers are importing Keras or stepping
    assert _workers_of(tmpdir), "the run did not start its workers"
    proc.send_signal(sig)
    stopped = time.time()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert time.time() - stopped < 15
    assert one_error_line(err) and signal.Signals(sig).name in err, err
    time.sleep(0.5)
    assert _workers_of(tmpdir) == []
    assert list(tmpdir.iterdir()) == []                       # inputs removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "tmp"]  # no partial report
    assert snapshot(out) == before


# --- 6. worker deaths ---------------------------------------------------------------
KILLER = '''
import os, signal, sys
print("I0000 00:00:1795 port.cc:153] oneDNN custom operations are on.", file=sys.stderr)
import verify.worker.__main__ as worker
if "{how}" == "import":
    raise ImportError("no module named fancy_backend")
runs = []
original = worker.Run.execute
def execute(self, *args):
    runs.append(1)
    if len(runs) == 2:
        print("W0000 an unrelated warning of a library", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, *args)
worker.Run.execute = execute
sys.exit(worker.main(sys.argv[-1]))
'''


def dying_python(tmp_path, how):
    script = tmp_path / "killer.py"
    script.write_text(KILLER.replace("{how}", how))
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.mark.parametrize("how,expected", [
    ("kill", "killed by SIGKILL"),
    ("import", "exited with status 1; last error: ImportError: no module named fancy_backend"),
])
def test_a_dead_worker_is_named_by_how_it_died(tmp_path, how, expected):
    sel = make_selection([fast_backend()], ["keras"], configurations=["sgd", "adam", "lion"],
                         dtypes=["float32"], modes=["eager"], names=["gaussian"], steps=5,
                         size=4)
    sel.python = dying_python(tmp_path, how)
    df = run_selection(sel, tmp_path / "out")
    errors = df[df.verdict == "error"]
    assert len(errors) >= 2
    for reason in errors.reason:
        assert expected in reason and "I0000" not in reason and "W0000" not in reason, reason
    if how == "kill":
        assert df.verdict.iloc[0] in ("exact", "match")  # the run it finished keeps its verdict


def test_the_reason_is_the_last_traceback_line_not_the_last_log_line(tmp_path):
    log = tmp_path / "worker.log"
    log.write_text("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
                   "    f()\nValueError: first\n"
                   "run 3: Traceback (most recent call last):\nrun 3: KeyError: 'per run'\n"
                   "Traceback (most recent call last):\n  File \"y.py\", line 2\n"
                   "MemoryError: out of memory\nI0000 tensorflow says hello\n")
    assert processes.death_reason(-9, log) == "killed by SIGKILL; last error: MemoryError: " \
                                            "out of memory"
    assert processes.death_reason(3, tmp_path / "none.log") == "exited with status 3"

