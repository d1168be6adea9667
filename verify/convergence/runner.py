"""Start one worker process per backend, follow their progress, collect the curves."""

from __future__ import annotations

import json
import queue
import sys
import threading
from pathlib import Path

import numpy as np

from verify import processes
from verify.convergence.worker import THREAD_ENV

class WorkerError(RuntimeError):
    pass


def _start(backend, job_path, log_path, python):
    env = processes.pinned_environment(backend, log_path.with_name(f"keras-home-{backend}"),
                                     extra=THREAD_ENV)
    return processes.start("verify.convergence.worker", job_path, log_path, env, python)


def run(backends, runs, seeds, work: Path, *, progress=None, python=sys.executable):
    """runs: [{"id", "keras_config", "epochs"}].  progress(event_dict) is called
    for every worker event.  Returns (curves, environment): curves is backend ->
    id -> {"loss", "accuracy"} arrays [seeds, epochs]."""
    work.mkdir(parents=True, exist_ok=True)
    started = []
    events = queue.Queue()
    try:
        for backend in backends:
            job = {"backend": backend, "seeds": list(seeds), "runs": runs, "output": str(work)}
            job_path = work / f"job-{backend}.json"
            job_path.write_text(json.dumps(job))
            proc, log = _start(backend, job_path, work / f"worker-{backend}.log", python)
            started.append((backend, proc, log))

        def reader(backend, proc):
            for line in proc.stdout:
                try:
                    events.put((backend, json.loads(line)))
                except json.JSONDecodeError:
                    continue
            events.put((backend, None))

        for backend, proc, _ in started:
            threading.Thread(target=reader, args=(backend, proc), daemon=True).start()
        environment, seconds, errors = {}, {}, {}
        open_workers = len(started)
        while open_workers:
            backend, event = events.get()
            if event is None:
                open_workers -= 1
                continue
            event["backend"] = backend
            if event["event"] == "hello":
                environment[backend] = {k: event[k] for k in
                                        ("keras", "version", "numpy", "python", "keras_config")}
            elif event["event"] == "done":
                seconds.setdefault(backend, {})[event["id"]] = event["seconds"]
            elif event["event"] == "error":
                errors[backend] = event["reason"]
            if progress:
                progress(event)
        for backend, proc, log in started:
            proc.wait()
            log.close()
            if proc.returncode and backend not in errors:
                errors[backend] = processes.death_reason(proc.returncode,
                                                       work / f"worker-{backend}.log")
        if errors:
            raise WorkerError("; ".join(f"{b} worker failed: {r}" for b, r in errors.items()))
    finally:
        for _, proc, log in started:
            processes.stop(proc)
            log.close()
    curves = {b: {} for b in backends}
    for b in backends:
        for r in runs:
            with np.load(work / f"{b}__{r['id']}.npz") as data:
                curves[b][r["id"]] = {k: data[k] for k in data.files}
    return curves, {"backends": environment, "seconds": seconds}
