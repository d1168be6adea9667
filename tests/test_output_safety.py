"""Issue 30, output safety: one run at a time on an output (a lock beside it), a
report read back only as the harness wrote it (the marker's SHA-256 of every
file), a symbolic link refused as one, and what a killed run leaves behind
removed by the next run when it is provably the harness's."""

import contextlib
import fcntl
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import ROOT, fast_backend
from verify import cli, output

TINY = ["--family", "keras", "--optimizer", "sgd,adam", "--dtype", "float32", "--mode",
        "eager", "--scenario", "gaussian", "--steps", "3", "--size", "8", "--quiet"]


def invoke(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


def one_line_error(code, err, *words):
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (code, err)
    for w in words:
        assert w in lines[0], (w, lines[0])
    assert "internal error" not in lines[0]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 7: one run at a time on an output ---------------------------------------------
@contextlib.contextmanager
def held_lock(out: Path, pid=None):
    """Hold the lock of `out` as another run of the harness does (flock on .NAME.lock)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        json.dump({"pid": pid or os.getpid(), "host": socket.gethostname(),
                   "started": "2025-01-01 00:00:00"}, f)
        f.flush()
        yield


def test_a_second_run_on_an_output_being_written_is_refused(tmp_path):
    out = tmp_path / "report"
    with held_lock(out, pid=424242):
        r = subprocess.run([sys.executable, "-m", "verify.cli", "--backend", fast_backend(),
                            *TINY, "--output", str(out)], cwd=ROOT, capture_output=True,
                           text=True, timeout=600)
    one_line_error(r.returncode, r.stderr, str(out), "pid 424242")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".report.lock"]  # the holder's


def test_every_writer_takes_the_lock(tmp_path):
    folder, single = tmp_path / "r", tmp_path / "explain.md"
    with held_lock(folder), pytest.raises(output.OutputRefused, match="being written"):
        with output.replacing_folder(folder, "run"):
            pass
    with held_lock(folder), pytest.raises(output.OutputRefused, match="being written"):
        output.add_files(folder, {"check.md": "x"}, "check")
    with held_lock(single), pytest.raises(output.OutputRefused, match="being written"):
        output.replace_file(single, "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".explain.md.lock", ".r.lock"]


def test_the_lock_is_released_on_every_exit_path_and_a_stale_one_does_not_block(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(KeyboardInterrupt):
        with output.replacing_folder(out, "run"):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    # a lock file left by a killed run (its flock went with it): no obstacle, and removed
    (tmp_path / ".r.lock").write_text(json.dumps({"pid": 999999, "host": "h", "started": "x"}))
    with output.replacing_folder(out, "run") as tmp:
        (tmp / "a.txt").write_text("a")
    output.add_files(out, {"b.txt": "b"}, "check")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    with held_lock(out):  # and it can be taken again
        pass


# --- 8: a report read back is what the harness wrote -----------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Two shards of a tiny selection, merged, and a baseline of the merged run."""
    root = tmp_path_factory.mktemp("safety-shards")
    for k in (1, 2):
        code, _, err = invoke(["--backend", fast_backend(), *TINY, "--shard", f"{k}/2",
                               "--output", str(root / f"s{k}")])
        assert code == 0, err
    code, _, err = invoke(["merge", str(root / "s1"), str(root / "s2"), "--output",
                           str(root / "merged")])
    assert code == 0, err
    code, _, err = invoke(["check", "--update-baseline", "--from", str(root / "merged"),
                           "--baseline", str(root / "baseline")])
    assert code == 0, err
    return root


def copy(src: Path, dst: Path) -> Path:
    import shutil
    shutil.copytree(src, dst)
    return dst


def set_keras_mismatch(folder: Path, everything: bool) -> None:
    """A keras row of summary.json made a mismatch (with a divergence, or the verdict only)."""
    doc = json.loads((folder / "summary.json").read_text())
    row = next(r for r in doc["rows"] if r["family"] == "keras")
    row["verdict"] = "mismatch"
    if everything:
        row.update(first_divergent_step=1, divergent_state="weights", max_rel_error=0.5)
    (folder / "summary.json").write_text(json.dumps(doc, indent=1, sort_keys=True))


EDITS = {
    "verdict and divergence": lambda f: set_keras_mismatch(f, True),
    "verdict only": lambda f: set_keras_mismatch(f, False),
    "summary.csv": lambda f: (f / "summary.csv").write_text(
        (f / "summary.csv").read_text().replace(",match,", ",mismatch,", 1)),
    "a step table": lambda f: next((f / "steps").rglob("*.csv.gz")).write_bytes(b"\x1f\x8b"),
    "a file added": lambda f: (f / "notes.txt").write_text("mine"),
}


@pytest.mark.parametrize("edit", EDITS)
def test_merge_refuses_an_edited_shard_in_one_line(shards, tmp_path, edit):
    s1 = copy(shards / "s1", tmp_path / "s1")
    EDITS[edit](s1)
    code, _, err = invoke(["merge", str(s1), str(shards / "s2"), "--output",
                           str(tmp_path / "merged")])
    one_line_error(code, err, str(s1))
    assert not (tmp_path / "merged").exists()


def test_merge_of_unedited_shards_reads_them_back(shards, tmp_path):
    code, _, err = invoke(["merge", str(shards / "s2"), str(shards / "s1"), "--output",
                           str(tmp_path / "merged")])
    assert code == 0, err
    output.read_back(tmp_path / "merged")  # and what it wrote reads back in turn


@pytest.mark.parametrize("edit", ["verdict and divergence", "verdict only", "a file added"])
def test_check_from_refuses_an_edited_run(shards, tmp_path, edit):
    merged = copy(shards / "merged", tmp_path / "merged")
    EDITS[edit](merged)
    before = snapshot(merged)
    code, _, err = invoke(["check", "--from", str(merged), "--baseline",
                           str(shards / "baseline")])
    one_line_error(code, err, str(merged))
    assert snapshot(merged) == before


def test_check_from_an_unedited_run_passes_and_can_be_repeated(shards, tmp_path):
    merged = copy(shards / "merged", tmp_path / "merged")
    for _ in range(2):  # check --from adds its files: they read back too
        code, _, err = invoke(["check", "--from", str(merged), "--baseline",
                               str(shards / "baseline")])
        assert code == 0, err
    assert (merged / "check.md").exists()


def test_check_refuses_an_edited_baseline(shards, tmp_path):
    baseline = copy(shards / "baseline", tmp_path / "baseline")
    lines = (baseline / "cells.csv").read_text().splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith("keras,"))
    lines[i] = lines[i].replace(",match,,,rounding,", ",mismatch,1,weights,1e-01,").replace(
        ",exact,,,exact,", ",mismatch,1,weights,1e-01,")
    assert lines[i] != (baseline / "cells.csv").read_text().splitlines()[i]
    (baseline / "cells.csv").write_text("\n".join(lines) + "\n")
    code, _, err = invoke(["check", "--from", str(copy(shards / "merged", tmp_path / "m")),
                           "--baseline", str(baseline)])
    one_line_error(code, err, "cells.csv")


