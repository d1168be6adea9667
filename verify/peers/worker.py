"""Peer worker: runs torch.optim or optax optimizers, without Keras, and streams their
states in the Keras worker's protocol (verify/worker/messages.py), under Keras's slot names.

Started as `python -m verify.peers.worker JOB.json` by verify/peers/run.py, one
process per library and dtype (JAX's x64 is set from the dtype before JAX is
imported).  Each run's spec holds, besides the Keras worker's fields, `peer`:
the library, class, keyword arguments, and which peer state is which Keras slot
(`states`), in which units (`scale`: Keras's slot is that factor times the peer's),
which are one optimizer-wide value (`shared`) and the value of a state the peer
creates lazily on its first step (`initial`, default 0: torch's zeros_like), which
weights the class takes where it takes some only (`takes`: torch's Muon), and the
training loop's wrappers by stage (`wrappers`, verify/peers/wrappers.toml), run in
Keras's order: accumulate, clip, weight decay, step (the class's, and that of the
`others` optimizer on the weights it does not take), the schedule's step, EMA.
Peer states not named in `states` (torch's step counters, optax's count) are not
sent: `iterations` is the number of steps taken.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import numpy as np

import reference.schedules
from verify.worker.gradients import gradient_digest
from verify.worker.messages import RunMessages, peak_memory_mb, write_message


def _places(spec):
    """(shape, scenario, offset, size, weight name) of every weight of every scenario."""
    places = []
    for scenario in spec["scenarios"]:
        offset = 0
        for name, shape in spec["weights"]:
            size = int(np.prod(shape, dtype=int))
            places.append((tuple(shape), scenario, offset, size, name))
            offset += size
    return places


def takes(place, rule) -> bool:
    """Does a class that takes some weights only (classes.toml `takes`: the rule, None
    for a class that takes every weight) take this one?"""
    shape, *_, name = place
    return rule is None or (len(shape) == rule["rank"] and rule["not_named"] not in name.lower())


class Peer:
    """One optimizer of a peer library on the weights of every scenario."""

    def __init__(self, spec, gradients, initial):
        self.spec, self.peer = spec, spec["peer"]
        self.dtype = np.dtype(spec["dtype"])
        self.gradients = gradients
        self.places = _places(spec)
        self.wrappers = self.peer.get("wrappers", {})
        self.steps = 0    # calls, as Keras's _iterations
        self.updates = 0  # optimizer steps taken (torch: fewer under accumulation)
        self.start([initial[o:o + n].reshape(shape).astype(self.dtype)
                    for shape, _, o, n, _ in self.places])

    def wrapper(self, stage):
        """(name, kwargs) of the stage's wrapper, or (None, {})."""
        w = self.wrappers.get(stage)
        return (w["name"], dict(w["kwargs"])) if w else (None, {})

    def gradient_arrays(self, t):
        rows = {name: np.asarray(self.gradients[name][t], dtype=self.dtype)
                for name in self.spec["scenarios"]}
        return [rows[scenario][o:o + n].reshape(shape)
                for shape, scenario, o, n, _ in self.places]

    def states(self):
        """{"i/state" or "g/state": array}: the weights and every mapped slot."""
        weights, raw = self.read()
        out = {f"{i}/variable": w for i, w in enumerate(weights)}
        shared = set(self.peer.get("shared", []))
        for peer_name, keras_name in self.peer["states"].items():
            values = raw.get(peer_name)
            if values is None:
                continue
            factor = self.peer["scale"].get(peer_name, 1.0)
            # in the run's dtype: a slot the peer keeps in another (torch's NAdam
            # mu_product, a float32 tensor) is compared as the value it holds
            values = [None if v is None else
                      (np.asarray(v, np.float64) * factor).astype(self.dtype) for v in values]
            if peer_name in self.peer.get("squeeze", {}):  # torch's keepdim axis
                axis = self.peer["squeeze"][peer_name]
                values = [None if v is None else np.squeeze(v, axis) for v in values]
            if peer_name in shared:
                present = [v for v in values if v is not None]
                if any(not np.array_equal(v, present[0]) for v in present):
                    raise RuntimeError(f"{peer_name} differs between weights")
                out[f"g/{keras_name}"] = np.asarray(present[0]).reshape(())
            else:
                for i, v in enumerate(values):
                    if v is not None:
                        out[f"{i}/{keras_name}"] = v
        return out

    def schedule_values(self, schedule):
        """The Keras schedule's value at every step of the run (and one past it), in
        float64 as Python computes it."""
        steps = len(next(iter(self.gradients.values())))
        return reference.schedules.values(schedule, steps + 1)

    def initial_value(self, name, shape):
        value = self.peer.get("initial", {}).get(name, 0.0)
        shape = () if name in self.peer.get("shared", []) else shape
        return np.full(shape, value, self.dtype)


