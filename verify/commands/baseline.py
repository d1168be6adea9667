"""The baseline's cell model, shared by `check` and `matrix`: a cell's class, the
changes between two sets of cells, and the baseline on disk.

A cell is one family x configuration x backend x dtype x mode x scenario.
Its *class* is what the check compares:

  verdict               exact, match, mismatch, error
  first_divergent_step  and divergent_state (mismatches)
  magnitude             exact -> "exact", match -> "rounding"; a mismatch ->
                        the decade of its largest relative error ("1e-03" for
                        [1e-3, 1e-2)), "inf" when one side is NaN or infinite;
                        error -> "error"
  reason                for a non-error cell, the states only one side has

Why the decade: a mismatch's relative error is set by the formula that
differs, not by rounding; rounding moves it by a relative 1e-7 (float32) or
1e-16 (float64), so a rerun of the same Keras stays in the same decade unless
the value sits within that of a power of ten, while a changed term moves it by
orders of magnitude.  The exact values are not compared: they are in the
run's report.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from verify import compare
from verify.output import OutputRefused, read_back, replacing_folder
from verify.report.findings import CELL
from verify.runner import distinct
from verify.selection import UsageError

FORMAT = 1
CLASS = ("verdict", "first_divergent_step", "divergent_state", "magnitude", "reason")
COLUMNS = CELL + CLASS
# selection flag -> key of the settings that lists its values, in run order
LISTS = {"family": "families", "optimizer": "optimizers", "backend": "backends",
         "dtype": "dtypes", "mode": "modes", "scenario": "scenarios"}
NUMBERS = ("steps", "size", "seed")
REQUIRED_SETTINGS = tuple(LISTS.values()) + NUMBERS + (
    "configurations", "tolerance", "comparison", "precision")
AGREE = ("exact", "match")


# --- cell classes -----------------------------------------------------------
def magnitude(verdict, max_rel_error) -> str:
    """The magnitude class of a cell (see the module docstring)."""
    if verdict == "exact":
        return "exact"
    if verdict == "match":
        return "rounding"
    if verdict in ("error", "n/a"):
        return verdict
    x = _float(max_rel_error)
    if x is None or math.isnan(x) or math.isinf(x):
        return "inf"
    if x <= 0:
        return "0"
    return f"1e{math.floor(math.log10(x)):+03d}"


def _float(v):
    if v is None or v == "":
        return None
    return float(v)  # also "inf", as the JSON report writes infinities


def cell_class(row: dict) -> dict:
    """A report row (summary.json) -> the baseline columns of its cell."""
    verdict = row["verdict"]
    step = row.get("first_divergent_step")
    return {**{k: row[k] for k in CELL}, "verdict": verdict,
            "first_divergent_step": "" if step is None or verdict != "mismatch" else int(step),
            "divergent_state": (row.get("divergent_state") or "") if verdict == "mismatch" else "",
            "magnitude": magnitude(verdict, row.get("max_rel_error")),
            "reason": (row.get("reason") or "")}


def cell_id(cell: dict, with_family=True) -> str:
    keys = CELL if with_family else CELL[1:]
    return "-".join(str(cell[k]) for k in keys)


def math_key(c: dict) -> tuple:
    """What must not change: exact and match are one class; an error's reason
    is free text (paths, library messages) and not compared."""
    agree = c["verdict"] in AGREE
    return ("agree" if agree else c["verdict"], c["first_divergent_step"], c["divergent_state"],
            "" if agree else c["magnitude"],
            "" if c["verdict"] in ("error", "n/a") else c["reason"])


def describe(c: dict | None) -> str:
    if c is None:
        return "(absent)"
    if c["verdict"] == "mismatch":
        text = (f"mismatch at step {c['first_divergent_step']} in {c['divergent_state']}, "
                f"rel. error {c['magnitude']}")
    elif c["verdict"] == "error":
        return "error: " + _short(c["reason"])
    else:
        text = c["verdict"]
    return text + (f" ({_short(c['reason'])})" if c["reason"] else "")


def _short(text, n=90):
    return text if len(text) <= n else text[:n - 3] + "..."


@dataclass
class Change:
    cell: dict
    before: dict | None
    after: dict | None
    what: str
    fails: bool


def compare_cells(before: list, after: list, strict=False) -> list:
    """Cell-by-cell changes, in the baseline's order (cells only in `after` last)."""
    key = lambda c: tuple(c[k] for k in CELL)  # noqa: E731
    now = {key(c): c for c in after}
    seen, changes = set(), []
    for b in before:
        k = key(b)
        seen.add(k)
        a = now.get(k)
        if a is None:
            changes.append(Change(b, b, None, "cell missing from the run", True))
            continue
        what = _what_changed(b, a)
        if what:
            rounding_only = math_key(a) == math_key(b)
            changes.append(Change(b, b, a, what, strict or not rounding_only))
    for k, a in now.items():
        if k not in seen:
            changes.append(Change(a, None, a, "cell not in the baseline", True))
    return changes


