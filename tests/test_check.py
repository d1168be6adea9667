"""`verify-optimizers check`: cell classes, the baseline file, usage errors, and
sensitivity against real edits of Keras's source (a copy of the installed
package first on the workers' import path) with a small baseline made here
from the unedited Keras."""

import json
import shutil

import pandas as pd
import pytest

import check_edits
from verify import cli, output
from verify.commands import baseline, check
from verify.selection import installed_backends, settings_of
from conftest import make_selection, needs, own_modes

# Adam and the classes that share its code (AdamW, and adam_amsgrad: Adam with
# amsgrad), the optimizers issue 9 added that check_edits.EDITS edit, SGD
# with momentum, which no edit touches, the configurations with a schedule, and the
# base-optimizer stages' configurations the edits of base_optimizer.py and JAX's
# optimizer.py move (all on Adam).
OPTIMIZERS = ["adam", "adamw", "adam_amsgrad", "adamax", "adadelta", "ftrl", "lamb",
              "sgd_momentum"] + check_edits.SCHEDULED + [
              "adam_clipnorm", "adam_ema", "adam_accumulation", "adam_loss_scale_factor"]
SCENARIOS = ["gaussian", "tiny", "sparse"]
SMALL = ["--family", "keras", "--optimizer", ",".join(OPTIMIZERS), "--scenario",
         ",".join(SCENARIOS), "--steps", "12", "--size", "8", "--quiet"]


# --- cell classes -------------------------------------------------------------
def cell(verdict="match", step="", state="", magnitude=None, reason="", **where):
    base = dict(family="keras", optimizer="adam", backend="torch", dtype="float32",
                mode="eager", scenario="gaussian")
    base.update(where)
    return {**base, "verdict": verdict, "first_divergent_step": step, "divergent_state": state,
            "magnitude": magnitude or baseline.magnitude(verdict, None), "reason": reason}


def test_magnitude_is_the_decade_of_a_mismatch():
    assert (baseline.magnitude("mismatch", 1.0e-3) == baseline.magnitude("mismatch", 9.9e-3)
            == "1e-03")
    assert baseline.magnitude("mismatch", 1.0e-2) == "1e-02"
    assert baseline.magnitude("mismatch", 2.0) == "1e+00"
    assert baseline.magnitude("mismatch", "inf") == baseline.magnitude("mismatch", None) == "inf"
    assert [baseline.magnitude(v, 0.5) for v in ("exact", "match", "error")] == [
        "exact", "rounding", "error"]


def test_unchanged_cells_are_no_change():
    cells = [cell(), cell("mismatch", 3, "velocity", "1e-05", scenario="tiny"),
             cell("error", reason="worker failed", scenario="sparse")]
    assert baseline.compare_cells(cells, [dict(c) for c in cells]) == []
    other_error_text = [dict(c) for c in cells]
    other_error_text[2]["reason"] = "another message"
    assert baseline.compare_cells(cells, other_error_text) == []


def test_exact_match_flip_is_reported_and_fails_only_when_strict():
    changes = baseline.compare_cells([cell("exact")], [cell("match")])
    assert [(c.what, c.fails) for c in changes] == [("rounding only (exact <-> match)", False)]
    assert baseline.compare_cells([cell("exact")], [cell("match")], strict=True)[0].fails


@pytest.mark.parametrize("after,what", [
    (cell("match"), "verdict"),
    (cell("error", reason="boom"), "verdict"),
    (cell("mismatch", 2, "momentum", "1e-03"), "first divergent step, divergent state"),
    (cell("mismatch", 1, "velocity", "1e-02"), "magnitude"),
    (cell("mismatch", 1, "velocity", "1e-03", reason="Keras state not in the reference: x."),
     "unmatched states"),
])
def test_every_math_class_change_fails(after, what):
    before = cell("mismatch", 1, "velocity", "1e-03")
    changes = baseline.compare_cells([before], [after])
    assert [(c.what, c.fails) for c in changes] == [(what, True)]


def test_a_new_deviation_and_a_fixed_one_both_fail():
    fixed = baseline.compare_cells([cell("mismatch", 1, "velocity", "1e-03")], [cell("exact")])
    new = baseline.compare_cells([cell("exact")], [cell("mismatch", 1, "velocity", "1e-03")])
    assert fixed[0].fails and new[0].fails and fixed[0].what == new[0].what == "verdict"


def test_a_missing_cell_fails():
    changes = baseline.compare_cells([cell(), cell(scenario="tiny")], [cell()])
    assert [(baseline.cell_id(c.cell), c.fails) for c in changes] == [
        ("keras-adam-torch-float32-eager-tiny", True)]


