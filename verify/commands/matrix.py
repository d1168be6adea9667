"""`verify-optimizers matrix --keras 3.0.0,3.5.0,...`: the same verification
against several Keras releases, one report with a column per release.

Each release gets its own virtual environment under --work (kept and reused):
`python -m venv`, a .pth file that appends this interpreter's site-packages
(the installed backends: TensorFlow, JAX, torch) after the environment's own,
and `pip install keras==VERSION` (plus whatever that release strictly needs
that is not already there).  Only the backend workers run in that environment
(`Selection.python`); the references and the comparison run here, identical
for every column.

A release is a public version number (`release`), checked with every other flag
before anything is created; its environment and runs are folders under --work
named by its normalised form, and an environment folder is cleared only when it
carries VENV_MARKER, written before the environment into a folder the harness
made: nothing outside --work, and nothing there the harness did not make, is
created, cleared or removed.

A release that cannot be installed, or that cannot be imported with a backend,
is a column (or the backend's cells of a column) marked `unsupported` with the
reason; the matrix goes on.  Cells are classed as in `verify-optimizers check`
(verify/commands/baseline.py), and every cell whose class differs between consecutive
releases is listed.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pandas as pd
from packaging.version import InvalidVersion, Version
from tabulate import tabulate

from verify import api, compare
from verify.cli import interruptible, selection_from_args, selection_parser
from verify.commands import baseline
from verify.configurations import CONFIGURATIONS
from verify.output import MARKER, OutputRefused, add_files, check_folder, write_marker
from verify.report import html as html_report
from verify.report.tables import records
from verify.runner import distinct
from verify.selection import UsageError, listed, settings_of
from verify.worker.messages import UNSUPPORTED

DEFAULT_OUTPUT = "reports/matrix"
DEFAULT_WORK = str(Path.home() / ".cache" / "verify-optimizers" / "matrix")
VENV_MARKER = ".verify-optimizers-venv"
# "keras-" + the release is one folder name, at most NAME_MAX (255) bytes on Linux and macOS
MAX_RELEASE = 200


def release(text: str) -> str:
    """A --keras value as the release it names, normalised (str(Version)): it
    becomes a folder name under --work and pip's `keras==` pin.  UsageError unless
    it is a public PEP 440 version (no local part) with no whitespace or path
    separator."""
    if any(c.isspace() or c in "/\\" for c in text):
        raise UsageError(f"--keras {text!r} is not a release number (e.g. 3.5.0)")
    try:
        version = Version(text)
    except ValueError:  # InvalidVersion, or a number past int()'s digit limit
        raise UsageError(f"--keras {text!r} is not a release number (e.g. 3.5.0)") from None
    if version.local is not None:
        raise UsageError(f"--keras {text!r} has a local part (+{version.local}); PyPI "
                         "publishes none: give a release number")
    if len(str(version)) > MAX_RELEASE:
        raise UsageError(f"--keras {text[:20]!r}... is longer than {MAX_RELEASE} characters")
    return str(version)


def _same_release(text: str, version: str) -> bool:
    """Whether keras.__version__ `text` is the release `version` (3.1 is 3.1.0)."""
    try:
        return Version(text) == Version(version)
    except InvalidVersion:
        return False


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds (got {text!r})")
    return value


def inside(work: Path, *parts: str) -> Path:
    """work/parts..., OutputRefused unless it resolves to a folder strictly inside
    work (a symlink on the way may not lead out of it)."""
    path = work.joinpath(*parts)
    if work.resolve() not in path.resolve().parents:
        raise OutputRefused(f"{path} lies outside --work {work}")
    return path


def venv_folder(work: Path, version: str) -> Path:
    """The environment folder of `version`; OutputRefused if it lies outside work or
    exists without VENV_MARKER (the harness did not make it: never cleared)."""
    env = inside(work, "venvs", f"keras-{version}")
    if env.is_symlink() or (env.exists() and not (env / VENV_MARKER).is_file()):
        raise OutputRefused(f"{env} was not made by verify-optimizers (no {VENV_MARKER}): "
                            "move it away or choose another --work")
    return env


def _parser():
    p = selection_parser("matrix", "Run the same verification against several Keras "
                         "releases, each in its own virtual environment, and write one report "
                         "with a column per release.", DEFAULT_OUTPUT)
    p.add_argument("--keras", action="append", default=[], required=True,
                   help="Keras releases, comma-separated, oldest first (e.g. 3.0.0,3.5.0)")
    p.add_argument("--work", default=DEFAULT_WORK,
                   help="virtual environments and per-release runs (default %(default)s)")
    p.add_argument("--timeout", type=_seconds, default=1800,
                   help="seconds allowed for one release's pip install (default %(default)s)")
    return p


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _venv_python(env: Path) -> Path:
    return env / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def prepare(version: str, work: Path, timeout: float) -> tuple:
    """(python of an environment with keras==version, None) or (None, reason);
    `version` as release() gives it.  OutputRefused for a folder the harness may
    not clear (venv_folder)."""
    env = venv_folder(work, version)
    python = _venv_python(env)
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('keras'))"]
    if python.exists():
        done = subprocess.run(probe, capture_output=True, text=True)
        if done.returncode == 0 and _same_release(done.stdout.strip(), version):
            return python, None
    try:
        if env.exists():
            shutil.rmtree(env)
        # the marker first: an interrupted build is still the harness's to clear
        env.mkdir(parents=True)
        (env / VENV_MARKER).write_text(json.dumps(
            {"written_by": "verify-optimizers", "command": "matrix", "keras": version}) + "\n")
        subprocess.run([sys.executable, "-m", "venv", str(env)], check=True,
                       capture_output=True, text=True, timeout=300)
        purelib = Path(subprocess.run([str(python), "-c",
                                       "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                      check=True, capture_output=True, text=True).stdout.strip())
        # appended after the environment's own site-packages: its keras comes first
        (purelib / "_verify_reuse_backends.pth").write_text(
            sysconfig.get_paths()["purelib"] + "\n")
        done = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                               "--no-input", f"keras=={version}"],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"pip install keras=={version} took more than {timeout:g} s"
    except (OSError, subprocess.CalledProcessError) as exc:
        return None, f"cannot create the environment: {_last_line(getattr(exc, 'stderr', '') or '') or exc}"
    if done.returncode != 0:
        return None, f"pip install keras=={version} failed: {_last_line(done.stderr)}"
    return python, None


def probe_backends(python: Path, version: str, backends) -> dict:
    """backend -> None if `import keras` works with it in that environment, else the reason."""
    out = {}
    for backend in backends:
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
        try:
            done = subprocess.run(
                [str(python), "-c", "import keras; print(keras.__version__); "
                 "print(keras.backend.backend())"],
                capture_output=True, text=True, env=env, timeout=600, cwd="/")
        except subprocess.TimeoutExpired:
            out[backend] = "import keras took more than 600 s"
            continue
        lines = done.stdout.split()
        if done.returncode != 0:
            out[backend] = f"import keras fails: {_last_line(done.stderr)}"
        elif len(lines) < 2 or not _same_release(lines[0], version) or lines[1] != backend:
            out[backend] = f"imports keras {' '.join(lines[:2])} instead of {version} {backend}"
        else:
            out[backend] = None
    return out


def cell_text(c: dict) -> str:
    """Compact class of a cell for the matrix."""
    if c["verdict"] == "mismatch":
        text = f"mismatch@{c['first_divergent_step']} {c['divergent_state']} {c['magnitude']}"
    elif c["verdict"] == "error":  # a class this release does not have is not an error
        return UNSUPPORTED if c["reason"].startswith(f"{UNSUPPORTED}: ") else "error"
    else:
        text = c["verdict"]
    return text + (" (+states)" if c["reason"] else "")


def consecutive_changes(columns: dict, versions: list) -> list:
    """[(from, to, Change)] between consecutive releases that ran, over the cells both ran."""
    out = []
    ran = [v for v in versions if columns.get(v) is not None]
    for a, b in zip(ran, ran[1:]):
        both = [k for k, c in columns[a].items() if c is not None and columns[b].get(k)]
        out += [(a, b, change) for change in baseline.compare_cells(
            [columns[a][k] for k in both], [columns[b][k] for k in both], strict=True)]
    return out


def write_report(output: Path, settings: dict, versions: list, releases: dict, columns: dict,
                 cells: list, work: Path | None = None) -> None:
    """matrix.md, matrix.csv, releases.json and matrix.html (its figures read the
    per-release runs under `work`, as main() keeps them)."""
    keyed = [tuple(c[f] for f in baseline.CELL) for c in cells]
    table = []
    for k in keyed:
        row = dict(zip(baseline.CELL, k))
        for v in versions:
            col = columns.get(v)
            if col is None:
                row[v] = UNSUPPORTED
            else:
                c = col.get(k)
                row[v] = UNSUPPORTED if c is None else cell_text(c)
        table.append(row)
    df = pd.DataFrame(table, columns=list(baseline.CELL) + versions)
    changes = consecutive_changes(columns, versions)
    worst = _worst(df, versions)
    runs = {v: [work / "runs" / v / "all"] + [work / "runs" / v / o
                                                for o in settings["optimizers"]]
            for v in versions} if work is not None else {}
    add_files(output, {
        "matrix.csv": df.to_csv(index=False),
        "releases.json": json.dumps({"settings": settings, "releases": releases}, indent=1,
                                    sort_keys=True) + "\n",
        "matrix.md": _markdown(settings, versions, releases, worst, changes, df),
        "matrix.html": html_report.render_matrix(settings, versions, releases, worst, changes,
                                                 baseline.describe, runs)}, "matrix")


def _worst(df, versions) -> list:
    """[(family, optimizer, {version: worst verdict over its cells, or unsupported})]."""
    out = []
    for (fam, opt), g in df.groupby(["family", "optimizer"], sort=False):
        by_version = {}
        for v in versions:
            values = [x.split("@")[0].split(" ")[0] for x in g[v] if x != UNSUPPORTED]
            by_version[v] = compare.worst(values) if values else UNSUPPORTED
        out.append((fam, opt, by_version))
    return out


def _markdown(settings, versions, releases, worst, changes, df) -> str:
    lines = ["# Keras version matrix", "",
             "Generated by `verify-optimizers matrix`; every release ran in its own virtual "
             "environment with the same backends, the same references and the same gradients. "
             "Findings explained: FINDINGS.md.", "",
             "## Settings", "",
             tabulate([(k, ", ".join(map(str, v)) if isinstance(v, list) else v)
                       for k, v in settings.items() if k not in ("configurations", "precision")],
                      headers=["setting", "value"], tablefmt="github"), "",
             "## Releases", "",
             tabulate([(v, r["status"], r.get("backends_text", ""), r.get("wall_seconds", ""),
                        r.get("reason", "")) for v, r in releases.items()],
                      headers=["keras", "status", "backends", "run (s)", "reason"],
                      tablefmt="github", disable_numparse=True), "",
             "## Worst verdict per configuration", "",
             "Over backends, dtypes, modes and scenarios; `unsupported` where the release did "
             "not run.", ""]
    body = [[fam, opt] + [by_version[v] for v in versions] for fam, opt, by_version in worst]
    lines += [tabulate(body, headers=["family", "optimizer"] + versions, tablefmt="github"), ""]
    lines += ["## Changes between consecutive releases", "",
              "Cells whose class (verdict; for a mismatch its first divergent step, state and "
              "decade of relative error; the states one side lacks) differs from the previous "
              "release that ran it, grouped.", ""]
    if not changes:
        lines += ["None.", ""]
    else:
        groups = {}
        for a, b, ch in changes:
            key = (a, b, ch.cell["family"], ch.cell["optimizer"], ch.cell["backend"],
                   baseline.describe(ch.before), baseline.describe(ch.after), ch.what)
            groups.setdefault(key, []).append(ch.cell)
        rows = []
        for key, members in groups.items():
            a, b, fam, opt, backend, before, after, what = key
            dims = "; ".join(f"{f}: " + ", ".join(dict.fromkeys(m[f] for m in members))
                             for f in ("dtype", "mode", "scenario"))
            rows.append((f"{a} -> {b}", fam, opt, backend, dims, len(members), before, after,
                         what))
        lines += [tabulate(rows, headers=["releases", "family", "optimizer", "backend",
                                          "cells", "n", "before", "after", "changed"],
                           tablefmt="github", disable_numparse=True), ""]
        changed = {tuple(ch.cell[f] for f in baseline.CELL) for _, _, ch in changes}
        marks = {(tuple(ch.cell[f] for f in baseline.CELL), b) for _, b, ch in changes}
        detail = []
        for r in df.itertuples(index=False):
            k = tuple(getattr(r, f) for f in baseline.CELL)
            if k in changed:
                detail.append([baseline.cell_id(dict(zip(baseline.CELL, k)))]
                              + [f"**{x}**" if (k, v) in marks else x
                                 for v, x in zip(versions, r[len(baseline.CELL):])])
        lines += ["### Changed cells", "", "Bold: differs from the previous release.", "",
                  tabulate(detail, headers=["cell"] + versions, tablefmt="github",
                           disable_numparse=True), ""]
    lines += ["Every cell of every release: matrix.csv; environments: releases.json; with "
              "figures of the changed cells: matrix.html.", ""]
    return "\n".join(lines)


# --- one release's run: a child process ------------------------------------------
# Each release's selection runs in a child process (`python -m verify.commands.matrix`),
# so that a harness failure on an unexpected release ends that child, not the
# matrix.  The child's interface is this and nothing else:
#   stdin   one JSON request: "selection", the keyword arguments of api.selection
#           (built-in configurations by id, the others as {"id", "class_name",
#           "config"}); "python", the release's interpreter for the workers;
#           "output", the run's report folder; "harness", harness_fingerprint().
#   output  the run's report (json and csv: matrix.html's figures read its
#           steps/), holding RESULT: {"request": the request, "environment": the
#           run's environment block, "cells": its cells as baseline.cell_class gives
#           them, "wall_seconds": how long the run took}.  The parent reads RESULT
#           only; a RESULT of the same request is reused (an interrupted matrix goes
#           on where it stopped), with the time of the run that made it.
#   exit    0 with RESULT written; otherwise failed, the last line of stderr says why.
RESULT = "result.json"


def selection_request(sel, optimizers=None) -> dict:
    """api.selection's keyword arguments for `sel` (only the configurations
    `optimizers` names, when given), as JSON."""
    chosen = [c for c in sel.configurations if optimizers is None or c.id in optimizers]
    return {"optimizers": [c.id if CONFIGURATIONS.get(c.id) == c
                           else {"id": c.id, **c.keras_config()} for c in chosen],
            "backends": sel.backends, "dtypes": sel.dtypes, "families": sel.families,
            "scenarios": sel.scenarios, "modes": sel.modes, "steps": sel.steps,
            "size": sel.size, "seed": sel.seed}


def run_release(request: dict) -> None:
    """The child: run the request's selection, its workers on the request's python."""
    sel = api.selection(**request["selection"])
    sel.python = request["python"]
    started = time.perf_counter()

    def finish(folder, result):
        cells = [baseline.cell_class(r) for r in records(result.rows)]
        (folder / RESULT).write_text(json.dumps(
            {"request": request, "environment": result.environment, "cells": cells,
             "wall_seconds": round(time.perf_counter() - started)},
            sort_keys=True) + "\n")

    api.execute(sel, request["output"], ["json", "csv"], finish=finish, command="matrix run")


def harness_fingerprint() -> str:
    """sha256 of the harness's own sources (verify/, reference/): a finished run is
    reused only if the code that produced it is the code running now."""
    root = Path(__file__).parents[2]
    digest = hashlib.sha256()
    for path in sorted(p for package in ("verify", "reference")
                       for p in (root / package).rglob("*")
                       if p.suffix in (".py", ".toml", ".npz") and p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _run_child(python, output, selection) -> tuple:
    """Run one selection in a child process: (its RESULT, None) or (None, why it
    failed), and the seconds it took (as its RESULT says: a reused one's first run)."""
    started = time.perf_counter()
    result, reason = _child_result(python, output, selection)
    if result is not None:
        return result, reason, result.get("wall_seconds", 0)
    return result, reason, time.perf_counter() - started


def _child_result(python, output, selection) -> tuple:
    request = {"selection": selection, "python": str(python), "output": str(output),
               "harness": harness_fingerprint()}
    try:
        done = json.loads((Path(output) / RESULT).read_text())
        if done["request"] == request:
            return done, None
    except (OSError, ValueError, KeyError, TypeError):
        pass
    child = subprocess.Popen([sys.executable, "-m", "verify.commands.matrix"],
                             stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True,
                             cwd=str(Path(__file__).parents[2]))
    try:
        _, stderr = child.communicate(json.dumps(request))
    except BaseException:  # interrupted: the child stops its workers and cleans up
        child.terminate()
        try:
            child.wait(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
        raise
    if child.returncode == 0:
        return json.loads((Path(output) / RESULT).read_text()), None
    return None, f"harness failed: {_last_line(stderr) or f'exit {child.returncode}'}"


def run_columns(sel, python, out: Path) -> tuple:
    """Run the selection `sel` on one Keras release, whose workers run on `python`,
    in child processes writing under `out`; return (cells, environment, failed,
    seconds).

    The whole selection runs first in one child (out/all).  If that child fails,
    each configuration runs again in a child of its own (out/<id>), so that one
    configuration the harness cannot run on this release does not take the others
    with it.  `cells` maps each cell key (its values of baseline.CELL) to its baseline
    columns (baseline.cell_class); the cells of a configuration that failed on its own
    are `error` cells with the child's reason.  `environment` is the environment
    block of the last child that succeeded ({} when none did).  `failed`
    maps the id of each configuration that failed on its own to that reason.
    `seconds`: the wall time of the children, a reused one's as it first ran."""
    result, reason, seconds = _run_child(python, out / "all", selection_request(sel))
    done = [result] if reason is None else []
    failed = {}
    if reason is not None:  # isolate the configuration(s) that fail
        for c in sel.configurations:
            result, why, more = _run_child(python, out / c.id, selection_request(sel, [c.id]))
            seconds += more
            if why is None:
                done.append(result)
            else:
                failed[c.id] = why
    cells, environment = {}, {}
    for result in done:
        environment = result["environment"]
        for c in result["cells"]:
            cells[tuple(c[f] for f in baseline.CELL)] = c
    for opt, why in failed.items():
        for combo in itertools.product(sel.families, [opt], sel.backends, sel.dtypes, sel.modes,
                                       sel.scenarios):
            c = {**dict(zip(baseline.CELL, combo)), "verdict": "error", "first_divergent_step": "",
                 "divergent_state": "", "magnitude": "error", "reason": why}
            cells[combo] = c
    return cells, environment, failed, round(seconds)


def main(argv) -> int:
    args = _parser().parse_args(list(argv))
    versions = list(dict.fromkeys(release(v) for v in listed(args.keras)))
    if not versions:
        raise UsageError("--keras needs at least one release")
    if args.gradients:
        raise UsageError("a matrix runs the seeded scenarios; --gradients is not supported")
    args.inputs = [("--work", args.work)]
    sel, output, formats = selection_from_args(args, replace_output=False)
    work = Path(args.work).resolve()
    try:
        check_folder(work, what="--work", replace=False)
        for version in versions:  # before anything is created
            venv_folder(work, version)
            inside(work, "runs", version)
    except OutputRefused as exc:
        raise UsageError(str(exc)) from None
    (work / "runs").mkdir(parents=True, exist_ok=True)
    if not (work / MARKER).exists():
        write_marker(work, "matrix --work")
    all_backends = list(sel.backends)
    settings = dict(settings_of(sel, ["json"]))
    releases, columns = {}, {}
    for version in versions:
        print(f"keras {version}: preparing", file=sys.stderr, flush=True)
        python, reason = prepare(version, work, args.timeout)
        if python is None:
            releases[version] = {"status": UNSUPPORTED, "reason": reason}
            columns[version] = None
            print(f"keras {version}: unsupported: {reason}", file=sys.stderr, flush=True)
            continue
        probes = probe_backends(python, version, all_backends)
        usable = [b for b in all_backends if probes[b] is None]
        releases[version] = {"status": "ran" if usable else UNSUPPORTED,
                             "reason": "; ".join(f"{b}: {r}" for b, r in probes.items() if r)}
        if not usable:
            columns[version] = None
            continue
        sel.backends = usable
        out = work / "runs" / version
        print(f"keras {version}: running on {', '.join(usable)}", file=sys.stderr, flush=True)
        cells, env, failed, seconds = run_columns(sel, python, out)
        sel.backends = all_backends
        if failed:
            releases[version]["reason"] = "; ".join(
                [releases[version]["reason"]] * bool(releases[version]["reason"])
                + [f"{o}: {w}" for o, w in failed.items()])
        backends = env.get("backends", {})
        releases[version].update(
            wall_seconds=seconds,
            backends=backends,
            backends_text=", ".join(
                f"{b} {backends[b]['version']}" + (
                    "" if backends[b]["keras"] == version
                    else f" (keras {backends[b]['keras']}!)")
                for b in usable if b in backends))
        columns[version] = cells
    if all(c is None for c in columns.values()):
        raise UsageError("no release could run: " + "; ".join(
            f"{v}: {r['reason']}" for v, r in releases.items()))
    cells = [c for c in (dict(zip(baseline.CELL, k)) for k in itertools.product(
        *(settings[baseline.LISTS[f]] for f in baseline.CELL)))
        if distinct(c["backend"], c["mode"])]  # torch's compiled run is its eager one
    write_report(Path(args.output), settings, versions, releases, columns, cells, work)
    n = len(consecutive_changes(columns, versions))
    print(f"matrix written to {args.output}/matrix.md ({len(versions)} releases, {n} cell "
          "changes between consecutive releases)")
    return 0


if __name__ == "__main__":
    with interruptible():
        run_release(json.load(sys.stdin))