def _what_changed(b, a) -> str:
    if math_key(a) == math_key(b):
        return "" if a["verdict"] == b["verdict"] else "rounding only (exact <-> match)"
    parts = []
    if (b["verdict"] in AGREE) != (a["verdict"] in AGREE) or (
            b["verdict"] not in AGREE and b["verdict"] != a["verdict"]):
        parts.append("verdict")
    else:
        for field, name in (("first_divergent_step", "first divergent step"),
                            ("divergent_state", "divergent state"), ("magnitude", "magnitude")):
            if a[field] != b[field]:
                parts.append(name)
        if a["reason"] != b["reason"] and a["verdict"] != "error":
            parts.append("unmatched states")
    return ", ".join(parts)


# --- the baseline on disk ---------------------------------------------------
@dataclass
class Baseline:
    path: Path
    settings: dict
    environment: dict
    cells: list  # dicts with COLUMNS, in run order


def malformed(path, what):
    return UsageError(f"malformed baseline {path}: {what}")


def load_baseline(path) -> Baseline:
    path = Path(path)
    meta_path, cells_path = path / "baseline.json", path / "cells.csv"
    if not path.is_dir():
        raise UsageError(f"no baseline at {path} (write one with `verify-optimizers check "
                         "--update-baseline`)")
    for p in (meta_path, cells_path):
        if not p.is_file():
            raise malformed(path, f"{p.name} is missing")
    try:
        files = read_back(path, [meta_path.name, cells_path.name], what="malformed baseline")
    except OutputRefused as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:
        raise malformed(path, f"cannot read it: {exc}") from None
    try:
        meta = json.loads(files[meta_path.name].decode())
    except UnicodeDecodeError as exc:
        raise malformed(path, f"cannot read baseline.json: {exc}") from None
    except json.JSONDecodeError as exc:
        raise malformed(path, f"baseline.json is not JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise malformed(path, f"baseline.json has format {found!r}, expected {FORMAT}")
    settings, environment = meta.get("settings"), meta.get("environment")
    if not isinstance(settings, dict) or not isinstance(environment, dict):
        raise malformed(path, "baseline.json needs objects `settings` and `environment`")
    for k in REQUIRED_SETTINGS:
        if k not in settings:
            raise malformed(path, f"settings lack `{k}`")
    for k in LISTS.values():
        v = settings[k]
        if not (isinstance(v, list) and v and all(isinstance(x, str) for x in v)):
            raise malformed(path, f"settings `{k}` must be a non-empty list of names")
    for k in NUMBERS:
        if not isinstance(settings[k], int) or isinstance(settings[k], bool) or settings[k] < 0:
            raise malformed(path, f"settings `{k}` must be a non-negative integer")
    for k, kind, what in (("configurations", dict, "an object"), ("precision", dict, "an object"),
                          ("comparison", str, "a string"), ("tolerance", (int, float), "a number")):
        if not isinstance(settings[k], kind) or isinstance(settings[k], bool):
            raise malformed(path, f"settings `{k}` must be {what}")
    if not all(isinstance(v, str) for v in settings["precision"].values()):
        raise malformed(path, "settings `precision` must map backends to strings")
    backends = environment.get("backends", {})
    if not isinstance(backends, dict) or not all(isinstance(v, dict) for v in backends.values()):
        raise malformed(path, "environment `backends` must map backends to objects")
    cells = _read_cells(path, files[cells_path.name])
    expected = [c for c in (dict(zip(CELL, combo)) for combo in
                            itertools.product(*(settings[LISTS[k]] for k in CELL)))
                if distinct(c["backend"], c["mode"])]
    have = {tuple(c[k] for k in CELL) for c in cells}
    missing = [c for c in expected if tuple(c[k] for k in CELL) not in have]
    if missing:
        raise malformed(path, f"cells.csv lacks {len(missing)} cell(s) of its settings, e.g. "
                         f"{cell_id(missing[0])}")
    if len(cells) != len(expected):
        wanted = {tuple(c[k] for k in CELL) for c in expected}
        extra = next(c for c in cells if tuple(c[k] for k in CELL) not in wanted)
        raise malformed(path, f"cells.csv has a cell outside its settings: {cell_id(extra)}")
    return Baseline(path, settings, environment, cells)


def _read_cells(path, data: bytes) -> list:
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise malformed(path, f"cannot read cells.csv: {exc}") from None
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header != list(COLUMNS):
        raise malformed(path, f"cells.csv header must be {','.join(COLUMNS)}")
    cells, seen = [], set()
    for line, values in enumerate(reader, start=2):
        if len(values) != len(COLUMNS):
            raise malformed(path, f"cells.csv line {line}: {len(values)} fields, expected "
                             f"{len(COLUMNS)}")
        c = dict(zip(COLUMNS, values))
        if c["verdict"] not in compare.VERDICT_ORDER:
            raise malformed(path, f"cells.csv line {line}: unknown verdict {c['verdict']!r}")
        if c["verdict"] == "mismatch":
            try:
                c["first_divergent_step"] = int(c["first_divergent_step"])
            except ValueError:
                raise malformed(path, f"cells.csv line {line}: a mismatch needs an integer "
                                 "first_divergent_step") from None
            if not c["divergent_state"]:
                raise malformed(path, f"cells.csv line {line}: a mismatch needs a divergent_state")
            if not _valid_decade(c["magnitude"]):
                raise malformed(path, f"cells.csv line {line}: bad magnitude {c['magnitude']!r}")
        elif c["first_divergent_step"] or c["divergent_state"] or c["magnitude"] != magnitude(
                c["verdict"], None):
            raise malformed(path, f"cells.csv line {line}: a {c['verdict']} cell has no divergence "
                             f"and magnitude {magnitude(c['verdict'], None)!r}")
        k = tuple(c[f] for f in CELL)
        if k in seen:
            raise malformed(path, f"cells.csv line {line}: duplicate cell {cell_id(c)}")
        seen.add(k)
        cells.append(c)
    return cells


def _valid_decade(m) -> bool:
    if m in ("inf", "0"):
        return True
    return len(m) >= 4 and m[:2] == "1e" and m[2] in "+-" and m[3:].isdigit()


def write_baseline(path, settings, environment, cells) -> None:
    """Write cells.csv, baseline.json and README.md; replace `path` whole."""
    with replacing_folder(Path(path), "baseline") as tmp:
        with open(tmp / "cells.csv", "w", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(COLUMNS)
            for c in cells:
                w.writerow([c[k] for k in COLUMNS])
        meta = {"format": FORMAT, "settings": settings, "environment": environment}
        (tmp / "baseline.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(_baseline_readme(settings, environment, cells))


def _baseline_readme(settings, environment, cells) -> str:
    counts = pd.DataFrame(cells).groupby(["family", "verdict"]).size()
    backends = environment.get("backends", {})
    return "\n".join([
        "# Baseline of `verify-optimizers check`", "",
        "Written by `verify-optimizers check --update-baseline`; do not edit by hand.", "",
        "- `cells.csv`: one line per family x configuration x backend x dtype x mode x "
        "scenario, in run order: " + ", ".join(f"`{c}`" for c in COLUMNS) + ". "
        "`magnitude` is `exact`, `rounding` (match), the decade of a mismatch's largest "
        "relative error (`1e-03` is [1e-3, 1e-2)), `inf` or `error`; `reason` lists the "
        "states only one side has (for errors: why it could not run).",
        "- `baseline.json`: the settings the cells were computed with (what `check` re-runs) "
        "and the environment.", "",
        f"Keras {environment.get('keras', '?')}; "
        + ", ".join(f"{b} {v.get('version')}" for b, v in sorted(backends.items()))
        + f"; {settings['steps']} steps x {settings['size']} elements, seed {settings['seed']}; "
        + f"{len(cells)} cells: " + ", ".join(f"{f} {v} {n}" for (f, v), n in counts.items())
        + ".", ""])