def test_the_shard_reports_uploaded_by_ci_keep_their_marker():
    from test_workflow import _step, load, shard_pairs
    for job, _ in shard_pairs(load()):
        assert _step(job, "actions/upload-artifact")["with"].get("include-hidden-files") is True


def test_the_committed_reports_read_back():
    for name in ("baseline", "claims", "convergence", "low_precision"):
        output.read_back(ROOT / "reports" / name)


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_byte_changed_in_a_report_is_refused(shards, tmp_path_factory, data):
    from verify.commands import merge
    folder = copy(shards / "s1", tmp_path_factory.mktemp("edit") / "s1")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != output.MARKER)
    path = data.draw(st.sampled_from(files), label="file")
    content = bytearray(path.read_bytes())
    how = data.draw(st.sampled_from(["flip", "cut", "append"]), label="how")
    if how == "flip":
        i = data.draw(st.integers(0, len(content) - 1), label="at")
        content[i] ^= data.draw(st.integers(1, 255), label="xor")
    elif how == "cut":
        content = content[:data.draw(st.integers(0, len(content) - 1), label="to")]
    else:
        content += data.draw(st.binary(min_size=1, max_size=8), label="tail")
    path.write_bytes(bytes(content))
    with pytest.raises((output.OutputRefused, cli.UsageError), match=re.escape(path.name)):
        merge.read_shard(folder)


