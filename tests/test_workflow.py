"""The GitHub Actions workflow: valid by a linter (check-jsonschema with its
vendored GitHub-workflow schema) and by `bash -n`, and doing what the README
promises: tests and the check on push, the check against the newest Keras and the
nightly every week with a backend matrix, each check as a matrix of shards and a
merge job that checks the merged whole.  Each test has a broken twin, a copy of
the real workflow, that it must reject."""

import fnmatch
import itertools
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from ruamel.yaml import YAML

from conftest import ROOT
from verify.selection import BACKENDS

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


def runs_on(job, event) -> bool:
    """Does the job run on `event`? (its `if`, of github.event_name comparisons)"""
    condition = job.get("if", "true").replace("&&", " and ").replace("||", " or ")
    return eval(condition.replace("github.event_name", repr(event)), {"true": True})


def test_push_runs_the_quick_tests_and_the_check_and_pull_requests_every_test():
    wf = load()
    assert {"push", "pull_request", "schedule"} <= set(wf["on"])
    scripts = {event: "\n".join(_runs(j) for j in wf["jobs"].values() if runs_on(j, event))
               for event in ("push", "pull_request", "schedule")}
    assert re.search(r"^python -m pytest -m quick$", scripts["push"], re.M)
    assert not re.search(r"^python -m pytest$", scripts["push"], re.M)
    assert re.search(r"^verify-optimizers check\b", scripts["push"], re.M)
    for event in ("pull_request", "schedule"):
        assert re.search(r"^python -m pytest$", scripts[event], re.M), event
    # the long sweeps the plain command leaves out run every week
    assert re.search(r"^python -m pytest -m slow$", scripts["schedule"], re.M)
    assert not re.search(r"^python -m pytest -m slow$", scripts["push"], re.M)


def test_runs_on_reads_the_conditions():
    """Sensitivity of the test above: a condition that excludes push is read so."""
    assert runs_on({"if": "github.event_name != 'push'"}, "pull_request")
    assert not runs_on({"if": "github.event_name != 'push'"}, "push")
    assert runs_on({"if": "github.event_name == 'schedule' || github.event_name == 'push'"},
                   "push")
    assert runs_on({}, "schedule")


def test_weekly_check_against_newest_release_and_nightly_on_every_backend():
    wf = load()
    crons = [s["cron"] for s in wf["on"]["schedule"]]
    assert len(crons) == 1
    _, _, day, month, weekday = crons[0].split()
    assert day == month == "*" and weekday.isdigit()  # once a week
    scheduled = {n: j for n, j in wf["jobs"].items() if "== 'schedule'" in j.get("if", "")}
    assert set(scheduled) == {"upstream", "upstream-merge", "slow"}
    job = scheduled["upstream"]
    assert set(job["strategy"]["matrix"]["keras"]) == {"release", "nightly"}
    assert set(job["strategy"]["matrix"]["backend"]) == set(BACKENDS)
    scripts = _runs(job)
    assert "keras-nightly" in scripts and "--upgrade keras" in scripts
    assert re.search(r'verify-optimizers check --backend "\$BACKEND"', scripts)
    for backend in BACKENDS:  # every backend of the matrix gets installed
        assert re.search(rf"^\s*{backend}\)", scripts, re.M), backend


# --- the checks as shard matrices -----------------------------------------------------
def _expand(text, values):
    """GitHub's ${{ matrix.X }} in `text` for one matrix combination."""
    return re.sub(r"\$\{\{\s*matrix\.(\w+)\s*\}\}", lambda m: str(values.get(m.group(1), m.group(0))), text)


def _combinations(job, without=()):
    matrix = {k: v for k, v in job.get("strategy", {}).get("matrix", {}).items()
              if k not in without}
    keys = sorted(matrix)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(matrix[k] for k in keys))]


def _step(job, uses):
    found = [s for s in job["steps"] if s.get("uses", "").startswith(uses)]
    assert len(found) == 1, (uses, job["steps"])
    return found[0]


def shard_pairs(wf):
    """(shard job, merge job) for every job running `check --shard`, with the
    merge job that needs it."""
    pairs = []
    for name, job in wf["jobs"].items():
        if re.search(r"verify-optimizers check\b.*--shard", _runs(job)):
            merges = [j for j in wf["jobs"].values() if name in
                      ([j["needs"]] if isinstance(j.get("needs"), str) else j.get("needs", []))]
            assert len(merges) == 1, name
            pairs.append((job, merges[0]))
    return pairs


