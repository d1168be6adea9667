"""Reports: summary rows, per-step tables, markdown / CSV / JSON files.

Everything except the environment block is a function of the inputs, so the
same inputs give byte-identical files.
"""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path

import pandas as pd
from tabulate import tabulate

import reference
from reference.explanations import cause
from verify import compare
from verify.report.findings import CELL, FINDING_HEADERS, finding_groups, steps_path
from verify.report.html import render, trace, trace_of
from verify.scenarios import DESCRIPTIONS, WEIGHTS

ROW_FIELDS = [
    "family", "optimizer", "backend", "dtype", "mode", "scenario", "steps", "verdict",
    "first_divergent_step", "divergent_state", "divergent_weight", "keras_value", "reference_value",
    "error_bound", "max_abs_error", "max_rel_error", "max_scaled_error", "mismatch_steps",
    "drift", "final_drift", "precision", "reason", "serialization", "explanation",
    "low_precision",
]
EXCERPT_STEPS = 6  # steps shown around a divergence in the markdown excerpts
STEP_ROWS = 10_000  # rows of a per-step table read at once


class _Appending:
    """A file object that opens its file only to append each write (no descriptor
    held between chunks, however many comparisons are open)."""

    def __init__(self, path: Path):
        self.path = path

    def write(self, data) -> None:
        if len(data):
            with open(self.path, "ab") as f:
                f.write(data)

    def flush(self) -> None:
        pass  # every write is already on disk


class StepFiles:
    """RunComparison.on_table: each chunk's per-step table appended as CSV rows to
    one gzip stream per scenario (per state its error columns, and the drift), so that the
    harness keeps no per-step table in memory.  The files hold the bytes pandas'
    to_csv(compression={"method": "gzip", "mtime": 0, "compresslevel": 6}) writes
    for the whole table: deflate's output does not depend on how its input is cut,
    and pandas flushes (Z_SYNC_FLUSH) once before closing, as close() does."""

    def __init__(self, paths: list, temporary: bool):
        self.paths, self.temporary = paths, temporary  # temporary: not part of the report
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
        self.streams = [gzip.GzipFile(filename=str(p), fileobj=_Appending(p), mode="wb",
                                      compresslevel=6, mtime=0) for p in paths]
        self.started = [False] * len(paths)

    def __call__(self, table: dict) -> None:
        for s in range(len(self.streams)):
            self.append(s, pd.DataFrame({"_".join(k) if isinstance(k, tuple) else k:
                                         v if k == "step" else v[:, s]
                                         for k, v in table.items()}))

    def append(self, s: int, frame: pd.DataFrame) -> None:
        """The next rows of the s-th table (its header before the first)."""
        self.streams[s].write(frame.to_csv(header=not self.started[s], index=False).encode())
        self.started[s] = True

    def close(self) -> None:
        for stream in self.streams:
            if not stream.closed:
                stream.flush()
                stream.close()

    def remove(self) -> None:
        self.close()
        for path in self.paths:
            path.unlink(missing_ok=True)


def _num(x):
    """JSON-safe number: None for NaN, "inf"/"-inf" for infinities."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return None
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def records(df: pd.DataFrame) -> list:
    """Rows as summary.json holds them: dicts, None for a missing value, JSON-safe
    numbers (_num)."""
    return [{k: (_num(v) if isinstance(v, float) else v) for k, v in r.items()}
            for r in df.astype(object).where(df.notna(), None).to_dict("records")]


def compared(comparison, error=None, not_stated=None) -> bool:
    """Does a row hold its comparison's results (not an error or n/a)?"""
    return (not_stated is None and error is None and comparison is not None
            and not comparison.error)


