"""The selection: what a run verifies, its defaults and limits, and the checks of a
user's choice of it; below the command line (cli.py) and the harness's functions
(api.py), which both build selections from it.  Bad input raises UsageError."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np

import reference
from verify import compare
from verify.runner import SAME_AS, Selection
from verify.worker import dtypes
from verify.worker.messages import UNSUPPORTED, peak_memory_mb

BACKENDS = ("tensorflow", "jax", "torch")
# the default run's dtypes; float16, bfloat16 and the mixed policies with --dtype
# (verify/worker/dtypes.py)
DTYPES, DEFAULT_DTYPES = dtypes.DTYPES, dtypes.DEFAULT
MODES = ("eager", "compiled", "jit", "fit", "resume")
# jit (model.compile(jit_compile=True)) only when asked for, also with --full: it compiles
# every configuration and dtype anew, more than the whole default run costs on
# TensorFlow alone and several times that on torch (docs/how-it-works.md)
# fit (a real model.fit, verify/worker/fit.py) likewise: docs/how-it-works.md has its cost
# resume (saved to .keras and to weights, each loaded in a fresh process:
# verify/worker/resume.py) likewise: a mode, not a flag, because it is another way the same
# updates run, judged cell by cell like the others; it starts two processes per run
DEFAULT_MODES = ("eager", "compiled")
FORMATS = ("md", "csv", "json", "html")
# Error cells that are Keras's own answer, not the harness failing: Keras raised on the
# configuration, or the installed release lacks the class. Reported, not exit 2.
KERAS_REFUSES = ("Keras raises ", f"{UNSUPPORTED}: ")
# The default run verifies every configuration, family, backend, dtype, mode and
# scenario at a scale that keeps it (and `check` of the committed baseline) within
# minutes on two cores; --full is the article's 1000 steps at 1024 elements.
DEFAULT_STEPS, DEFAULT_SIZE = 80, 256
FULL_STEPS, FULL_SIZE = 1000, 1024
MAX_GRADIENT_BYTES = 2 * 1024 ** 3  # the scenario arrays the run holds and hands out


class UsageError(ValueError):
    """Bad input: reported as one line, exit code 2."""


def installed_backends() -> list:
    return [b for b in BACKENDS if importlib.util.find_spec(b) is not None]


def choices(values, allowed, what):
    """Repeatable, comma-separated option values, checked and de-duplicated in order."""
    chosen = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            if item not in allowed:
                raise UsageError(f"unknown {what} {item!r} (choose from {', '.join(allowed)})")
            if item not in chosen:
                chosen.append(item)
    return chosen


def listed(values) -> list:
    """Repeatable, comma-separated option values as given, unchecked."""
    return [x.strip() for v in values for x in v.split(",") if x.strip()]


def parse_shard(text) -> tuple | None:
    """--shard K/N -> (K, N), or None without it."""
    if text is None:
        return None
    k, slash, n = text.partition("/")
    if not (slash and k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise UsageError(f"--shard must be K/N with 1 <= K <= N (got {text!r})")
    return int(k), int(n)


def chosen_backends(values) -> list:
    """--backend values, checked; default: every installed backend."""
    available = installed_backends()
    backends = choices(values, BACKENDS, "backend") or available
    missing = [b for b in backends if b not in available]
    if missing:
        raise UsageError(f"backend not installed: {', '.join(missing)}")
    if not backends:
        raise UsageError("no Keras backend is installed (tensorflow, jax or torch)")
    return backends


def check_has_runs(sel: Selection) -> None:
    """UsageError for a selection whose every run is another mode's (SAME_AS)."""
    if not sel.runs(every=True):
        same = "; ".join(f"{m} on {b} is {other}: {why}" for (b, m), (other, why)
                         in SAME_AS.items() if b in sel.backends and m in sel.modes)
        raise UsageError(f"the selection has no run of its own ({same})")


def check_run_size(steps: int, size: int, scenario_count: int, seed: int) -> None:
    """UsageError for sizes and seeds a run cannot have."""
    if steps < 1 or size < 1:
        raise UsageError(f"--steps and --size must be at least 1 (got {steps}, {size})")
    if steps * size * scenario_count * 8 > MAX_GRADIENT_BYTES:
        raise UsageError(f"--steps {steps} x --size {size} x {scenario_count} scenarios needs "
                         f"more than {MAX_GRADIENT_BYTES // 1024 ** 3} GiB of gradients")
    if not 0 <= seed < 2 ** 63:
        raise UsageError(f"--seed must be a non-negative integer (got {seed})")


def settings_of(sel: Selection, formats) -> dict:
    return {
        "backends": sel.backends, "dtypes": sel.dtypes, "families": sel.families,
        "optimizers": [c.id for c in sel.configurations],
        "configurations": {c.id: c.keras_config() for c in sel.configurations},
        "scenarios": sel.scenarios, "modes": sel.modes, "steps": sel.steps, "size": sel.size,
        "weights": {name: list(shape) for name, shape in sel.weights.items()},
        "seed": sel.seed, "tolerance": compare.TOLERANCE, "comparison": "lockstep",
        "precision": {b: reference.PRECISIONS[b].describe() for b in sel.backends},
        **({"shard": f"{sel.shard[0]}/{sel.shard[1]}"} if sel.shard else {}),
    }


def inputs_digest(sel: Selection) -> str:
    """SHA-256 of the initial weights and every scenario's gradients: shards to be
    merged must have verified the same numbers (a gradient file is not in the
    settings)."""
    digest = hashlib.sha256(np.ascontiguousarray(sel.initial, dtype=np.float64).tobytes())
    for name in sel.scenarios:
        digest.update(name.encode() + b"\0")
        digest.update(np.ascontiguousarray(sel.gradients[name], dtype=np.float64).tobytes())
    return digest.hexdigest()


def write_shard_file(folder: Path, sel: Selection, settings: dict) -> None:
    """shard.json of a shard report, what `merge` needs beyond summary.json: the
    part, the inputs' digest, and the settings in their order (summary.json sorts
    its keys)."""
    doc = {"part": settings["shard"], "inputs": inputs_digest(sel),
           "settings": {k: v for k, v in settings.items() if k != "shard"}}
    (folder / "shard.json").write_text(json.dumps(doc, indent=1) + "\n")


def report_order(settings: dict) -> dict:
    """Row field -> its values in report order (report.Sink)."""
    return {"family": settings["families"], "optimizer": settings["optimizers"],
            "backend": settings["backends"], "dtype": settings["dtypes"],
            "mode": settings["modes"], "scenario": settings["scenarios"]}


def timing_of(runner, harness_cpu: float) -> dict:
    """Where a run's time went (seconds, for the environment block and `bench`)."""
    t = runner.timing
    return {"harness_cpu": round(harness_cpu, 2),
            "harness_peak_rss_mb": round(peak_memory_mb(), 1),
            "receive_cpu": round(t["receive_cpu"], 2), "diff_cpu": round(t["diff_cpu"], 2),
            **{k: round(v, 2) for k, v in t.items() if k.startswith("workers_")},
            "workers": t["workers"]}
