"""Runs the backend workers and diffs their state streams as they arrive.

One worker process per backend (per backend and x64 setting for JAX), all
started at once; a reader thread per worker queues its messages, the main
thread hands them to a pool of diff threads, each run's in order.  Only
running statistics are kept: each comparison's per-step tables go to files as
they come (report.StepFiles).
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

import reference
from verify import compare, configurations, processes, scenarios
from verify.output import note_child, scratch_folder
from verify.worker import dtypes
from verify.worker.gradients import gradient_digest, intended
from verify.worker.messages import read_message

CHUNK = 50
EXIT_SECONDS = 60  # a worker's exit after its stream ends

# A mode that is the very computation of another on a backend runs once.  Keras's
# model.compile default jit_compile="auto" (keras/src/trainers/trainer.py,
# _resolve_auto_jit_compile, the same in every Keras 3 release) resolves to True on
# JAX, so there the compiled mode is jit_compile=True's computation, jax.jit of the
# train step; on torch it resolves to False, and the trainer runs the eager step.
SAME_AS = {("jax", "jit"): ("compiled", "on JAX the compiled mode is jit_compile=True "
                                        "(Keras's jit_compile='auto' resolves to True)"),
           ("torch", "compiled"): ("eager", "on torch the compiled mode is the eager step "
                                            "(Keras's jit_compile='auto' resolves to False)")}


def distinct(backend, mode) -> bool:
    """Is this mode a computation of its own on this backend (SAME_AS)?"""
    return (backend, mode) not in SAME_AS


@dataclass
class Selection:
    backends: list
    dtypes: list
    families: list
    configurations: list  # Configuration objects
    scenarios: list       # names
    modes: list
    steps: int
    size: int
    seed: int
    # scenario -> [steps, N] float64, N the elements of all weights (verify/scenarios.py);
    # None: the scenarios' own, generated from steps, weights and seed
    gradients: dict | None = None
    initial: np.ndarray | None = None  # [N]; None: generated from the seed
    python: str = sys.executable
    python_path: list = field(default_factory=list)  # put first on the workers' sys.path
    jax_x64: bool | None = None  # None: on exactly for float64 work (tests may force it)
    weights: dict | None = None  # name -> shape; None: scenarios.weight_shapes(size)
    shard: tuple | None = None  # (K, N): the K-th of N shards of the runs (runs())
    # (configuration id, backend, dtype, mode) of the runs to make, a part of the
    # product (pairwise()); None: every run of the product
    only: frozenset | None = None

    def __post_init__(self):
        if self.weights is None:
            self.weights = scenarios.weight_shapes(self.size)
        self.weights = {name: tuple(shape) for name, shape in self.weights.items()}
        count = scenarios.element_count(self.weights)
        if self.gradients is None:
            self.gradients = {n: scenarios.gradients(n, self.steps, count, self.seed)
                              for n in self.scenarios}
        if self.initial is None:
            self.initial = scenarios.initial_weights(count, self.seed)
        configurations.check_names(self.configurations, [p for p, *_ in self.variables()])

    def runs(self, every=False) -> list:
        """(configuration, backend, dtype, mode) of each run, in run order.  A run
        is the unit of sharding: one worker stream that every family and scenario
        share.  Shard (K, N) takes the K-th run and every N-th after it, so that
        the shards share out every backend and dtype evenly and each run is in
        exactly one shard."""
        runs = [(c, b, d, m) for b in self.backends for d in self.dtypes
                for c in self.configurations for m in self.modes if distinct(b, m)
                and (self.only is None or (c.id, b, d, m) in self.only)]
        if every or self.shard is None:
            return runs
        k, n = self.shard
        return runs[k - 1::n]

    def pairwise(self) -> "Selection":
        """This selection with a part of its runs in which every configuration runs on
        every backend, in every dtype and in every mode at least once (a pairwise
        covering design; the product is every combination).  Greedy: each
        configuration takes the run that covers most of its pairs still missing,
        ties to the (backend, dtype, mode) used least so far, so the parts of the
        product share the runs evenly."""
        cells = [(b, d, m) for b in self.backends for d in self.dtypes for m in self.modes
                 if distinct(b, m)]
        used = {cell: 0 for cell in cells}
        chosen = set()
        for c in self.configurations:
            missing = ({("backend", b) for b, _, _ in cells} | {("dtype", d) for _, d, _ in cells}
                       | {("mode", m) for _, _, m in cells})
            while missing:
                def gain(cell):
                    return len(missing & {("backend", cell[0]), ("dtype", cell[1]),
                                          ("mode", cell[2])})
                cell = max(cells, key=lambda cell: (gain(cell), -used[cell]))
                missing -= {("backend", cell[0]), ("dtype", cell[1]), ("mode", cell[2])}
                used[cell] += 1
                chosen.add((c.id, *cell))
        return replace(self, only=frozenset(chosen))

    def variables(self, names=None) -> list:
        """(path, weight name, shape, scenario index) of every variable of the
        scenarios `names` (all), in order: each scenario's weights, scenario after
        scenario."""
        return [(f"{scenario}_{name}", name, shape, s)
                for s, scenario in enumerate(self.scenarios if names is None else names)
                for name, shape in self.weights.items()]

    def scenario_groups(self) -> list:
        """The scenarios of each run of a configuration, backend, dtype and mode,
        each run one optimizer holding their weights: all together, but each of
        scenarios.ISOLATED alone (its NaN would reach the others' weights through
        a global clipnorm, and skip their steps under a loss scale)."""
        shared = tuple(s for s in self.scenarios if s not in scenarios.ISOLATED)
        return ([shared] if shared else []) + [(s,) for s in self.scenarios
                                               if s in scenarios.ISOLATED]


@dataclass
class RunSpec:
    id: int
    configuration: object
    backend: str
    dtype: str
    mode: str
    scenarios: tuple = ()  # the scenarios whose weights its optimizer holds
    round_trip: str | None = None  # Keras's serialization round trip: None, or a finding


def _worker_groups(sel: Selection):
    """(backend, x64, dtypes) for each worker process: one per backend and
    dtype, so that slow backends use every core and JAX's x64 is on exactly
    for float64."""
    groups = []
    for backend in sel.backends:
        for dtype in sel.dtypes:
            x64 = (dtype == "float64") if sel.jax_x64 is None else sel.jax_x64
            groups.append((backend, x64 if backend == "jax" else None, [dtype]))
    return groups


class Runner:
    def __init__(self, sel: Selection, sink, progress=None, observer=None, floor=False):
        self.sel = sel
        self.floor = floor  # the Keras work alone: no states sent, nothing compared
        self.sink = sink          # receives finished rows and step tables
        self.progress = progress  # callable(steps_done) or None
        # observer(run, first_step, states, header): sees Keras's raw states too
        # (step 0 first), for checks that compare Keras with Keras
        self.observer = observer
        # per group of scenarios, their weights (the comparison lays them end to end,
        # flattened) and their gradients
        self.segments, self.all_gradients = {}, {}
        for names in sel.scenario_groups():
            paths, labels, shapes, groups = zip(*sel.variables(names))
            self.segments[names] = compare.Segments(paths, shapes, groups, len(names), labels)
            self.all_gradients[names] = np.concatenate(
                [sel.gradients[n].reshape(len(sel.gradients[n]), -1) for n in names], axis=1)
        self.environment = {"backends": {}, "pinned": processes.pinned_description(),
                            "user_settings_not_used": processes.overridden_user_settings()}
        self._lock = threading.Lock()  # the sink and progress, shared by the diff threads
        # where the time goes (seconds): per worker process, and in this process
        self.timing = {"workers": [], "receive_cpu": 0.0, "diff_cpu": 0.0}

    def run(self) -> None:
        sel = self.sel
        with scratch_folder("verify-inputs-") as tmp:
            self.spill = tmp / "steps"  # per-step tables the report does not keep
            inputs = {"initial": str(tmp / "initial.npy"), "scenarios": {}}
            np.save(inputs["initial"], sel.initial)
            for name in sel.scenarios:
                path = tmp / f"{name}.npy"
                np.save(path, sel.gradients[name])
                inputs["scenarios"][name] = str(path)
            started, run_id = [], 0
            self.runs = {}
            chosen = sel.runs()
            for backend, x64, dtypes in _worker_groups(sel):
                specs = []
                for configuration, b, dtype, mode in chosen:
                    if b != backend or dtype not in dtypes:
                        continue
                    for names in sel.scenario_groups():
                        run = RunSpec(run_id, configuration, backend, dtype, mode, names)
                        self.runs[run_id] = run
                        specs.append({"id": run_id, "class_name": configuration.class_name,
                                      "config": configuration.config,
                                      "source": configuration.source, "dtype": dtype,
                                      "mode": mode, "scenarios": list(names),
                                      "weights": [[n, list(shape)] for n, shape
                                                  in sel.weights.items()]})
                        run_id += 1
                if not specs:  # no run of this shard on this backend and dtype
                    continue
                job = {"backend": backend, "x64": x64, "steps": sel.steps, "chunk": CHUNK,
                       "inputs": inputs, "runs": specs, "python_path": sel.python_path,
                       "floor": self.floor}
                job_path = tmp / f"job-{len(started)}.json"
                job_path.write_text(json.dumps(job))
                started.append(self._start_worker(backend, x64, job_path, tmp, len(started),
                                                  specs))
            try:
                self._pump(started)
            finally:  # an interrupt or a failure: no worker outlives the run
                for w in started:
                    processes.stop(w["proc"])
                    w["log"].close()

    def _start_worker(self, backend, x64, job_path, tmp, index, specs):
        env = processes.pinned_environment(backend, tmp / f"keras-home-{index}", x64=x64)
        log_path = tmp / f"worker-{index}.log"
        proc, log = processes.start("verify.worker", job_path, log_path, env, self.sel.python)
        note_child(tmp, proc.pid)
        return {"proc": proc, "log": log, "log_path": log_path, "backend": backend,
                "runs": [s["id"] for s in specs]}

    def _pump(self, started):
        """Read every worker's messages in the main thread; diff them on a pool of
        threads (numpy releases the GIL), one comparison (run and family) at a time
        in arrival order, different comparisons in parallel."""
        q = queue.Queue(maxsize=2 * len(started))  # backpressure: workers wait for the diff
        diff = _OrderedPool(_diff_threads(),
                            budget=(2 * len(started) + 2) * len(self.sel.families))
        streams = _Streams(self, diff)

        def reader(w):
            try:
                while True:
                    cpu = time.thread_time()
                    msg = read_message(w["proc"].stdout)
                    with self._lock:
                        self.timing["receive_cpu"] += time.thread_time() - cpu
                    if msg is None:
                        break
                    q.put((w, msg))
            except Exception as exc:  # a torn stream is reported as the worker's failure
                q.put((w, ({"type": "torn", "reason": f"{type(exc).__name__}: {exc}"}, {})))
            q.put((w, None))

        threads = [threading.Thread(target=reader, args=(w,), daemon=True) for w in started]
        for t in threads:
            t.start()
        open_workers = len(started)
        try:
            while open_workers:
                w, msg = q.get()
                diff.raise_failure()
                if msg is None:
                    open_workers -= 1
                    streams.closed(w)
                else:
                    streams.handle(w, *msg)
        except BaseException:
            diff.abandon()
            raise
        diff.close()
        self.timing["diff_cpu"] = diff.cpu
        for t in threads:
            t.join()

    def _digest(self, run_id, start, k) -> str:
        """The digest of steps start..start+k-1 as the worker computes it."""
        run = self.runs[run_id]
        return gradient_digest(dtypes.gradients(
            self.all_gradients[run.scenarios][start - 1:start - 1 + k], run.dtype))

    def _worker_timing(self, w, bye):
        self.timing["workers"].append({
            "backend": w["backend"], "startup": bye.get("startup_seconds"),
            "build": bye.get("build_seconds"), "cpu": bye.get("cpu_seconds"),
            "peak_rss_mb": bye.get("peak_rss_mb")})

    def _advance(self, steps):
        if self.progress:
            with self._lock:
                self.progress(steps)

    @staticmethod
    def _check_dtypes(run, computed):
        run.problem = None
        if computed != [dtypes.variables(run.dtype)]:
            run.problem = (f"Keras computed in {', '.join(computed)} although {run.dtype} "
                           "was requested")

    def _start(self, run_id, family, states, iteration, layout, active):
        run = self.runs[run_id]
        keras_states = [n for n in states if n != "variable"]
        gradients = self.all_gradients[run.scenarios]
        if run.mode == "fit":  # apply receives them times the trainer's loss scale
            gradients = intended(gradients, run.configuration.config, run.dtype)
        c, reason = compare.build(family, reference.get_rule, run.configuration, run.dtype,
                                  reference.PRECISIONS[run.backend], self.segments[run.scenarios],
                                  gradients, keras_states)
        if c is not None:
            c.on_table = self.sink.step_files(family, run, run.scenarios,
                                              self.spill / f"{run_id}-{family}")
            c.error = run.problem
            _guarded(c, c.start, states, iteration, layout, self.not_kept(run))
        active[run_id, family] = c if c is not None else reason

    def not_kept(self, run) -> dict:
        """{state: why}: slots the subject keeps for some variables only or in another
        shape (compare.RunComparison.start); Keras keeps every slot it has."""
        return {}

    def _feed(self, run_id, family, start, states, iterations, active):
        c = active[run_id, family]
        if isinstance(c, compare.RunComparison) and not c.error:
            _guarded(c, c.feed, start, states, iterations)

    @staticmethod
    def _notes(run_id, family, notes, active):
        """What the worker says of the whole run (torch.compile's fallback to eager)."""
        c = active[run_id, family]
        if isinstance(c, compare.RunComparison):
            for s in range(len(c.notes)):
                c.notes[s].extend(notes)

    def _unfinalised(self, run_id, family, found, active):
        """Weights fit left other than finalize_variable_values writes (verify/worker/fit.py)."""
        c = active[run_id, family]
        if isinstance(c, compare.RunComparison) and not c.error:
            for f in found:
                c.after_last_step(self.runs[run_id].steps_done, f["place"], f["keras"],
                                  f["expected"], f["text"])

    def _finish(self, run_id, family, active):
        run, c = self.runs[run_id], active.pop((run_id, family))
        if not isinstance(c, str):
            c.on_table.close()
        with self._lock:
            for s, scenario in enumerate(run.scenarios):
                if isinstance(c, str) and family in reference.JUDGED:  # the harness must state it
                    self.sink.row(family, run, scenario, error=c)
                elif isinstance(c, str):
                    self.sink.row(family, run, scenario, not_stated=c)
                else:
                    self.sink.row(family, run, scenario, comparison=c, index=s,
                                  steps=c.on_table.paths[s])
        if not isinstance(c, str) and (c.error or c.on_table.temporary):
            c.on_table.remove()  # an error row has no per-step table

    def _finish_error(self, run_id, family, reason, active):
        run = self.runs[run_id]
        c = active.pop((run_id, family), None)
        if isinstance(c, compare.RunComparison):
            c.on_table.remove()
        not_stated = None
        if family != "keras":  # a family that does not state it says so, run or not
            try:
                reference.get_rule(family, run.configuration.class_name).hyperparameters(
                    run.configuration.config)
            except reference.Unsupported as exc:
                not_stated = str(exc)
        with self._lock:
            for scenario in run.scenarios:
                if not_stated is not None:
                    self.sink.row(family, run, scenario, not_stated=not_stated)
                else:
                    self.sink.row(family, run, scenario, error=reason)


class _Streams:
    """The workers' messages, each kind to its handler (HANDLERS), for one Runner.run:
    a run's messages become tasks of its comparisons, one per family, on the diff pool."""

    def __init__(self, runner, diff):
        self.runner, self.diff = runner, diff
        self.active = {}  # (run id, family) -> comparison, touched only by its own tasks
        self.done = set()  # runs whose rows are written or on their way

    def handle(self, w, header, arrays):
        kind = header["type"]
        if kind in ("chunk", "run_end", "run_error") and header["id"] in self.done:
            return  # a run already failed (its rows are written)
        handler = self.HANDLERS.get(kind)
        if handler is not None:
            handler(self, w, header, arrays)

    def closed(self, w):
        """A worker's stream ended: its runs without an end failed with it."""
        if "torn" in w:  # nobody reads its stream: it would block writing
            processes.stop(w["proc"])
        try:
            w["proc"].wait(timeout=EXIT_SECONDS)
        except subprocess.TimeoutExpired:
            processes.stop(w["proc"])
        w["log"].close()
        reason = processes.death_reason(w["proc"].returncode, w["log_path"])
        self._fail_open_runs(w, f"{w['backend']} worker failed: {reason}")

    def _each_family(self, run_id, method, *args):
        for family in self.runner.sel.families:
            self.diff.submit((run_id, family), method, run_id, family, *args)

    def _fail(self, run_id, reason):
        runner = self.runner
        self.done.add(run_id)
        if runner.floor:
            runner.timing.setdefault("failures", []).append(reason)
            return
        self._each_family(run_id, runner._finish_error, reason, self.active)
        runner._advance(runner.sel.steps - getattr(runner.runs[run_id], "steps_done", 0))

    def _fail_open_runs(self, w, reason):
        for run_id in w["runs"]:
            if run_id not in self.done:
                self._fail(run_id, reason)

    def _torn(self, w, header, arrays):
        w["torn"] = header["reason"]
        self._fail_open_runs(w, f"{w['backend']} worker's stream could not be read: "
                                f"{header['reason']}")

    def _hello(self, w, header, arrays):
        self.runner.environment["backends"][header["backend"]] = {
            "keras": header["keras"], "version": header.get("backend_version"),
            "numpy": header["numpy"], "python": header["python"],
            "keras_config": header.get("keras_config")}

    def _bye(self, w, header, arrays):
        self.runner._worker_timing(w, header)

    def _run_start(self, w, header, arrays):
        runner, run_id = self.runner, header["id"]
        run = runner.runs[run_id]
        run.round_trip = header.get("round_trip")
        states = _assemble(arrays, 1)
        if runner.observer:
            runner.observer(run, 0, states, header)
        runner._check_dtypes(run, header["computed_dtypes"])
        self._each_family(run_id, runner._start, states, int(arrays["iterations"][0]),
                          _layout(arrays), self.active)

    def _chunk(self, w, header, arrays):
        runner, run_id, start = self.runner, header["id"], header["start"]
        k = len(arrays["iterations"])
        if header.get("gradients") != runner._digest(run_id, start, k):
            self._fail(run_id, "harness error: the worker applied other gradients at "
                               f"steps {start}..{start + k - 1} than the comparison uses")
            return
        run = runner.runs[run_id]
        states = _assemble(arrays, k)
        if runner.observer:
            runner.observer(run, start, states, header)
        self._each_family(run_id, runner._feed, start, states, arrays["iterations"],
                          self.active)
        run.steps_done = getattr(run, "steps_done", 0) + k
        runner._advance(k)

    def _run_end(self, w, header, arrays):
        runner, run_id = self.runner, header["id"]
        for part, seconds in header["seconds"].items():
            key = f"workers_{part}"
            runner.timing[key] = runner.timing.get(key, 0.0) + seconds
        if runner.floor:
            runner._advance(runner.sel.steps)
        else:
            if header.get("notes"):
                self._each_family(run_id, runner._notes, header["notes"], self.active)
            if header.get("unfinalised"):
                self._each_family(run_id, runner._unfinalised, header["unfinalised"],
                                  self.active)
            self._each_family(run_id, runner._finish, self.active)
        self.done.add(run_id)

    def _run_error(self, w, header, arrays):
        self._fail(header["id"], header["reason"])

    HANDLERS = {"torn": _torn, "hello": _hello, "bye": _bye, "run_start": _run_start,
                "chunk": _chunk, "run_end": _run_end, "run_error": _run_error}


def _diff_threads() -> int:
    """Threads for the diff: the cores this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class _OrderedPool:
    """A thread pool that runs the tasks of one key in submission order, one at a
    time, and tasks of different keys in parallel.  At most `budget` tasks wait
    or run at once: `submit` blocks beyond that (backpressure up to the workers).
    The first exception of a task is raised again by `raise_failure`/`close`."""

    def __init__(self, threads: int, budget: int):
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="diff")
        self.slots = threading.Semaphore(budget)
        self.lock = threading.Lock()
        self.pending = {}
        self.busy = set()
        self.failures = []
        self.abandoned = False
        self.cpu = 0.0  # CPU seconds of the tasks

    def submit(self, key, fn, *args):
        self.slots.acquire()
        with self.lock:
            self.pending.setdefault(key, deque()).append((fn, args))
            if key in self.busy:
                return
            self.busy.add(key)
        self.pool.submit(self._drain, key)

    def _drain(self, key):
        while True:
            with self.lock:
                if not self.pending[key]:
                    self.busy.discard(key)
                    return
                fn, args = self.pending[key].popleft()
            cpu = time.thread_time()
            try:
                if not (self.failures or self.abandoned):
                    fn(*args)
            except BaseException as exc:  # noqa: BLE001 - raised again in the main thread
                self.failures.append(exc)
            finally:
                with self.lock:
                    self.cpu += time.thread_time() - cpu
                self.slots.release()

    def raise_failure(self):
        if self.failures:
            raise self.failures[0]

    def abandon(self):
        """Skip every task not yet started, wait for the running ones."""
        self.abandoned = True
        self.pool.shutdown(wait=True)

    def close(self):
        self.pool.shutdown(wait=True)
        self.raise_failure()


def _guarded(comparison, method, *args):
    """A reference that raises makes its comparison an `error`, not the run's end."""
    try:
        method(*args)
    except Exception as exc:
        comparison.error = f"reference failed: {type(exc).__name__}: {exc}".splitlines()[0]


def _layout(arrays) -> dict:
    """Run-start arrays -> {state: [(variable index or None, shape)]}: which
    variables Keras keeps a state for, and its shape."""
    out = {}
    for key, value in arrays.items():
        if key != "iterations":
            owner, name = key.split("/", 1)
            out.setdefault(name, []).append((None if owner == "g" else int(owner),
                                             tuple(value.shape[1:])))
    return {n: sorted(parts, key=lambda p: -1 if p[0] is None else p[0])
            for n, parts in out.items()}


def _assemble(arrays, k):
    """Worker arrays ("i/state", "g/state") -> {state: [k, N] or [k, 1]}."""
    per_state = {}
    for key, value in arrays.items():
        if key == "iterations":
            continue
        owner, name = key.split("/", 1)
        if owner == "g":
            per_state[name] = [value.reshape(k, 1)]
        else:
            per_state.setdefault(name, []).append((int(owner), value.reshape(k, -1)))
    out = {}
    for name, parts in per_state.items():
        if isinstance(parts[0], tuple):
            out[name] = np.concatenate([v for _, v in sorted(parts, key=lambda p: p[0])], axis=1)
        else:
            out[name] = parts[0]
    return out