# --- 9: a symbolic link as the output ------------------------------------------------
def test_a_symbolic_link_to_an_empty_folder_is_refused_as_a_link(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    code, _, err = invoke(["--backend", fast_backend(), *TINY, "--output",
                           str(tmp_path / "link")])
    one_line_error(code, err, "symbolic link")
    assert (tmp_path / "link").is_symlink() and list((tmp_path / "empty").iterdir()) == []
    code, _, err = invoke(["explain", "adam", "--output", str(tmp_path / "link")])
    one_line_error(code, err, "symbolic link")


def test_a_real_empty_folder_is_accepted(tmp_path):
    (tmp_path / "empty").mkdir()
    assert cli.claim_output(tmp_path / "empty", []) == tmp_path / "empty"


# --- 11: what a killed run leaves behind -------------------------------------------------
def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def look_alikes(parent: Path, prefix: str) -> list:
    """Folders named like a killed run's that are not provably one's left to no one:
    no marker; the marker of a live process (this one); another host's; a dead
    writer's with a live worker (this process)."""
    made, dead = [], dead_pid()
    for tag, writer in (("1", None), (str(os.getpid()), {"pid": os.getpid()}),
                        ("2", {"pid": 2, "host": "elsewhere"}),
                        (str(dead), {"pid": dead, "children": [os.getpid()]})):
        folder = parent / f"{prefix}{tag}-keep"
        folder.mkdir()
        (folder / "mine.txt").write_text("a user's")
        if writer is not None:
            (folder / output.MARKER).write_text(json.dumps(
                {"written_by": "verify-optimizers", "files": [],
                 "writer": {"host": socket.gethostname(), **writer}}))
        made.append(folder)
    return made


def test_a_killed_run_leaves_what_the_next_run_removes(tmp_path):
    scratch, out = tmp_path / "tmp", tmp_path / "reports" / "r"
    scratch.mkdir()
    env = {**os.environ, "TMPDIR": str(scratch)}
    argv = [sys.executable, "-m", "verify.cli", "--backend", fast_backend(), *TINY,
            "--output", str(out)]
    proc = subprocess.Popen(argv[:-2] + ["--steps", "2000", "--output", str(out)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not (list(out.parent.glob(".r-partial-*")) and any(
                "children" in p.read_text() for p in scratch.glob(f"*/{output.MARKER}"))):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert list(out.parent.glob(".r-partial-*"))
    (inputs,) = scratch.glob("verify-inputs-*")
    for pid in json.loads((inputs / output.MARKER).read_text())["writer"]["children"]:
        with contextlib.suppress(ProcessLookupError):  # its workers, orphaned: killed too
            os.kill(pid, signal.SIGKILL)
    while any(output._alive(pid) for pid in
              json.loads((inputs / output.MARKER).read_text())["writer"]["children"]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    keep = look_alikes(out.parent, ".r-partial-") + look_alikes(scratch, "verify-inputs-")
    r = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert sorted(out.parent.glob(".r-partial-*")) == sorted(keep[:4])
    assert sorted(scratch.glob("verify-inputs-*")) == sorted(keep[4:])
    assert all((k / "mine.txt").exists() for k in keep)