# --- the baseline file and usage errors (no run) -----------------------------
@pytest.fixture
def fake_baseline(tmp_path):
    """A well-formed baseline written without running anything."""
    sel = make_selection(installed_backends()[:1], ["keras"], configurations=["sgd"],
                         dtypes=["float32"], modes=["eager"], names=["gaussian", "tiny"],
                         steps=5, size=4)
    settings = settings_of(sel, ["csv"])
    cells = [cell(backend=sel.backends[0], optimizer="sgd", scenario=s)
             for s in ("gaussian", "tiny")]
    path = tmp_path / "baseline"
    baseline.write_baseline(path, settings, {"keras": "x", "backends": {}}, cells)
    return path


def run_cli(argv, capsys):
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_written_baseline_reads_back(fake_baseline):
    b = baseline.load_baseline(fake_baseline)
    assert [c["scenario"] for c in b.cells] == ["gaussian", "tiny"]
    assert (fake_baseline / "cells.csv").read_text().splitlines()[0] == ",".join(baseline.COLUMNS)


# the edits below are signed as the harness's (output.write_marker): what is tested is
# the reading of a baseline the harness wrote malformed, not its digests
def _edit_json(path, change):
    meta = json.loads((path / "baseline.json").read_text())
    change(meta)
    (path / "baseline.json").write_text(json.dumps(meta))
    output.write_marker(path, "baseline")


def _edit_cells(path, change):
    lines = (path / "cells.csv").read_text().splitlines()
    (path / "cells.csv").write_text("\n".join(change(lines)) + "\n")
    output.write_marker(path, "baseline")


MALFORMED = {
    "no baseline at": lambda p: shutil.rmtree(p),
    "cells.csv is missing": lambda p: (p / "cells.csv").unlink(),
    "baseline.json is not JSON": lambda p: (
        (p / "baseline.json").write_text("{"), output.write_marker(p, "baseline")),
    "settings lack `steps`": lambda p: _edit_json(p, lambda m: m["settings"].pop("steps")),
    "has format": lambda p: _edit_json(p, lambda m: m.update(format=99)),
    "cells.csv header": lambda p: _edit_cells(p, lambda ls: ["a,b"] + ls[1:]),
    "unknown verdict 'fine'": lambda p: _edit_cells(
        p, lambda ls: ls[:1] + [ls[1].replace(",match,", ",fine,")] + ls[2:]),
    "lacks 1 cell(s)": lambda p: _edit_cells(p, lambda ls: ls[:2]),
    "duplicate cell": lambda p: _edit_cells(p, lambda ls: ls[:2] + ls[1:2]),
    "a mismatch needs an integer first_divergent_step": lambda p: _edit_cells(
        p, lambda ls: ls[:1] + [ls[1].replace(",match,,,rounding,", ",mismatch,,x,1e-03,")]
        + ls[2:]),
}


