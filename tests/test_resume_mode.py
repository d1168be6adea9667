"""Mode resume: saved after steps//3 to .keras (model.save, load_model) and after
2*steps//3 to weights (save_weights, load_weights into a new model), each loaded in a
fresh process.  Plain Adam goes on exactly as if uninterrupted on every backend
(specificity); a save that loses a slot or the iteration count, in an edited copy of
Keras, is caught at the first step after loading, with the state named (sensitivity)."""

import numpy as np
import pytest

import check_edits
from conftest import DESIGNS, fast_backend, make_selection, run_selection
from verify import cli, selection
from verify.worker.resume import ResumeRun, interruptions

STEPS = 30
K1, K2 = interruptions(STEPS)
SAVE_LINE = "            store[str(i)] = variable.numpy()\n"


def saved_as(condition, value):
    """An edit of the optimizer's save_own_variables: `value` stored instead of the
    variable's value where `condition` holds (loading is untouched)."""
    return check_edits.Edit(f"saved-{condition}", ((
        check_edits.BASE, SAVE_LINE,
        f"            store[str(i)] = {value} if {condition} else variable.numpy()\n"),))


DROPPED_MOMENTUM = saved_as('variable.name.endswith("_momentum")', "variable.numpy() * 0")
RESET_ITERATION = saved_as('variable.name == "iteration"', "variable.numpy() * 0")


def test_interruptions_are_a_third_and_two_thirds_of_the_run():
    assert (K1, K2) == (10, 20)
    assert interruptions(100) == (33, 66)


def test_the_stream_is_each_process_s_own_segment():
    def part(first_step, last_step):
        steps = np.arange(first_step, last_step + 1, dtype=float)[:, None]
        return {"0/m": steps}, np.arange(first_step, last_step + 1)

    mine, first, second = part(0, 9), part(3, 9), part(6, 9)
    first[0]["0/m"] = first[0]["0/m"] + 100  # the first resumed process's own values
    states, iterations = ResumeRun.assemble(mine, first, second, 3, 6)
    assert states["0/m"].ravel().tolist() == [0, 1, 2, 3, 104, 105, 106, 7, 8, 9]
    assert iterations.tolist() == list(range(10))
    lost = ({}, second[1])  # a state the last process lacks is NaN in its part
    states, _ = ResumeRun.assemble(mine, first, lost, 3, 6)
    assert np.isnan(states["0/m"][7:]).all() and not np.isnan(states["0/m"][:7]).any()


def test_resume_is_a_mode_not_in_the_default_run():
    args = cli.build_parser().parse_args(["--optimizer", "adam", "--mode", "resume",
                                          "--backend", selection.installed_backends()[0]])
    assert cli.selection_from_args(args)[0].modes == ["resume"]
    args = cli.build_parser().parse_args(["--optimizer", "adam", "--backend",
                                          selection.installed_backends()[0]])
    assert "resume" not in cli.selection_from_args(args)[0].modes


def resumed_rows(backends, out, site=None, configurations=("adam",), modes=("eager", "resume"),
                 dtypes=("float32", "float64"), only=None):
    sel = make_selection(backends, ["keras"], configurations=list(configurations),
                         modes=list(modes), dtypes=list(dtypes), names=["gaussian"],
                         steps=STEPS, size=16, only=only,
                         **({"python_path": [str(site)]} if site else {}))
    return run_selection(sel, out)


@pytest.mark.parametrize("design", DESIGNS)
def test_adam_resumes_exactly_on_every_backend(backends, tmp_path, design):
    """Each backend in one dtype, the dtypes taken in turn (every dtype weekly: product)."""
    dtypes = ("float32", "float64")
    only = None if design == "product" else frozenset(
        ("adam", b, dtypes[i % 2], m) for i, b in enumerate(backends) for m in ("eager", "resume"))
    rows = resumed_rows(backends, tmp_path, only=only)
    assert len(rows) == (len(only) if only else 2 * 2 * len(backends))
    assert set(rows.backend) == set(backends)
    for (backend, dtype), cell in rows.groupby(["backend", "dtype"]):
        eager = cell[cell["mode"] == "eager"].iloc[0]
        resumed = cell[cell["mode"] == "resume"].iloc[0]
        assert resumed.verdict == eager.verdict and resumed.verdict in ("exact", "match"), (
            backend, dtype, resumed.reason)
        # bit for bit as the uninterrupted run, on both save paths: no finding
        assert not isinstance(resumed.serialization, str) or not resumed.serialization, (
            backend, dtype, resumed.serialization)


