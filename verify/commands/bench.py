"""`verify-optimizers bench`: what verification costs, as a ratio to Keras alone.

For one selection, in one invocation and alternating, `--repeat` times:

  floor    the same Keras work run the way the harness runs its workers (one
           process per backend and dtype, all at once, the same optimizers,
           variables, gradients and modes), with nothing observed: no state
           read, nothing sent, nothing compared;
  harness  the verification itself, reports written to a scratch folder.

Wall and CPU (this process plus every worker) of each; the medians of their
ratios; and where the harness's CPU goes: worker start-up and optimizer
building, Keras steps, reading the states, sending them, receiving them,
reference and diff, and the rest of this process (scenarios, reports).
"""

from __future__ import annotations

import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tabulate import tabulate

from verify.cli import run, selection_from_args, selection_parser
from verify.output import replacing_folder
from verify.runner import Runner
from verify.selection import KERAS_REFUSES, UsageError

DEFAULT_OUTPUT = "reports/bench"


def _parser():
    p = selection_parser("bench", "Time the verification against the same Keras work "
                         "alone, side by side, and say where the time goes.", DEFAULT_OUTPUT)
    p.add_argument("--repeat", type=int, default=3,
                   help="floor/harness pairs, alternating; medians reported (default 3)")
    return p


def _workers_cpu(timing) -> float:
    return sum(w["cpu"] or 0.0 for w in timing["workers"])


def measure_floor(sel) -> dict:
    wall, cpu = time.perf_counter(), time.process_time()
    runner = Runner(sel, sink=None, floor=True)
    runner.run()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    # what Keras itself refuses (Muon on TensorFlow float64) fails in the harness's
    # run too, as an error cell; anything else means the floor did not run
    failures = [f for f in runner.timing.get("failures", []) if not f.startswith(KERAS_REFUSES)]
    if failures:
        raise UsageError(f"the floor run failed: {failures[0]}")
    return {"wall": wall, "cpu": cpu + _workers_cpu(runner.timing),
            "keras_steps": runner.timing.get("workers_step", 0.0),
            "workers_peak_rss_mb": max(w["peak_rss_mb"] for w in runner.timing["workers"])}


def measure_harness(sel, formats) -> dict:
    with tempfile.TemporaryDirectory(prefix="verify-bench-") as scratch:
        output = Path(scratch) / "report"
        wall = time.perf_counter()
        run(sel, output, formats, quiet=True, console=io.StringIO())
        wall = time.perf_counter() - wall
        timing = json.loads((output / "summary.json").read_text())["environment"]["timing"]
    workers = timing["workers"]
    parts = {
        "worker start-up and building": sum((w["startup"] or 0) + (w["build"] or 0)
                                            for w in workers),
        "Keras steps": timing.get("workers_step", 0.0),
        "reading states": timing.get("workers_read", 0.0),
        "sending states": timing.get("workers_send", 0.0),
        "receiving states": timing["receive_cpu"],
        "reference and diff": timing["diff_cpu"],
    }
    worker_cpu = _workers_cpu(timing)
    parts["rest of the workers (imports, idle waits)"] = max(
        0.0, worker_cpu - sum(parts[k] for k in ("worker start-up and building", "Keras steps",
                                                 "reading states", "sending states")))
    parts["rest of the harness (scenarios, reports)"] = max(
        0.0, timing["harness_cpu"] - timing["receive_cpu"] - timing["diff_cpu"])
    return {"wall": wall, "cpu": timing["harness_cpu"] + worker_cpu, "parts": parts,
            "harness_peak_rss_mb": timing["harness_peak_rss_mb"],
            "workers_peak_rss_mb": max(w["peak_rss_mb"] or 0 for w in workers)}


def summarise(pairs) -> dict:
    med = statistics.median
    floor, harness = [f for f, _ in pairs], [h for _, h in pairs]
    parts = {k: med(h["parts"][k] for h in harness) for k in harness[0]["parts"]}
    return {
        "repeats": len(pairs),
        "floor": {"wall": med(f["wall"] for f in floor), "cpu": med(f["cpu"] for f in floor),
                  "workers_peak_rss_mb": max(f["workers_peak_rss_mb"] for f in floor)},
        "harness": {"wall": med(h["wall"] for h in harness),
                    "cpu": med(h["cpu"] for h in harness),
                    "harness_peak_rss_mb": max(h["harness_peak_rss_mb"] for h in harness),
                    "workers_peak_rss_mb": max(h["workers_peak_rss_mb"] for h in harness)},
        "ratio": {"wall": med(h["wall"] / f["wall"] for f, h in pairs),
                  "cpu": med(h["cpu"] / f["cpu"] for f, h in pairs)},
        "harness_cpu_parts": parts,
    }


def markdown(result, settings) -> str:
    f, h, r = result["floor"], result["harness"], result["ratio"]
    total = sum(result["harness_cpu_parts"].values())
    parts = [(k, f"{v:.1f}", f"{100 * v / total:.0f}%" if total else "")
             for k, v in result["harness_cpu_parts"].items()]
    selection = ", ".join(f"{k} {v if not isinstance(v, list) else ','.join(map(str, v))}"
                          for k, v in settings.items())
    return "\n".join([
        "# verify-optimizers bench", "",
        f"Selection: {selection}. Medians of {result['repeats']} alternating floor/harness "
        "pairs; the ratio is the median of the per-pair ratios.", "",
        tabulate([("floor: Keras alone", f"{f['wall']:.1f}", f"{f['cpu']:.1f}"),
                  ("harness: verification", f"{h['wall']:.1f}", f"{h['cpu']:.1f}"),
                  ("ratio harness / floor", f"{r['wall']:.2f}", f"{r['cpu']:.2f}")],
                 headers=["", "wall (s)", "CPU (s)"], tablefmt="github", disable_numparse=True),
        "", "Where the harness's CPU goes (median seconds):", "",
        tabulate(parts, headers=["part", "CPU (s)", "share"], tablefmt="github",
                 disable_numparse=True), "",
        f"Peak memory: harness process {h['harness_peak_rss_mb']:.0f} MB; largest worker "
        f"{h['workers_peak_rss_mb']:.0f} MB (floor: {f['workers_peak_rss_mb']:.0f} MB).", ""])


def main(argv) -> int:
    args = _parser().parse_args(list(argv))
    if not 1 <= args.repeat <= 100:
        raise UsageError(f"--repeat must be from 1 to 100 (got {args.repeat})")
    sel, output, formats = selection_from_args(args)
    settings = {"backends": sel.backends, "dtypes": sel.dtypes, "modes": sel.modes,
                "optimizers": [c.id for c in sel.configurations], "families": sel.families,
                "scenarios": sel.scenarios, "steps": sel.steps, "size": sel.size}
    pairs = []
    for i in range(args.repeat):
        print(f"bench: pair {i + 1}/{args.repeat}: floor", file=sys.stderr, flush=True)
        floor = measure_floor(sel)
        print(f"bench: pair {i + 1}/{args.repeat}: harness", file=sys.stderr, flush=True)
        pairs.append((floor, measure_harness(sel, formats)))
    result = summarise(pairs)
    text = markdown(result, settings)
    with replacing_folder(output, "bench") as tmp:
        (tmp / "bench.md").write_text(text)
        (tmp / "bench.json").write_text(json.dumps(
            {"settings": settings, "result": result, "pairs": pairs}, indent=1,
            sort_keys=True) + "\n")
    print(text)
    return 0
