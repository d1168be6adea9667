"""The make_moons convergence experiment: claim criteria on synthetic curves,
stacked seeds against separate article models, plotting, the moons gradient
scenario, and the command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import reference
from verify import scenarios
from verify.cli import main as cli_main
from verify.configurations import CONFIGURATIONS, Configuration
from verify.convergence import claims, cli, runner
from verify.convergence.worker import THREAD_ENV
from verify.output import write_marker
from verify.selection import installed_backends

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = installed_backends()
needs_extra = pytest.mark.needs("sklearn", "matplotlib")  # the convergence extra

CLAIM = {c["id"]: c for c in claims.CLAIMS}
EPOCHS = 100


# --- synthetic curves ------------------------------------------------------------

def decay(reach_epoch=None, start=0.7, epochs=EPOCHS, floor=0.001):
    """A smooth decreasing curve whose first epoch below NEAR_ZERO is reach_epoch
    (None: it stays above it)."""
    if reach_epoch is None:
        return np.linspace(start, 2 * claims.NEAR_ZERO, epochs)
    k = np.log(start / claims.NEAR_ZERO) / (reach_epoch - 1 - 0.5)
    return np.maximum(start * np.exp(-k * np.arange(epochs)), floor)


def bump(curve, at=60, height=0.1):
    curve = curve.copy()
    curve[at] += height
    return curve


def synthetic(per_config, seeds=3, backends=("tensorflow", "torch")):
    """per_config: id -> one curve (every seed) or a list of per-seed curves."""
    out = {}
    for b in backends:
        out[b] = {}
        for cid, curve in per_config.items():
            rows = curve if isinstance(curve, list) else [curve] * seeds
            out[b][cid] = np.array(rows, dtype=float)
    return out


FAST, SLOW = decay(10), decay(None)
CASES = [
    # (label, claim, curves, expected verdict)
    ("faster", "momentum_speeds_up", {"sgd_momentum": FAST, "sgd": SLOW}, "holds"),
    ("slower", "momentum_speeds_up", {"sgd_momentum": SLOW, "sgd": FAST}, "does not hold"),
    ("slower", "adagrad_slower_than_sgd", {"adagrad": SLOW, "sgd": FAST}, "holds"),
    ("faster", "adagrad_slower_than_sgd", {"adagrad": FAST, "sgd": SLOW}, "does not hold"),
    ("bump-0.1", "rmsprop_not_stable", {"rmsprop": bump(FAST)}, "holds"),
    ("smooth", "rmsprop_not_stable", {"rmsprop": FAST}, "does not hold"),
    ("bump-0.049", "rmsprop_not_stable", {"rmsprop": bump(FAST, height=0.049)}, "does not hold"),
    ("reaches-at-40", "rmsprop_near_zero_around_40", {"rmsprop": decay(40)}, "holds"),
    ("reaches-at-30", "rmsprop_near_zero_around_40", {"rmsprop": decay(30)}, "holds"),
    ("reaches-at-50", "rmsprop_near_zero_around_40", {"rmsprop": decay(50)}, "holds"),
    ("reaches-at-20", "rmsprop_near_zero_around_40", {"rmsprop": decay(20)}, "does not hold"),
    ("reaches-at-60", "rmsprop_near_zero_around_40", {"rmsprop": decay(60)}, "does not hold"),
    ("never", "rmsprop_near_zero_around_40", {"rmsprop": SLOW}, "does not hold"),
    ("faster-than-both", "rmsprop_much_faster", {"rmsprop": FAST, "adagrad": SLOW, "sgd": SLOW}, "holds"),
    ("not-much-faster-than-sgd", "rmsprop_much_faster", {"rmsprop": FAST, "adagrad": SLOW, "sgd": FAST * 1.5},
     "does not hold"),
    ("faster", "centered_momentum_faster",
     {"rmsprop_momentum_centered": FAST, "rmsprop": decay(30)}, "holds"),
    ("slower", "centered_momentum_faster",
     {"rmsprop_momentum_centered": decay(30), "rmsprop": FAST}, "does not hold"),
    ("bump-0.1", "centered_momentum_not_stable", {"rmsprop_momentum_centered": bump(FAST)}, "holds"),
    ("smooth", "centered_momentum_not_stable", {"rmsprop_momentum_centered": FAST}, "does not hold"),
    ("smooth", "adam_smooth", {"adam": FAST}, "holds"),
    ("bump-0.1", "adam_smooth", {"adam": bump(FAST)}, "does not hold"),
    ("reaches-at-20", "adam_near_zero_by_20", {"adam": decay(20)}, "holds"),
    ("reaches-at-21", "adam_near_zero_by_20", {"adam": decay(21)}, "does not hold"),
    ("10pct-better", "nadam_little_improvement", {"nadam": FAST * 0.9, "adam": FAST}, "holds"),
    ("worse", "nadam_little_improvement", {"nadam": FAST * 2, "adam": FAST}, "holds"),
    ("60pct-better", "nadam_little_improvement", {"nadam": FAST * 0.4, "adam": FAST}, "does not hold"),
    ("worse-than-all", "lion_worse_than_adam_family",
     {"lion": SLOW, "adam": FAST, "adamw": FAST, "nadam": FAST}, "holds"),
    ("better-than-nadam", "lion_worse_than_adam_family",
     {"lion": decay(20), "adam": FAST, "adamw": FAST, "nadam": SLOW}, "does not hold"),
    ("two-of-three-seeds", "adam_near_zero_by_20", {"adam": [decay(10), decay(30), decay(15)]},
     "holds on some seeds"),
    ("sgd-not-run", "momentum_speeds_up", {"sgd_momentum": FAST}, "not measured"),
    ("19-epoch-run", "adam_near_zero_by_20", {"adam": decay(5, epochs=19)}, "not measured"),
]


def _case_id(case):
    label, claim_id, _, verdict = case
    return f"{claim_id}-{label}-{verdict.replace(' ', '_')}"


@pytest.mark.parametrize("claim_id", list(CLAIM))
def test_every_claim_can_hold_and_can_fail(claim_id):
    """Each claim's criterion, as claims.evaluate applies it, decides both ways on
    the synthetic curves (not the expected column of CASES: what evaluate says)."""
    verdicts = {claims.evaluate(CLAIM[claim_id], synthetic(curves))["verdict"]
                for _, c, curves, _ in CASES if c == claim_id}
    assert {"holds", "does not hold"} <= verdicts, verdicts


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_criterion_on_synthetic_curves(case):
    _, claim_id, curves, verdict = case
    row = claims.evaluate(CLAIM[claim_id], synthetic(curves))
    assert row["verdict"] == verdict, row
    if verdict not in ("not measured",):
        assert row["runs"] == 6
        assert sum(b["holding"] for b in row["by_backend"].values()) == row["holding"]


def test_some_seeds_counts_runs():
    row = claims.evaluate(CLAIM["adam_near_zero_by_20"],
                          synthetic({"adam": [decay(10), decay(30), decay(15)]}))
    assert (row["holding"], row["runs"], row["fraction"]) == (4, 6, round(4 / 6, 4))
    assert row["values"][""]["median"] == 15 and row["values"][""]["max"] == 30


@pytest.mark.parametrize("curve, expected", [
    ([0.7, 0.3, 0.04, 0.01], 3.0),
    ([0.04, 0.5], 1.0),
    ([0.7, 0.05, 0.06], np.inf),
], ids=["third-epoch", "first-epoch", "never-at-threshold-exactly"])
def test_epochs_to_counts_from_one(curve, expected):
    assert claims.epochs_to(np.array(curve)) == expected


@pytest.mark.parametrize("curve, expected", [
    ([0.7, 0.5, 0.3, 0.1], 0.0),
    ([0.7, 0.2, 0.4, 0.1, 0.15], 0.2),
    ([0.7, 0.9], 0.2),
], ids=["monotone", "rise-above-running-min", "rise-at-start"])
def test_max_rebound(curve, expected):
    assert claims.max_rebound(np.array(curve)) == pytest.approx(expected)


def test_mean_loss_ratio_uses_common_epochs():
    short, long = np.full(100, 0.1), np.concatenate([np.full(100, 0.2), np.full(700, 10.0)])
    assert claims.mean_loss_ratio(short, long) == pytest.approx(0.5)


def test_thresholds_are_stated():
    for claim in claims.CLAIMS:
        assert claim["thresholds"] and all(t in claims.THRESHOLDS for t in claim["thresholds"])
        assert claim["quote"] and claim["measure"] in claims.MEASURES
        assert all(o in CONFIGURATIONS for o in [claim["subject"], *claim.get("others", [])])


# --- stacked seeds against separate runs of the article's model -----------------------

EQUIVALENCE_EPOCHS, EQUIVALENCE_SEEDS = 2, "0,5"
# Stacked copies are independent only under an elementwise optimizer
# (verify/convergence/model.py); Lamb's trust ratio takes norms over a whole variable.
STACKABLE = [i for i, c in CONFIGURATIONS.items()
             if reference.get_rule("keras", c.class_name).elementwise(
                 reference.get_rule("keras", c.class_name).hyperparameters(c.config))]


def _env(backend):
    env = dict(os.environ, **THREAD_ENV, KERAS_BACKEND=backend)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


# every plain `pytest` stacks three of them; all of them weekly (slow)
EVERY_RUN_STACKED = ["sgd_momentum", "adam", "adagrad"]


def _equivalence(config_ids):
    """Every installed backend in parallel."""
    procs = {b: subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "convergence_equivalence.py"),
         str(EQUIVALENCE_EPOCHS), EQUIVALENCE_SEEDS, *config_ids],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(b), text=True)
        for b in BACKENDS}
    results = {}
    for b, p in procs.items():
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-2000:]
        results[b] = {r["id"]: r for r in map(json.loads, out.splitlines())}
    return results


@pytest.fixture(scope="module")
def equivalence():
    return _equivalence(EVERY_RUN_STACKED)


@pytest.fixture(scope="module")
def equivalence_all():
    return _equivalence(STACKABLE)


@needs_extra
@pytest.mark.parametrize("config_id", [
    pytest.param(c, marks=() if c in EVERY_RUN_STACKED else pytest.mark.slow) for c in STACKABLE])
@pytest.mark.parametrize("backend", BACKENDS)
def test_stacked_seeds_match_separate_article_models(request, backend, config_id):
    """Same initial weights and batch order: the stacked copies follow the separate
    runs within float32 rounding (einsum and matmul sum in different orders); a
    gradient scaled by the number of copies, or a copy leaking into another,
    would be off by the size of a whole update (1e-3 and more)."""
    fixture = "equivalence" if config_id in EVERY_RUN_STACKED else "equivalence_all"
    r = request.getfixturevalue(fixture)[backend][config_id]
    assert r["loss_diff"] <= 1e-5, r
    assert r["weight_diff"] <= 1e-5 * max(1.0, r["weight_scale"]), r
    assert r["loss_range"][1] < 5, r  # the runs did train


@needs_extra
@pytest.mark.parametrize("backend", BACKENDS)
def test_stacked_training_is_reproducible(equivalence, backend):
    first = equivalence[backend][EVERY_RUN_STACKED[0]]
    assert first["repeat_identical"] is True


# --- plots and the whole command on a short run ---------------------------------

@needs_extra
def test_plot_titles_name_configuration_backend_seeds_keras():
    from verify.convergence import plots

    losses = {"jax": np.array([decay(5, epochs=8), decay(6, epochs=8)])}
    fig = plots.configuration_plot("adam", "Adam(learning_rate=0.01)", losses, "3.15.1")
    texts = [fig._suptitle.get_text()] + [ax.get_title() for ax in fig.axes]
    assert "adam" in texts[0] and "Keras 3.15.1" in texts[0]
    assert "jax, 2 seeds" in texts[1:]
    overlay = plots.overlay_plot({"jax": {"adam": losses["jax"]}}, "3.15.1")
    assert overlay.axes[0].get_yscale() == "log"
    assert plots.configuration_figure("adam", "Adam", losses, "3")[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("conv") / "report"
    backend = "jax" if "jax" in BACKENDS else BACKENDS[0]  # the quickest to start
    proc = subprocess.run(
        [sys.executable, "-m", "verify.cli", "convergence", "--optimizer", "sgd,adam",
         "--epochs", "3", "--seeds", "2", "--backend", backend, "--output", str(out),
         "--quiet"], capture_output=True, text=True, env=_env(backend), cwd=ROOT, timeout=600)
    return proc, out, backend


@needs_extra
def test_short_run_writes_plots_claims_and_html(short_run):
    proc, out, backend = short_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == [".verify-optimizers", "adam.png", "claims.json", "claims.md",
                     "curves.npz", "overlay.png", "report.html", "sgd.png"]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]
    doc = json.loads((out / "claims.json").read_text())
    assert len(doc["claims"]) == len(claims.CLAIMS)
    by_id = {r["id"]: r for r in doc["claims"]}
    assert by_id["adam_smooth"]["runs"] == 2 and by_id["adam_smooth"]["verdict"] != "not measured"
    assert by_id["momentum_speeds_up"]["verdict"] == "not measured"
    assert by_id["adam_near_zero_by_20"]["verdict"] == "not measured"  # 3 epochs < 20
    assert doc["settings"]["epochs"] == {"sgd": 3, "adam": 3}
    assert backend in doc["environment"]["backends"]
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    assert "You can see that the performance of this optimizer" in html
    with np.load(out / "curves.npz") as data:
        assert data[f"{backend}/adam/loss"].shape == (2, 3)


# --- the moons gradient scenario ------------------------------------------------

def test_moons_scenario_maps_steps_and_size_onto_the_recording():
    with np.load(scenarios.MOONS_FILE) as data:
        recorded = data["gradients"].astype(np.float64)
        description = json.loads(str(data["description"]))
    assert recorded.shape == (description["steps"], description["parameters"])
    steps, size = recorded.shape
    g = scenarios.gradients("moons", steps + 7, size + 3, seed=0)
    np.testing.assert_array_equal(g[:steps, :size], recorded)
    np.testing.assert_array_equal(g[steps:], g[:7])
    np.testing.assert_array_equal(g[:, size:], g[:, :3])
    np.testing.assert_array_equal(scenarios.gradients("moons", 5, 4, seed=9), recorded[:5, :4])
    assert np.all(np.isfinite(recorded)) and np.any(recorded != 0)


@needs_extra
@pytest.mark.needs("torch")  # recording runs on torch
def test_moons_recording_is_regenerated(tmp_path):
    out = tmp_path / "g.npz"
    subprocess.run([sys.executable, "-m", "verify.convergence.record", "--epochs", "2",
                    "--output", str(out)], check=True, capture_output=True, env=_env("torch"),
                   cwd=ROOT, timeout=600)
    with np.load(out) as fresh, np.load(scenarios.MOONS_FILE) as shipped:
        np.testing.assert_allclose(fresh["gradients"], shipped["gradients"][:20],
                                   rtol=0, atol=1e-6)


# --- command line ---------------------------------------------------------------

BAD_INPUT = [
    (["--optimizer", "adamax_typo"], "unknown optimizer"),
    (["--backend", "theano"], "unknown backend"),
    (["--epochs", "0"], "--epochs must be from 1 to"),
    (["--seeds", "0"], "--seeds must be from 1 to"),
    (["--seeds", "ten"], "invalid int value"),
    (["--learning-rate", "1"], "unrecognized arguments"),
]


@needs_extra
@pytest.mark.parametrize("argv, message", BAD_INPUT,
                         ids=[" ".join(a) for a, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, argv, message):
    out = tmp_path / "report"
    code = cli_main(["convergence", *argv, "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("verify-optimizers: error:")
    assert message in err
    assert list(tmp_path.iterdir()) == []


@needs_extra
def test_output_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "report"
    target.write_text("keep me")
    assert cli_main(["convergence", "--output", str(target)]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert target.read_text() == "keep me" and len(list(tmp_path.iterdir())) == 1


@needs_extra
def test_failing_worker_leaves_previous_report_untouched(tmp_path, monkeypatch):
    out = tmp_path / "report"
    out.mkdir()
    (out / "claims.md").write_text("previous")
    write_marker(out, "convergence")  # an earlier report of the harness
    monkeypatch.setitem(cli.CONFIGURATIONS, "broken", Configuration("broken", "NoSuchOpt", {}))
    settings = {"backends": BACKENDS[:1], "optimizers": ["broken"], "epochs": {"broken": 1},
                "seeds": 1, "output": out, "quiet": True}
    with pytest.raises(runner.WorkerError, match="worker failed"):
        cli.run(settings)
    assert [p.name for p in tmp_path.iterdir()] == ["report"]
    assert (out / "claims.md").read_text() == "previous"


@needs_extra
def test_a_folder_of_the_user_is_refused(tmp_path, capsys):
    out = tmp_path / "report"
    out.mkdir()
    (out / "claims.md").write_text("mine")
    assert cli_main(["convergence", "--output", str(out)]) == 2
    assert "did not write" in capsys.readouterr().err
    assert (out / "claims.md").read_text() == "mine"