class TorchPeer(Peer):
    def start(self, weights):
        import torch

        torch.set_num_threads(1)
        self.torch = torch
        self.params = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in weights]
        # torch creates most states on the first step: a copy takes one step with zero
        # gradients to tell which states this configuration keeps
        probe = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in weights]
        for p in probe:
            p.grad = torch.zeros_like(p)
        self.opts, self.owner, self.kept = [], [None] * len(weights), [None] * len(weights)
        others, others_kw = self.wrapper("others")  # the weights the class does not take
        own = [takes(place, self.peer["takes"]) for place in self.places]
        for name, kwargs, mine in ((self.peer["class"], self.peer["kwargs"], True),
                                   (others, others_kw, False)):
            chosen = [i for i, is_own in enumerate(own) if is_own == mine]
            if not name or not chosen:
                continue
            kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}
            make = getattr(torch.optim, name)
            opt = make([self.params[i] for i in chosen], **kwargs)
            probe_opt = make([probe[i] for i in chosen], **kwargs)
            probe_opt.step()
            self.opts.append(opt)
            for i in chosen:
                self.owner[i] = opt
                # the states kept for the weight and their shapes
                self.kept[i] = {s: tuple(probe_opt.state[probe[i]][s].shape)
                                for s in self.peer["states"] if s in probe_opt.state[probe[i]]}
        name, kw = self.wrapper("schedule")
        base = kw.pop("initial", None)  # the class's rate: the others' is relative to it
        if name == "LambdaLR":  # lr_lambda=lambda t: f(t) / lr, f the Keras schedule
            rates = self.schedule_values(kw.pop("schedule"))
            kw["lr_lambda"] = lambda t: float(rates[t]) / base
        self.schedulers = [getattr(torch.optim.lr_scheduler, name)(opt, **kw)
                           for opt in (self.opts if name else [])]
        name, kw = self.wrapper("ema")
        self.ema = None
        if name:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.module = torch.nn.ParameterList(self.params)
            self.ema = AveragedModel(self.module,
                                     multi_avg_fn=get_ema_multi_avg_fn(kw["decay"]))
            self.overwrite_every = kw["overwrite_every"]

    def step(self, arrays):
        torch = self.torch
        self.steps += 1
        _, accumulate = self.wrapper("accumulate")
        if accumulate:  # (loss / steps).backward(): p.grad += g / steps
            k = accumulate["steps"]
            for p, g in zip(self.params, arrays):
                part = torch.from_numpy(g.copy()) / k
                p.grad = part if p.grad is None else p.grad.add_(part)
            if self.steps % k:
                return
        else:
            for p, g in zip(self.params, arrays):
                p.grad = torch.from_numpy(g.copy())
        name, kw = self.wrapper("clip")
        if name == "clip_grad_norm_":
            torch.nn.utils.clip_grad_norm_(self.params, kw["max_norm"])
        elif name == "clip_grad_norm_each":
            for p in self.params:
                torch.nn.utils.clip_grad_norm_(p, kw["max_norm"])
        elif name == "clip_grad_value_":
            torch.nn.utils.clip_grad_value_(self.params, kw["clip_value"])
        _, decay = self.wrapper("decay")
        if decay:
            with torch.no_grad():
                for p, opt in zip(self.params, self.owner):
                    p.mul_(1 - opt.param_groups[0]["lr"] * decay["weight_decay"])
        for opt in self.opts:
            opt.step()
        self.updates += 1
        if accumulate:
            for opt in self.opts:
                opt.zero_grad()
        for scheduler in self.schedulers:
            scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.module)
            if self.overwrite_every and self.updates % self.overwrite_every == 0:
                with torch.no_grad():
                    for p, a in zip(self.params, self.ema.module.parameters()):
                        p.copy_(a)

    def wrapper_state(self, name, weights):
        if name == "grad":
            return [np.zeros_like(w) if p.grad is None else p.grad.numpy().copy()
                    for p, w in zip(self.params, weights)]
        if name == "average":
            # before its first update_parameters (which copies the weights) the
            # average holds no value: reported as Keras's initial one
            if not self.ema.n_averaged.item():
                return [self.initial_value(name, np.shape(w)) for w in weights]
            return [a.detach().numpy().copy() for a in self.ema.module.parameters()]
        return None

    def read(self):
        weights = [p.detach().numpy().copy() for p in self.params]
        raw = {}
        for name in self.peer["states"]:
            values = self.wrapper_state(name, weights)
            if values is not None:
                raw[name] = values
                continue
            values = []
            for p, opt, kept in zip(self.params, self.owner, self.kept):
                value = opt.state[p].get(name)
                if value is None and self.updates == 0 and name in kept:
                    value = self.initial_value(name, kept[name])  # before the step creating it
                values.append(value.detach().numpy().copy() if hasattr(value, "detach")
                              else value)
            if any(v is not None for v in values):
                raw[name] = values
        return weights, raw


