"""A backend worker whose stream breaks off mid-run: the runs it finished keep
their verdicts, every other run of it becomes `error` with the reason, every
cell is reported exactly once, and the harness does not hang or crash."""

import os
import stat
import sys

from conftest import make_selection, run_selection


def truncating_python(tmp_path, limit):
    """An interpreter wrapper whose standard output stops after `limit` bytes."""
    script = tmp_path / "python"
    script.write_text(f'#!/bin/sh\n"{sys.executable}" "$@" | head -c {limit}\n')
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_a_broken_worker_stream_makes_its_unfinished_runs_errors(tmp_path, backends):
    families = ["keras", "article"]
    sel = make_selection(backends[:1], families, configurations=["sgd", "adam", "nadam"],
                         dtypes=["float32"], modes=["eager"], names=["gaussian", "tiny"],
                         steps=200, size=64)
    sel.python = truncating_python(tmp_path, 250_000)
    df = run_selection(sel, tmp_path / "out")
    assert len(df) == len(families) * 3 * 2
    assert not df.duplicated(["family", "optimizer", "scenario"]).any()
    errors = df[df.verdict == "error"]
    assert 0 < len(errors) < len(df), df[["family", "optimizer", "verdict"]]
    assert errors.reason.str.contains("worker failed|stream", regex=True).all(), errors.reason
    # a run is cut for every family alike; what finished is judged as usual
    by_run = df.groupby("optimizer").verdict.apply(lambda v: (v == "error").all()
                                                  or not (v == "error").any())
    assert by_run.all()
    assert set(df[(df.family == "keras") & (df.verdict != "error")].verdict) <= {"exact",
                                                                              "match"}


def test_the_wrapper_passes_a_whole_stream_through(tmp_path, backends):
    sel = make_selection(backends[:1], ["keras"], configurations=["sgd"], dtypes=["float32"],
                         modes=["eager"], names=["gaussian"], steps=20, size=8)
    sel.python = truncating_python(tmp_path, 10**9)
    df = run_selection(sel, tmp_path / "out")
    assert set(df.verdict) <= {"exact", "match"}, df.reason.tolist()


if os.name == "nt":  # a /bin/sh wrapper
    del test_a_broken_worker_stream_makes_its_unfinished_runs_errors
    del test_the_wrapper_passes_a_whole_stream_through


def test_a_stream_the_harness_cannot_read_ends_in_errors_not_a_hang(tmp_path, backends,
                                                                     monkeypatch):
    """The reader fails while the worker is alive and still writing (the worker
    blocks on a full pipe): the worker is stopped, its unfinished runs are errors
    with the reader's exception, and the run ends."""
    from verify import runner
    calls = {"n": 0}
    real = runner.read_message

    def failing(stream):
        calls["n"] += 1
        if calls["n"] == 4:
            raise ValueError("a header that is not JSON")
        return real(stream)

    monkeypatch.setattr(runner, "read_message", failing)
    sel = make_selection(backends[:1], ["keras"], configurations=["sgd", "adam", "nadam"],
                         dtypes=["float32"], modes=["eager"], names=["gaussian"],
                         steps=2000, size=256)
    df = run_selection(sel, tmp_path / "out")
    errors = df[df.verdict == "error"]
    assert len(errors) > 0 and errors.reason.str.contains(
        "stream could not be read: ValueError: a header that is not JSON").all(), errors.reason
