"""One backend's share of the experiment: `python -m verify.convergence.worker JOB.json`.

Started with KERAS_BACKEND set and one compute thread (see `thread_env`).  For
each configuration of the job it trains one stacked model (all seeds) with
model.fit, writes OUTPUT/BACKEND__ID.npz (loss and accuracy, [seeds, epochs]),
and reports on standard output, one JSON object per line:
{"event": "hello", ...versions}, {"event": "epoch", "id", "epoch"},
{"event": "done", "id", "seconds"}, and {"event": "error", "reason"} on failure.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

# One compute thread per worker: the backends run side by side, and a single
# thread also keeps the reductions in a fixed order.
THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "TF_NUM_INTRAOP_THREADS": "1",
    "TF_NUM_INTEROP_THREADS": "1",
    "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
    "TF_CPP_MIN_LOG_LEVEL": "3",
    "TF_DETERMINISTIC_OPS": "1",
    "JAX_ENABLE_X64": "0",
}


def _say(**message):
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _versions(keras) -> dict:
    import importlib

    backend = keras.backend.backend()
    module = importlib.import_module(backend)
    return {"backend": backend, "keras": keras.__version__,
            "version": getattr(module, "__version__", "unknown"),
            "numpy": np.__version__, "python": sys.version.split()[0]}


def main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    try:
        import keras

        from verify.convergence import model
        from verify.worker.pinned import check_pinned

        _say(event="hello", **_versions(keras), keras_config=check_pinned(keras))
        output = Path(job["output"])
        for run in job["runs"]:
            started = time.perf_counter()
            curves, _ = model.train(
                run["keras_config"], job["seeds"], run["epochs"],
                on_epoch=lambda epoch, rid=run["id"]: _say(event="epoch", id=rid, epoch=epoch))
            np.savez(output / f"{job['backend']}__{run['id']}.npz", **curves)
            _say(event="done", id=run["id"], seconds=round(time.perf_counter() - started, 2))
    except Exception as exc:
        traceback.print_exc()
        _say(event="error", reason=f"{type(exc).__name__}: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
