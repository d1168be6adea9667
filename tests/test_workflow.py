"""The GitHub Actions workflow: valid by a linter (check-jsonschema with its
vendored GitHub-workflow schema), and doing what the README promises: tests
and the check on push, the check against the newest Keras and the nightly
every week with a backend matrix.  Each validity test has a broken twin the
linter must reject."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from conftest import ROOT
from verify.cli import BACKENDS

WORKFLOW = ROOT / ".github" / "workflows" / "verify.yml"


def lint(path):
    exe = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or \
        shutil.which("check-jsonschema")
    assert exe, "check-jsonschema is not installed (pip install -e '.[test]')"
    return subprocess.run([exe, "--builtin-schema", "vendor.github-workflows", str(path)],
                          capture_output=True, text=True)


def load(text=None):
    return YAML(typ="safe").load(text if text is not None else WORKFLOW.read_text())


def test_the_workflow_passes_the_linter():
    done = lint(WORKFLOW)
    assert done.returncode == 0, done.stdout + done.stderr


BROKEN = {
    "runs-on misspelt": ("runs-on: ubuntu-latest", "run-on: ubuntu-latest"),
    "timeout not a number": ("timeout-minutes: 90", "timeout-minutes: ninety"),
    "unknown trigger": ("  workflow_dispatch:", "  workflow_dispatched:"),
    "step with neither run nor uses": ("run: python -m pytest", "rn: python -m pytest"),
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_the_linter_rejects_a_broken_copy(tmp_path, name):
    old, new = BROKEN[name]
    text = WORKFLOW.read_text()
    assert old in text
    broken = tmp_path / "verify.yml"
    broken.write_text(text.replace(old, new, 1))
    assert lint(broken).returncode != 0


def _runs(job):
    return "\n".join(step.get("run", "") for step in job["steps"])


def test_push_runs_the_tests_and_the_check():
    wf = load()
    assert "push" in wf["on"]
    on_push = [j for j in wf["jobs"].values()
               if "if" not in j or "github.event_name != 'schedule'" in j["if"]]
    scripts = "\n".join(_runs(j) for j in on_push)
    assert re.search(r"python -m pytest\b", scripts)
    assert re.search(r"^verify-optimizers check\b", scripts, re.M)


def test_weekly_check_against_newest_release_and_nightly_on_every_backend():
    wf = load()
    crons = [s["cron"] for s in wf["on"]["schedule"]]
    assert len(crons) == 1
    minute, hour, day, month, weekday = crons[0].split()
    assert day == month == "*" and weekday.isdigit()  # once a week
    scheduled = [j for j in wf["jobs"].values() if "== 'schedule'" in j.get("if", "")]
    assert len(scheduled) == 1
    job = scheduled[0]
    assert set(job["strategy"]["matrix"]["keras"]) == {"release", "nightly"}
    assert set(job["strategy"]["matrix"]["backend"]) == set(BACKENDS)
    scripts = _runs(job)
    assert "keras-nightly" in scripts and "--upgrade keras" in scripts
    assert re.search(r'verify-optimizers check --backend "\$BACKEND"', scripts)
    for backend in BACKENDS:  # every backend of the matrix gets installed
        assert re.search(rf"^\s*{backend}\)", scripts, re.M), backend


def test_every_run_script_is_valid_bash():
    wf = load()
    for name, job in wf["jobs"].items():
        for step in job["steps"]:
            if "run" in step:
                script = re.sub(r"\$\{\{[^}]*\}\}", "x", step["run"])
                done = subprocess.run(["bash", "-n"], input=script, capture_output=True,
                                      text=True)
                assert done.returncode == 0, (name, step.get("name"), done.stderr)


def test_bash_syntax_check_catches_a_broken_script():
    done = subprocess.run(["bash", "-n"], input="case x in\n  a) true ;;\n", text=True,
                          capture_output=True)
    assert done.returncode != 0
