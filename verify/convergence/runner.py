"""Start one worker process per backend, follow their progress, collect the curves."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np

from verify.convergence.worker import THREAD_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]


class WorkerError(RuntimeError):
    pass


def _start(backend, job_path, log_path, python):
    env = dict(os.environ)
    env.update(THREAD_ENV)
    env["KERAS_BACKEND"] = backend
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    log = open(log_path, "wb")
    proc = subprocess.Popen([python, "-m", "verify.convergence.worker", str(job_path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log,
                            env=env, cwd=str(REPO_ROOT))
    return proc, log


def run(backends, runs, seeds, work: Path, *, progress=None, python=sys.executable):
    """runs: [{"id", "keras_config", "epochs"}].  progress(event_dict) is called
    for every worker event.  Returns (curves, environment): curves is backend ->
    id -> {"loss", "accuracy"} arrays [seeds, epochs]."""
    work.mkdir(parents=True, exist_ok=True)
    workers = []
    events = queue.Queue()
    try:
        for backend in backends:
            job = {"backend": backend, "seeds": list(seeds), "runs": runs, "output": str(work)}
            job_path = work / f"job-{backend}.json"
            job_path.write_text(json.dumps(job))
            proc, log = _start(backend, job_path, work / f"worker-{backend}.log", python)
            workers.append((backend, proc, log))

        def reader(backend, proc):
            for line in proc.stdout:
                try:
                    events.put((backend, json.loads(line)))
                except json.JSONDecodeError:
                    continue
            events.put((backend, None))

        for backend, proc, _ in workers:
            threading.Thread(target=reader, args=(backend, proc), daemon=True).start()
        environment, seconds, errors = {}, {}, {}
        open_workers = len(workers)
        while open_workers:
            backend, event = events.get()
            if event is None:
                open_workers -= 1
                continue
            event["backend"] = backend
            if event["event"] == "hello":
                environment[backend] = {k: event[k] for k in
                                        ("keras", "version", "numpy", "python")}
            elif event["event"] == "done":
                seconds.setdefault(backend, {})[event["id"]] = event["seconds"]
            elif event["event"] == "error":
                errors[backend] = event["reason"]
            if progress:
                progress(event)
        for backend, proc, log in workers:
            proc.wait()
            log.close()
            if proc.returncode and backend not in errors:
                errors[backend] = f"worker exited with code {proc.returncode}"
        if errors:
            raise WorkerError("; ".join(f"{b} worker failed: {r}" for b, r in errors.items()))
    finally:
        for _, proc, log in workers:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    curves = {b: {} for b in backends}
    for b in backends:
        for r in runs:
            with np.load(work / f"{b}__{r['id']}.npz") as data:
                curves[b][r["id"]] = {k: data[k] for k in data.files}
    return curves, {"backends": environment, "seconds": seconds}