def summary_row(family, run, scenario, steps: int, comparison=None, index=None, error=None,
                not_stated=None) -> dict:
    """One comparison's summary row (ROW_FIELDS): of scenario `index` of
    `comparison`, or an error or a configuration the family does not state."""
    base = {"family": family, "optimizer": run.configuration.id, "backend": run.backend,
            "dtype": run.dtype, "mode": run.mode, "scenario": scenario,
            "steps": steps, "precision": run.backend,
            "serialization": getattr(run, "round_trip", None) or ""}
    if not_stated is not None:
        return {**{f: None for f in ROW_FIELDS}, **base, "verdict": "n/a",
                "reason": not_stated, "mismatch_steps": 0}
    if not compared(comparison, error, not_stated):
        reason = error if error is not None else comparison.error
        return {**{f: None for f in ROW_FIELDS}, **base, "verdict": "error",
                "reason": reason, "mismatch_steps": 0}
    s = comparison.summary(index)
    d = s["divergence"]
    reason = ""
    layout = comparison.layout
    if layout.only_keras:
        reason += f"Keras state not in the reference: {', '.join(layout.only_keras)}. "
    if layout.only_reference:
        reason += f"reference state not in Keras: {', '.join(layout.only_reference)}. "
    for text in layout.unmatched.values():
        reason += f"{text}. "
    for text in comparison.notes[index]:
        reason += f"{text}. "
    return {
        **base, "verdict": s["verdict"],
        "first_divergent_step": d.step if d else None,
        "divergent_state": d.state if d else None,
        "divergent_weight": (d.weight or None) if d else None,
        "keras_value": d.keras if d else None,
        "reference_value": d.reference if d else None,
        "error_bound": d.bound if d else None,
        "max_abs_error": s["max_abs_error"], "max_rel_error": s["max_rel_error"],
        "max_scaled_error": s["max_scaled_error"], "mismatch_steps": s["mismatch_steps"],
        "drift": s["drift"], "final_drift": s["final_drift"], "reason": reason.strip(),
        "low_precision": s["low_precision"] or None,
    }


class StepTables:
    """The per-step tables of a run: where each goes as it is written (StepFiles),
    and what the reports take from them, read back in pieces: the excerpt around a
    first divergence (steps.md) and the figure's trace (report.html); with
    `keep_tables`, the tables themselves (for a later `replay` into a folder)."""

    def __init__(self, out_dir: Path | None, formats: set, steps: int, keep_tables=False):
        self.out_dir, self.formats, self.steps = out_dir, formats, steps
        self.excerpts = {}
        self.traces = {}  # cell -> html_report.Trace of a mismatching comparison
        self.keep_tables = keep_tables
        self.tables = {}  # cell -> its per-step table, with keep_tables
        self._divergences = {}  # cell -> (state, step) of its first divergence

    def files(self, keys: list, spill: Path) -> StepFiles:
        """The files of the tables of cells `keys` (Sink.step_files)."""
        if "csv" in self.formats:
            return StepFiles([self.out_dir / steps_path(k) for k in keys], temporary=False)
        return StepFiles([spill / steps_path(k) for k in keys], temporary=True)

    def finished(self, key, path: Path, divergence) -> None:
        """The table of cell `key` at `path` is complete; `divergence`: its first
        (step, state), or None."""
        self.read_back(key, path, divergence)
        if self.keep_tables:
            self.tables[key] = pd.read_csv(path, compression="gzip")
            self._divergences[key] = None if divergence is None else divergence[::-1]

    def read_back(self, key, path: Path, divergence) -> None:
        """At a divergence (step, state), keep the excerpt around it and the
        figure's trace from the per-step table at `path` (gzip'd CSV), read in
        pieces of STEP_ROWS rows: nothing held grows with the steps."""
        if divergence is None:
            return
        step, state = divergence
        lo = max(0, step - 1)
        excerpt = []

        def pieces():
            with pd.read_csv(path, compression="gzip", chunksize=STEP_ROWS) as tables:
                for table in tables:
                    excerpt.append(table[(table.step >= lo) & (table.step < lo + EXCERPT_STEPS)])
                    yield table

        if "html" in self.formats:
            self.traces[key] = trace_of(pieces(), self.steps + 1, state, step)
        else:
            for _ in pieces():
                pass
        self.excerpts[key] = pd.concat(excerpt)

    def replay(self, out_dir: Path, formats: set) -> None:
        """The kept tables written into `out_dir` in `formats`, their traces made anew."""
        if not self.keep_tables:
            raise ValueError("the run did not keep its per-step tables")
        self.out_dir, self.formats, self.traces = out_dir, formats, {}
        for key, table in self.tables.items():
            if "csv" in self.formats:
                files = StepFiles([self.out_dir / steps_path(key)], temporary=False)
                files.append(0, table)
                files.close()
            if self._divergences[key] is not None and "html" in self.formats:
                self.traces[key] = trace(self.tables[key], *self._divergences[key])