@pytest.mark.parametrize("message", list(MALFORMED))
def test_malformed_baseline_is_exit_2_with_what_is_wrong(fake_baseline, capsys, message):
    MALFORMED[message](fake_baseline)
    code, out, err = run_cli(["check", "--baseline", str(fake_baseline)], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err


IRREPRODUCIBLE = {
    "differs from the baseline's 5": ["--steps", "6"],
    "optimizer 'adam' is not in the baseline": ["--optimizer", "adam"],
    "--gradients is not supported": ["--gradients", "g.npy"],
}


@pytest.mark.parametrize("message", list(IRREPRODUCIBLE))
def test_settings_outside_the_baseline_are_exit_2(fake_baseline, capsys, message):
    code, out, err = run_cli(["check", "--baseline", str(fake_baseline)]
                             + IRREPRODUCIBLE[message], capsys)
    assert code == 2 and message in err, err


@pytest.mark.parametrize("key,change", [
    ("configuration 'sgd'", lambda s: s["configurations"]["sgd"]["config"].update(
        learning_rate=0.1)),
    ("tolerance", lambda s: s.update(tolerance=1.0)),
    ("precision setting", lambda s: s["precision"].update(
        {b: "other" for b in s["backends"]})),
    ("its scenario 'nope'", lambda s: s["scenarios"].append("nope")),
])
def test_settings_this_checkout_cannot_reproduce_are_exit_2(fake_baseline, capsys, key, change):
    _edit_json(fake_baseline, lambda m: change(m["settings"]))
    if key.startswith("its scenario"):  # keep the cells consistent with the settings
        _edit_cells(fake_baseline, lambda ls: ls + [ls[1].replace(",tiny,", ",nope,")
                                                    .replace(",gaussian,", ",nope,")])
    code, out, err = run_cli(["check", "--baseline", str(fake_baseline)], capsys)
    assert code == 2 and "cannot reproduce the baseline" in err and key in err, err


def test_a_baseline_backend_that_is_not_installed_is_named(fake_baseline, capsys, monkeypatch):
    backend = json.loads((fake_baseline / "baseline.json").read_text())["settings"]["backends"][0]
    monkeypatch.setattr(check, "installed_backends",
                        lambda: [b for b in installed_backends() if b != backend])
    code, out, err = run_cli(["check", "--baseline", str(fake_baseline)], capsys)
    assert code == 2 and f"backend {backend} is not installed" in err, err


# --- sensitivity: real edits of Keras ---------------------------------------
@pytest.fixture(scope="module")
def small_baseline(tmp_path_factory, request):
    """The small baseline; when only the EVERY_RUN edits run, of their optimizers alone."""
    edits = {item.callspec.params["edit"].name for item in request.session.items
             if getattr(item, "originalname", "") == EDIT_TEST}
    flags = SMALL if edits - EVERY_RUN else [
        *SMALL[:2], "--optimizer", ",".join(EVERY_RUN_OPTIMIZERS), *SMALL[4:]]
    return check_edits.written_baseline(tmp_path_factory.mktemp("check"), flags)


def changed(output):
    df = pd.read_csv(output / "changes.csv", keep_default_na=False)
    cells = [dict(zip(baseline.CELL, c.split("-"))) for c in df.cell]
    return [(c["optimizer"], c["backend"], c["dtype"], c["mode"], c["scenario"], f)
            for c, f in zip(cells, df.fails.astype(str) == "True")]


# Every plain `pytest` checks one edit, seen on all three backends (Adam's default, which
# torch's kernel reads too); every edit runs weekly (slow), and the pristine copy below
# is every run's specificity.
EVERY_RUN = {"changed-default"}
# Adam (whose default it edits; the configurations of Adam with a base-optimizer stage or
# a schedule weekly), and three it must leave alone: AdamW and adam_amsgrad give beta_2
# themselves, no edit touches SGD
EVERY_RUN_OPTIMIZERS = ["adam", "adamw", "adam_amsgrad", "sgd_momentum"]


EDIT_TEST = "test_the_check_fails_on_exactly_the_cells_an_edit_of_keras_changes"


@pytest.mark.parametrize("edit", [
    pytest.param(e, id=e.name, marks=() if e.name in EVERY_RUN else pytest.mark.slow)
    for e in check_edits.EDITS])
def test_the_check_fails_on_exactly_the_cells_an_edit_of_keras_changes(
        small_baseline, tmp_path, capsys, edit):
    assert {o for o, _ in edit.changes} <= set(OPTIMIZERS), "the small baseline lacks them"
    # the edit is only seen on the backends it needs: without one of them, the cells
    # that must fail (or the rounding that must move) are not in the run at all
    settings = baseline.load_baseline(small_baseline).settings
    missing = sorted(edit.needs - set(settings["backends"]))
    needs(*missing)
    site = check_edits.edited_keras(edit, tmp_path)
    output = tmp_path / "run"
    code, out, err = run_cli(["check", "--baseline", str(small_baseline), "--keras-path",
                              str(site), "--output", str(output), "--quiet"], capsys)
    got = changed(output) if (output / "changes.csv").exists() else []
    failing = {(o, b, d, m, s) for o, b, d, m, s, f in got if f}
    if edit.changes:
        assert code == 1, out + err
        cells = {(o, b, d, m, s) for o, b in edit.changes if o in settings["optimizers"]
                 for d in ("float32", "float64") for m in own_modes(b) for s in SCENARIOS}
        assert cells, "the baseline has none of the optimizers the edit changes"
        must = {c for c in cells if c[2] in edit.must_fail_in(c[0], c[1])}
        assert must <= failing, sorted(must - failing)         # sensitivity
        outside = {c[:5] for c in got} - cells
        assert not outside, sorted(outside)                    # specificity: nothing else moves
        assert "changed their math class" in out and "Per-step detail of keras-" in out
    else:
        # the math is kept: no failure, but the edited copy was used (rounding moved)
        assert code == 0 and not failing, out + err
        assert got and "no math change" in out, out


def test_the_pristine_copy_shows_no_change(small_baseline, tmp_path, capsys):
    site = check_edits.edited_keras(check_edits.Edit("none", ()), tmp_path)
    code, out, err = run_cli(["check", "--baseline", str(small_baseline), "--keras-path",
                              str(site), "--output", str(tmp_path / "run"), "--quiet",
                              "--optimizer", "adam", "--backend", installed_backends()[0]],
                             capsys)
    assert code == 0 and out.startswith("no change"), out + err
