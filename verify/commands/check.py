"""`verify-optimizers check`: re-run a committed baseline's verification and
compare it cell by cell.

A cell and its class: verify/commands/baseline.py.

The check fails (exit 1) when a cell's math class changes: exact/match <->
mismatch or error, another first divergent step, state, magnitude or set of
unmatched states.  exact <-> match is rounding only: reported, and a failure
only with --strict.  Exit 2: missing or malformed baseline, a baseline backend
that is not installed, settings that cannot be reproduced, bad flags.
"""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pandas as pd
from tabulate import tabulate

import reference
from verify import api, compare, configurations, scenarios
from verify.cli import (add_shard_flag, build_parser, one_line, progress_display,
                        selection_from_args, selection_parser)
from verify.commands.baseline import (CELL, CLASS, LISTS, NUMBERS, REQUIRED_SETTINGS, malformed,
                                      cell_class, cell_id, compare_cells, describe,
                                      load_baseline, write_baseline)
from verify.configurations import CONFIGURATIONS
from verify.output import OutputRefused, add_files, check_folder, read_back
from verify.report import html as html_report
from verify.report.tables import records
from verify.selection import UsageError, installed_backends, listed

DEFAULT_BASELINE = "reports/baseline"
DEFAULT_OUTPUT = "reports/check"


# --- selections from a baseline ---------------------------------------------
def _parser():
    p = selection_parser("check", "Re-run the baseline's verification (or the subset the "
                         "selection flags choose) and compare it cell by cell. Exit 0 no change, "
                         "1 a cell's math changed, 2 usage, baseline or environment error, or "
                         "cells that could not be verified.", DEFAULT_OUTPUT)
    p.set_defaults(seed=None, output=None)
    p.add_argument("--baseline", default=DEFAULT_BASELINE,
                   help="baseline folder (default %(default)s)")
    p.add_argument("--update-baseline", action="store_true",
                   help="run the selection and write it as the baseline (defaults: the "
                        "existing baseline's settings, else the main command's)")
    p.add_argument("--strict", action="store_true",
                   help="also fail on exact <-> match (rounding-only) changes")
    p.add_argument("--keras-path", action="append", default=[], metavar="DIR",
                   help="put DIR first on the workers' import path (e.g. an edited keras)")
    add_shard_flag(p)
    p.add_argument("--from", dest="from_run", metavar="DIR",
                   help="compare the run report in DIR (e.g. `verify-optimizers merge` of the "
                        "shards of `check --shard K/N`) with the baseline instead of running, "
                        "and add the check's files to DIR; with --update-baseline, write it as "
                        "the baseline. No selection flags: DIR's settings are the selection")
    return p


# flags that choose or place a run, which --from takes from the run's report
RUN_FLAGS = ("backend", "dtype", "family", "optimizer", "scenario", "mode", "steps", "size",
             "seed", "gradients", "full", "keras_path", "shard", "output", "format")


def _restrict(args, settings) -> None:
    """Selection flags default to the baseline's settings and must stay within them."""
    for flag, key in LISTS.items():
        allowed = settings[key]
        chosen = listed(getattr(args, flag))
        outside = [x for x in chosen if x not in allowed]
        if outside:
            raise UsageError(f"{flag} {outside[0]!r} is not in the baseline "
                             f"({', '.join(allowed)})")
        values = [x for x in allowed if x in chosen] if chosen else list(allowed)
        setattr(args, flag, [",".join(values)])
    if args.full:
        raise UsageError("a check re-runs the baseline's --steps and --size; --full is for "
                         "--update-baseline")
    for k in NUMBERS:
        given = getattr(args, k)
        if given is not None and given != settings[k]:
            raise UsageError(f"--{k} {given} differs from the baseline's {settings[k]}: a check "
                             "re-runs the baseline's settings")
        setattr(args, k, settings[k])


def _defaults_from(args, settings) -> None:
    """Unset selection flags take the settings' values (for --update-baseline);
    --config or --config-file replace its configurations."""
    for flag, key in LISTS.items():
        if flag == "optimizer" and (args.config or args.config_file):
            continue
        if not listed(getattr(args, flag)):
            values = settings[key]
            if flag == "backend":
                values = [b for b in values if b in installed_backends()]
            setattr(args, flag, [",".join(values)] if values else [])
    for k in NUMBERS:
        if getattr(args, k) is None and not (args.full and k in ("steps", "size")):
            setattr(args, k, settings[k])


