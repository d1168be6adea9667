"""report.html of a run, check.html of `check`, matrix.html of `matrix`: one
self-contained file each (verify/report/htmlkit.py), the verdicts as a colour-coded
grid (each cell also says its verdict in a symbol and a word) and a figure
for every family x configuration that mismatches or changed
(verify/report/figures.py; without matplotlib the pages hold the tables only and
say so).

The figures draw per step what the run kept: for a mismatching comparison,
the lockstep scaled error (the largest over the states) and the free-run drift,
reduced to at most POINTS points per line, each the largest value of a bin
of consecutive steps at the step where it occurs, so that no step above the
tolerance is smoothed away.
"""

from __future__ import annotations

import importlib
import json
import sys
from dataclasses import dataclass
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd

from verify import compare
from verify.report import htmlkit
from verify.report.findings import CELL, FINDING_HEADERS, finding_groups, steps_path

POINTS = 250
SYMBOL = {"exact": "=", "match": "\u2248", "n/a": "\u2013", "mismatch": "\u2717", "error": "!"}
STYLE = """
td.v-exact { background: #8fd19e; } td.v-match { background: #dff0d8; }
td.v-mismatch { background: #f5a3a3; } td.v-error { background: #c9b3e6; }
td.v-na { background: #f4f4f4; color: #888; }
td.changed { outline: 3px solid #1f4e9c; outline-offset: -3px; font-weight: bold; }
tr.fails td { background: #fde2e2; }
td a { color: inherit; }
figure { margin: 0 0 1.5em; } figcaption { font-size: 0.85em; color: #444; }
.note { background: #fff6d6; padding: 0.4em; }
"""
NO_FIGURES = ("Figures need matplotlib (pip install 'verify-optimizers[convergence]'), which "
              "is not installed: this page holds the tables only.")


def plotting():
    """verify.report.figures, or None without matplotlib."""
    try:
        return importlib.import_module("verify.report.figures")
    except ImportError:
        return None


def cell_id(key) -> str:
    return "-".join(str(k) for k in key)


