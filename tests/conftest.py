"""Session fixtures: one real verification run over every installed backend,
shared by the integration, specificity and sensitivity tests."""

import importlib.util
import io
import os
import subprocess
import sys
import tomllib
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from verify import scenarios  # noqa: E402
from verify.configurations import CONFIGURATIONS  # noqa: E402
from verify.report.tables import Sink  # noqa: E402
from verify.runner import Runner, Selection, distinct  # noqa: E402
from verify.selection import installed_backends  # noqa: E402
from verify.selection import DEFAULT_MODES  # noqa: E402

import perturbations  # noqa: E402

STEPS, SIZE, SEED = 25, 24, 7

# The per-push subset, `pytest -m quick` (.github/workflows/verify.yml; about a minute
# on two cores): the reference rules and base stages, the comparison's arithmetic, the
# README's and the workflow's claims, and real runs through a worker
# (test_gradient_digest).  Plain `pytest` runs everything.
QUICK = {"test_arithmetic_reductions", "test_compare", "test_diff_pool",
         "test_gradient_digest", "test_keras_refusals", "test_readme",
         "test_reference_adafactor", "test_reference_base", "test_reference_muon",
         "test_reference_rules", "test_reference_shapes", "test_reference_textbook_base",
         "test_reports_fresh", "test_user_rule", "test_workflow"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__ in QUICK:
            item.add_marker(pytest.mark.quick)


# Under CI=true every backend and peer library is there (the README's command installs
# them): a missing one fails the tests that need it instead of skipping them.
IN_CI = os.environ.get("CI") == "true"


def needs(*libraries):
    """Skip unless every library (a Keras backend, torch, optax, scikit-learn, ...) is
    installed; under CI=true fail instead."""
    missing = [m for m in libraries if importlib.util.find_spec(m) is None]
    if missing:
        (pytest.fail if IN_CI else pytest.skip)(f"{', '.join(missing)} not installed")


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs"):
        needs(*mark.args)


def own_modes(backend) -> list:
    """The default modes that are a run of their own on `backend` (runner.SAME_AS:
    torch's compiled run is its eager one)."""
    return [m for m in DEFAULT_MODES if distinct(backend, m)]


REFUSALS = tomllib.loads((Path(__file__).with_name("keras_refusals.toml")).read_text())["refusal"]
CELL_KEYS = ("optimizer", "backend", "dtype", "mode")


def refused_by_keras(frame):
    """The cells of `frame` that tests/keras_refusals.toml says Keras refuses, checked to
    be `error` cells with Keras's exception, and the others, which must hold no
    "Keras raises" cell: a refusal not in the table fails here."""
    listed = np.zeros(len(frame), bool)
    for entry in REFUSALS:
        where = np.ones(len(frame), bool)
        for key in CELL_KEYS:
            if key in entry:
                where &= (frame[key] == entry[key]).to_numpy()
        hit = frame[where]
        assert (hit.verdict == "error").all(), hit[hit.verdict != "error"][
            ["family", *CELL_KEYS, "scenario", "verdict"]].to_string()
        assert hit.reason.str.startswith(tuple(f"Keras raises {e}" for e in entry["raises"])).all(), \
            hit.reason.unique()
        listed |= where
    others = frame[~listed]
    new = others[(others.verdict == "error") & others.reason.str.startswith("Keras raises ")]
    assert new.empty, "Keras refuses cells tests/keras_refusals.toml does not list:\n" + new[
        ["family", *CELL_KEYS, "scenario", "reason"]].to_string()
    return frame[listed], others


def nonempty(frame):
    """`frame`, failing the test when a selection left it empty (where `.all()` would pass)."""
    assert len(frame), "the selection is empty"
    return frame


def verify_optimizers(*args, cwd, env=None, timeout=600, **kw):
    """`verify-optimizers ARGS` in a fresh process (where the process boundary is the
    subject: signals, environment variables, the console's output)."""
    env = dict(env or os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "verify.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout, **kw)


def in_process(*args, cwd):
    """`verify-optimizers ARGS` as the CLI's main in this process, from `cwd`: its exit
    code and what it printed, as subprocess.run gives them (no interpreter to start)."""
    from verify import cli

    out, err, before = io.StringIO(), io.StringIO(), os.getcwd()
    os.chdir(cwd)
    try:
        with redirect_stdout(out), redirect_stderr(err):
            code = cli.main(list(args))
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def fast_backend(prefer=("torch", "jax", "tensorflow")):
    """The installed backend that starts and steps fastest (for a save and a load in
    fresh processes, JAX: `prefer`)."""
    found = installed_backends()
    return next((b for b in prefer if b in found), found[0])


def make_selection(backends, families, *, configurations=None, dtypes=("float32", "float64"),
                   modes=("eager", "compiled"), names=scenarios.SCENARIOS, steps=STEPS,
                   size=SIZE, seed=SEED, **extra):
    configurations = configurations or list(CONFIGURATIONS)
    return Selection(backends=list(backends), dtypes=list(dtypes), families=list(families),
                     configurations=[CONFIGURATIONS[c] for c in configurations],
                     scenarios=list(names), modes=list(modes), steps=steps, size=size,
                     seed=seed, **extra)


def run_selection(sel, out_dir):
    order = {"family": sel.families, "optimizer": [c.id for c in sel.configurations],
             "backend": sel.backends, "dtype": sel.dtypes, "mode": sel.modes,
             "scenario": sel.scenarios}
    sink = Sink(out_dir, ["csv"], {"steps": sel.steps}, order)
    Runner(sel, sink).run()
    return sink.frame()


@pytest.fixture(scope="session")
def backends():
    found = installed_backends()
    assert found, "no Keras backend installed"
    return found


# A fixture's runs: in every run of plain `pytest` their pairwise covering
# (Selection.pairwise: each configuration on every backend, in every dtype and every
# mode), weekly (slow) the whole product.
DESIGNS = ["pairwise", pytest.param("product", marks=pytest.mark.slow)]


def designed(sel, design):
    return sel.pairwise() if design == "pairwise" else sel


@pytest.fixture(scope="session", params=DESIGNS)
def verification(backends, tmp_path_factory, request):
    """Every family, every scenario, on the runs of every configuration x backend x dtype
    x mode (DESIGNS: the pairwise covering is a third of the product).  attrs["runs"]:
    how many runs it made."""
    sel = designed(make_selection(backends, ["article", "textbook", "keras"]
                                  + perturbations.FAMILIES), request.param)
    frame = run_selection(sel, tmp_path_factory.mktemp(f"verification-{request.param}"))
    frame.attrs["runs"] = len(sel.runs())
    return frame