@pytest.mark.parametrize("edit, state, finding", [
    (DROPPED_MOMENTUM, "momentum", "momentum of gaussian_"),
    (RESET_ITERATION, "variable", "iterations"),
])
def test_a_save_that_loses_state_is_caught_after_loading(tmp_path, edit, state, finding):
    site = check_edits.edited_keras(edit, tmp_path)
    rows = resumed_rows([fast_backend(prefer=("jax", "torch", "tensorflow"))], tmp_path / "out", site, dtypes=["float64"])
    eager = rows[rows["mode"] == "eager"].iloc[0]
    assert eager.verdict in ("exact", "match")  # the edit changes saving alone
    resumed = rows[rows["mode"] == "resume"].iloc[0]
    assert resumed.verdict == "mismatch"
    assert resumed.first_divergent_step == K1 + 1 and resumed.divergent_state == state
    assert resumed.serialization.startswith(
        f"resumed from model.save(.keras) and keras.models.load_model at step {K1}: ")
    assert f"{finding}" in resumed.serialization.split(";")[0]
    assert f"from step {K1} (on loading)" in resumed.serialization
    assert f"at step {K2}: " in resumed.serialization  # the weights path loses it too


def test_the_keras_file_loses_the_exclusion_from_weight_decay(tmp_path):
    """Found (Keras 3.15.1, every backend): exclude_from_weight_decay is a method call
    that get_config does not record, so the optimizer load_model rebuilds decays the
    excluded weight from the first step after loading; the weights path, whose
    optimizer the user builds, keeps it."""
    rows = resumed_rows([fast_backend(prefer=("jax", "torch", "tensorflow"))], tmp_path, configurations=["adamw_exclude"],
                        modes=["resume"], dtypes=["float32"])
    resumed = rows.iloc[0]
    assert resumed.verdict == "mismatch" and resumed.first_divergent_step == K1 + 1
    assert (f"resumed from model.save(.keras) and keras.models.load_model at step {K1}: "
            f"variable of gaussian_vector differs from the uninterrupted run from step "
            f"{K1 + 1} (the first step after loading)") in resumed.serialization
    assert "load_weights" not in resumed.serialization


def test_a_finding_names_the_step_the_state_a_dtype_and_a_warning():
    run = ResumeRun.__new__(ResumeRun)  # finding reads only the places' paths
    run.places = [("gaussian_vector", (2,), "gaussian", 0, 2)]
    rows = np.arange(8.0).reshape(4, 2)
    before = ({"0/variable": rows, "0/momentum": rows + 10, "g/average": rows[:, :1]},
              np.arange(4), {"0/variable": "float64", "0/momentum": "float64",
                             "g/average": "float32"}, [])
    same = ({n: v[1:] for n, v in before[0].items()}, before[1][1:], before[2], [], [])
    assert run.finding("keras", 1, before, same, 1) is None
    zeroed = {**same[0], "0/momentum": np.zeros((3, 2))}
    text = run.finding("keras", 1, before, (zeroed, same[1], {**same[2], "0/momentum":
                                                              "float32"}, [], ["w"]), 1)
    assert text == ("resumed from model.save(.keras) and keras.models.load_model at step 1: "
                    "Keras warns 'w'; momentum of gaussian_vector is float32 after loading, "
                    "float64 before; momentum of gaussian_vector differs from the "
                    "uninterrupted run from step 1 (on loading)")
    reset = ({n: v for n, v in same[0].items() if n != "g/average"}, same[1] - 1, same[2],
             [], [])
    text = run.finding("weights", 1, before, reset, 1)
    assert "the loaded optimizer has no average" in text
    assert "iterations differs from the uninterrupted run from step 1 (on loading)" in text
