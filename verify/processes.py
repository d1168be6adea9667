"""Starting backend worker processes, and telling why one died.

Workers run in a pinned environment: what the verdicts depend on is set by
the harness, never taken from the user's home or shell.  Keras reads
`$KERAS_HOME/keras.json` (default `~/.keras/keras.json`) when it is imported,
and writes one there if there is none; each worker gets a fresh KERAS_HOME
holding PINNED_KERAS_CONFIG, and the environment variables in UNSET, which
change what Keras or a backend computes, are removed.  The home and cache
folders the libraries write to (matplotlib's config, torch's inductor cache,
...) point into the same fresh folder, which the run removes: a worker
leaves nothing behind in the user's home or the temporary folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

from verify.worker.pinned import PINNED_KERAS_CONFIG

REPO_ROOT = Path(__file__).resolve().parent.parent

UNSET = ("KERAS_HOME", "KERAS_NNX_ENABLED", "KERAS_MAX_EPOCHS", "KERAS_MAX_STEPS_PER_EPOCH",
         "XLA_FLAGS", "JAX_DEFAULT_MATMUL_PRECISION", "JAX_DEFAULT_DTYPE_BITS",
         "JAX_NUMPY_DTYPE_PROMOTION", "JAX_ENABLE_X64", "TF_ENABLE_ONEDNN_OPTS")

# where libraries write on their own, each pointed into the worker's folder
CACHES = {"HOME": "home", "XDG_CACHE_HOME": "cache", "XDG_CONFIG_HOME": "config",
          "MPLCONFIGDIR": "matplotlib", "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
          "TRITON_CACHE_DIR": "triton", "TMPDIR": "tmp"}


def pinned_environment(backend: str, home: Path, *, x64=None, extra=None) -> dict:
    """The environment of a worker for `backend`, with a fresh Keras home `home`."""
    home = Path(home)
    for sub in ("", *CACHES.values()):
        (home / sub).mkdir(parents=True, exist_ok=True)
    (home / "keras.json").write_text(json.dumps({**PINNED_KERAS_CONFIG, "backend": backend}))
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    for name, sub in CACHES.items():
        env[name] = str(home / sub)
    env["KERAS_HOME"] = str(home)
    env["KERAS_BACKEND"] = backend
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if backend == "jax":
        env["JAX_ENABLE_X64"] = "1" if x64 else "0"
    env.update(extra or {})
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO_ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    return env


def overridden_user_settings() -> dict:
    """What the user's own Keras config and shell would have set that the
    workers do not use (for the report's environment block)."""
    out = {}
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        user = json.loads(Path(home, "keras.json").read_text())
    except (OSError, ValueError):
        user = {}
    if isinstance(user, dict):
        for key, pinned in PINNED_KERAS_CONFIG.items():
            if key in user and user[key] != pinned:
                out[f"keras.json {key}"] = user[key]
    for name in UNSET:
        if name in os.environ and name != "KERAS_HOME":
            out[name] = os.environ[name]
    return out


def pinned_description() -> dict:
    return {"keras.json": PINNED_KERAS_CONFIG,
            "KERAS_HOME": "a fresh folder per worker, removed after the run",
            "home and caches": ", ".join(sorted(CACHES)) + " point into that folder",
            "unset": [n for n in UNSET if n != "KERAS_HOME"]}


def start(module: str, job_path: Path, log_path: Path, env: dict, python: str):
    """Start `python -m module job_path`, standard error to `log_path`, in a
    session of its own (a Ctrl-C reaches the harness, which stops its workers)."""
    log = open(log_path, "wb")
    proc = subprocess.Popen([python, "-m", module, str(job_path)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=log, env=env, cwd=str(REPO_ROOT),
                            start_new_session=True)
    return proc, log


def stop(proc) -> None:
    """Kill a worker that is still running and reap it."""
    if proc.poll() is None:
        try:
            proc.kill()
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
        pass
    if proc.stdout is not None:
        proc.stdout.close()


def death_reason(returncode: int, log_path) -> str:
    """How a worker ended ("killed by SIGKILL", "exited with status 1") and the
    last line of the last traceback it wrote, never an unrelated log line."""
    if returncode is not None and returncode < 0:
        try:
            how = f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            how = f"killed by signal {-returncode}"
    else:
        how = f"exited with status {returncode}"
    last = last_traceback_line(log_path)
    return f"{how}; last error: {last}" if last else how


def last_traceback_line(log_path) -> str:
    """The exception line that ends the last Python traceback in a log."""
    try:
        lines = Path(log_path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    starts = [i for i, ln in enumerate(lines) if ln.startswith("Traceback (most recent call last)")]
    if not starts:
        return ""
    exception_lines = [ln for ln in lines[starts[-1] + 1:]
                       if ln.strip() and not ln.startswith((" ", "\t"))]
    return exception_lines[0].strip() if exception_lines else ""
