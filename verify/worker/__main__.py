"""The worker process: `python -m verify.worker JOB.json`, started by the runner
(verify/runner.py) with KERAS_BACKEND set, one per backend (the backend is fixed when
keras is imported).  It writes protocol messages (verify/worker/messages.py) to its
standard output; anything else printed while it runs goes to standard error.

It runs inside matrix's per-release virtualenvs too, so it and what it imports
(verify/worker/, reference/) use only the standard library, numpy and keras with its
backend (tests/test_layers.py).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import numpy as np

from verify.worker.fit import FitRun
from verify.worker.messages import UNSUPPORTED, peak_memory_mb, write_message
from verify.worker.pinned import check_pinned
from verify.worker.resume import ResumeRun
from verify.worker.run import ClassMissing, Run, raised_in_keras, round_trip


def _probe_float64(keras) -> bool:
    """Does this process compute float64 in float64? (JAX needs x64.)"""
    from keras import ops
    one = ops.ones((), dtype="float64")
    tiny = ops.convert_to_tensor(np.float64(2.0 ** -40), dtype="float64")
    return float(ops.convert_to_numpy(ops.add(one, tiny))) == 1.0 + 2.0 ** -40


def main(job_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    os.environ["KERAS_BACKEND"] = job["backend"]
    if job["backend"] == "jax":
        os.environ["JAX_ENABLE_X64"] = "1" if job.get("x64") else "0"
    for path in reversed(job.get("python_path", [])):
        sys.path.insert(0, path)
    import keras

    hello = {"type": "hello", "backend": keras.backend.backend(),
             "keras": keras.__version__, "numpy": np.__version__,
             "python": sys.version.split()[0],
             "float64_computes_float64": _probe_float64(keras),
             "keras_config": check_pinned(keras)}
    try:
        module = __import__({"tensorflow": "tensorflow", "jax": "jax",
                             "torch": "torch"}[job["backend"]])
        hello["backend_version"] = module.__version__
    except Exception:  # pragma: no cover - version only informs the report
        hello["backend_version"] = "unknown"
    write_message(out, hello)
    startup = time.process_time()  # CPU from the start of the process: imports, probes

    inputs = job["inputs"]
    initial = np.load(inputs["initial"])
    gradients = {name: np.load(path, mmap_mode="r")
                 for name, path in inputs["scenarios"].items()}
    build = 0.0
    round_trips = {}  # one check per configuration and dtype, shared by the modes
    for spec in job["runs"]:
        try:
            if spec["dtype"] == "float64" and not hello["float64_computes_float64"]:
                raise RuntimeError(f"{job['backend']} computes float64 in float32 in this "
                                   "process (JAX without x64)")
            started = time.process_time()
            if spec["mode"] == "fit":  # a real model.fit (verify/worker/fit.py)
                run_class = FitRun
            elif spec["mode"] == "resume":  # saved and resumed (verify/worker/resume.py)
                run_class = ResumeRun
            else:
                run_class = Run
            run = run_class(keras, spec, job, gradients, initial)
            build += time.process_time() - started
            key = (spec.get("source"), spec["class_name"],
                   json.dumps(spec["config"], sort_keys=True), spec["dtype"],
                   json.dumps(spec["weights"]))
            if key not in round_trips and not job.get("floor"):
                first = spec["scenarios"][0]
                round_trips[key] = round_trip(
                    keras, spec["class_name"], spec["config"], lambda: run.make_variables(first),
                    lambda t: run._grads(t, run._gradient_arrays(t, first)), job["steps"],
                    run.variables, spec.get("source"))
            run.round_trip = round_trips.get(key)
            if job.get("floor"):
                run.floor(out, job["steps"])
            else:
                run.execute(out, job["steps"], job["chunk"])
        except Exception as exc:  # reported as an `error` verdict for this run
            for line in traceback.format_exc().splitlines():  # not taken for a fatal error
                print(f"run {spec['id']}: {line}", file=sys.stderr)
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
            if isinstance(exc, ClassMissing):
                reason = f"{UNSUPPORTED}: {exc}"
            elif raised_in_keras(exc, keras):
                reason = f"Keras raises {reason}"
            write_message(out, {"type": "run_error", "id": spec["id"], "reason": reason})
    write_message(out, {"type": "bye", "build_seconds": build, "startup_seconds": startup,
                        "cpu_seconds": time.process_time(),
                        "peak_rss_mb": peak_memory_mb()})
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
