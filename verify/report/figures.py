"""Figures (matplotlib, Agg) as PNG bytes: the same input gives the same bytes
(fixed dpi, no software or date metadata).

divergence_figure draws comparisons step by step: per row, the lockstep
scaled error on a log axis with the tolerance line, and beside it the
free-run drift (lines: verify.report.html.Trace, already reduced to bins).
"""

from __future__ import annotations

import atexit
import io
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass

# matplotlib keeps its configuration and font cache in the user's home
# (~/.config, ~/.cache), which the harness never writes: imported here first,
# it uses a temporary folder instead, removed at exit.
_private = "matplotlib" not in sys.modules and "MPLCONFIGDIR" not in os.environ
if _private:
    _config = tempfile.mkdtemp(prefix="verify-optimizers-matplotlib-")
    atexit.register(shutil.rmtree, _config, ignore_errors=True)
    os.environ["MPLCONFIGDIR"] = _config

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import LogLocator, NullLocator  # noqa: E402

if _private:  # matplotlib has read it; child processes must not inherit it
    del os.environ["MPLCONFIGDIR"]

DPI = 100
SCALED_FLOOR = 1e-3     # scaled errors below (0 included) are drawn at the floor
DRIFT_FLOOR = 1e-18     # drift likewise
CEILING = 1e200         # values above (inf included) are drawn at the top
PALETTE = plt.get_cmap("tab10").colors
FIGURE_DPI = 80
WIDTH, LEGEND = 9.0, 1.75  # inches: the figure, the legend on its right
TOP, BOTTOM = 0.5, 0.5      # inches: title and column titles, step label and notes


def png(fig, dpi=DPI) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


@dataclass
class Line:
    trace: object                    # verify.report.html.Trace
    color: int                       # index into PALETTE
    style: str = "-"                 # matplotlib linestyle
    reference_step: int | None = None  # marked by a vertical dotted line (the baseline's step)


def _draw(ax, x, y, floor, top, color, style, width):
    inf = np.isinf(y)
    ax.plot(x, np.clip(y, floor, top), color=color, linestyle=style, linewidth=width)
    if inf.any():
        ax.plot(x[inf], np.full(inf.sum(), top), "^", color=color, markersize=3)


def _top(values, floor, least):
    """The top of a log axis: above the largest finite value, where inf is drawn;
    at most CEILING (log ticks, a stride past the top, must stay below the largest float)."""
    finite = [v[np.isfinite(v)] for v in values]
    largest = max([least] + [float(f.max()) for f in finite if f.size])
    return min(max(largest, floor) * 30, CEILING)


def divergence_figure(title: str, panels: dict, legend: list, tolerance: float, steps: int,
                      notes: str = "") -> bytes:
    """panels: label -> [Line]; legend: [(text, color index or None, linestyle)].
    One row per panel: scaled error (log, tolerance dashed red) and drift (log)."""
    rows = len(panels)
    height = max(TOP + BOTTOM + 1.25 * rows, 0.7 + 0.19 * (len(legend) + 2))
    fig, axes = plt.subplots(rows, 2, figsize=(WIDTH, height), squeeze=False, sharex=True)
    # fixed margins (inches) rather than tight_layout, which costs a third of the time
    fig.subplots_adjust(left=0.75 / WIDTH, right=1 - LEGEND / WIDTH, top=1 - TOP / height,
                        bottom=BOTTOM / height, wspace=0.22, hspace=0.12)
    traces = [line.trace for lines in panels.values() for line in lines]
    top_scaled = _top([t.scaled for t in traces], SCALED_FLOOR, tolerance)
    top_drift = _top([t.drift for t in traces], DRIFT_FLOOR, DRIFT_FLOOR)
    for (label, lines), (ax_s, ax_d) in zip(panels.items(), axes):
        for line in lines:
            t, color = line.trace, PALETTE[line.color % len(PALETTE)]
            style, width = line.style, 1.3 if line.style == "-" else 0.9
            _draw(ax_s, t.scaled_step, t.scaled, SCALED_FLOOR, top_scaled, color, style, width)
            _draw(ax_d, t.drift_step, t.drift, DRIFT_FLOOR, top_drift, color, style, width)
            if t.first is not None:
                y = min(max(t.first[1], SCALED_FLOOR), top_scaled)
                ax_s.plot([t.first[0]], [y], "o", color=color, markersize=3.5)
            if line.reference_step is not None:
                ax_s.axvline(line.reference_step, color=color, linestyle=":", linewidth=1)
        ax_s.axhline(tolerance, color="red", linestyle="--", linewidth=0.8)
        ax_s.set_yscale("log")
        ax_d.set_yscale("log")
        ax_s.set_ylim(SCALED_FLOOR / 2, top_scaled * 2)
        ax_d.set_ylim(DRIFT_FLOOR / 2, top_drift * 2)
        ax_s.set_xlim(-0.015 * max(steps, 1), max(steps, 1) * 1.015)  # step 0 off the spine
        ax_s.set_ylabel(label, fontsize=7)
        for ax in (ax_s, ax_d):
            ax.yaxis.set_major_locator(LogLocator(numticks=6))
            ax.yaxis.set_minor_locator(NullLocator())
            ax.tick_params(labelsize=6)
            ax.grid(True, which="major", linewidth=0.3)
    axes[0][0].set_title("scaled error (lockstep)", fontsize=8)
    axes[0][1].set_title("free-run drift of the weights", fontsize=8)
    axes[-1][0].set_xlabel("step", fontsize=7)
    axes[-1][1].set_xlabel("step", fontsize=7)
    handles = [Line2D([], [], color="red", linestyle="--", linewidth=0.8)]
    texts = [f"tolerance {tolerance:g}"]
    for text, color, style in legend:
        handles.append(Line2D([], [], color="0.3" if color is None else
                              PALETTE[color % len(PALETTE)], linestyle=style))
        texts.append(text)
    handles.append(Line2D([], [], color="0.3", marker="o", linestyle="none", markersize=3.5))
    texts.append("first divergence")
    fig.legend(handles, texts, loc="center right", fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9, y=1 - 0.06 / height, va="top")
    if notes:
        fig.text(0.01, 0.04 / height, notes, fontsize=6, color="0.35", va="bottom")
    return png(fig, dpi=FIGURE_DPI)