# --- per-step traces ----------------------------------------------------------
class Bins:
    """A series of known length, fed in consecutive pieces, reduced to the largest
    value of each of at most `points` bins of consecutive steps, at the step where
    it occurs (NaN counts as inf): it holds the bins, never the series."""

    def __init__(self, length: int, points: int = POINTS):
        self.size = 1 if length <= points else -(-length // points)
        self.seen = 0
        self.steps, self.values = [], []

    def add(self, step, values) -> None:
        step, values = np.asarray(step), np.asarray(values, dtype=np.float64)
        values = np.where(np.isnan(values), np.inf, values)
        i = 0
        while i < len(values):
            at = self.seen % self.size
            n = min(self.size - at, len(values) - i)
            j = i + int(np.argmax(values[i:i + n]))
            if at == 0:
                self.steps.append(step[j])
                self.values.append(values[j])
            elif values[j] > self.values[-1]:  # the first of equal values stays
                self.steps[-1], self.values[-1] = step[j], values[j]
            i += n
            self.seen += n

    def result(self) -> tuple:
        return np.asarray(self.steps), np.asarray(self.values, dtype=np.float64)


@dataclass
class Trace:
    """What a figure draws of one comparison, already reduced to bins: per step
    the largest scaled error over the states (at the first divergence, that of
    the divergent state; after it, a state that keeps departing is not hidden
    behind one that departed once) and the drift."""
    state: str | None         # the divergent state, named in titles
    scaled_step: np.ndarray
    scaled: np.ndarray
    drift_step: np.ndarray
    drift: np.ndarray
    first: tuple | None       # (first divergent step, its scaled error)


def trace(table: pd.DataFrame, state=None, first_step=None) -> Trace:
    """A comparison's per-step table (report.Sink, steps/*.csv.gz) -> its Trace."""
    return trace_of([table], len(table), state, first_step)


def trace_of(tables, length: int, state=None, first_step=None) -> Trace:
    """trace() of a per-step table of `length` rows given as consecutive pieces."""
    scaled_bins, drift_bins, first = Bins(length), Bins(length), None
    for table in tables:
        step = table["step"].to_numpy()
        scaled = table[[c for c in table.columns if c.endswith("_scaled")]].to_numpy(
            dtype=np.float64).max(axis=1)
        if first_step is not None and (step == first_step).any():
            first = (int(first_step), float(scaled[step == first_step][0]))
        scaled_bins.add(step, scaled)
        drift_bins.add(step, table["drift"].to_numpy(dtype=np.float64))
    return Trace(state, *scaled_bins.result(), *drift_bins.result(), first)


def _bins_note(steps: int) -> str:
    size = -(-(steps + 1) // POINTS)
    binned = (f"Each point is the largest value of {size} consecutive steps; values " if size > 1
              else "Values ")
    return (binned + "below 1e-3 (scaled error) or 1e-18 (drift), 0 included, are drawn at the "
            "bottom, above 1e200 at the top, inf as a triangle there")


# --- the verdict grid ---------------------------------------------------------
def _verdict_class(verdict) -> str:
    return "v-na" if verdict == "n/a" else f"v-{verdict}"


def legend_html() -> str:
    return "<p>" + " ".join(
        f'<span class="{_verdict_class(v)}" style="padding:2px 6px">{escape(SYMBOL[v])} {v}</span>'
        for v in SYMBOL) + "</p>"


def grid(df: pd.DataFrame, links=None, marks=None) -> str:
    """family x configuration against backend x dtype x mode: the worst verdict
    over the scenarios, how many scenarios mismatch, `n/a` where nothing ran.
    links: (family, optimizer) -> anchor; marks: {(family, optimizer, backend,
    dtype, mode): text} to highlight (changed cells)."""
    links, marks = links or {}, marks or {}
    cols = list(dict.fromkeys(zip(df.backend, df.dtype, df["mode"])))
    rows = list(dict.fromkeys(zip(df.family, df.optimizer)))
    groups = {k: g for k, g in df.groupby(["family", "optimizer", "backend", "dtype", "mode"],
                                           sort=False)}
    head = ("<table class='grid'><tr><th>family</th><th>configuration</th>"
            + "".join(f"<th>{escape(b)}<br>{escape(d)}<br>{escape(m)}</th>" for b, d, m in cols)
            + "</tr>")
    body = []
    for fam, opt in rows:
        tds = []
        for col in cols:
            key = (fam, opt) + col
            g = groups.get(key)
            verdict = "n/a" if g is None else compare.worst(g.verdict)
            text = f"{SYMBOL[verdict]} {verdict}"
            if verdict == "mismatch":
                text += f" {int((g.verdict == 'mismatch').sum())}/{len(g)}"
            text = escape(text)
            if verdict == "mismatch" and (fam, opt) in links:
                text = f'<a href="#{links[fam, opt]}">{text}</a>'
            cls = _verdict_class(verdict)
            if key in marks:
                cls += " changed"
                text += f"<br>\u0394 {escape(marks[key])}"
            tds.append(f'<td class="{cls}" data-cell="{escape("/".join(key))}" '
                       f'data-verdict="{verdict}">{text}</td>')
        body.append(f"<tr><th>{escape(fam)}</th><th>{escape(opt)}</th>" + "".join(tds) + "</tr>")
    return "\n".join([head] + body) + "</table>"


# --- figures -------------------------------------------------------------------
def _png(figs, title, lines_by_panel, legend, settings) -> bytes:
    return figs.divergence_figure(title, lines_by_panel, legend, compare.TOLERANCE,
                                  settings["steps"], notes=_bins_note(settings["steps"]))


def _figure(figs, title, lines_by_panel, legend, settings, cells, alt) -> str:
    return htmlkit.img(_png(figs, title, lines_by_panel, legend, settings), alt,
                       cells=" ".join(cells))


def _scenario_legend(settings, scenarios) -> list:
    order = settings["scenarios"]
    return [(s, order.index(s), "-") for s in order if s in scenarios]


MODE_STYLES = {"eager": ("-", ""), "compiled": ("--", " (dashed)"), "jit": ("-.", " (dash-dot)"),
               "fit": (":", " (dotted)"), "resume": ((0, (3, 1, 1, 1, 1, 1)), " (dash-dot-dot)")}


def _mode_legend(settings, modes) -> list:
    return [(m + MODE_STYLES[m][1], None, MODE_STYLES[m][0]) for m in settings["modes"]
            if m in modes]


def _finding(figs, family, optimizer, cells, settings) -> tuple:
    """cells: [(key, Trace)], all of one family x configuration -> (title, panels,
    legend, alt): one row per backend x dtype, a line per mode x scenario
    (colour: scenario; line style: mode)."""
    panels = {}
    for key, t in cells:
        _, _, backend, dtype, mode, scenario = key
        panels.setdefault(f"{backend}\n{dtype}", []).append(figs.Line(
            t, settings["scenarios"].index(scenario), MODE_STYLES[mode][0]))
    states = ", ".join(dict.fromkeys(t.state for _, t in cells))
    legend = _scenario_legend(settings, {k[5] for k, _ in cells})
    legend += _mode_legend(settings, {k[4] for k, _ in cells})
    title = (f"{family} / {optimizer}: {len(cells)} mismatching cell(s); first divergent "
             f"state: {states}")
    alt = (f"{family} / {optimizer}: per-step scaled error and free-run drift of "
           f"{len(cells)} mismatching cells")
    return title, panels, legend, alt


def finding_figure(figs, family, optimizer, cells, settings) -> str:
    title, panels, legend, alt = _finding(figs, family, optimizer, cells, settings)
    return _figure(figs, title, panels, legend, settings, [cell_id(k) for k, _ in cells], alt)


def finding_png(folder, family, optimizer) -> bytes:
    """The figure of one finding as a PNG, from a report folder written with csv
    and json (summary.csv, summary.json, steps/)."""
    folder = Path(folder)
    settings = json.loads((folder / "summary.json").read_text())["settings"]
    df = pd.read_csv(folder / "summary.csv", keep_default_na=False, na_values=[""])
    bad = df[(df.family == family) & (df.optimizer == optimizer) & (df.verdict == "mismatch")]
    if bad.empty:
        raise ValueError(f"{folder} has no mismatching cell of {family} / {optimizer}")
    cells = []
    for _, r in bad.iterrows():
        key = tuple(r[f] for f in CELL)
        cells.append((key, read_trace(folder / steps_path(key), r.divergent_state,
                                      int(r.first_divergent_step))))
    figs = importlib.import_module("verify.report.figures")
    title, panels, legend, _ = _finding(figs, family, optimizer, cells, settings)
    return _png(figs, title, panels, legend, settings)


# --- report.html of a run -----------------------------------------------------
def _settings_line(s) -> str:
    return (f"{len(s['families'])} families x {len(s['optimizers'])} configurations x "
            f"{', '.join(s['backends'])} x {', '.join(s['dtypes'])} x {', '.join(s['modes'])} "
            f"x {len(s['scenarios'])} scenarios ({', '.join(s['scenarios'])}); {s['steps']} "
            f"steps x {s['size']} elements, seed {s.get('seed', 0)}; tolerance "
            f"{s.get('tolerance', compare.TOLERANCE):g} (scaled error).")


def _versions(environment) -> str:
    backends = environment.get("backends", {})
    return f"Keras {environment.get('keras', '?')}; " + ", ".join(
        f"{b} {v.get('version')}" for b, v in sorted(backends.items()))


def _num(v) -> str:
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3g}"


def render(df: pd.DataFrame, settings: dict, traces: dict, environment: dict, formats) -> str:
    """report.html: df is the run's summary frame, traces {cell key: Trace} of
    its mismatching cells."""
    figs = plotting()
    csv = "csv" in formats
    files = {"md": "summary.md, steps.md", "csv": "summary.csv, steps/", "json": "summary.json"}
    parts = ["<h1>verify-optimizers report</h1>", f"<p>{escape(_settings_line(settings))}</p>",
             "<p>Other files of this report: " + escape("; ".join(
                 text for f, text in files.items() if f in formats) or "none") + ".</p>"]
    if figs is None:
        parts.append(f'<p class="note">{escape(NO_FIGURES)}</p>')
    groups = (finding_groups(df, ["keras"]), finding_groups(df))
    links = {(f, o): f"finding-{f}-{o}" for g in groups for f, o, *_ in g}
    parts += ["<h2>Verdicts</h2>",
              f"<p>Worst verdict over the scenarios ({escape(' < '.join(compare.VERDICT_ORDER))}"
              "), with how many scenarios mismatch; a mismatch links to its finding.</p>",
              legend_html(), grid(df, links)]
    counts = df.groupby(["family", "verdict"], sort=False).size()
    parts.append("<p>" + escape(", ".join(f"{f} {v}: {n}" for (f, v), n in counts.items()))
                 + "</p>")
    if figs is not None:
        parts.append(f"<p>Figures: per mismatching cell, per step, the lockstep scaled error, "
                     f"the largest over the states (log axis; the dashed red line is the tolerance "
                     f"{compare.TOLERANCE:g}; a dot marks the first divergent step) and the "
                     f"free-run drift of the weights. {escape(_bins_note(settings['steps']))}."
                     "</p>")
    for heading, intro, found in (
            ("Failures: the keras family", "A keras-family mismatch means Keras's math is not "
             "what the harness states it is: the run fails (exit 1).", groups[0]),
            ("Findings", "Where the article's or the papers' formulas depart from what Keras "
             "computes, why, and where it shows.", groups[1])):
        if heading.startswith("Failures") and not found:
            continue
        parts += [f"<h2>{heading}</h2>", f"<p>{escape(intro)}</p>"]
        if not found:
            parts.append("<p>None.</p>")
        for family, optimizer, causes, rows, group in found:
            anchor = links[family, optimizer]
            jump = ([f'<a href="#figure-{anchor}">figure</a>'] if figs is not None else []) + [
                f'<a href="#cells-{anchor}">its {len(group)} mismatching cells'
                + (" and their per-step tables" if csv else "") + "</a>"]
            parts += [f'<h3 id="{anchor}">{escape(family)} / {escape(optimizer)}</h3>',
                      "<p>" + " \u00b7 ".join(jump) + "</p>",
                      "<ul>" + "".join(f"<li>{escape(c)}</li>" for c in causes) + "</ul>",
                      htmlkit.table(FINDING_HEADERS, rows)]
            keys = [tuple(r[f] for f in CELL) for _, r in group.iterrows()]
            if figs is not None:
                drawn = [(k, traces[k]) for k in keys if k in traces]
                parts.append(f'<figure id="figure-{anchor}">'
                             + finding_figure(figs, family, optimizer, drawn, settings)
                             + "</figure>")
            parts.append(_cells_table(group, csv, f"cells-{anchor}"))
    errors = df[df.verdict == "error"]
    if len(errors):
        parts += ["<h2>Comparisons that could not run</h2>", htmlkit.table(
            ["cell", "reason"], [(cell_id(tuple(r[f] for f in CELL)), r.reason)
                                 for _, r in errors.iterrows()])]
    parts += ["<hr>", f'<section id="environment"><p>{escape(_versions(environment))}</p>'
                      "<p>The full environment is in summary.json and summary.md.</p></section>"]
    return htmlkit.page("verify-optimizers report", parts, STYLE)


def _cells_table(group, csv, anchor) -> str:
    """The mismatching cells of a finding, each linked to its per-step table."""
    rows = []
    for _, r in group.iterrows():
        key = tuple(r[f] for f in CELL)
        name = escape(cell_id(key[2:]))
        link = f'<a href="{escape(steps_path(key))}">{name}</a>' if csv else name
        rows.append(f"<tr><td>{link}</td><td>{int(r.first_divergent_step)}</td>"
                    f"<td>{escape(str(r.divergent_state))}</td><td>{_num(r.max_scaled_error)}"
                    f"</td><td>{_num(r.max_rel_error)}</td><td>{_num(r.final_drift)}</td></tr>")
    what = "per-step tables" if csv else "cells (per-step tables need --format csv)"
    return (f'<details id="{anchor}"><summary>{len(group)} mismatching {what}</summary>'
            "<table><tr><th>backend-dtype-mode-scenario</th><th>first step</th><th>state</th>"
            "<th>max scaled error</th><th>max rel. error</th><th>final drift</th></tr>"
            + "".join(rows) + "</table></details>")


# --- check.html and matrix.html -----------------------------------------------
def read_trace(path, state=None, first_step=None):
    """The Trace of a per-step table on disk, or None when there is none."""
    try:
        table = pd.read_csv(path, compression="gzip")
    except (OSError, ValueError):
        return None
    return trace(table, state, first_step)


def _mismatch(c) -> bool:
    return c is not None and c["verdict"] == "mismatch"


def _cell_key(c) -> tuple:
    return tuple(c[f] for f in CELL)


def render_check(head: str, outcome: str, changes, describe, folder, rows, settings,
                 formats) -> str:
    """check.html: the run's grid with the changed cells marked, the changes,
    and per family x configuration one figure of the changed cells as they are
    now (the baseline holds classes only: its first divergent step is the
    dotted vertical line, its class in the caption)."""
    figs = plotting()
    parts = ["<h1>verify-optimizers check</h1>", f"<p>{escape(head)}</p>",
             f"<p><b>{escape(outcome)}</b></p>"]
    if "html" in formats:
        parts.append('<p>The whole run: <a href="report.html">report.html</a>.</p>')
    if figs is None and changes:
        parts.append(f'<p class="note">{escape(NO_FIGURES)}</p>')
    marks = {}
    for c in changes:
        k = _cell_key(c.cell)[:5]
        marks[k] = marks.get(k, 0) + 1
    if changes:
        parts += ["<h2>Changed cells</h2>", "<table><tr><th>cell</th><th>baseline</th>"
                  "<th>now</th><th>changed</th><th>fails</th></tr>" + "".join(
                      f'<tr class="{"fails" if c.fails else "rounding"}"><td>'
                      f'{escape(cell_id(_cell_key(c.cell)))}</td><td>{escape(describe(c.before))}'
                      f"</td><td>{escape(describe(c.after))}</td><td>{escape(c.what)}</td><td>"
                      f'{"yes" if c.fails else "no"}</td></tr>' for c in changes) + "</table>"]
    parts += ["<h2>Verdicts now</h2>", "<p>A framed cell holds changed cells (\u0394: how "
              "many of its scenarios).</p>", legend_html(),
              grid(pd.DataFrame(rows), marks={k: f"{n} changed" for k, n in marks.items()})]
    if figs is not None and changes:
        parts += ["<h2>Figures of the changed cells</h2>",
                  f"<p>As now, per step: the lockstep scaled error, the largest over the states, "
                  f"log axis, tolerance "
                  f"{compare.TOLERANCE:g} dashed red, a dot at the first divergent step; the "
                  f"dotted vertical line is the baseline's first divergent step; beside it the "
                  f"free-run drift. {escape(_bins_note(settings['steps']))}.</p>"]
        by_config = {}
        for c in changes:
            by_config.setdefault(_cell_key(c.cell)[:2], []).append(c)
        for (family, optimizer), group in by_config.items():
            parts += [f"<h3>{escape(family)} / {escape(optimizer)}</h3>",
                      _check_figure(figs, family, optimizer, group, describe, folder, settings)]
    return htmlkit.page("verify-optimizers check", parts, STYLE)


def _check_figure(figs, family, optimizer, changes, describe, folder, settings) -> str:
    panels, drawn, missing, captions = {}, [], [], []
    for c in changes:
        key = _cell_key(c.cell)
        _, _, backend, dtype, mode, scenario = key
        t = None
        if c.after is not None and c.after["verdict"] != "error":
            t = read_trace(folder / steps_path(key), None,
                           c.after["first_divergent_step"] if _mismatch(c.after) else None)
        captions.append(f"{cell_id(key[2:])}: baseline {describe(c.before)}; now "
                        f"{describe(c.after)}")
        if t is None:
            missing.append(cell_id(key))
            continue
        drawn.append(cell_id(key))
        before = c.before["first_divergent_step"] if _mismatch(c.before) else None
        panels.setdefault(f"{backend}\n{dtype}", []).append(figs.Line(
            t, settings["scenarios"].index(scenario), MODE_STYLES[mode][0], before))
    out = []
    if panels:
        scenarios = {k.split("-")[-1] for k in drawn}
        modes = {k.split("-")[-2] for k in drawn}
        legend = (_scenario_legend(settings, scenarios) + _mode_legend(settings, modes)
                  + [("baseline's first divergence", None, ":")])
        out.append(_figure(figs, f"{family} / {optimizer}: {len(drawn)} changed cell(s), now",
                           panels, legend, settings, drawn,
                           f"{family} / {optimizer}: per-step scaled error and drift of "
                           f"{len(drawn)} changed cells, now"))
    if missing:
        out.append(f"<p>No per-step table (the cell did not run): {escape(', '.join(missing))}"
                   "</p>")
    return ("<figure>" + "".join(out) + "<figcaption><ul>"
            + "".join(f"<li>{escape(x)}</li>" for x in captions) + "</ul></figcaption></figure>")


def render_matrix(settings, versions, releases, worst, changes, describe, runs) -> str:
    """matrix.html: the worst verdict per configuration and release (a changed
    one framed), the changes, and per family x configuration one figure of its
    changed cells, before (the older release, dashed) and after (solid), from
    the per-release runs' per-step tables (runs: version -> the run folders that
    may hold them).
    worst: [(family, optimizer, {version: verdict or 'unsupported'})]."""
    figs = plotting()
    parts = ["<h1>Keras version matrix</h1>", f"<p>{escape(_settings_line(settings))}</p>",
             htmlkit.table(["keras", "status", "backends", "run (s)", "reason"],
                           [(v, r["status"], r.get("backends_text", ""),
                             r.get("wall_seconds", ""), r.get("reason", ""))
                            for v, r in releases.items()])]
    if figs is None and changes:
        parts.append(f'<p class="note">{escape(NO_FIGURES)}</p>')
    changed = {}
    for a, b, c in changes:
        changed.setdefault((c.cell["family"], c.cell["optimizer"], b), []).append(c)
    head = "<table><tr><th>family</th><th>configuration</th>" + "".join(
        f"<th>{escape(v)}</th>" for v in versions) + "</tr>"
    body = []
    for family, optimizer, by_version in worst:
        tds = []
        for v in versions:
            verdict = by_version[v]
            shown = "n/a" if verdict not in SYMBOL else verdict
            n = len(changed.get((family, optimizer, v), []))
            cls = _verdict_class(shown) + (" changed" if n else "")
            text = f"{SYMBOL[shown]} {verdict}" + (f"<br>\u0394 {n} changed" if n else "")
            tds.append(f'<td class="{cls}" data-cell="{escape(f"{family}/{optimizer}/{v}")}" '
                       f'data-verdict="{escape(verdict)}">{text}</td>')
        body.append(f"<tr><th>{escape(family)}</th><th>{escape(optimizer)}</th>"
                    + "".join(tds) + "</tr>")
    parts += ["<h2>Worst verdict per configuration</h2>",
              "<p>Over backends, dtypes, modes and scenarios; a framed cell has cells whose "
              "class differs from the previous release that ran them.</p>", legend_html(),
              head + "\n".join(body) + "</table>", "<h2>Changes between consecutive releases</h2>"]
    if not changes:
        parts.append("<p>None.</p>")
    else:
        parts.append(htmlkit.table(["releases", "cell", "before", "after", "changed"], [
            (f"{a} -> {b}", cell_id(_cell_key(c.cell)), describe(c.before), describe(c.after),
             c.what) for a, b, c in changes]))
    if figs is not None and changes:
        parts.append(f"<p>Per step, before (the older release, dashed) and after (solid): the "
                     f"lockstep scaled error, the largest over the states (log axis, tolerance "
                     f"{compare.TOLERANCE:g} dashed red) and the free-run drift. "
                     f"{escape(_bins_note(settings['steps']))}.</p>")
        by_config = {}
        for a, b, c in changes:
            by_config.setdefault(_cell_key(c.cell)[:2], []).append((a, b, c))
        for (family, optimizer), group in by_config.items():
            parts += [f"<h3>{escape(family)} / {escape(optimizer)}</h3>",
                      _matrix_figure(figs, family, optimizer, group, describe, runs, settings)]
    return htmlkit.page("Keras version matrix", parts, STYLE)


def _matrix_figure(figs, family, optimizer, changes, describe, runs, settings) -> str:
    panels, drawn, missing, captions = {}, [], [], []
    for a, b, c in changes:
        key = _cell_key(c.cell)
        _, _, backend, dtype, mode, scenario = key
        captions.append(f"{a} -> {b}, {cell_id(key[2:])}: {describe(c.before)} -> "
                        f"{describe(c.after)}")
        for version, cls, dashed in ((b, c.after, False), (a, c.before, True)):  # dashed on top
            paths = [f / steps_path(key) for f in runs.get(version) or ()]
            path = next((p for p in paths if p.exists()), None)
            t = None
            if cls is not None and cls["verdict"] != "error" and path is not None:
                t = read_trace(path, None, cls["first_divergent_step"] if _mismatch(cls)
                               else None)
            if t is None:
                missing.append(f"{cell_id(key)} in {version}")
                continue
            drawn.append(f"{cell_id(key)}@{version}")
            panels.setdefault(f"{backend} {dtype}\n{mode}, {a} -> {b}", []).append(figs.Line(
                t, settings["scenarios"].index(scenario), "--" if dashed else "-"))
    out = []
    if panels:
        scenarios = {k.split("@")[0].split("-")[-1] for k in drawn}
        legend = _scenario_legend(settings, scenarios) + [
            ("before (older release)", None, "--"), ("after", None, "-")]
        out.append(_figure(figs, f"{family} / {optimizer}: changed cells before and after",
                           panels, legend, settings, drawn,
                           f"{family} / {optimizer}: per-step scaled error and drift of the "
                           f"changed cells in both releases"))
    if missing:
        out.append(f"<p>No per-step table: {escape(', '.join(missing))}</p>")
    return ("<figure>" + "".join(out) + "<figcaption><ul>"
            + "".join(f"<li>{escape(x)}</li>" for x in captions) + "</ul></figcaption></figure>")


def main(argv) -> int:
    """python -m verify.report.html REPORT FAMILY/CONFIGURATION OUT.png: one
    finding's figure as a file (the README's figure is made this way)."""
    if len(argv) != 3 or argv[1].count("/") != 1:
        print("usage: python -m verify.report.html REPORT FAMILY/CONFIGURATION OUT.png",
              file=sys.stderr)
        return 2
    family, optimizer = argv[1].split("/")
    Path(argv[2]).write_bytes(finding_png(argv[0], family, optimizer))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
