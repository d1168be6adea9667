"""Mode resume: training interrupted, saved the ways users save, and resumed in a
fresh process.

The run's variables are the weights of a minimal Keras model (Holder), compiled with
the optimizer; every step is `optimizer.apply` as in eager mode, so the save and the
load are the only difference.  The worker runs all steps uninterrupted; after step
K1 = steps // 3 it writes `model.save(".keras")`, after K2 = 2 * steps // 3
`model.save_weights(".weights.h5")`.  A fresh process (same backend and environment)
loads the first with `keras.models.load_model` and goes on to the end; another builds
the model anew, compiles it with the optimizer built from the configuration, builds
the optimizer (Keras skips the optimizer's variables, with a warning, when it is not
built), calls `load_weights` and goes on.  The states the comparison receives are the
worker's up to K1, the first resumed process's up to K2, the second's after: a lost
slot, a reset iteration count or a lost EMA parts from the reference at K1 + 1 or
K2 + 1.  Each resumed process is also compared bit for bit with the worker's run,
which went on uninterrupted: the first state or iteration count that differs, a
changed dtype, a missing state and any warning Keras gave while loading are a
finding in the row's `serialization` column.  Files go to a temporary folder inside the worker's
own (the runner's, removed after the run).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

import numpy as np

from verify.worker.gradients import gradient_digest
from verify.worker.messages import RunMessages, read_message, write_message
from verify.worker.run import Run, raised_in_keras

PATHS = {"keras": "model.save(.keras) and keras.models.load_model",
         "weights": "model.save_weights(.weights.h5) and load_weights into a new model"}


def interruptions(steps: int) -> tuple:
    """(K1, K2): the steps after which the run is saved to .keras and to weights."""
    return steps // 3, 2 * steps // 3


def _holder_class(keras):
    """The model holding the run's variables as its weights (registered once per
    process, so that load_model finds it)."""
    registered = keras.saving.get_registered_object("verify>Holder")
    if registered is not None:
        return registered

    @keras.saving.register_keras_serializable(package="verify")
    class Holder(keras.Model):
        def __init__(self, names, shapes, held=None, **kwargs):
            super().__init__(**kwargs)
            self.names, self.shapes = list(names), [list(s) for s in shapes]
            # as load_model builds it from its config: variables of the right kind, whose
            # values the saved weights replace
            self.held = held if held is not None else [
                keras.Variable(np.zeros(s), dtype=self.dtype_policy.variable_dtype, name=n)
                for n, s in zip(names, shapes)]
            self.built = True

        def call(self, inputs):
            return inputs

        def get_config(self):
            return {**super().get_config(), "names": self.names, "shapes": self.shapes}

    return Holder


class ResumeRun(Run):
    """A Run whose optimizer is compiled into a Holder; `loaded`: a model loaded
    in this process, whose variables and optimizer the run continues."""

    def __init__(self, keras, spec, job, gradients, initial, loaded=None):
        self.loaded = loaded
        self.job = job
        super().__init__(keras, spec, job, gradients, initial)
        if loaded is None:
            self.model = self.new_model(self.variables)
            self.model.compile(optimizer=self.optimizer)
        else:
            self.model = loaded

    def new_model(self, held):
        return _holder_class(self.keras)([p[0] for p in self.places],
                                          [p[1] for p in self.places], held=held,
                                          dtype=self.dtype, name="holder")

    def make_variables(self, scenario=None):
        if self.loaded is not None:
            return list(self.loaded.trainable_variables)
        return super().make_variables(scenario)

    def make_optimizer(self):
        if self.loaded is not None:
            return self.loaded.optimizer
        return super().make_optimizer()

    def _make_step(self, backend, mode):
        return super()._make_step(backend, "eager")

    def trajectory(self, start, steps, saves=()):
        """States after steps start..steps (the first: as they are now), iterations,
        each state's dtype in Keras, and each step's gradient digest.  `saves`:
        [(step, write())], each write called after its step."""
        values, iteration = self.read()
        rows, iterations, digests = [values], [iteration], []
        for t in range(start, steps):
            for step, write in saves:
                if step == t:
                    write()
            arrays = self._gradient_arrays(t)
            digests.append(gradient_digest(arrays))
            self.step_fn(self._grads(t, self._scaled(arrays, values)))
            values, iteration = self.read()
            rows.append(values)
            iterations.append(iteration)
        states = {n: np.stack([r[j] for r in rows]) for j, n in enumerate(self.state_names())}
        dtypes = {n: str(v.dtype) for n, (_, _, v) in zip(self.state_names(), self.state_vars)}
        return states, np.asarray(iterations, np.int64), dtypes, digests

    def execute(self, out, steps, chunk):
        k1, k2 = interruptions(steps)
        with tempfile.TemporaryDirectory(prefix="verify-resume-") as tmp:
            tmp = Path(tmp)
            keras_file, weights_file = tmp / "model.keras", tmp / "model.weights.h5"
            mine = self.trajectory(0, steps, [(k1, lambda: self.model.save(keras_file)),
                                              (k2, lambda: self.model.save_weights(weights_file))])
            first = self._resumed(tmp, "first", ("keras", keras_file, k1), steps)
            second = (self._resumed(tmp, "second", ("weights", weights_file, k2), steps)
                      if not isinstance(first, str) else first)
        failed = next((r for r in (first, second) if isinstance(r, str)), None)
        if failed is None and (first[3] != mine[3][k1:] or second[3] != mine[3][k2:]):
            failed = "harness error: a resumed process applied other gradients than the worker"
        if failed is not None:
            return write_message(out, {"type": "run_error", "id": self.spec["id"],
                                       "reason": failed})
        findings = [self.finding("keras", k1, mine, first, k1),
                    self.finding("weights", k2, mine, second, k2)]
        states, iterations = self.assemble(mine, first, second, k1, k2)
        self.round_trip = "; ".join(f for f in [self.round_trip, *findings] if f) or None
        self.send(out, states, iterations, steps, chunk)

    def _resumed(self, tmp, label, load, steps):
        """A fresh process loading `load` = (path kind, file, step) and running on to
        the end: its trajectory and Keras's warnings while loading, or the reason it
        failed (a run error)."""
        how, path, step = load
        job = {**{k: self.job[k] for k in ("backend", "inputs")},
               "python_path": self.job.get("python_path", []), "spec": self.spec,
               "steps": steps, "load": [how, str(path), step],
               "out": str(tmp / f"{label}.msg"), "error": str(tmp / f"{label}.json")}
        job_path = tmp / f"{label}-job.json"
        job_path.write_text(json.dumps(job))
        proc = subprocess.run([sys.executable, "-m", "verify.worker.resume", str(job_path)],
                              stdin=subprocess.DEVNULL, stdout=sys.stderr, env=os.environ)
        if Path(job["error"]).exists():
            return json.loads(Path(job["error"]).read_text())["reason"]
        if proc.returncode != 0 or not Path(job["out"]).exists():
            return (f"the process resuming from {PATHS[how]} at step {step} exited with "
                    f"status {proc.returncode}")
        with open(job["out"], "rb") as f:
            header, data = read_message(f)
        return ({n: data[f"s{j}"] for j, n in enumerate(header["names"])}, data["iterations"],
                header["dtypes"], header["digests"], header["warnings"])

    def _label(self, name):
        owner, state = name.split("/", 1)
        return state if owner == "g" else f"{state} of {self.places[int(owner)][0]}"

    def finding(self, how, step, before, after, offset):
        """What differs between the run resumed at `step` (`after`, from that step)
        and the run it was saved from, which went on uninterrupted (`before`, its
        rows from `offset` on): None, or the finding."""
        states, iterations, dtypes = before[:3]
        got_states, got_iterations, got_dtypes, _, said = after
        notes = [f"Keras warns {w!r}" for w in said]
        missing = [n for n in states if n not in got_states]
        if missing:
            notes.append("the loaded optimizer has no " + ", ".join(map(self._label, missing)))
        extra = [n for n in got_states if n not in states]
        if extra:
            notes.append("the loaded optimizer has states the original has not: "
                         + ", ".join(map(self._label, extra)))
        notes += [f"{self._label(n)} is {got_dtypes[n]} after loading, {dtypes[n]} before"
                  for n in states if n in got_dtypes and got_dtypes[n] != dtypes[n]]
        differs = {"iterations": _first_difference(iterations[offset:], got_iterations)}
        differs.update({n: _first_difference(states[n][offset:], got_states[n])
                        for n in states if n in got_states})
        found = [(j, n) for n, j in differs.items() if j is not None]
        if found:
            j = min(j for j, _ in found)
            names = [n if n == "iterations" else self._label(n) for jj, n in found if jj == j]
            when = {0: " (on loading)", 1: " (the first step after loading)"}.get(j, "")
            notes.append(f"{', '.join(names)} {'differ' if len(names) > 1 else 'differs'} "
                         f"from the uninterrupted run from step "
                         f"{step + j}{when}")
        if not notes:
            return None
        return f"resumed from {PATHS[how]} at step {step}: " + "; ".join(notes)

    @staticmethod
    def assemble(mine, first, second, k1, k2):
        """The states the comparison receives: this process's up to K1, the first
        resumed process's up to K2, the second's after (a state a resumed process
        lacks is NaN there: it parts from the reference at once).  Both resumed from
        this process's saves: where the first has already parted from it, the second
        starts from another state than the first's at K2 (after that first mismatch)."""
        parts = [(mine, 0, k1 + 1), (first, 1, k2 - k1 + 1), (second, 1, None)]
        states = {}
        for name, values in mine[0].items():
            pieces = []
            for got, start, stop in parts:
                rows = got[0].get(name)
                if rows is None:
                    rows = np.full((len(got[1]),) + values.shape[1:], np.nan, values.dtype)
                pieces.append(rows[start:stop].astype(values.dtype))
            states[name] = np.concatenate(pieces)
        iterations = np.concatenate([got[1][start:stop] for got, start, stop in parts])
        return states, iterations

    def send(self, out, states, iterations, steps, chunk):
        messages = RunMessages(out, self.spec["id"])
        self.send_start(messages, {n: rows[0] for n, rows in states.items()}, iterations[0])
        for t0 in range(0, steps, chunk):
            k = min(chunk, steps - t0)
            messages.chunk(t0 + 1, self.applied_digest(t0, t0 + k),
                           {n: rows[t0 + 1:t0 + 1 + k] for n, rows in states.items()},
                           iterations[t0 + 1:t0 + 1 + k])
        messages.end(seconds={})