def recorded(settings, path) -> dict:
    """The baseline's own configurations (given with --config when it was written)."""
    try:
        return {i: configurations.from_keras(c, f"configuration {i!r}", explicit_id=i)
                for i, c in settings["configurations"].items() if i not in CONFIGURATIONS}
    except configurations.ConfigError as exc:
        raise malformed(path, str(exc)) from None


def _reproducible(settings, sel) -> None:
    """Raise UsageError unless this checkout computes what the baseline recorded."""
    ids = [c.id for c in sel.configurations if c.id in CONFIGURATIONS]
    for i in ids:
        recorded = settings["configurations"].get(i)
        if recorded != CONFIGURATIONS[i].keras_config():
            raise UsageError(f"cannot reproduce the baseline: configuration {i!r} is "
                             f"{json.dumps(recorded, sort_keys=True)} there and "
                             f"{json.dumps(CONFIGURATIONS[i].keras_config(), sort_keys=True)} "
                             "in verify/configurations.toml")
    if settings["tolerance"] != compare.TOLERANCE:
        raise UsageError(f"cannot reproduce the baseline: tolerance {settings['tolerance']} "
                         f"there, {compare.TOLERANCE} here")
    here = {name: list(shape) for name, shape in sel.weights.items()}
    if settings.get("weights") != here:
        raise UsageError("cannot reproduce the baseline: its weights are "
                         f"{json.dumps(settings.get('weights'))}, here {json.dumps(here)} "
                         "(a baseline from before weights of every shape records none; "
                         "refresh it with check --update-baseline)")
    if settings["comparison"] != "lockstep":
        raise UsageError(f"cannot reproduce the baseline: comparison {settings['comparison']!r}")
    for b in sel.backends:
        here = reference.PRECISIONS[b].describe()
        if settings["precision"].get(b) != here:
            raise UsageError(f"cannot reproduce the baseline: the {b} precision setting there "
                             f"is {settings['precision'].get(b)!r}, here {here!r}")


def _inputs(args) -> list:
    """What the output folder may not overlap."""
    return [("--baseline", args.baseline)] + [("--keras-path", p) for p in args.keras_path]


def plan(argv_or_args):
    """`check` flags against a baseline: (args, baseline, selection, output, formats,
    baseline cells to compare)."""
    args = (_parser().parse_args(argv_or_args) if isinstance(argv_or_args, (list, tuple))
            else argv_or_args)
    if args.gradients:
        raise UsageError("a check re-runs the baseline's seeded scenarios; --gradients is not "
                         "supported")
    if args.update_baseline:
        raise UsageError("plan() is for checks, not --update-baseline")
    if args.config or args.config_file:
        raise UsageError("a check re-runs the baseline's configurations; --config and "
                         "--config-file are for --update-baseline")
    args.output = args.output or DEFAULT_OUTPUT
    args.inputs = _inputs(args)
    baseline = load_baseline(args.baseline)
    s = baseline.settings
    args.recorded = recorded(s, baseline.path)
    for key, known, what in (("families", reference.FAMILIES, "family"),
                             ("optimizers", [*CONFIGURATIONS, *args.recorded],
                              "configuration"),
                             ("scenarios", list(scenarios.SCENARIOS), "scenario")):
        unknown = [x for x in s[key] if x not in known]
        if unknown:
            raise UsageError(f"cannot reproduce the baseline: its {what} {unknown[0]!r} is not "
                             "known here")
    _restrict(args, s)
    wanted = listed(args.backend)
    missing = [b for b in wanted if b not in installed_backends()]
    if missing:
        raise UsageError(f"the baseline's backend {', '.join(missing)} is not installed "
                         "(install it, or check a subset with --backend)")
    sel, output, formats = selection_from_args(args)
    _reproducible(s, sel)
    sel.python_path = [str(Path(p).resolve()) for p in args.keras_path]
    chosen = {flag: set(listed(getattr(args, flag))) for flag in LISTS}
    cells = [c for c in baseline.cells if all(c[f] in chosen[f] for f in LISTS)]
    return args, baseline, sel, output, sorted(set(formats) | {"csv", "json"}), cells


def execute(sel, output, formats, quiet=True, finish=None):
    """Run the selection through the API, reports to `output`: (cells, environment,
    settings).  `finish(folder, rows, settings, environment)` (rows as summary.json
    holds them) may add files before the report appears."""
    got = {}

    def collect(folder, result):
        rows = records(result.rows)
        got["cells"] = [cell_class(r) for r in rows]
        if finish is not None:
            finish(folder, rows, result.settings, result.environment)

    with progress_display(len(sel.runs()) * sel.steps, quiet) as progress:
        result = api.execute(sel, output, formats, progress=progress, finish=collect,
                             command="check")
    return got["cells"], result.environment, result.settings


