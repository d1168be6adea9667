"""Mode fit, a real model.fit through Keras's trainer (verify/worker/fit.py): the keras
family agrees with it on every backend (specificity), a reference with one real
change does not (sensitivity).  A gradient fit applied that is not the intended one
(another gradient, a loss scale the trainer did not apply) is an error with that
reason, never a verdict; weights fit leaves other than finalize_variable_values writes
(the EMA not written at the end of fit) are reported with the weight and the step, a
divergence at the last step (tests/test_check_training.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DESIGNS, designed, make_selection, run_selection
from verify import cli, selection
from verify.worker.gradients import intended

ROOT = Path(__file__).resolve().parent.parent
CONFIGURATIONS = ["adam", "adam_ema", "loss_scale_adam", "adam_accumulation",
                  "adam_loss_scale_factor"]
PERTURBED = "beta_1+1e-4"  # Adam's beta_1 shifted (tests/perturbations.py)


@pytest.fixture(scope="module", params=DESIGNS)
def fit_rows(backends, tmp_path_factory, request):
    """fit on every installed backend, both dtypes, every scenario, 25 steps x 24:
    25 is not a multiple of steps_per_execution, so the last execution is partial."""
    sel = make_selection(backends, ["keras", PERTURBED], configurations=CONFIGURATIONS,
                         modes=["fit"])
    return run_selection(designed(sel, request.param),
                         tmp_path_factory.mktemp(f"fit-{request.param}"))


def test_keras_family_agrees_in_fit_mode_on_every_backend(fit_rows, backends):
    keras = fit_rows[fit_rows.family == "keras"]
    for backend in backends:
        got = keras[keras.backend == backend]
        assert set(got.optimizer) == set(CONFIGURATIONS), backend
        assert set(got.dtype) == {"float32", "float64"}, backend
        assert set(got.verdict) <= {"exact", "match"}, got[got.verdict.isin(
            ["mismatch", "error"])][["optimizer", "dtype", "scenario", "reason"]]


def test_one_real_change_is_a_fit_mismatch_on_every_backend(fit_rows):
    """In every float64 run of Adam (on the product: on every backend)."""
    float64 = fit_rows[(fit_rows.optimizer == "adam") & (fit_rows.dtype == "float64")]
    got = float64[float64.family == PERTURBED]
    assert len(got) and set(got.backend) == set(float64.backend)
    for backend, cell in got.groupby("backend"):
        assert (cell.verdict == "mismatch").any(), backend


def test_the_comparison_feeds_the_gradient_times_loss_scale_factor():
    g = np.array([[1.0, 3.0e38, -2.0 ** -140]])
    got = intended(g, {"loss_scale_factor": 128.0}, "float32")
    assert got.dtype == np.float32
    with np.errstate(over="ignore"):
        assert got.tobytes() == (g.astype(np.float32) * np.float32(128)).tobytes()
    assert intended(g, {"learning_rate": 0.01}, "float32") is g


def test_fit_is_not_in_the_default_modes():
    args = cli.build_parser().parse_args(["--optimizer", "sgd", "--backend",
                                          selection.installed_backends()[0]])
    sel, _, _ = cli.selection_from_args(args)
    assert "fit" not in sel.modes and "fit" in selection.MODES


# One fit run of the worker in a fresh process, with one thing changed: "data" feeds
# one element of step 5 one ulp off the scenario's; "unscaled" makes the trainer's
# scale_loss return the loss unscaled; "no-finalize" makes finalize_variable_values do
# nothing.  It prints, as JSON on its last line, the error the run raised, or what
# its run_end message says fit left unfinalised (or nothing).
PROBE = r"""
import io, json, os, sys
backend, change, class_name, config = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
os.environ["KERAS_BACKEND"] = backend
import numpy as np, keras
from verify.worker import fit
if change == "data":
    data = fit.FitRun._data
    def perturbed(self, steps):
        rows = data(self, steps)
        rows[4, 0] = np.nextafter(rows[4, 0], np.inf)
        return rows
    fit.FitRun._data = perturbed
if change == "unscaled":
    keras.optimizers.LossScaleOptimizer.scale_loss = lambda self, loss: loss
if change == "no-finalize":
    keras.optimizers.Optimizer.finalize_variable_values = lambda self, var_list: None
spec = {"id": 0, "scenarios": ["s"], "weights": [["w", [4]], ["m", [2, 3]]],
        "dtype": "float32", "class_name": class_name, "config": json.loads(config),
        "mode": "fit"}
rng = np.random.default_rng(0)
grads = {"s": rng.normal(size=(25, 10))}
run = fit.FitRun(keras, spec, {"backend": backend}, grads, rng.normal(size=10))
out = io.BytesIO()
try:
    run.execute(out, 25, 10)
except fit.FitCheckFailed as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit(0)
from verify.worker.messages import read_message
out.seek(0)
while (message := read_message(out)) is not None:
    header = message[0]
found = header["unfinalised"]
print(json.dumps({"unfinalised": found[0]["text"]} if found else {}))
"""
CHANGES = {
    "none": ("Adam", {"learning_rate": 0.01}, None, None),
    "data": ("Adam", {"learning_rate": 0.01},
             "error", "fit applied another gradient than intended at step 5 to s_w"),
    "unscaled": ("LossScaleOptimizer", {"inner_optimizer": {"class_name": "Adam",
                                                            "config": {}}},
                 "error", "fit applied another gradient than intended at step 1 to s_w"),
    "no-finalize": ("Adam", {"use_ema": True, "ema_momentum": 0.9},
                    "unfinalised", "fit did not finalise: the weights s_w after fit are not the EMA "
                    "average of its last step, 25, as finalize_variable_values writes "
                    "them (element 0: "),
}


def probe(backend, change, tmp_path):
    class_name, config, *_ = CHANGES[change]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", PROBE, backend, change, class_name,
                           json.dumps(config)], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("change", list(CHANGES))
def test_what_fit_applied_or_left_is_checked_bit_for_bit(change, tmp_path):
    installed = selection.installed_backends()
    backend = "torch" if "torch" in installed else installed[0]
    got = probe(backend, change, tmp_path)
    _, _, kind, expected = CHANGES[change]
    if expected is None:
        assert got == {}
    else:
        assert list(got) == [kind] and got[kind].startswith(expected), got
