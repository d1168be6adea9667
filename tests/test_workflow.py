"""The GitHub Actions workflow: valid by a linter (check-jsonschema with its
vendored GitHub-workflow schema) and by `bash -n`, and doing what the README
promises: tests and the check on push, the check against the newest Keras and the
nightly every week with a backend matrix.  Each validity test has a broken twin,
a copy of the real workflow, that it must reject."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

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


def test_the_linter_rejects_a_broken_copy(tmp_path):
    """Sensitivity of the test above: `lint` really checks against the workflow
    schema (one broken key is enough to show it; what else the schema catches is
    check-jsonschema's business, not this project's)."""
    text = WORKFLOW.read_text()
    assert "runs-on: ubuntu-latest" in text
    broken = tmp_path / "verify.yml"
    broken.write_text(text.replace("runs-on: ubuntu-latest", "run-on: ubuntu-latest", 1))
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
    _, _, day, month, weekday = crons[0].split()
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


def bash_errors(wf):
    """(job, step name, bash's complaint) for every run script of the workflow that
    `bash -n` rejects (GitHub's ${{ ... }} expressions stand in as a word)."""
    errors = []
    for name, job in wf["jobs"].items():
        for step in job["steps"]:
            if "run" in step:
                script = re.sub(r"\$\{\{[^}]*\}\}", "x", step["run"])
                done = subprocess.run(["bash", "-n"], input=script, capture_output=True,
                                      text=True)
                if done.returncode != 0:
                    errors.append((name, step.get("name"), done.stderr))
    return errors


def test_every_run_script_is_valid_bash():
    assert bash_errors(load()) == []


def test_a_broken_run_script_is_named_by_its_job_and_step():
    """Sensitivity of the test above, on a copy of the real workflow: the check
    reaches the scripts of every job (here the scheduled one) and names the step."""
    text = WORKFLOW.read_text()
    assert text.count("          esac\n") == 1
    errors = bash_errors(load(text.replace("          esac\n", "", 1)))
    assert [(job, step) for job, step, _ in errors] == [
        ("upstream", "Install the harness and one backend (newest CPU build)")]
