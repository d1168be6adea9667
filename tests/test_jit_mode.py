"""Mode jit, what model.compile(jit_compile=True) runs: XLA on TensorFlow,
torch.compile on torch; on JAX the compiled mode is already that computation
(runner.SAME_AS) and runs once.  The keras family agrees with it (specificity),
a reference with one real change does not (sensitivity), and the mode really
compiles: the backends' own evidence shows it, and a jit that silently ran eager
is an error, never a verdict."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import DESIGNS, designed, make_selection, needs, run_selection
from verify import cli, selection
from verify.runner import SAME_AS
from verify.scenarios import SCENARIOS

ROOT = Path(__file__).resolve().parent.parent
CONFIGURATIONS = ["adam", "sgd_momentum", "adam_accumulation", "adam_ema",
                  "lion_cosine_decay_warmup"]
PERTURBED = {"beta_1+1e-4": "adam", "momentum+1e-4": "sgd_momentum"}
OWN_JIT = [b for b in ("tensorflow", "torch") if b in selection.installed_backends()]


# Every run of plain `pytest` (pairwise): the two changed optimizers and one that torch
# recompiles, in the scenarios where compiled code rounds differently (fusion meeting
# epsilon: tiny; large values; IEEE specials: nonfinite); weekly (product) all of them.
PAIRWISE = {"configurations": ["adam", "sgd_momentum", "adam_ema"],
            "names": ["gaussian", "tiny", "large", "nonfinite"]}
EVERY = {"configurations": CONFIGURATIONS, "names": list(SCENARIOS)}


@pytest.fixture(scope="module", params=DESIGNS)
def jit_rows(backends, tmp_path_factory, request):
    """jit on every installed backend, 30 steps x 64 (JAX's jit is its compiled mode)."""
    out = tmp_path_factory.mktemp(f"jit-{request.param}")
    part = PAIRWISE if request.param == "pairwise" else EVERY
    parts = []
    for chosen, mode in ((backends, "jit"), (["jax"] if "jax" in backends else [], "compiled")):
        sel = designed(make_selection(chosen, ["keras", *PERTURBED], modes=[mode], steps=30,
                                      size=64, **part), request.param)
        if sel.runs():
            parts.append(run_selection(sel, out / mode))
    rows = pd.concat(parts, ignore_index=True)
    rows.attrs["configurations"] = part["configurations"]
    return rows


def jit_of(backend):
    """The mode that is jit_compile=True's computation on this backend."""
    return SAME_AS.get((backend, "jit"), ("jit",))[0]


# Found: torch.compile recompiles Keras's update at every step of these (Dynamo's guards
# fail anew each step) and gives up at its recompile limit, after which the update runs
# on eagerly, as under Keras's trainer; the harness judges that run and says so.
RECOMPILED_ON_TORCH = {"adam_accumulation", "adam_ema", "lion_cosine_decay_warmup"}


def test_keras_family_agrees_in_jit_mode_on_every_backend(jit_rows, backends):
    keras = jit_rows[jit_rows.family == "keras"]
    assert set(keras.dtype) == {"float32", "float64"}
    for backend in backends:
        mode = jit_of(backend)
        got = keras[(keras.backend == backend) & (keras["mode"] == mode)]
        assert set(got.optimizer) == set(jit_rows.attrs["configurations"]), (backend, mode)
        assert set(got.verdict) <= {"exact", "match"}, got[got.verdict.isin(
            ["mismatch", "error"])][["optimizer", "dtype", "scenario", "reason"]]
        recompiled = got.optimizer.isin(RECOMPILED_ON_TORCH) & (backend == "torch")
        said = got.reason.fillna("").str.contains(
            "hit Dynamo's recompile limit (8) at step 9: from there the update ran eagerly",
            regex=False)
        assert (said == recompiled).all(), got[said != recompiled][["optimizer", "reason"]]


def test_one_real_change_is_a_jit_mismatch_on_every_backend(jit_rows):
    """In every float64 run of the changed optimizer (on the product: on every backend)."""
    for family, optimizer in PERTURBED.items():
        runs = jit_rows[(jit_rows.family == "keras") & (jit_rows.optimizer == optimizer)
                        & (jit_rows.dtype == "float64")]
        got = jit_rows[(jit_rows.family == family) & (jit_rows.optimizer == optimizer)
                       & (jit_rows.dtype == "float64")]
        assert len(got) and set(got.backend) == set(runs.backend), family
        for backend, cell in got.groupby("backend"):
            assert (cell.verdict == "mismatch").any(), (family, backend)


def test_jax_jit_is_not_run_twice(jit_rows, backends):
    needs("jax")
    assert not len(jit_rows[(jit_rows.backend == "jax") & (jit_rows["mode"] == "jit")])
    sel = make_selection(["jax"], ["keras"], configurations=["adam"], modes=["jit"])
    assert sel.runs() == []


def test_a_selection_of_only_jax_jit_is_bad_input(tmp_path):
    needs("jax")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "verify.cli", "--backend", "jax", "--mode",
                           "jit", "--output", str(out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "jit on jax is compiled" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_jit_is_not_in_the_default_modes():
    args = cli.build_parser().parse_args(["--optimizer", "sgd", "--backend",
                                          selection.installed_backends()[0]])
    sel, _, _ = cli.selection_from_args(args)
    assert sel.modes == ["eager", "compiled"]


# One step of Adam through the worker's step function, in a fresh process. It prints,
# as JSON on its last line, what the backend itself reports: torch's Dynamo graphs and
# Inductor kernels since the step function was built, or the error the worker raised;
# TensorFlow's XLA logs "Compiled cluster using XLA" on stderr when it runs a cluster.
PROBE = r"""
import json, os, sys
backend, mode, eager_compile = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
os.environ["KERAS_BACKEND"] = backend
import numpy as np, keras
if eager_compile and backend == "torch":  # torch.compile that silently does nothing
    import torch
    torch.compile = lambda fn, **kwargs: fn
if eager_compile and backend == "tensorflow":  # tf.function without XLA
    import tensorflow as tf
    plain = tf.function
    tf.function = lambda fn, **kwargs: plain(fn, **{**kwargs, "jit_compile": False})
from verify.worker.run import Run
spec = {"scenarios": ["s"], "weights": [["w", [4]]], "dtype": "float32",
        "class_name": "Adam", "config": {}, "mode": mode}
grads = {"s": np.ones((2, 4))}
evidence = {}
try:
    run = Run(keras, spec, {"backend": backend}, grads, np.zeros(4))
    if backend == "torch":
        import torch._inductor.metrics as metrics
        from torch._dynamo.utils import counters
        graphs, kernels = counters["stats"]["unique_graphs"], metrics.generated_kernel_count
    run.step_fn(run._grads(0))
    if backend == "torch":
        evidence = {"graphs": counters["stats"]["unique_graphs"] - graphs,
                    "kernels": metrics.generated_kernel_count - kernels}
except RuntimeError as exc:
    evidence = {"error": str(exc)}
print(json.dumps(evidence))
"""


def probe(backend, mode, tmp_path, eager_compile=False):
    tmp_path.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), TF_CPP_MIN_LOG_LEVEL="0",
               TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"))
    proc = subprocess.run([sys.executable, "-c", PROBE, backend, mode,
                           "1" if eager_compile else "0"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr


@pytest.mark.parametrize("backend", OWN_JIT)
def test_jit_mode_really_compiles(backend, tmp_path):
    """The backend's own evidence of compilation is there in jit mode and not in
    compiled mode, the trainer's default (so the observation tells them apart)."""
    default = SAME_AS.get((backend, "compiled"), ("compiled",))[0]  # torch: eager
    for mode, compiles in ((default, False), ("jit", True)):
        evidence, stderr = probe(backend, mode, tmp_path / mode)
        assert "error" not in evidence, evidence
        if backend == "tensorflow":
            assert ("Compiled cluster using XLA" in stderr) == compiles, mode
        else:
            assert (evidence["graphs"] > 0 and evidence["kernels"] > 0) == compiles, (
                mode, evidence)


@pytest.mark.parametrize("backend", OWN_JIT)
def test_a_jit_that_runs_eagerly_is_an_error(backend, tmp_path):
    evidence, _ = probe(backend, "jit", tmp_path, eager_compile=True)
    assert evidence == {"error": f"jit mode ran uncompiled on {backend}"}


def test_jax_jit_shards_merge_and_check_without_its_cells(tmp_path, capsys):
    """A selection with jit on JAX has no JAX jit cell: merge and check expect none."""
    needs("jax")
    base = ["--backend", "jax", "--mode", "compiled,jit", "--optimizer", "nadam,adam",
            "--dtype", "float64", "--scenario", "gaussian", "--steps", "10", "--size", "8",
            "--family", "keras", "--quiet"]
    for k in (1, 2):
        assert cli.main(base + ["--shard", f"{k}/2", "--output", str(tmp_path / f"s{k}")]) == 0
    merged, baseline = tmp_path / "merged", tmp_path / "baseline"
    assert cli.main(["merge", str(tmp_path / "s1"), str(tmp_path / "s2"),
                     "--output", str(merged)]) == 0
    assert cli.main(["check", "--update-baseline", "--from", str(merged),
                     "--baseline", str(baseline)]) == 0
    assert cli.main(["check", "--from", str(merged), "--baseline", str(baseline)]) == 0
    assert "no change: all 2 cells" in capsys.readouterr().out
    assert set(pd.read_csv(baseline / "cells.csv")["mode"]) == {"compiled"}
