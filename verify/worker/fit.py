"""Mode `fit`: the optimizer driven by a real `model.fit`, through Keras's trainer.

The model holds the run's variables as its weights and its loss is linear in them,

    loss = sum over variables v of sum(v * g_t[v]),

with g_t, the scenario's gradient of step t, fed as the data: one sample per step,
one batch of one sample per step, in order, one epoch.  The gradient of each weight is then
1 * g_t (the sum's broadcast upstream times the other factor), bit for bit, times
what the trainer's `optimizer.scale_loss` multiplies the loss by: a
LossScaleOptimizer's `dynamic_scale`, or `loss_scale_factor` (`intended`).

`model.compile` keeps Keras's defaults, as users have them: jit_compile="auto"
(keras/src/trainers/trainer.py, _resolve_auto_jit_compile: XLA off on a CPU-only
TensorFlow, off on torch, on for JAX), and `fit` ends with
`optimizer.finalize_variable_values` (the EMA written into the weights when
use_ema).  The data come from a generator, one batch of one sample per step, in
order: Keras's array adapter would cast a float64 array to floatx (keras/src/
trainers/data_adapters/array_slicing.py), and floatx stays float32, as in the other
modes (it sets how a Python-float operand enters on torch).  steps_per_execution is STEPS_PER_EXECUTION where the trainer takes
it; Keras's torch trainer refuses anything but 1 (keras/src/backend/torch/
trainer.py), so torch runs one step per execution.

The optimizer's entry point is tapped (`apply` on TensorFlow and torch,
`stateless_apply` in JAX's jitted train step): after each call the gradients it
received and every state it left are handed to the host (tf.py_function,
jax.debug.callback with ordered=True, directly on torch), so the states of every
step stream as in the other modes even within one execution of several steps.
Before anything is sent the worker checks that every gradient Keras applied is
bit-identical to the intended one (else the run is an error with that reason).  The
weights fit leaves must be those `finalize_variable_values` writes (the last average
with use_ema, else the last weights): one that is not is a divergence of its
scenario at the last step, in `variable` (verify/runner.py).
"""

from __future__ import annotations

import time

import numpy as np

from verify.worker.gradients import intended, scale_factor
from verify.worker.messages import RunMessages
from verify.worker.run import Run, iteration_variable

# Prime to gradient_accumulation_steps (4) and ema_overwrite_frequency (10) of the
# shipped configurations, so that executions straddle their update and overwrite steps.
STEPS_PER_EXECUTION = 3


class FitCheckFailed(RuntimeError):
    """What fit applied or left is not what the harness intended."""


def steps_per_execution(backend: str) -> int:
    return 1 if backend == "torch" else STEPS_PER_EXECUTION


def _linear_model(keras, variables, places, dtype):
    ops = keras.ops

    class LinearLoss(keras.Model):
        def __init__(self):
            super().__init__(dtype=dtype)
            self.weights_held = list(variables)  # tracked: the model's trainable weights
            self.slices = places

        def call(self, x):
            total = None
            for v, (_, shape, _, offset, size) in zip(self.weights_held, self.slices):
                term = ops.sum(ops.multiply(v, ops.reshape(x[0, offset:offset + size], shape)))
                total = term if total is None else ops.add(total, term)
            return total

        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                         training=True):
            return y_pred

    return LinearLoss()