class OptaxPeer(Peer):
    def start(self, weights):
        import jax
        import optax

        kwargs = dict(self.peer["kwargs"])
        name, kw = self.wrapper("schedule")
        if name == "Schedule":  # f(count), the Keras schedule's values in the run's dtype
            rates = jax.numpy.asarray(self.schedule_values(kw["schedule"]), self.dtype)
            kwargs["learning_rate"] = lambda count: rates[count]
        elif name:
            kwargs["learning_rate"] = getattr(optax, name)(init_value=kw.pop("initial"), **kw)
        make = optax
        for part in self.peer.get("function", self.peer["class"]).split("."):
            make = getattr(make, part)  # optax.contrib.muon
        tx = make(**kwargs)
        name, kw = self.wrapper("clip")
        if name:
            tx = optax.chain(getattr(optax, name)(**kw), tx)
        name, kw = self.wrapper("ema")
        if name == "ema":
            tx = optax.chain(tx, optax.ema(**kw))
        self.average = None
        if name == "incremental_update":  # the parameters' EMA, kept beside them
            self.decay, self.overwrite_every = kw["decay"], kw["overwrite_every"]
            self.average = [jax.numpy.asarray(w) for w in weights]
        name, kw = self.wrapper("accumulate")
        if name:
            tx = optax.MultiSteps(tx, **kw)
        self.tx = tx
        self.rate = kwargs.get("learning_rate")  # a number or a schedule of the count
        self.params = [jax.numpy.asarray(w) for w in weights]
        self.state = self.tx.init(self.params)

        def step(params, state, grads):
            updates, state = self.tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        self.jitted = jax.jit(step)  # as a training loop runs it
        self.jitted_average = jax.jit(lambda params, average: optax.incremental_update(
            params, average, 1 - self.decay)) if self.average is not None else None

    def name_factors(self, weights, raw):
        """optax's factors (v_row reduces its factored dim d0, v_col d1) under the Keras
        slot reducing the same axis; a weight it does not factor, or over other axes,
        has none."""
        from optax._src.factorized import _factored_dims

        reduces = self.peer["reduces"]
        for keras_name in reduces:
            raw[keras_name] = [None] * len(weights)
        for i, w in enumerate(weights):
            dims = _factored_dims(w.shape, self.peer["kwargs"].get("factored", True),
                                  self.peer["kwargs"]["min_dim_size_to_factor"])
            if dims is None:
                continue
            axis = {"d1": dims[0], "d0": dims[1]}
            for peer_name, which in self.peer["factors"].items():
                for keras_name, reduced in reduces.items():
                    if reduced % w.ndim == axis[which]:
                        raw[keras_name][i] = raw[peer_name][i]

    def step(self, arrays):
        _, decay = self.wrapper("decay")
        k = self.wrapper("accumulate")[1].get("every_k_schedule", 1)
        if decay and (self.steps + 1) % k == 0:  # on the calls that update (MultiSteps)
            count = self.steps // k  # the updates so far: the count a schedule sees
            lr = self.rate(count) if callable(self.rate) else self.rate
            self.params = [p * (1 - lr * decay["weight_decay"]) for p in self.params]
        self.params, self.state = self.jitted(self.params, self.state, list(arrays))
        self.steps += 1
        self.updates += 1
        if self.average is not None:
            self.average = self.jitted_average(self.params, self.average)
            if self.overwrite_every and self.updates % self.overwrite_every == 0:
                self.params = list(self.average)

    def read(self):
        import optax

        weights = [np.asarray(p) for p in self.params]
        raw = {}
        count = len(self.params)

        masked = optax.MaskedNode

        def walk(node, prefix=""):
            """Per-parameter lists by field name; a partition's parts (optax's
            combine.partition: a dict of masked states) as "part.field", a masked
            parameter's entry None."""
            if isinstance(node, tuple) and hasattr(node, "_fields"):
                for name in node._fields:
                    value = getattr(node, name)
                    if isinstance(value, list) and len(value) == count:
                        raw.setdefault(prefix + name, [
                            None if isinstance(v, masked) else np.asarray(v) for v in value])
                    else:
                        walk(value, prefix)
            elif isinstance(node, dict):
                for key, value in node.items():
                    walk(value, f"{prefix}{key}.")
            elif isinstance(node, (tuple, list)):
                for item in node:
                    walk(item, prefix)

        walk(self.state)
        if self.peer.get("factors"):
            self.name_factors(weights, raw)
        if "acc_grads" in raw:  # MultiSteps' running mean of mini_step gradients: their sum
            raw["acc_grads"] = [a * np.asarray(self.state.mini_step) for a in raw["acc_grads"]]
        if self.average is not None:
            raw["average"] = [np.asarray(a) for a in self.average]
        return weights, raw