class Sink:
    """Collects summary rows and the per-step tables (StepTables: each written as
    soon as it is final into `out_dir`, None: nowhere); writes the reports."""

    def __init__(self, out_dir: Path | None, formats, settings: dict, order: dict,
                 keep_tables=False):
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.formats = set(formats) if out_dir is not None else set()
        self.settings = settings
        self.order = order  # field -> list giving the row order
        self.rows = []
        self.step_tables = StepTables(self.out_dir, self.formats, settings["steps"],
                                      keep_tables)

    @property
    def tables(self) -> dict:
        """cell -> its per-step table, with keep_tables."""
        return self.step_tables.tables

    def row(self, family, run, scenario, comparison=None, index=None, error=None,
            not_stated=None, steps=None):
        """One comparison's row; `steps` the path of its per-step table (StepFiles)."""
        row = summary_row(family, run, scenario, self.settings["steps"], comparison, index,
                          error, not_stated)
        self.rows.append(row)
        if not compared(comparison, error, not_stated):
            return
        key = (family, run.configuration.id, run.backend, run.dtype, run.mode, scenario)
        self.step_tables.finished(key, steps, None if row["first_divergent_step"] is None
                                  else (row["first_divergent_step"], row["divergent_state"]))

    def step_files(self, family, run, scenarios, spill: Path) -> StepFiles:
        """Where a comparison's per-step tables go as they come: the report's
        steps/ when csv is a format, else a file in `spill` read back by row()."""
        return self.step_tables.files(
            [(family, run.configuration.id, run.backend, run.dtype, run.mode, s)
             for s in scenarios], spill)

    def steps(self, key, path: Path, divergence) -> None:
        """The per-step table of a merged cell (verify/commands/merge.py)."""
        self.step_tables.read_back(key, path, divergence)

    def replay(self, out_dir: Path, formats, environment: dict) -> pd.DataFrame:
        """Write the reports of a finished run (its tables kept) into `out_dir`."""
        self.step_tables.replay(Path(out_dir), set(formats))
        self.out_dir, self.formats = self.step_tables.out_dir, self.step_tables.formats
        return self.write(environment)

    def frame(self) -> pd.DataFrame:
        df = pd.DataFrame(self.rows, columns=ROW_FIELDS)
        keys = []
        for field, values in self.order.items():
            keys.append(df[field].map({v: i for i, v in enumerate(values)}))
        df = df.assign(**{f"_k{i}": k for i, k in enumerate(keys)})
        df = df.sort_values([f"_k{i}" for i in range(len(keys))], kind="stable")
        df = df.drop(columns=[f"_k{i}" for i in range(len(keys))]).reset_index(drop=True)
        df["explanation"] = explanations(df)
        return df

    def write(self, environment: dict) -> pd.DataFrame:
        df = self.frame()
        write_reports(self.out_dir, self.formats, df, self.settings, environment,
                      self.step_tables)
        return df