class FitRun(Run):
    """A run whose steps are a `model.fit` (module docstring)."""

    def _make_step(self, backend, mode):
        to_numpy = self.keras.ops.convert_to_numpy

        def read_variables():
            return ([to_numpy(v.value) for _, _, v in self.state_vars],
                    int(to_numpy(iteration_variable(self.optimizer).value)))
        return None, read_variables

    def _data(self, steps):
        """[steps, N]: each step's scenario gradients laid end to end in the
        variables' order (the model slices them back), in the working dtype."""
        return np.stack([np.concatenate([a.reshape(-1) for a in self._gradient_arrays(t)])
                         for t in range(steps)])

    def _places(self):
        """The variables' (path, shape, scenario, offset, size) in the data rows."""
        out, offset = [], 0
        for path, shape, scenario, _, size in self.places:
            out.append((path, shape, scenario, offset, size))
            offset += size
        return out

    def _tap(self, backend, record):
        """Make the optimizer's entry point hand (gradients, states after) to
        `record` after every call, as numpy arrays in the variables' order."""
        opt, keras = self.optimizer, self.keras
        index = {id(v): k for k, v in enumerate(opt.variables)}
        trainable = {id(v): k for k, v in enumerate(self.variables)}
        counter = index[id(iteration_variable(opt))]
        states = [(trainable[id(v)], "w") if name == "variable" and v is self.variables[i]
                  else (index[id(v)], "o") for i, name, v in self.state_vars]

        def host(grads, weights, opt_values):
            record([np.asarray(g) for g in grads],
                   [np.asarray(weights[k] if kind == "w" else opt_values[k])
                    for k, kind in states], int(np.asarray(opt_values[counter])))

        if backend == "jax":
            import jax

            original = opt.stateless_apply

            def stateless_apply(optimizer_variables, grads, trainable_variables):
                new_weights, new_opt = original(optimizer_variables, grads,
                                                trainable_variables)
                jax.debug.callback(host, list(grads), list(new_weights), list(new_opt),
                                   ordered=True)
                return new_weights, new_opt
            opt.stateless_apply = stateless_apply
            return
        original = opt.apply
        if backend == "tensorflow":
            import tensorflow as tf

            def apply(grads, trainable_variables=None):
                grads = list(grads)
                out = original(grads, trainable_variables)
                n, m = len(grads), len(self.variables)
                tf.py_function(lambda *a: host(a[:n], a[n:n + m], a[n + m:]),
                               grads + [v.value for v in self.variables]
                               + [v.value for v in opt.variables], [])
                return out
        else:  # torch: eager
            to_numpy = keras.ops.convert_to_numpy

            def apply(grads, trainable_variables=None):
                received = [to_numpy(g).copy() for g in grads]
                out = original(grads, trainable_variables)
                host(received, [to_numpy(v.value) for v in self.variables],
                     [to_numpy(v.value) for v in opt.variables])
                return out
        opt.apply = apply

    def _fit(self, steps):
        """Run model.fit over `steps` steps; (gradients, states, iterations) of
        every step, and the weights fit leaves."""
        keras, backend = self.keras, self.keras.backend.backend()
        recorded = []
        self._tap(backend, lambda g, s, i: recorded.append((g, s, i)))
        model = _linear_model(keras, self.variables, self._places(), self.dtype)
        if [id(v) for v in model.trainable_variables] != [id(v) for v in self.variables]:
            raise RuntimeError("fit model: its trainable variables are not the run's")
        model.compile(optimizer=self.optimizer, steps_per_execution=steps_per_execution(backend))
        # fit's frames in Keras stay in a traceback, for worker.raised_in_keras
        keras.config.disable_traceback_filtering()
        data = self._data(steps)
        model.fit(((data[t:t + 1],) for t in range(steps)), steps_per_epoch=steps, epochs=1,
                  verbose=0)
        if backend == "jax":
            import jax
            jax.effects_barrier()
        to_numpy = keras.ops.convert_to_numpy
        left = [to_numpy(v.value) for v in self.variables]
        return recorded, left

    def _check(self, recorded, start_values, steps):
        """FitCheckFailed unless every step's gradients are the intended ones bit
        for bit: otherwise the states are not those of the scenario's stream, and
        the run is an `error` cell with the weight and the step, never a verdict."""
        if len(recorded) != steps:
            raise FitCheckFailed(f"fit: the optimizer was applied {len(recorded)} times "
                                 f"in {steps} steps")
        factor = scale_factor(self.spec["config"])
        values = start_values
        for t, (grads, states, _) in enumerate(recorded):
            want = self._gradient_arrays(t)
            if factor is not None:
                want = [intended(a, self.spec["config"], self.dtype) for a in want]
            want = self._scaled(want, values)
            for (path, *_), g, w in zip(self.places, grads, want):
                if g.dtype != w.dtype or g.shape != w.shape or g.tobytes() != w.tobytes():
                    raise FitCheckFailed(
                        f"fit applied another gradient than intended at step {t + 1} to "
                        f"{path} ({g.dtype}{list(g.shape)} vs {w.dtype}{list(w.shape)}, "
                        f"{_differing(g, w)})")
            values = states

    def unfinalised(self, recorded, left, steps) -> list:
        """The weights fit leaves that are not those finalize_variable_values writes
        (the last step's EMA average with use_ema, else its weights), bit for bit:
        per weight, its place, the first differing element's two values and what
        differs.  The runner makes each a divergence of its scenario at the last
        step, in `variable`: a change in what fit computes, compared like any other."""
        last = recorded[-1][1]
        averages = {i: last[k] for k, (i, name, _) in enumerate(self.state_vars)
                    if name == "average" and i is not None}
        found = []
        for i, (path, *_) in enumerate(self.places):
            expected = averages.get(i, last[i])
            if left[i].tobytes() != expected.tobytes():
                what = "EMA average" if i in averages else "weights"
                bits = np.dtype(f"u{expected.dtype.itemsize}")
                k = int(np.flatnonzero(left[i].reshape(-1).view(bits)
                                       != expected.reshape(-1).view(bits))[0])
                found.append({"place": i, "keras": float(left[i].reshape(-1)[k]),
                              "expected": float(expected.reshape(-1)[k]), "text": (
                                  f"fit did not finalise: the weights {path} after fit are "
                                  f"not the {what} of its last step, {steps}, as "
                                  "finalize_variable_values writes them "
                                  f"({_differing(left[i], expected)})")})
        return found

    def execute(self, out, steps, chunk):
        start_values, start_iteration = self.read()
        clock = time.process_time
        t = clock()
        recorded, left = self._fit(steps)
        spent = {"step": clock() - t}
        self._check(recorded, start_values, steps)
        states = [[s.astype(self.dtype) if np.issubdtype(s.dtype, np.integer) else s
                   for s in step_states] for _, step_states, _ in recorded]
        iterations = np.array([i for *_, i in recorded], np.int64)
        self._stream(out, start_values, start_iteration, states, iterations, chunk, spent,
                     self.unfinalised(recorded, left, steps))

    def _stream(self, out, start_values, start_iteration, states, iterations, chunk, spent,
                unfinalised):
        """The run's messages, as Run.execute sends them, the weights fit left
        unfinalised in run_end."""
        messages = RunMessages(out, self.spec["id"])
        names = self.state_names()
        self.send_start(messages, dict(zip(names, start_values)), start_iteration)
        t = time.process_time()
        for t0 in range(0, len(states), chunk):
            part = states[t0:t0 + chunk]
            messages.chunk(t0 + 1, self.applied_digest(t0, t0 + len(part)),
                           {n: np.stack([s[k] for s in part]) for k, n in enumerate(names)},
                           iterations[t0:t0 + chunk])
        spent["send"] = time.process_time() - t
        messages.end(seconds=spent, unfinalised=unfinalised)

    def floor(self, out, steps):
        start = time.process_time()
        self._fit(steps)
        RunMessages(out, self.spec["id"]).end(seconds={"step": time.process_time() - start})


def _differing(g, w) -> str:
    """Where two gradient arrays first differ in their bytes."""
    if g.shape != w.shape or g.dtype != w.dtype:
        return "shape or dtype differs"
    bits = np.dtype(f"u{g.dtype.itemsize}")
    k = int(np.flatnonzero(g.reshape(-1).view(bits) != w.reshape(-1).view(bits))[0])
    return f"element {k}: {g.reshape(-1)[k]!r} vs {w.reshape(-1)[k]!r}"

