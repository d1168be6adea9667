"""The baseline comparison of `verify-optimizers check` as one pytest test per
cell, with readable ids: `test_keras[adam-torch-float32-eager-gaussian]`
(the test's name is the family).

VERIFY_CHECK_ARGS holds `check` flags (the CLI's, e.g. "--backend torch
--optimizer adam --baseline path/to/baseline --strict"); set to "" it checks
the whole baseline.  Unset, this suite checks a fast subset of the committed
baseline: two optimizers on one installed backend.  The run's report goes to
the --output given there, else to a pytest temporary folder.
"""

import os
import shlex
import warnings

import pytest

from conftest import ROOT
from verify.commands import baseline, check
from verify.selection import UsageError, installed_backends

ENV = "VERIFY_CHECK_ARGS"
FAST_OPTIMIZERS = "adam,sgd_nesterov"
FAST_BACKENDS = ("jax", "torch", "tensorflow")  # quickest first


def _argv():
    raw = os.environ.get(ENV)
    if raw is not None:
        argv = shlex.split(raw)
    else:
        here = [b for b in FAST_BACKENDS if b in installed_backends()]
        argv = ["--optimizer", FAST_OPTIMIZERS] + (["--backend", here[0]] if here else [])
    if not any(a == "--baseline" or a.startswith("--baseline=") for a in argv):
        argv += ["--baseline", str(ROOT / "reports" / "baseline")]
    return argv + ["--quiet"]


def _plan():
    try:
        return check.plan(_argv()), None
    except UsageError as exc:
        return None, str(exc)


PLAN, PROBLEM = _plan()
CELLS = PLAN[-1] if PLAN else []


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    """Run the selection once: (cells now by key, report folder)."""
    _, _, sel, output, formats, _ = PLAN
    if not any(a == "--output" or a.startswith("--output=") for a in _argv()):
        output = tmp_path_factory.mktemp("check")
    now, _, _ = check.execute(sel, output, formats)
    return {tuple(c[k] for k in baseline.CELL): c for c in now}, output


def _test_for(family):
    cells = [c for c in CELLS if c["family"] == family]

    @pytest.mark.parametrize("before", cells,
                             ids=[baseline.cell_id(c, with_family=False) for c in cells])
    def test(before, checked):
        now, output = checked
        after = now.get(tuple(before[k] for k in baseline.CELL))
        changes = baseline.compare_cells([before], [after] if after else [],
                                      strict=PLAN[0].strict)
        for change in changes:
            message = (f"{baseline.cell_id(before)}: {baseline.describe(before)} -> "
                       f"{baseline.describe(after)} ({change.what})")
            if change.fails:
                pytest.fail(message + "\n\n" + check.step_detail(output, change), pytrace=False)
            warnings.warn(message + " (rounding only; VERIFY_CHECK_ARGS='--strict' fails it)")

    test.__name__ = f"test_{family}"
    test.__doc__ = f"Family {family}: each cell's class is the baseline's."
    return test


for _family in dict.fromkeys(c["family"] for c in CELLS):
    globals()[f"test_{_family}"] = _test_for(_family)


def test_the_baseline_can_be_checked_here():
    """A missing or malformed baseline, or one this machine cannot reproduce, fails here."""
    assert PROBLEM is None, PROBLEM
    assert CELLS, "the selection leaves no baseline cell to check"
