#!/usr/bin/env python3
"""Regenerate the committed reports under reports/.

    python reports/regenerate.py                 every report (hours: the matrix)
    python reports/regenerate.py explain claims  only these
    python reports/regenerate.py --list          names, costs and command lines

REPORTS holds each report's command lines, the one place they are written down
(docs/reports.md points here; tests/test_reports_fresh.py reads them to name the
command that regenerates a stale report).  `verify-optimizers` stands for this
interpreter's `python -m verify.cli` run on this checkout, `{scratch}` for a
temporary folder.  The costs are wall times on the 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent


class Report(NamedTuple):
    cost: str
    commands: tuple


REPORTS = {
    "baseline": Report("9 min", ("verify-optimizers check --update-baseline",)),
    "bench": Report("14 min", ("verify-optimizers bench --repeat 1 --output reports/bench",)),
    "claims": Report("1 min", ("verify-optimizers claims --output reports/claims",)),
    "convergence": Report("5 min", ("verify-optimizers convergence --output reports/convergence",)),
    "explain": Report("15 min, estimated",
                      ("verify-optimizers explain --output reports/explain.md",)),
    "figures": Report("3 min, estimated", (
        "verify-optimizers --family article --optimizer nadam,adagrad,sgd_momentum "
        "--steps 300 --size 256 --output {scratch}/run",
        "python -m verify.report.html {scratch}/run article/nadam "
        "reports/figures/article-nadam.png")),
    "low_precision": Report("10 min", (
        "verify-optimizers --family keras --dtype float16,bfloat16,mixed_float16,mixed_bfloat16 "
        "--steps 30 --size 64 --format md,html --output reports/low_precision",)),
    "matrix": Report("2 h or more", (
        "verify-optimizers matrix --keras 3.0.0,3.2.1,3.4.1,3.6.0,3.8.0,3.10.0,3.12.4,3.13.2,"
        "3.14.1,3.15.1 --steps 80 --size 128 --output reports/matrix",)),
    "peers": Report("5 min", (
        "verify-optimizers peers --output reports/peers/peers.md",
        "verify-optimizers port --to torch --output reports/peers/port-to-torch.md",
        "verify-optimizers port --to optax --output reports/peers/port-to-optax.md")),
}

PROGRAMS = {"verify-optimizers": [sys.executable, "-m", "verify.cli"], "python": [sys.executable]}


def argv_of(command: str, scratch: str = "{scratch}") -> list:
    """A command line of REPORTS as the argument list it runs."""
    program, *args = shlex.split(command.replace("{scratch}", scratch))
    return PROGRAMS[program] + args


def regenerate(name: str) -> int:
    """Run one report's commands in order; the first exit code above 1 stops them
    (0 and 1 both leave the report written: 1 is a verified change in Keras's math,
    such as low_precision's XLA float16 mismatch)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with tempfile.TemporaryDirectory(prefix="regenerate-") as scratch:
        for command in REPORTS[name].commands:
            print(f"== {name}: {command}", flush=True)
            code = subprocess.run(argv_of(command, scratch), cwd=ROOT, env=env).returncode
            if code > 1:
                return code
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="reports/regenerate.py", description=__doc__.split("\n")[0])
    p.add_argument("report", nargs="*", help=f"{', '.join(REPORTS)} (default: every one)")
    p.add_argument("--list", action="store_true", help="print the reports, costs and commands")
    args = p.parse_args(argv)
    unknown = [name for name in args.report if name not in REPORTS]
    if unknown:
        p.error(f"unknown report {', '.join(unknown)} (choose from {', '.join(REPORTS)})")
    if args.list:
        for name, report in REPORTS.items():
            print(f"{name} ({report.cost}):", *(f"  {c}" for c in report.commands), sep="\n")
        return 0
    failed = {name: code for name in (args.report or REPORTS) if (code := regenerate(name))}
    for name, code in failed.items():
        print(f"regenerate: {name} failed (exit {code})", file=sys.stderr)
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
