"""`verify-optimizers merge DIR... [--output OUT]`: join the reports of the N
shards of one selection (`verify-optimizers --shard K/N`, `check --shard K/N`)
into the report the unsharded run writes: the same rows, verdicts and per-step
tables, the same files byte for byte but the environment block, which lists
each shard's.

It refuses (exit 2, one line, nothing written) a folder that is not a shard
report, shards of different settings, inputs, formats or Keras and backend
versions, a shard given twice and a missing one.  Exit codes otherwise as
the main command's for the merged rows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
from pathlib import Path

from verify.cli import Parser, claim_output, conclude
from verify.output import read_back, replacing_folder
from verify.report.findings import CELL, steps_path
from verify.report.tables import ROW_FIELDS, Sink
from verify.runner import distinct
from verify.selection import UsageError, report_order

LISTS = ("families", "optimizers", "backends", "dtypes", "modes", "scenarios")
# row fields the JSON report writes as "inf"/"-inf" when infinite
NUMBERS = ("keras_value", "reference_value", "error_bound", "max_abs_error", "max_rel_error",
           "max_scaled_error", "drift", "final_drift")
# format -> a file of the report that only that format writes
FORMAT_FILES = {"md": "summary.md", "csv": "summary.csv", "json": "summary.json",
                "html": "report.html"}


def _parser():
    p = Parser(prog="verify-optimizers merge",
                description="Join the reports of the shards of one selection (written with "
                            "--shard K/N by the main command or by check) into the report the "
                            "unsharded run writes. Compare a merged check run with the "
                            "baseline by `verify-optimizers check --from OUT`.",
                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folders", nargs="+", metavar="DIR", help="shard report folders")
    p.add_argument("--output", default="reports/latest",
                   help="merged report folder (default %(default)s)")
    return p


def read_shard(folder: Path) -> dict:
    """A shard report's part, inputs digest, settings (in order), environment,
    rows and formats; UsageError if the folder is not one, OutputRefused if it is
    not what the harness wrote (output.read_back)."""
    if not (folder / "shard.json").is_file():
        raise UsageError(f"{folder} is not a shard report (written with --shard K/N: "
                         "shard.json and summary.json of one shard)")
    files = read_back(folder, ["shard.json", "summary.json"], what="shard")
    try:
        shard = json.loads(files["shard.json"])
        doc = json.loads(files["summary.json"])
        k, n = (int(x) for x in shard["part"].split("/"))
        settings, environment, rows = shard["settings"], doc["environment"], doc["rows"]
        consistent = doc["settings"] == {**settings, "shard": shard["part"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        consistent = False
    if not consistent:
        raise UsageError(f"{folder} is not a shard report (written with --shard K/N: "
                         "shard.json and summary.json of one shard)")
    formats = [f for f, name in FORMAT_FILES.items() if (folder / name).is_file()]
    if "csv" not in formats:
        raise UsageError(f"{folder} is not a shard report: it lacks summary.csv and steps/")
    return {"folder": folder, "settings": settings, "inputs": shard["inputs"],
            "environment": environment, "rows": rows, "formats": formats, "part": (k, n),
            "name": shard["part"]}


def _versions(environment) -> tuple:
    return (environment.get("keras"), json.dumps(
        {b: {k: v.get(k) for k in ("keras", "version")}
         for b, v in (environment.get("backends") or {}).items()}, sort_keys=True))


def check_shards(shards) -> None:
    """UsageError unless the shards are every part of one selection, once each."""
    first = shards[0]
    common = first["settings"]
    for s in shards[1:]:
        other = s["settings"]
        differ = [k for k in sorted(set(common) | set(other)) if common.get(k) != other.get(k)]
        if s["inputs"] != first["inputs"]:
            differ.append("inputs (gradients or initial weights)")
        if differ:
            raise UsageError(f"{s['folder']} and {first['folder']} are shards of different "
                             f"settings ({', '.join(differ)} differ)")
        if s["part"][1] != first["part"][1]:
            raise UsageError(f"{s['folder']} is a shard of {s['part'][1]}, {first['folder']} "
                             f"of {first['part'][1]}")
        if s["formats"] != first["formats"]:
            raise UsageError(f"{s['folder']} was written with the formats "
                             f"{','.join(s['formats'])}, {first['folder']} with "
                             f"{','.join(first['formats'])}")
        if _versions(s["environment"]) != _versions(first["environment"]):
            raise UsageError(f"{s['folder']} ran with other Keras or backend versions than "
                             f"{first['folder']}")
    n, seen = first["part"][1], {}
    for s in shards:
        k = s["part"][0]
        if k in seen:
            raise UsageError(f"shard {k}/{n} is given twice: {seen[k]} and {s['folder']}")
        seen[k] = s["folder"]
    missing = [f"{k}/{n}" for k in range(1, n + 1) if k not in seen]
    if missing:
        raise UsageError(f"shard(s) {', '.join(missing)} missing")
    expected = {c for c in itertools.product(*(common[k] for k in LISTS))
                if distinct(c[CELL.index("backend")], c[CELL.index("mode")])}
    owner = {}
    for s in shards:
        for r in s["rows"]:
            cell = tuple(r.get(f) for f in CELL)
            if cell in owner:
                raise UsageError(f"{s['folder']} and {owner[cell]} overlap: both hold "
                                 f"{'-'.join(map(str, cell))}")
            if cell not in expected:
                raise UsageError(f"{s['folder']} holds {'-'.join(map(str, cell))}, outside "
                                 "its settings")
            owner[cell] = s["folder"]
            if r.get("verdict") not in ("error", "n/a") and not (
                    s["folder"] / steps_path(cell)).is_file():
                raise UsageError(f"{s['folder']} lacks {steps_path(cell)}")
    if len(owner) != len(expected):
        absent = next(c for c in sorted(expected) if c not in owner)
        raise UsageError(f"no shard holds {'-'.join(absent)}: the shards are incomplete")


def merged_environment(shards) -> dict:
    """The first shard's environment, every shard's backends, the longest wall
    time (shards run side by side), and each shard's own wall time and timing."""
    ordered = sorted(shards, key=lambda s: s["part"])
    env = {k: v for k, v in ordered[0]["environment"].items() if k != "timing"}
    env["backends"] = {}
    for s in ordered:
        env["backends"].update(s["environment"].get("backends", {}))
    env["wall_seconds"] = max(s["environment"].get("wall_seconds") or 0 for s in ordered)
    env["shards"] = {s["name"]: {
        "wall_seconds": s["environment"].get("wall_seconds"),
        "timing": s["environment"].get("timing")} for s in ordered}
    return env