# --- output -------------------------------------------------------------------
def changes_table(changes, tablefmt="github") -> str:
    rows = [(cell_id(c.cell), describe(c.before), describe(c.after), c.what,
             "yes" if c.fails else "no") for c in changes]
    return tabulate(rows, headers=["cell", "baseline", "now", "changed", "fails"],
                    tablefmt=tablefmt, disable_numparse=True)


def step_detail(output, change, rows=6, shown=None) -> str:
    """Per-step errors of the run (in `output`, named `shown` in the text) around
    where the changed cell diverges."""
    c = change.cell
    if change.after is None:
        return "The cell is not in the run."
    if change.after["verdict"] == "error":
        return f"The cell could not run: {change.after['reason']}"
    path = Path(output) / "steps" / c["family"] / c["optimizer"] / (
        f"{c['backend']}-{c['dtype']}-{c['mode']}-{c['scenario']}.csv.gz")
    try:
        with gzip.open(path, "rt") as f:
            table = pd.read_csv(f)
    except OSError as exc:
        return f"No per-step table: {exc}"
    shown_path = Path(shown or output) / path.relative_to(output)
    steps = [x["first_divergent_step"] for x in (change.after, change.before)
             if x and x["verdict"] == "mismatch"]
    scaled = [col for col in table.columns if col.endswith("_scaled")]
    if steps:
        at = min(steps)
    else:
        at = int(table.step[table[scaled].max(axis=1).idxmax()]) if scaled else 0
    lo = max(0, at - 1)
    part = table[(table.step >= lo) & (table.step < lo + rows)]
    part = part[["step"] + [col for col in table.columns if col.endswith(("_rel", "_scaled"))]
                + ["drift"]]
    body = [[f"{v:.3g}" if isinstance(v, float) else v for v in r]
            for r in part.itertuples(index=False)]
    return (f"Per-step detail of {cell_id(c)} (largest relative and scaled error per state; "
            f"scaled > {compare.TOLERANCE:g} is a mismatch), from {shown_path}:\n\n"
            + tabulate(body, headers=list(part.columns), tablefmt="github",
                       disable_numparse=True))


def _versions(environment) -> str:
    backends = environment.get("backends", {})
    return f"keras {environment.get('keras', '?')} (" + ", ".join(
        f"{b} {v.get('version')}" for b, v in sorted(backends.items())) + ")"


def unverified(change) -> bool:
    """A failing change that says nothing about Keras's math: the cell could not run
    now, or a family's statement of it appeared or went (n/a: the harness changed)."""
    return (change.after is None or change.after["verdict"] == "error"
            or "n/a" in (change.after["verdict"], (change.before or {}).get("verdict")))


def head(baseline, cells, environment) -> str:
    return (f"Baseline {baseline.path}: {_versions(baseline.environment)}; now "
            f"{_versions(environment)}; {len(cells)} cells compared.")


def outcome(baseline, cells, environment, changes, strict) -> str:
    """The result in one sentence."""
    failing = [c for c in changes if c.fails]
    if not changes:
        return (f"no change: all {len(cells)} cells as in the baseline {baseline.path} "
                f"({_versions(baseline.environment)} -> {_versions(environment)})")
    if failing:
        verified = [c for c in failing if not unverified(c)]
        return (f"{len(verified)} cell(s) changed their math class"
                + (" or rounding (--strict)" if strict else "") + "; "
                f"{len(failing) - len(verified)} cell(s) could not be verified (they did "
                "not run).")
    return (f"no math change: {len(changes)} cell(s) changed between exact and match "
            "only (rounding; --strict makes that a failure).")


def report(baseline, cells, environment, changes, folder, strict, shown=None) -> tuple:
    """(text for the console and check.md, exit code): 1 when a cell's math
    changed, 2 when the only failing cells are cells that could not run."""
    failing = [c for c in changes if c.fails]
    result = outcome(baseline, cells, environment, changes, strict)
    if not changes:
        return result, 0
    order = failing + [c for c in changes if not c.fails]
    lines = [head(baseline, cells, environment), "", changes_table(order), "", result]
    verified = [c for c in failing if not unverified(c)]
    if failing:
        lines += ["", step_detail(folder, (verified or failing)[0], shown=shown)]
    return "\n".join(lines), 1 if verified else (2 if failing else 0)


