"""The harness process keeps running statistics, never trajectories or per-step
tables: its peak memory at 100000 steps stays near what its inputs take.  The
per-step tables go to their files chunk by chunk (report.StepFiles) and the
figures' traces are binned as they are read (html_report.Bins), which must give
what the whole table gives."""

import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import pandas as pd
from hypothesis import given, settings, strategies as st

from conftest import ROOT, fast_backend
from verify import scenarios
from verify.report import html as html_report
from verify.report.tables import StepFiles

STEPS, SIZE = 100_000, 128
ELEMENTS = scenarios.element_count(scenarios.weight_shapes(SIZE))  # 119: five weights
MIB = 1024 ** 2
# What the harness must hold: the gradients, STEPS x ELEMENTS float64 = 91 MiB, twice
# (the scenario's array and the comparison's copy of all scenarios end to end): 182 MiB;
# with Python, numpy, pandas, matplotlib and the references the run peaked at 287 MiB
# (torch, on the loaded 2-core machine, 2 min 40 s).  Keeping trajectories would add
# 91 MiB per state and side: Keras's three Adam states alone (variable, momentum,
# velocity) 272 MiB, which with the inputs alone is 454 MiB, over BOUND_MB whatever the
# interpreter takes; BOUND_MB leaves the measured run 133 MiB of headroom.
# (The per-step tables the harness kept before took, per comparison in progress,
# (2 + 3 x states) columns x scenarios x 8 B per step, and a DataFrame copy at its
# end: 2 x 8.4 MiB here, 7 times that per comparison with every scenario.)
INPUTS_MB = 2 * STEPS * ELEMENTS * 8 / MIB
TRAJECTORY_MB = STEPS * ELEMENTS * 8 / MIB
BOUND_MB = 420


@pytest.mark.slow
def test_the_harness_stays_near_its_inputs_at_100000_steps(tmp_path):
    out = tmp_path / "report"
    code = ("import sys\n"
            "from verify.cli import main\n"
            "from verify.worker.messages import peak_memory_mb\n"
            "code = main(sys.argv[1:])\n"
            "print(peak_memory_mb())\n"
            "sys.exit(code)\n")
    done = subprocess.run(
        [sys.executable, "-c", code, "--backend", fast_backend(), "--family", "keras",
         "--optimizer", "adam", "--scenario", "gaussian", "--dtype", "float64", "--mode",
         "eager", "--steps", str(STEPS), "--size", str(SIZE), "--quiet", "--output", str(out)],
        capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    peak_mb = float(done.stdout.strip().splitlines()[-1])
    assert INPUTS_MB + 3 * TRAJECTORY_MB > BOUND_MB  # Keras's trajectories alone exceed it
    assert peak_mb < BOUND_MB, f"harness peak {peak_mb:.0f} MiB at {STEPS} steps"
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert {r["verdict"] for r in rows} <= {"exact", "match"} and rows[0]["steps"] == STEPS
    table = pd.read_csv(out / "steps" / "keras" / "adam" /
                        f"{fast_backend()}-float64-eager-gaussian.csv.gz")
    assert list(table.step) == list(range(STEPS + 1))  # every step is in the file


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.integers(1, 2000), st.data())
def test_binning_in_pieces_is_binning_the_whole(length, data):
    rng = np.random.default_rng(length)
    values = rng.uniform(0, 1, length)
    values[rng.integers(0, length, 3)] = [np.nan, np.inf, 5.0]
    values[rng.integers(0, length, 2)] = 5.0  # ties: the first stays
    step = np.arange(length)
    cuts = sorted(data.draw(st.lists(st.integers(0, length), max_size=8)))
    bins = html_report.Bins(length)
    for lo, hi in zip([0] + cuts, cuts + [length]):
        bins.add(step[lo:hi], values[lo:hi])
    got, want = bins.result(), _bin_max_whole(step, values)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_a_child_reports_its_own_peak_not_its_parents():
    """ru_maxrss survives vfork + exec: a child of a process holding 300 MiB reads
    300 MiB (the full test session's 637 MiB reading); peak_memory_mb must not."""
    held = np.ones(300 * MIB // 8)
    code = "from verify.worker.messages import peak_memory_mb; print(peak_memory_mb())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert held.sum() == held.size and float(done.stdout) < 150


def _bin_max_whole(step, values, points=html_report.POINTS):
    """Bins as it was written for a whole series (reshape into bins)."""
    values = np.where(np.isnan(values), np.inf, values)
    if len(values) <= points:
        return step, values
    size = -(-len(values) // points)
    padded = np.full(-(-len(values) // size) * size, -np.inf)
    padded[:len(values)] = values
    at = np.argmax(padded.reshape(-1, size), axis=1) + np.arange(0, len(padded), size)
    return step[at], values[at]


def test_binning_in_pieces_catches_a_changed_bin_size():
    """Sensitivity of the test above: Bins of another length bins otherwise."""
    step, values = np.arange(1000), np.random.default_rng(0).uniform(0, 1, 1000)
    bins = html_report.Bins(2000)
    bins.add(step, values)
    assert not np.array_equal(bins.result()[0], _bin_max_whole(step, values)[0])


def _chunk_tables(steps, names, chunk, seed=0):
    """Per-chunk tables as RunComparison hands them on, 2 scenarios."""
    rng = np.random.default_rng(seed)
    tables = []
    for start in range(0, steps, chunk):
        k = min(chunk, steps - start)
        t = {"step": np.arange(start, start + k), "drift": rng.uniform(0, 1, (k, 2))}
        for name in names:
            for metric in ("abs", "rel", "scaled"):
                t[(name, metric)] = np.where(rng.uniform(size=(k, 2)) < 0.01, np.inf,
                                             rng.lognormal(0, 20, (k, 2)))
        tables.append(t)
    return tables


def _whole_table_bytes(tables, s, folder, name) -> bytes:
    """What pandas writes for scenario s's whole table, as the file `name`."""
    whole = pd.DataFrame({"_".join(k) if isinstance(k, tuple) else k:
                          np.concatenate([t[k] if k == "step" else t[k][:, s] for t in tables])
                          for k in tables[0]})
    folder.mkdir(exist_ok=True)
    whole.to_csv(folder / name, index=False,
                 compression={"method": "gzip", "mtime": 0, "compresslevel": 6})
    return (folder / name).read_bytes()


def test_step_files_written_in_chunks_are_the_bytes_of_the_whole_table(tmp_path):
    """The per-step files the harness streams are those pandas wrote for the whole
    table (so reports stay byte-identical)."""
    tables = _chunk_tables(2345, ["variable", "momentum"], 50)
    paths = [tmp_path / f"{s}.csv.gz" for s in (0, 1)]
    files = StepFiles(paths, temporary=False)
    for t in tables:
        files(t)
    files.close()
    for s, path in enumerate(paths):
        assert path.read_bytes() == _whole_table_bytes(tables, s, tmp_path / "pandas",
                                                       path.name), s


def test_step_files_closed_without_pandas_flush_would_differ(tmp_path):
    """Sensitivity of the test above: the same rows closed without the flush pandas
    does are other bytes (the same text), which the comparison sees."""
    tables = _chunk_tables(300, ["variable"], 50)
    path = tmp_path / "0.csv.gz"
    files = StepFiles([path], temporary=False)
    for t in tables:
        files(t)
    files.streams[0].close()
    expected = _whole_table_bytes(tables, 0, tmp_path / "pandas", path.name)
    assert path.read_bytes() != expected
    assert gzip.decompress(path.read_bytes()) == gzip.decompress(expected)