def _row(r: dict) -> dict:
    """A summary.json row as report.Sink keeps it."""
    return {f: (float(r[f]) if f in NUMBERS and r.get(f) in ("inf", "-inf") else r.get(f))
            for f in ROW_FIELDS}


def merge(shards, output: Path, console=None) -> int:
    console = console or sys.stdout
    settings = shards[0]["settings"]
    formats = shards[0]["formats"]
    with replacing_folder(output, "merge") as tmp:
        sink = Sink(tmp, formats, settings, report_order(settings))
        for s in shards:
            if (s["folder"] / "steps").is_dir():
                shutil.copytree(s["folder"] / "steps", tmp / "steps", dirs_exist_ok=True)
            for r in s["rows"]:
                row = _row(r)
                sink.rows.append(row)
                if row["verdict"] == "mismatch":
                    key = tuple(row[f] for f in CELL)
                    sink.steps(key, tmp / steps_path(key),
                               (int(row["first_divergent_step"]), row["divergent_state"]))
        df = sink.write(merged_environment(shards))
    print(f"merged {len(shards)} shards ({len(df)} rows) into {output}", file=console)
    return conclude(df, output, formats, console)


def main(argv) -> int:
    args = _parser().parse_args(list(argv))
    folders = [Path(f) for f in args.folders]
    shards = [read_shard(f) for f in folders]
    check_shards(shards)
    output = claim_output(args.output, [("shard", f) for f in folders])
    return merge(shards, output)