def _check_files(text, changes, html=None) -> dict:
    """check.md and changes.csv; check.html when `html` is (head, outcome, run
    folder, its rows, its settings, formats)."""
    rows = [{"cell": cell_id(c.cell), **{f"baseline_{k}": (c.before or {}).get(k, "")
                                         for k in CLASS},
             **{f"now_{k}": (c.after or {}).get(k, "") for k in CLASS},
             "changed": c.what, "fails": c.fails} for c in changes]
    files = {"check.md": "# verify-optimizers check\n\n" + text + "\n",
             "changes.csv": pd.DataFrame(
                 rows, columns=["cell"] + [f"baseline_{k}" for k in CLASS]
                 + [f"now_{k}" for k in CLASS] + ["changed", "fails"]).to_csv(index=False)}
    if html is not None:
        first, result, folder, rows, settings, formats = html
        order = [c for c in changes if c.fails] + [c for c in changes if not c.fails]
        files["check.html"] = html_report.render_check(
            first, result, order, describe, folder, rows, settings, formats)
    return files


# --- the subcommand -----------------------------------------------------------
def _conclude(args, baseline, cells, folder, rows, settings, environment, formats,
              shown) -> dict:
    """The comparison of a run (its rows and settings, report in `folder`) with the
    baseline's `cells`: its text, exit code, changes and check files."""
    now = [cell_class(r) for r in rows]
    changes = compare_cells(cells, now, strict=args.strict)
    text, code = report(baseline, cells, environment, changes, folder, args.strict, shown=shown)
    html = ((head(baseline, cells, environment),
             outcome(baseline, cells, environment, changes, args.strict), folder, rows, settings,
             formats)
            if "html" in formats else None)
    return {"text": text, "code": code, "changes": changes,
            "files": _check_files(text, changes, html)}


def _announce(result, output, formats, console) -> int:
    print(result["text"], file=console)
    if result["changes"]:
        print(f"\nReport: {output}/check.md, changes.csv"
              + (", check.html" if "html" in formats else "")
              + f"; the run's tables in {output}/",
              file=console)
    if result["code"] == 2:
        failing = [c for c in result["changes"] if c.fails]
        print(one_line(f"verify-optimizers check: error: {len(failing)} cell(s) could not be "
                       f"verified, e.g. {cell_id(failing[0].cell)}: "
                       f"{describe(failing[0].after)}"), file=sys.stderr)
    return result["code"]


def check(args, console=None) -> int:
    console = console or sys.stdout
    args, baseline, sel, output, formats, cells = plan(args)
    if sel.shard is not None:
        return _shard(sel, output, formats, args.quiet, console)
    result = {}

    def finish(folder, rows, settings, environment):
        result.update(_conclude(args, baseline, cells, folder, rows, settings, environment,
                                formats, output))
        for name, content in result["files"].items():
            (folder / name).write_text(content)

    execute(sel, output, formats, quiet=args.quiet, finish=finish)
    return _announce(result, output, formats, console)


def _shard(sel, output, formats, quiet, console) -> int:
    """A shard of a check or of a baseline refresh: its run report only; the
    comparison or the baseline waits for all the shards (merge, then --from)."""
    execute(sel, output, formats, quiet=quiet)
    k, n = sel.shard
    print(f"shard {k}/{n} written to {output}/; when all {n} are done: `verify-optimizers "
          f"merge DIR... --output MERGED`, then `verify-optimizers check --from MERGED`"
          " (with --update-baseline to accept it)", file=console)
    return 0


def read_run(args) -> tuple:
    """--from DIR: (folder, settings, environment, rows, formats) of a complete run
    report; UsageError for selection flags beside it or a folder that is not one."""
    given = [f for f in RUN_FLAGS if getattr(args, f) not in (None, [], False)]
    if given:
        raise UsageError(f"--from takes the selection from the run in "
                         f"{args.from_run}; do not give --{given[0].replace('_', '-')}")
    folder = Path(args.from_run)
    if not (folder / "summary.json").is_file():
        raise UsageError(f"--from {folder} is not a run report (no readable summary.json)")
    files = read_back(folder, ["summary.json"], what="--from")
    try:
        doc = json.loads(files["summary.json"])
        settings, environment, rows = doc["settings"], doc["environment"], doc["rows"]
        [cell_class(r) for r in rows]  # every row a cell: else not a run report
        missing = [k for k in REQUIRED_SETTINGS if k not in settings]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise UsageError(f"--from {folder} is not a run report (no readable "
                         "summary.json)") from None
    if missing:
        raise UsageError(f"--from {folder}: its settings lack `{missing[0]}`")
    if "shard" in settings:
        raise UsageError(f"--from {folder} is shard {settings['shard']} only: merge the shards "
                         "first (`verify-optimizers merge`)")
    formats = [f for f, name in (("md", "summary.md"), ("csv", "summary.csv"),
                                 ("json", "summary.json"), ("html", "report.html"))
               if (folder / name).is_file()]
    return folder, settings, environment, rows, formats