def check_sharding(wf):
    """What makes a sharded check the whole check; returns the problems found."""
    problems = []
    n = int(wf["env"]["SHARDS"])
    pairs = shard_pairs(wf)
    if {id(j) for j, _ in pairs} != {id(j) for j in wf["jobs"].values()
                                      if "verify-optimizers check" in _runs(j)
                                      and "--from" not in _runs(j)}:
        problems.append("a check runs unsharded")
    for job, merge in pairs:
        if job["strategy"]["matrix"]["shard"] != list(range(1, n + 1)):
            problems.append(f"shards {job['strategy']['matrix']['shard']} are not 1..{n}")
        command = re.search(r"verify-optimizers check\b.*", _runs(job)).group(0)
        if '--shard "${{ matrix.shard }}/$SHARDS"' not in command:
            problems.append(f"the shard job runs {command}")
        output = re.search(r"--output (\S+)", command).group(1)
        upload = _step(job, "actions/upload-artifact")
        if upload["with"]["path"].rstrip("/") != output.rstrip("/"):
            problems.append("the shard job uploads another folder than its report")
        if merge.get("if") != job.get("if"):
            problems.append("the merge job runs on other events than its shards")
        if _combinations(merge) != _combinations(job, without=("shard",)):
            problems.append("the merge job's matrix is not the shards' without the shard")
        download = _step(merge, "actions/download-artifact")
        for combo in _combinations(merge):  # each merge gets exactly its N shards
            pattern = _expand(download["with"]["pattern"], combo)
            names = [_expand(upload["with"]["name"], c) for c in _combinations(job)]
            mine = [x for x, c in zip(names, _combinations(job))
                    if all(c[k] == v for k, v in combo.items())]
            if len(set(names)) != len(names) or sorted(
                    x for x in names if fnmatch.fnmatchcase(x, pattern)) != sorted(mine) or (
                    len(mine) != n):
                problems.append(f"the merge for {combo} does not download exactly its shards")
        script = _runs(merge)
        folder = download["with"]["path"].rstrip("/")
        merged = re.search(rf"verify-optimizers merge {re.escape(folder)}/\* --output (\S+)",
                           script)
        if not merged or f"verify-optimizers check --from {merged.group(1)}" not in script:
            problems.append("the merge job does not merge the shards and check the result")
    return problems


def test_every_check_runs_as_shards_and_a_merge_that_checks_them_all():
    wf = load()
    assert {(j["name"].split()[0], m["needs"]) for j, m in shard_pairs(wf)} == {
        ("check", "check"), ("check", "upstream")}
    assert check_sharding(wf) == []


@pytest.mark.parametrize("edit,problem", [
    (lambda wf: wf["jobs"]["check"]["strategy"]["matrix"].update(shard=[1, 2, 3]),
     "are not 1..4"),
    (lambda wf: wf["env"].update(SHARDS=5), "are not 1..5"),
    (lambda wf: _step(wf["jobs"]["upstream"], "actions/upload-artifact")["with"].update(
        name="upstream-${{ matrix.backend }}-shard-${{ matrix.shard }}"),
     "does not download exactly its shards"),
    (lambda wf: _step(wf["jobs"]["check-merge"], "actions/download-artifact")["with"].update(
        pattern="check-shard-1"), "does not download exactly its shards"),
    (lambda wf: wf["jobs"]["upstream-merge"]["strategy"]["matrix"].pop("backend"),
     "matrix is not the shards'"),
    (lambda wf: wf["jobs"]["check-merge"]["steps"][-2].update(
        run="verify-optimizers merge shards/* --output reports/check"),
     "does not merge the shards and check the result"),
    (lambda wf: wf["jobs"]["check"]["steps"][-2].update(
        run="verify-optimizers check --quiet --output reports/shard"), "runs unsharded"),
])
def test_a_broken_sharding_is_caught(edit, problem):
    """Sensitivity of the test above: each way a sharded check stops being the
    whole check, made on a copy of the real workflow."""
    wf = load()
    edit(wf)
    assert any(problem in p for p in check_sharding(wf)), check_sharding(wf)


@pytest.mark.parametrize("merge_code,check_code,expected", [
    (0, 0, 0), (0, 1, 1), (1, 0, 0), (1, 1, 1), (2, 0, 2), (0, 2, 2)])
def test_the_merge_script_fails_as_check_does(tmp_path, merge_code, check_code, expected):
    """The merge job's script with stand-ins for verify-optimizers: a refused
    merge (2) fails without a check; a merged keras mismatch (1) is left to the
    check, whose exit code is the job's."""
    job = load()["jobs"]["check-merge"]
    script = next(s["run"] for s in job["steps"] if "verify-optimizers merge" in s.get("run", ""))
    stub = tmp_path / "verify-optimizers"
    stub.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/calls\n'
                    f'[ "$1" = merge ] && exit {merge_code}\nexit {check_code}\n')
    stub.chmod(0o755)
    done = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, capture_output=True,
                          env={"PATH": f"{tmp_path}:/usr/bin:/bin"}, text=True)
    assert done.returncode == expected, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0].startswith("merge shards/")
    assert calls[1:] == ([] if merge_code >= 2 else ["check --from reports/check"])


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