def _first_difference(a, b):
    """The first row at which two arrays of rows differ (shape, dtype aside: values,
    NaN equal to NaN), or None."""
    n = min(len(a), len(b))
    for j in range(n):
        x, y = np.asarray(a[j]), np.asarray(b[j])
        if x.shape != y.shape or not np.array_equal(x.astype(np.float64), y.astype(np.float64),
                                                    equal_nan=True):
            return j
    return None


def resume(job_path: str) -> int:
    """The fresh process: load the saved run, go on to the last step, write the
    trajectory (or why it failed) where the job says."""
    job = json.loads(Path(job_path).read_text())
    for path in reversed(job.get("python_path", [])):
        sys.path.insert(0, path)
    import keras

    spec = job["spec"]
    how, path, step = job["load"]
    keras_dir = os.path.dirname(os.path.abspath(keras.__file__))
    try:
        inputs = job["inputs"]
        initial = np.load(inputs["initial"])
        gradients = {name: np.load(p, mmap_mode="r") for name, p in inputs["scenarios"].items()}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if how == "keras":
                _holder_class(keras)
                run = ResumeRun(keras, spec, job, gradients, initial,
                                loaded=keras.models.load_model(path))
            else:  # a model built anew, compiled with its optimizer, which is built
                run = ResumeRun(keras, spec, job, gradients, initial)
                run.model.load_weights(path)
        said = [str(w.message).splitlines()[0] for w in caught
                if os.path.abspath(w.filename).startswith(keras_dir)]
        states, iterations, dtypes, digests = run.trajectory(step, job["steps"])
        names = list(states)
        with open(job["out"], "wb") as f:  # the workers' protocol: bfloat16 as its bits
            write_message(f, {"names": names, "dtypes": dtypes, "digests": digests,
                              "warnings": said},
                          {"iterations": iterations,
                           **{f"s{j}": states[n] for j, n in enumerate(names)}})
    except Exception as exc:
        traceback.print_exc()
        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        where = f"resuming from {PATHS[how]} at step {step}"
        # Keras's own refusal begins with "Keras raises", as in the other modes
        reason = (f"Keras raises {reason} ({where})" if raised_in_keras(exc, keras)
                  else f"{where}: {reason}")
        Path(job["error"]).write_text(json.dumps({"reason": reason}))
    return 0


if __name__ == "__main__":
    sys.exit(resume(sys.argv[1]))
