"""`verify-optimizers check` on the training paths, modes fit and resume: a small
baseline of both modes made here from the unedited Keras; a copy of Keras whose fit
leaves the weights unfinalised (finalize_variable_values without the EMA overwrite)
and whose save stores the momentum slots as zeros fails the check on exactly the
cells those change (sensitivity): adam_ema's fit cells mismatch at the last step, in
the weights, with the reason naming the weight, the resume cells of both configurations mismatch at the
first step after loading the .keras file, in momentum; nothing else moves, and an
unedited copy changes nothing (specificity)."""

import pandas as pd
import pytest

import check_edits
from verify import cli
from verify.commands import baseline
from verify.selection import installed_backends
from verify.worker.resume import interruptions

pytestmark = pytest.mark.slow  # a training baseline and two checks on every backend: weekly

STEPS = 12  # not a multiple of adam_ema's ema_overwrite_frequency (10): fit's last
# step leaves the weights apart from the average, which only the finalisation writes
K1, _ = interruptions(STEPS)
OPTIMIZERS = ["adam_ema", "sgd_momentum"]
SCENARIOS = ["gaussian", "tiny"]
SMALL = ["--family", "keras", "--optimizer", ",".join(OPTIMIZERS), "--scenario",
         ",".join(SCENARIOS), "--mode", "fit,resume", "--dtype", "float64", "--steps",
         str(STEPS), "--size", "8", "--quiet"]
FINALISATION = ("            self._overwrite_model_variables_with_average_value(var_list)\n")
NOT_FINALISED_AND_SLOT_LOST = check_edits.Edit("not-finalised-and-slot-lost", (
    (check_edits.BASE, FINALISATION, "            pass\n"),
    (check_edits.BASE, "            store[str(i)] = variable.numpy()\n",
     '            store[str(i)] = variable.numpy() * 0 if variable.name.endswith('
     '"_momentum") else variable.numpy()\n')))


@pytest.fixture(scope="module")
def training_baseline(tmp_path_factory):
    return check_edits.written_baseline(tmp_path_factory.mktemp("check-training"), SMALL)


def test_a_fit_not_finalised_and_a_save_losing_a_slot_fail_exactly_their_cells(
        training_baseline, tmp_path, capsys):
    site = check_edits.edited_keras(NOT_FINALISED_AND_SLOT_LOST, tmp_path)
    output = tmp_path / "run"
    code = cli.main(["check", "--baseline", str(training_baseline), "--keras-path", str(site),
                     "--output", str(output), "--quiet"])
    out = capsys.readouterr().out
    assert code == 1, out
    changes = pd.read_csv(output / "changes.csv", keep_default_na=False)
    changes[list(baseline.CELL)] = changes.cell.str.split("-", expand=True)
    assert (changes.fails.astype(str) == "True").all(), changes
    backends = installed_backends()
    fit = changes[changes["mode"] == "fit"]
    assert set(zip(fit.optimizer, fit.backend, fit.dtype, fit.scenario)) == {
        ("adam_ema", b, "float64", s) for b in backends for s in SCENARIOS}
    assert (fit.baseline_verdict.isin(["exact", "match"])).all()
    assert (fit.now_verdict == "mismatch").all(), fit.now_verdict
    assert (fit.now_first_divergent_step.astype(int) == STEPS).all()
    assert (fit.now_divergent_state == "variable").all()
    assert all(r.startswith(f"fit did not finalise: the weights {s}_")
               for r, s in zip(fit.now_reason, fit.scenario)), fit.now_reason
    assert fit.now_reason.str.contains(f"not the EMA average of its last step, {STEPS}, ").all()
    resume = changes[changes["mode"] == "resume"]
    assert set(zip(resume.optimizer, resume.backend, resume.dtype, resume.scenario)) == {
        (o, b, "float64", s) for o in OPTIMIZERS for b in backends for s in SCENARIOS}
    assert (resume.now_verdict == "mismatch").all(), resume.now_verdict
    assert (resume.now_first_divergent_step.astype(int) == K1 + 1).all()
    assert (resume.now_divergent_state == "momentum").all(), resume.now_divergent_state


def test_an_unedited_keras_changes_no_training_cell(training_baseline, tmp_path, capsys):
    site = check_edits.edited_keras(check_edits.Edit("none", ()), tmp_path)
    code = cli.main(["check", "--baseline", str(training_baseline), "--keras-path", str(site),
                     "--output", str(tmp_path / "run"), "--quiet", "--backend",
                     installed_backends()[0]])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("no change"), out
