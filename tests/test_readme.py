"""The README's numbers are the committed baseline's: its excerpt of the verdict grid,
the verdict counts, the cell count, the configuration count and its steps
(reports/baseline/), and the committed bench's time and ratios of that selection
(reports/bench/), so a refreshed baseline that changes them fails here until the
README says the same; and every page it links exists.  Each with a twin: a README
that says otherwise is caught."""

import json
import re

import pandas as pd
from tabulate import tabulate

from conftest import ROOT
from verify import compare

README = (ROOT / "README.md").read_text()
BASELINE = ROOT / "reports" / "baseline"
BENCH = ROOT / "reports" / "bench" / "bench.json"


def excerpt(cells: pd.DataFrame, optimizers) -> str:
    """The grid for `optimizers` as the README shows it: worst verdict per family x
    configuration x backend x dtype, and the verdict counts of every cell."""
    sub = cells[cells.optimizer.isin(optimizers)]
    columns = sorted(set(sub.backend + " " + sub.dtype))
    rows = []
    for (family, optimizer), g in sub.groupby(["family", "optimizer"], sort=True):
        worst = {f"{b} {d}": compare.worst(x.verdict) for (b, d), x in g.groupby(["backend",
                                                                                   "dtype"])}
        rows.append([family, optimizer] + [worst[c] for c in columns])
    counts = cells.groupby(["family", "verdict"]).size()
    return (tabulate(rows, headers=["family", "optimizer"] + columns, tablefmt="github")
            + "\n\n" + ", ".join(f"{f} {v}: {n}" for (f, v), n in counts.items()) + ".")


def stale(readme: str, bench: dict | None = None) -> list:
    """What the README says that the committed baseline (and bench) does not."""
    cells = pd.read_csv(BASELINE / "cells.csv", dtype=str, keep_default_na=False)
    meta = json.loads((BASELINE / "baseline.json").read_text())
    bench = bench or json.loads(BENCH.read_text())
    shown = list(dict.fromkeys(line.split("|")[2].strip() for line in readme.splitlines()
                               if re.match(r"\| (article|keras|textbook) ", line)))
    problems = []
    if not shown or excerpt(cells, shown) not in readme:
        problems.append("the excerpt or the verdict counts")
    said = {"cells": f"({len(cells)} cells;",
            "time": f"**{bench['result']['harness']['wall']:.0f} s**, "
                    f"{bench['result']['ratio']['wall']:.2f} times the wall time "
                    f"({bench['result']['ratio']['cpu']:.2f} times the CPU)",
            "configurations": f"all {len(meta['settings']['optimizers'])} configurations",
            "steps": f"{meta['settings']['steps']} steps, `--size {meta['settings']['size']}`"}
    flat = " ".join(readme.split())
    problems += [what for what, text in said.items() if text not in flat]
    if any(bench["settings"][k] != meta["settings"][k] for k in bench["settings"]):
        problems.append("the bench's selection")
    return problems


def test_the_readme_says_what_the_committed_baseline_holds():
    assert stale(README) == []


def _one_more(pattern: str) -> str:
    """The README with the first number `pattern` captures increased by one."""
    m = re.search(pattern, README)
    return README[:m.start(1)] + str(int(m.group(1)) + 1) + README[m.end(1):]


def test_a_readme_that_says_otherwise_is_caught():
    assert "the excerpt or the verdict counts" in stale(_one_more(r"keras match: (\d+)"))
    row = next(line for line in README.splitlines() if line.startswith("| keras "))
    assert "the excerpt or the verdict counts" in stale(
        README.replace(row, row.replace("match", "mismatch", 1)))
    assert stale(_one_more(r"\((\d+) cells;")) == ["cells"]
    assert stale(_one_more(r"\*\*(\d+) s\*\*")) == ["time"]
    assert stale(_one_more(r"all (\d+) configurations")) == ["configurations"]
    other = json.loads(BENCH.read_text())
    other["settings"]["steps"] += 1  # a bench of another selection
    assert stale(README, other) == ["the bench's selection"]


def test_every_page_the_readme_links_exists():
    links = re.findall(r"\]\(([^)#]+)", README)
    assert len(links) >= 8
    assert [link for link in links if not (ROOT / link).exists()] == []
