"""The findings model both report writers use (tables.py, html.py): a cell's key
and per-step table, and the mismatching cells grouped per configuration."""

from __future__ import annotations

import pandas as pd

from reference.explanations import cause

# a cell of a report: one family x configuration x backend x dtype x mode x scenario
CELL = ("family", "optimizer", "backend", "dtype", "mode", "scenario")


def steps_path(key) -> str:
    """A cell's per-step table in a report folder."""
    family, optimizer, backend, dtype, mode, scenario = key
    return f"steps/{family}/{optimizer}/{backend}-{dtype}-{mode}-{scenario}.csv.gz"


FINDING_HEADERS = ["backend", "dtype", "mismatching cells", "scenarios", "first step", "state",
                   "max rel. error", "final drift"]


def finding_groups(df: pd.DataFrame, families=None) -> list:
    """Per family x configuration with mismatching cells (article and textbook
    unless `families` says otherwise): (family, optimizer, causes, rows of
    FINDING_HEADERS, the mismatching rows)."""
    families = [f for f in df.family.unique() if f != "keras"] if families is None else families
    bad = df[df.family.isin(families) & (df.verdict == "mismatch")]
    out = []
    for (family, optimizer), group in bad.groupby(["family", "optimizer"], sort=False):
        causes = list(dict.fromkeys(cause(family, optimizer, b, d) or "No curated cause."
                                    for b, d in zip(group.backend, group.dtype)))
        rows = []
        for (backend, dtype), g in group.groupby(["backend", "dtype"], sort=False):
            total = len(df[(df.family == family) & (df.optimizer == optimizer)
                           & (df.backend == backend) & (df.dtype == dtype)])
            rows.append([backend, dtype, f"{len(g)} of {total}",
                         ", ".join(dict.fromkeys(g.scenario)),
                         ", ".join(str(int(x)) for x in sorted(set(g.first_divergent_step))),
                         ", ".join(dict.fromkeys(g.divergent_state)),
                         f"{g.max_rel_error.max():.2g}", f"{g.final_drift.max():.2g}"])
        out.append((family, optimizer, causes, rows, group))
    return out