def check_from(args, console=None) -> int:
    """Compare an existing run report with the baseline, as a check of its selection."""
    console = console or sys.stdout
    folder, settings, environment, rows, formats = read_run(args)
    try:
        check_folder(folder, inputs=[("--baseline", args.baseline)], what="--from",
                     replace=False)
    except OutputRefused as exc:
        raise UsageError(str(exc)) from None
    baseline = load_baseline(args.baseline)
    b = baseline.settings
    for key in LISTS.values():
        outside = [x for x in settings[key] if x not in b[key]]
        if outside:
            raise UsageError(f"--from {folder}: its {key} {outside[0]!r} is not in the baseline")
    differ = [k for k in NUMBERS + ("tolerance", "comparison", "weights") if settings.get(k) != b.get(k)]
    differ += [f"configuration {i}" for i in settings["optimizers"]
               if settings["configurations"].get(i) != b["configurations"].get(i)]
    differ += [f"{x} precision" for x in settings["backends"]
               if settings["precision"].get(x) != b["precision"].get(x)]
    if differ:
        raise UsageError(f"--from {folder} ran other settings than the baseline ({differ[0]} "
                         "differs): a check compares the baseline's settings")
    chosen = {flag: set(settings[key]) for flag, key in LISTS.items()}
    cells = [c for c in baseline.cells if all(c[f] in chosen[f] for f in LISTS)]
    result = _conclude(args, baseline, cells, folder, rows, settings, environment, formats,
                       folder)
    add_files(folder, result["files"], "check")
    return _announce(result, folder, formats, console)


def update_from(args, console=None) -> int:
    """--update-baseline --from DIR: the run report in DIR becomes the baseline."""
    console = console or sys.stdout
    folder, settings, environment, rows, _ = read_run(args)
    try:
        check_folder(args.baseline, inputs=[("--from", folder)], what="--baseline")
    except OutputRefused as exc:
        raise UsageError(str(exc)) from None
    _write_new_baseline(args, settings, environment, [cell_class(r) for r in rows], console)
    return 0


def _write_new_baseline(args, settings, environment, now, console) -> None:
    previous = None
    try:
        previous = load_baseline(args.baseline)
    except UsageError:
        pass
    if previous is not None and all(previous.settings[k] == settings[k] for k in NUMBERS):
        keys = {tuple(c[k] for k in CELL) for c in now}
        old = [c for c in previous.cells if tuple(c[k] for k in CELL) in keys]
        changes = compare_cells(old, now, strict=True)
        if changes:
            print(f"Changes from the previous baseline ({_versions(previous.environment)}):\n\n"
                  + changes_table(changes) + "\n", file=console)
    write_baseline(args.baseline, settings, environment, now)
    print(f"baseline written: {args.baseline}/cells.csv ({len(now)} cells), baseline.json; "
          f"{_versions(environment)}, {environment.get('wall_seconds')} s", file=console)


def update(args, console=None) -> int:
    console = console or sys.stdout
    args.output = args.output or DEFAULT_OUTPUT
    if args.gradients:
        raise UsageError("a baseline records seeded scenarios; --gradients is not supported")
    try:
        check_folder(args.baseline, what="--baseline")
    except OutputRefused as exc:
        raise UsageError(str(exc)) from None
    args.inputs = _inputs(args)
    try:
        previous = load_baseline(args.baseline)
        args.recorded = recorded(previous.settings, previous.path)
    except UsageError:
        previous = None
    if previous is not None:
        _defaults_from(args, previous.settings)
    if args.seed is None:
        args.seed = build_parser().get_default("seed")
    sel, output, formats = selection_from_args(args)
    sel.python_path = [str(Path(p).resolve()) for p in args.keras_path]
    formats = sorted(set(formats) | {"csv", "json"})
    if sel.shard is not None:
        return _shard(sel, output, formats, args.quiet, console)
    now, environment, settings = execute(sel, output, formats, quiet=args.quiet)
    _write_new_baseline(args, settings, environment, now, console)
    return 0


def main(argv) -> int:
    args = _parser().parse_args(list(argv))
    if args.from_run is not None:
        return update_from(args) if args.update_baseline else check_from(args)
    return update(args) if args.update_baseline else check(args)