# --- final files --------------------------------------------------------
def write_reports(out_dir: Path, formats: set, df: pd.DataFrame, settings: dict,
                  environment: dict, step_tables: StepTables) -> None:
    """summary.csv, summary.json, summary.md and steps.md, report.html, as `formats` say."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if "csv" in formats:
        df.to_csv(out_dir / "summary.csv", index=False)
    if "json" in formats:
        doc = {"environment": environment, "settings": settings, "rows": records(df)}
        (out_dir / "summary.json").write_text(
            json.dumps(doc, indent=1, sort_keys=True, allow_nan=False) + "\n")
    if "md" in formats:
        (out_dir / "summary.md").write_text(markdown(df, settings, environment))
        (out_dir / "steps.md").write_text(steps_markdown(df, step_tables.excerpts))
    if "html" in formats:
        (out_dir / "report.html").write_text(
            render(df, settings, step_tables.traces, environment, formats))


def markdown(df: pd.DataFrame, settings: dict, environment: dict) -> str:
    s = settings
    lines = settings_markdown(s)
    lines += ["## Verdicts", "",
              "Worst verdict over the scenarios; exact < match < n/a < mismatch < error "
              "(n/a: the family does not state the configuration).", "",
              pivot(df, tablefmt="github"), ""]
    lines += ["## Serialization", "",
              "Each configuration is built from its class and, beside it, rebuilt "
              "through Keras's public serialization round trip (keras.optimizers."
              "serialize, JSON, keras.optimizers.deserialize; model.save stores the same "
              "serialized dict) and run for a few steps; a rebuilt optimizer that fails "
              "or computes differently is listed here.", ""]
    lines += serialization(df) or ["Every configuration survives it: the rebuilt "
                                   "optimizer computes bit for bit what the original does.",
                                   ""]
    if "low_precision" in df and df.low_precision.fillna("").ne("").any():
        lines += ["## Low precision", "",
                  "Where float16 or bfloat16 changes the math qualitatively: Keras's "
                  "state compared, each step, with the keras rule in float64 from the "
                  "same state and the unrounded gradient (verify/compare.py, "
                  "LowPrecision).", ""]
        lines += low_precision(df)
    lines += ["## Findings", "",
              "Where the article's or the papers' formulas depart from what Keras "
              "computes, why, and where it shows (a mismatch of the keras family would "
              "be a failure instead, listed under Deviations).", ""]
    lines += findings(df) or ["None.", ""]
    lines += ["## Deviations", "",
              "Every mismatch and error, grouped where the first divergent step and "
              "state agree; per-scenario rows are under All comparisons, per-step "
              "excerpts in steps.md.", ""]
    dev = deviations(df)
    lines += [_table(dev) if len(dev) else "None.", ""]
    lines += ["## All comparisons", "",
              _table(df.drop(columns=["precision", "explanation", "low_precision"])), ""]
    lines += ["## References", ""]
    for family in s["families"]:
        for opt_id in s["optimizers"]:
            class_name = s["configurations"][opt_id]["class_name"]
            try:
                rule = reference.get_rule(family, class_name)
            except reference.Unsupported:
                continue
            lines += [f"### {family} / {opt_id}", "", f"Source: {rule.source}", "",
                      "```", rule.doc, "```", ""]
            if rule.choices:
                lines += [f"Choices: {rule.choices}", ""]
    lines += ["## Precision settings", "",
              tabulate([(p.name, p.describe()) for p in reference.PRECISIONS.values()
                        if p.name in s["backends"]],
                       headers=["backend", "rounding modelled"], tablefmt="github"), ""]
    lines += ["## Scenarios", "",
              tabulate([(n, DESCRIPTIONS.get(n, "user gradient file")) for n in s["scenarios"]],
                       headers=["scenario", "gradients"], tablefmt="github"), ""]
    lines += ["## Weights", "",
              "Each scenario's optimizer updates these weights at once (Keras variables "
              "named <scenario>_<weight>); a row's verdict and errors are the worst over "
              "its weights, and divergent_weight names the weight of the first divergence.",
              "",
              tabulate([(n, "x".join(map(str, shape)) or "()",
                         WEIGHTS.get(n, "from the user's gradient file"))
                        for n, shape in s.get("weights", {}).items()],
                       headers=["weight", "shape", "stands for"], tablefmt="github"), ""]
    lines += ["---", "", "## Environment", "", "```json",
              json.dumps(environment, indent=1, sort_keys=True), "```", ""]
    return "\n".join(lines)

def steps_markdown(df: pd.DataFrame, excerpts: dict) -> str:
    lines = ["# Per-step excerpts around each first divergence", "",
             "Columns: per state, the largest absolute, relative and scaled error over "
             "the elements at that step; drift is the free-run distance of the weights. "
             "Full per-step tables for every comparison: steps/**/*.csv.gz.", ""]
    for _, r in df[df.verdict == "mismatch"].iterrows():
        key = tuple(r[f] for f in CELL)
        if key not in excerpts:
            continue
        lines += [f"## {' / '.join(key)}", "", _table(excerpts[key]), ""]
    return "\n".join(lines)


def settings_markdown(settings: dict) -> list:
    """summary.md's lines up to its verdicts: what the run was made from
    (tests/test_reports_fresh.py compares a committed report's with today's)."""
    plain = {k: v for k, v in settings.items() if k not in ("configurations", "precision")}
    return ["# verify-optimizers report", "", "## Settings", "", tabulate(
        [(k, ", ".join(map(str, v)) if isinstance(v, list) else v) for k, v in plain.items()],
        headers=["setting", "value"], tablefmt="github"), "",
        "## Configurations", "", tabulate(
            [(k, json.dumps(v["config"], sort_keys=True), v["class_name"])
             for k, v in settings["configurations"].items()],
            headers=["id", "config", "Keras class"], tablefmt="github"), ""]


def explanations(df: pd.DataFrame) -> list:
    """For each article or textbook mismatch: the curated cause, then what the
    run measured (first step and state, size in each dtype, drift, and
    whether float32 shows it in the same cell)."""
    cell = ["family", "optimizer", "backend", "mode", "scenario"]
    by_cell = {key: group for key, group in df.groupby(cell, sort=False)}
    out = []
    for _, r in df.iterrows():
        if r.family in reference.JUDGED or r.verdict != "mismatch":
            out.append("")
            continue
        text = cause(r.family, r.optimizer, r.backend, r["dtype"]) or (
            "No curated cause for this cell; see its per-step table.")
        text += (f" First departs at step {int(r.first_divergent_step)} in "
                 f"{r.divergent_state}"
                 + (f" of the {r.divergent_weight} weight." if isinstance(r.divergent_weight, str)
                    else "."))
        others = by_cell[tuple(r[c] for c in cell)]
        sizes = [f"{o.max_rel_error:.2g} in {o['dtype']} ({o.verdict})"
                 for _, o in others.iterrows()]
        text += " Largest relative difference: " + ", ".join(sizes) + "."
        text += f" Free-run drift of the weights after {int(r.steps)} steps: {r.final_drift:.2g}."
        f32 = others[others.dtype == "float32"]
        if len(f32):
            text += (" A float32 user sees it too." if (f32.verdict == "mismatch").any() else
                     " In float32 it stays within rounding here: a float32 user would not "
                     "see it in this scenario.")
        out.append(text)
    return out


def findings(df: pd.DataFrame) -> list:
    """Markdown lines: per article/textbook configuration that departs, its
    causes and where it shows."""
    lines = []
    for family, optimizer, causes, rows, _ in finding_groups(df):
        lines += [f"### {family} / {optimizer}", ""]
        lines += [f"- {c}" for c in causes] + [""]
        lines += [tabulate(rows, headers=FINDING_HEADERS, tablefmt="github",
                           disable_numparse=True), ""]
    return lines


def serialization(df: pd.DataFrame) -> list:
    """Serialization findings, one line per configuration, backend and dtype."""
    bad = df[df.serialization.fillna("") != ""]
    if not len(bad):
        return []
    rows = bad.drop_duplicates(["optimizer", "backend", "dtype"])
    return [tabulate(rows[["optimizer", "backend", "dtype", "serialization"]].values.tolist(),
                     headers=["configuration", "backend", "dtype", "finding"],
                     tablefmt="github"), ""]


# one finding of a row's low_precision (compare.LowPrecision.describe)
LOW_PRECISION_ITEM = re.compile(r"(?P<what>.+?) from step (?P<step>\d+)(?: \((?P<weight>\w+)\))?, "
                                r"(?P<count>\d+) of (?P<total>\d+) element-steps$")


def low_precision(df: pd.DataFrame) -> list:
    """Low-precision findings grouped over backends, modes and scenarios: one line
    per configuration, dtype and finding, with where it shows, its first step and
    the share of element-steps it touches (cells.csv has each cell's)."""
    items = []
    for r in df[df.low_precision.fillna("") != ""].itertuples():
        for text in r.low_precision.split("; "):
            m = LOW_PRECISION_ITEM.match(text)
            items.append({"optimizer": r.optimizer, "dtype": r.dtype, "backend": r.backend,
                          "mode": r.mode, "scenario": r.scenario,
                          "finding": m["what"] if m else text,
                          "step": int(m["step"]) if m else 1,
                          "count": int(m["count"]) if m else 0,
                          "total": int(m["total"]) if m else 0})
    table = []
    for (opt, dtype, finding), g in pd.DataFrame(items).groupby(
            ["optimizer", "dtype", "finding"], sort=False):
        total = g.total.sum()
        table.append([opt, dtype, finding, ", ".join(dict.fromkeys(g.backend)),
                      ", ".join(dict.fromkeys(g["mode"])), g.scenario.nunique(), g.step.min(),
                      f"{100 * g['count'].sum() / total:.3g}%" if total else ""])
    return [tabulate(table, headers=["configuration", "dtype", "finding", "backends", "modes",
                                     "scenarios", "first step", "element-steps"],
                     tablefmt="github", disable_numparse=True), ""]


def deviations(df: pd.DataFrame) -> pd.DataFrame:
    """Mismatch and error rows grouped by where they start."""
    bad = df[df.verdict.isin(["mismatch", "error"])].copy()
    if bad.empty:
        return bad
    keys = ["family", "optimizer", "backend", "dtype", "verdict", "first_divergent_step",
            "divergent_state", "reason"]
    bad[keys] = bad[keys].astype(object).where(bad[keys].notna(), "")
    out = bad.groupby(keys, sort=False).agg(
        modes=("mode", lambda x: ", ".join(dict.fromkeys(x))),
        scenarios=("scenario", lambda x: ", ".join(dict.fromkeys(x))),
        max_rel_error=("max_rel_error", "max"),
        max_scaled_error=("max_scaled_error", "max")).reset_index()
    return out[keys[:5] + ["modes", "scenarios"] + keys[5:7] + ["max_rel_error",
                                                               "max_scaled_error", "reason"]]


def _fmt(v):
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.3g}"
    return "" if v is None else str(v)


def _table(df: pd.DataFrame) -> str:
    return tabulate([[_fmt(v) for v in row] for row in df.astype(object).itertuples(index=False)],
                    headers=list(df.columns), tablefmt="github", disable_numparse=True)


def pivot(df: pd.DataFrame, tablefmt="simple") -> str:
    """Rows family x configuration; columns backend x dtype x mode; worst verdict."""
    col = df["backend"] + " " + df["dtype"] + " " + df["mode"]
    cols = list(dict.fromkeys(col))
    rows = list(dict.fromkeys(zip(df.family, df.optimizer)))
    cells = {}
    for (fam, opt, c), group in df.groupby([df.family, df.optimizer, col], sort=False):
        cells[(fam, opt, c)] = compare.worst(group.verdict)
    body = [[fam, opt] + [cells.get((fam, opt, c), "") for c in cols] for fam, opt in rows]
    headers = ["family", "optimizer"] + [c.replace(" ", "\n") if tablefmt == "simple" else c
                                         for c in cols]
    return tabulate(body, headers=headers, tablefmt=tablefmt)