def run(out, spec, gradients, initial, steps, chunk):
    peer = {"torch": TorchPeer, "optax": OptaxPeer}[spec["peer"]["library"]](
        spec, gradients, initial)
    states = peer.states()
    names = list(states)
    messages = RunMessages(out, spec["id"])
    messages.start(states, 0, computed_dtypes=sorted({str(v.dtype) for n, v in states.items()
                                                      if n.endswith("/variable")}),
                   round_trip=None, peer=spec["peer"])
    clock = time.process_time
    spent = {"step": 0.0, "read": 0.0, "send": 0.0}
    for t0 in range(0, steps, chunk):
        k = min(chunk, steps - t0)
        buffers = {n: np.empty((k,) + v.shape, v.dtype) for n, v in states.items()}
        applied = []
        for j in range(k):
            arrays = peer.gradient_arrays(t0 + j)
            applied += arrays
            t = clock()
            peer.step(arrays)
            t_step = clock()
            states = peer.states()
            if list(states) != names:
                raise RuntimeError(f"the peer's states changed after step {t0 + j + 1}: "
                                   f"{sorted(states)} instead of {sorted(names)}")
            for n, v in states.items():
                buffers[n][j] = v
            spent["step"] += t_step - t
            spent["read"] += clock() - t_step
        digest = gradient_digest(applied)
        t = clock()
        messages.chunk(t0 + 1, digest, buffers, np.arange(t0 + 1, t0 + k + 1))
        spent["send"] += clock() - t
    messages.end(seconds=spent)


def versions(libraries) -> str:
    parts = []
    if "torch" in libraries:
        import torch
        parts.append(f"torch {torch.__version__}")
    if "optax" in libraries:
        import jax
        import optax
        parts.append(f"optax {optax.__version__} (jax {jax.__version__})")
    return ", ".join(parts)


def main(job_path: str) -> int:
    with open(job_path) as f:
        job = json.load(f)
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from libraries must not corrupt the protocol
    dtypes = {spec["dtype"] for spec in job["runs"]}
    os.environ["JAX_ENABLE_X64"] = "1" if "float64" in dtypes else "0"
    for path in reversed(job.get("python_path", [])):
        sys.path.insert(0, path)
    libraries = {spec["peer"]["library"] for spec in job["runs"]}
    write_message(out, {"type": "hello", "backend": job["backend"], "keras": None,
                        "backend_version": versions(libraries), "numpy": np.__version__,
                        "python": sys.version.split()[0]})
    inputs = job["inputs"]
    initial = np.load(inputs["initial"])
    gradients = {name: np.load(path, mmap_mode="r")
                 for name, path in inputs["scenarios"].items()}
    for spec in job["runs"]:
        try:
            run(out, spec, gradients, initial, job["steps"], job["chunk"])
        except Exception as exc:  # reported as an `error` verdict for this run
            for line in traceback.format_exc().splitlines():
                print(f"run {spec['id']}: {line}", file=sys.stderr)
            reason = f"{spec['peer']['library']} raises {type(exc).__name__}: {exc}"
            write_message(out, {"type": "run_error", "id": spec["id"],
                                "reason": reason.splitlines()[0]})
    write_message(out, {"type": "bye", "cpu_seconds": time.process_time(),
                        "peak_rss_mb": peak_memory_mb()})
    out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
