"""The worker's runs of real Keras optimizers (the process: verify/worker/__main__.py).

For every run it builds the optimizer from its Keras config dict on the
weights of every scenario (verify/scenarios.py: several ranks, each a Keras
variable named "<scenario>_<weight>"), records every state (weights, every slot, every
optimizer-wide variable) before the first step and after each step, and sends
them in chunks of steps.
"""

from __future__ import annotations

import json
import os
import time
import traceback

import numpy as np

from reference.arithmetic import numpy_dtype
from verify.worker import dtypes
from verify.worker.gradients import gradient_digest
from verify.worker.messages import RunMessages
from verify.worker.user_class import load_class

def _state_layout(optimizer, variables):
    """Map every optimizer variable to (variable index or None, state name).

    Variables are recognised by identity among `optimizer.variables` (the class
    behind `keras.Variable` changed across Keras 3 releases).  A slot belongs
    to a weight when it sits in a list Keras keeps indexed like the weights
    (`_get_variable_index`: `_momentums`, Adafactor's `_r`), or when its name is
    the weight's path plus "_<state>" (the longest such path); its state name is
    that suffix, else its own name, or the list's attribute name where it is
    named after its weight."""
    if isinstance(getattr(optimizer, "optimizers", None), list):  # a MultiOptimizer
        return _inner_layouts(optimizer, variables)
    own = {id(v) for v in optimizer.variables}
    skip = {id(iteration_variable(optimizer))}
    # the learning rate, also of the optimizer a LossScaleOptimizer wraps (whose
    # iteration counter is a state: it counts the steps not skipped)
    for opt in (optimizer, getattr(optimizer, "inner_optimizer", None)):
        lr = getattr(opt, "_learning_rate", None)
        if id(lr) in own:
            skip.add(id(lr))
    prefixes = sorted(((v.path.replace("/", "_") + "_", i) for i, v in enumerate(variables)),
                      key=lambda p: -len(p[0]))
    weights = {id(v) for v in variables}
    paths = {v.path for v in variables} | {v.name for v in variables}
    attribute_names = {id(value): name.lstrip("_") for name, value in vars(optimizer).items()
                       if id(value) in own}

    def fits(slot, weight):
        """A slot's shape is its weight's, or that with one axis left out (a
        factored moment such as Adafactor's), or () (a placeholder)."""
        a, w = tuple(slot.shape), tuple(weight.shape)
        return a in {w, ()} or any(a == w[:i] + w[i + 1:] for i in range(len(w)))

    def slot_list(value):
        return (isinstance(value, (list, tuple)) and len(value) == len(variables)
                and any(id(s) in own for s in value)
                and not any(id(s) in weights or id(s) in skip for s in value)
                and all(s is None or fits(s, w) for s, w in zip(value, variables)))

    slot_of = {id(slot): (i, name.lstrip("_")) for name, value in vars(optimizer).items()
               if slot_list(value) for i, slot in enumerate(value) if id(slot) in own}
    layout = []
    for opt_var in optimizer.variables:
        if id(opt_var) in skip:
            continue
        name = opt_var.name
        owner = next(((i, name[len(p):]) for p, i in prefixes if name.startswith(p)), None)
        if id(opt_var) in slot_of:
            index, list_name = slot_of[id(opt_var)]
            if owner is not None and owner[0] == index:
                state = owner[1]
            else:  # named after its slot (Keras < 3.10), or after its weight (Adafactor)
                state = list_name if name in paths else name
            layout.append((index, state, opt_var))
        elif owner is not None:
            layout.append((owner[0], owner[1], opt_var))
        elif tuple(opt_var.shape) == ():
            layout.append((None, attribute_names.get(id(opt_var), name), opt_var))
        else:
            raise ValueError(f"optimizer variable {name!r} names no weight: cannot tell "
                             "which weight this slot belongs to")
    return layout


def _inner_layouts(multi, variables):
    """A MultiOptimizer's states: each inner optimizer's (its own layout on the
    variables it was given) named "<class in lower case><index>.<state>", and its
    iteration counter "<...>.iteration" (reference/multi.py names them alike)."""
    layout = []
    for k, inner in enumerate(multi.optimizers):
        label = f"{type(inner).__name__.lower()}{k}"
        mine = [i for i, v in enumerate(variables)
                if multi._var_to_optimizer_idx[multi._var_key(v)] == k]
        layout.append((None, f"{label}.iteration", iteration_variable(inner)))
        if mine:  # an inner optimizer without variables is never built
            layout += [(None if i is None else mine[i], f"{label}.{state}", v) for i, state, v
                       in _state_layout(inner, [variables[i] for i in mine])]
    return layout


class ClassMissing(ValueError):
    """The installed Keras has no such optimizer class (an older release)."""


def iteration_variable(optimizer):
    """The variable counting `apply` calls: `_iterations` (with gradient accumulation
    `optimizer.iterations` is computed from it), or `iterations` in releases
    without it."""
    own = {id(v) for v in optimizer.variables}
    counter = getattr(optimizer, "_iterations", None)
    return counter if id(counter) in own else optimizer.iterations


def build_optimizer(keras, class_name, config, source=None):
    """The optimizer from its class, as a user writes it: a serialized schedule
    deserialized, a MultiOptimizer's OptimizerMap built from its optimizers, and
    `exclude_from_weight_decay` (a method, kept in the config by
    verify/configurations.py) called before build.  `source`: the file or module
    of a user's own class (verify/worker/user_class.py); None: keras.optimizers."""
    if source is not None:
        return load_class(keras, source, class_name)(**config)
    cls = getattr(keras.optimizers, class_name, None)
    if not isinstance(cls, type):
        raise ClassMissing(f"keras.optimizers has no class {class_name} "
                           f"(Keras {keras.__version__})")
    config = dict(config)
    exclude = config.pop("exclude_from_weight_decay", None)
    built = []  # the optimizer, for a callable that reads its iterations
    if isinstance(config.get("learning_rate"), dict):
        config["learning_rate"] = _learning_rate(keras, config["learning_rate"], built)
    if isinstance(config.get("inner_optimizer"), dict):  # LossScaleOptimizer's, serialized
        config["inner_optimizer"] = build_optimizer(
            keras, config["inner_optimizer"]["class_name"],
            config["inner_optimizer"].get("config", {}))
    if "optimizer_map" in config:
        config["optimizer_map"] = _optimizer_map(keras, config["optimizer_map"])
    optimizer = cls(**config)
    built.append(optimizer)
    if exclude is not None:
        optimizer.exclude_from_weight_decay(**exclude)
    return optimizer


def _learning_rate(keras, value, built):
    """A serialized schedule, deserialized; a plain callable as users write one:
    {"callable": x} is `lambda: x`, or for a serialized schedule x
    `lambda: x(optimizer.iterations)`."""
    if "callable" not in value:
        return keras.optimizers.schedules.deserialize(value)
    inner = value["callable"]
    if not isinstance(inner, dict):
        return lambda: inner
    schedule = keras.optimizers.schedules.deserialize(inner)
    return lambda: schedule(built[0].iterations)


def _optimizer_map(keras, serialized):
    """keras.optimizers.OptimizerMap(default_optimizer, {pattern: optimizer})."""
    cls = getattr(keras.optimizers, "OptimizerMap", None)
    if not isinstance(cls, type):
        raise ClassMissing(f"keras.optimizers has no class OptimizerMap "
                           f"(Keras {keras.__version__})")
    config = serialized["config"]

    def build(inner):
        return build_optimizer(keras, inner["class_name"], inner.get("config", {}))
    return cls(build(config["default_optimizer"]),
               {pattern: build(inner)
                for pattern, inner in config.get("optimizer_map", {}).items()})


ROUND_TRIP_STEPS = 10


def round_trip(keras, class_name, config, make_variables, grads, steps, every_variable,
               source=None):
    """Keras's public serialization round trip (keras.optimizers.serialize, JSON,
    keras.optimizers.deserialize; model.save stores the same serialized dict), then
    the rebuilt optimizer run beside one built from the class for a few steps, on
    `make_variables()` with `grads(t)` (one scenario's weights: what serialization
    keeps or loses is a hyperparameter, the same for every scenario); which of
    `every_variable` each decays is compared too.  None, or what went wrong (a
    finding)."""
    original = build_optimizer(keras, class_name, config, source)
    excluded = config.get("exclude_from_weight_decay")
    try:
        text = json.dumps(keras.optimizers.serialize(original))
        rebuilt = keras.optimizers.deserialize(json.loads(text))
    except Exception as exc:
        return f"serialization round trip fails: {type(exc).__name__}: {exc}".splitlines()[0]
    if type(rebuilt) is not type(original):
        return (f"keras.optimizers.deserialize gives {type(rebuilt).__name__} "
                f"{str(rebuilt)[:40]!r} instead of a {type(original).__name__}")
    if excluded is not None:
        lost = [v.name for v in every_variable
                if original._use_weight_decay(v) != rebuilt._use_weight_decay(v)]
        if lost:
            return ("keras.optimizers.serialize does not keep exclude_from_weight_decay "
                    "(a method call, not in get_config; model.save and load_model lose it "
                    f"too): the rebuilt optimizer decays {lost[0]}"
                    + (f" and {len(lost) - 1} more variables" if len(lost) > 1 else "")
                    + ", which the original excludes")
    runs = []
    for optimizer in (original, rebuilt):
        variables = make_variables()
        optimizer.build(variables)
        runs.append((optimizer, variables))
    for t in range(min(steps, ROUND_TRIP_STEPS)):
        states = []
        for optimizer, variables in runs:
            try:
                optimizer.apply(grads(t), variables)
            except Exception as exc:
                if optimizer is original:  # not serialization's doing: the run says why
                    return None
                return (f"serialization round trip: step {t + 1} fails: "
                        f"{type(exc).__name__}: {exc}").splitlines()[0]
            states.append([keras.ops.convert_to_numpy(v.value)
                           for v in list(variables) + list(optimizer.variables)])
        a, b = states
        if len(a) != len(b):
            return (f"the optimizer rebuilt from its serialization has {len(b)} variables, "
                    f"the original {len(a)}")
        for i, (x, y) in enumerate(zip(a, b)):
            if x.shape != y.shape or not np.array_equal(x, y, equal_nan=True):
                name = (list(runs[0][1]) + list(runs[0][0].variables))[i].name
                return (f"the optimizer rebuilt from its serialization computes differently: "
                        f"{name} differs after step {t + 1}")
    return None


class Run:
    def __init__(self, keras, spec, job, gradients, initial):
        self.keras = keras
        self.spec = spec
        # the weights' dtype; spec["dtype"] may be a mixed policy (verify/worker/dtypes.py)
        self.dtype = dtypes.variables(spec["dtype"])
        self.np_dtype = numpy_dtype(self.dtype)
        self.gradients = gradients
        self.initial = initial
        # (path, shape, scenario, offset) of every variable: each scenario's weights
        # in order, their elements laid end to end in the scenario's gradient rows
        self.places = []
        for scenario in spec["scenarios"]:
            offset = 0
            for name, shape in spec["weights"]:
                size = int(np.prod(shape, dtype=int))
                self.places.append((f"{scenario}_{name}", tuple(shape), scenario, offset, size))
                offset += size
        # the global policy as a user's model sets it (the optimizer does not read it;
        # its variables take their weights' dtype)
        keras.mixed_precision.set_global_policy(
            spec["dtype"] if spec["dtype"] in dtypes.POLICIES else "float32")
        self.variables = self.make_variables()
        self.optimizer = self.make_optimizer()
        self.round_trip = None  # what Keras's serialization does to it (set by main)
        self.layout = _state_layout(self.optimizer, self.variables)
        self.state_vars = ([(i, "variable", v) for i, v in enumerate(self.variables)]
                           + self.layout)
        self.step_fn, read = self._make_step(job["backend"], spec["mode"])
        self.read = _counters_in(self.np_dtype, read)
        # The trainer multiplies the loss by a LossScaleOptimizer's current scale
        # (`scale_loss`), so `apply` receives the scenario's gradient times it: the
        # worker plays that part, in numpy, with the scale of the last state read.
        scale = getattr(self.optimizer, "dynamic_scale", None)
        self.scale_at = next((k for k, (_, _, v) in enumerate(self.state_vars)
                              if v is scale), None)

    def _scaled(self, arrays, values):
        if self.scale_at is None:
            return arrays
        scale = np.asarray(values[self.scale_at], dtype=self.np_dtype)
        # IEEE, as the trainer's product; a 0-d product stays an array (a numpy scalar
        # would reach Keras as a Python float, of dtype floatx)
        with np.errstate(over="ignore", invalid="ignore"):
            return [np.asarray(a * scale) for a in arrays]

    def make_optimizer(self):
        optimizer = build_optimizer(self.keras, self.spec["class_name"], self.spec["config"],
                                    self.spec.get("source"))
        optimizer.build(self.variables)
        return optimizer

    def make_variables(self, scenario=None):
        """The run's variables, or those of one of its scenarios."""
        return [self.keras.Variable(self.initial[o:o + n].reshape(shape).astype(self.np_dtype),
                                    dtype=self.dtype, name=path)
                for path, shape, s, o, n in self.places if scenario in (None, s)]

    def _gradient_arrays(self, t, scenario=None):
        rows = {name: dtypes.gradients(self.gradients[name][t], self.spec["dtype"])
                for name in self.spec["scenarios"]}
        return [rows[s][o:o + n].reshape(shape) for _, shape, s, o, n in self.places
                if scenario in (None, s)]

    def _grads(self, t, arrays=None):
        return [self.keras.ops.convert_to_tensor(a)
                for a in (self._gradient_arrays(t) if arrays is None else arrays)]

    def _make_step(self, backend, mode):
        keras, opt, variables = self.keras, self.optimizer, self.variables
        to_numpy = keras.ops.convert_to_numpy

        def read_variables():
            return ([to_numpy(v.value) for _, _, v in self.state_vars],
                    int(to_numpy(iteration_variable(opt).value)))

        if mode == "jit":
            return _jit_step(backend, opt, variables), read_variables
        if mode == "eager":
            return (lambda grads: opt.apply(grads, variables)), read_variables
        if backend == "tensorflow":
            import tensorflow as tf

            # model.fit's train function: tf.function; Keras's jit_compile="auto"
            # turns XLA off on CPU-only machines, so no XLA here either.
            step = tf.function(lambda grads: opt.apply(grads, variables),
                               jit_compile=_tf_uses_xla(keras))
            return step, read_variables
        if backend == "jax":
            import jax

            # model.fit's JAX train step: a jitted stateless_apply.
            trainable = [v.value for v in variables]
            opt_values = [v.value for v in opt.variables]
            index = {id(v): k for k, v in enumerate(opt.variables)}
            apply = jax.jit(opt.stateless_apply)
            holder = {"trainable": trainable, "opt": opt_values}

            def step(grads):
                holder["trainable"], holder["opt"] = apply(holder["opt"], grads,
                                                           holder["trainable"])

            def read():
                values = []
                for i, name, v in self.state_vars:
                    if name == "variable" and v is variables[i]:
                        values.append(np.asarray(holder["trainable"][i]))
                    else:
                        values.append(np.asarray(holder["opt"][index[id(v)]]))
                return values, int(np.asarray(
                    holder["opt"][index[id(iteration_variable(opt))]]))

            return step, read
        raise ValueError(f"unknown mode {mode}")

    def state_names(self):
        """Each state's name in the messages: "<weight index>/<state>", "g/<state>" for
        an optimizer-wide one."""
        return [f"{'g' if i is None else i}/{name}" for i, name, _ in self.state_vars]

    def send_start(self, messages, first, iteration):
        """run_start: the states before the first step (`first`, by name)."""
        messages.start(first, iteration,
                       # of the weights and their slots (an optimizer-wide value may have its
                       # own: LossScaleOptimizer's scale is float32 for any weights)
                       computed_dtypes=computed_dtypes(v for n, v in first.items()
                                                       if not n.startswith("g/")),
                       keras_config=_json_safe(self.optimizer.get_config()),
                       round_trip=self.round_trip)

    def applied_digest(self, start, stop):
        """The digest of the gradients of steps start..stop - 1 (from 0)."""
        return gradient_digest(a for t in range(start, stop) for a in self._gradient_arrays(t))

    def execute(self, out, steps, chunk):
        messages = RunMessages(out, self.spec["id"])
        names = self.state_names()
        values, iteration = self.read()
        self.send_start(messages, dict(zip(names, values)), iteration)
        clock = time.process_time  # CPU of every thread of this process
        spent = {"step": 0.0, "read": 0.0, "send": 0.0}
        for t0 in range(0, steps, chunk):
            k = min(chunk, steps - t0)
            buffers = [np.empty((k,) + v.shape, v.dtype) for v in values]
            iterations = np.empty(k, np.int64)
            applied = []  # what was applied, for the runner to check
            for j in range(k):
                arrays = self._gradient_arrays(t0 + j)
                applied += arrays
                t = clock()
                self.step_fn(self._grads(t0 + j, self._scaled(arrays, values)))
                t_step = clock()
                values, iterations[j] = self.read()
                for b, v in zip(buffers, values):
                    b[j] = v
                t_read = clock()
                spent["step"] += t_step - t
                spent["read"] += t_read - t_step
            digest = gradient_digest(applied)
            t = clock()
            messages.chunk(t0 + 1, digest, dict(zip(names, buffers)), iterations)
            spent["send"] += clock() - t
        messages.end(seconds=spent, notes=getattr(self.step_fn, "notes", []))

    def floor(self, out, steps):
        """The same Keras work with nothing observed: every step, then one read at
        the end (which also waits for asynchronous backends)."""
        start = time.process_time()
        values = self.read()[0] if self.scale_at is not None else None
        for t in range(steps):
            self.step_fn(self._grads(t, self._scaled(self._gradient_arrays(t), values)))
            if self.scale_at is not None:
                values = self.read()[0]
        self.read()
        RunMessages(out, self.spec["id"]).end(seconds={"step": time.process_time() - start})


def _counters_in(dtype, read):
    """`read` with every integer state (an inner optimizer's iteration counter,
    int32 or int64 by backend) in the working dtype, as the comparison holds
    every state: exact below 2**24 steps."""
    def read_states():
        values, iteration = read()
        return [v.astype(dtype) if np.issubdtype(v.dtype, np.integer) else v
                for v in values], iteration
    return read_states


def computed_dtypes(values) -> list:
    """The dtypes Keras computed these states in: every one but an integer counter
    (bfloat16, ml_dtypes's, is no numpy floating type)."""
    return sorted({str(v.dtype) for v in values if not np.issubdtype(v.dtype, np.integer)})


def raised_in_keras(exc, keras) -> bool:
    """Did Keras raise it (the harness called into Keras, and the exception came
    from there or from the backend below it, not from the harness)?"""
    frames = traceback.extract_tb(exc.__traceback__)
    harness = os.path.dirname(os.path.abspath(__file__))
    keras_dir = os.path.dirname(os.path.abspath(keras.__file__))
    return (bool(frames) and not frames[-1].filename.startswith(harness)
            and any(f.filename.startswith(keras_dir) for f in frames))


def _jit_step(backend, opt, variables):
    """The update as model.compile(jit_compile=True) runs it: the train step in
    tf.function(jit_compile=True) (XLA) on TensorFlow, torch.compile with the update
    under torch.no_grad() on torch (keras/src/backend/{tensorflow,torch}/trainer.py).
    Its first call checks that the backend really compiled it: RuntimeError if not.
    Where torch.compile gives up (Dynamo's recompile limit) the update runs on eagerly,
    as it does under model.compile(jit_compile=True); the step function's `notes` say
    from which step, for the run's reason."""
    if backend == "tensorflow":
        import tensorflow as tf

        step = tf.function(lambda grads: opt.apply(grads, variables), jit_compile=True,
                           reduce_retracing=True)

        def compiled(grads):  # the attribute by which TensorFlow's runtime hands it to XLA
            return step.get_concrete_function(grads).function_def.attr["_XlaMustCompile"].b
    elif backend == "torch":
        import torch
        from torch._dynamo.utils import counters

        def one_step(grads):
            with torch.no_grad():
                opt.apply(grads, variables)

        # Dynamo caches graphs per code object: without a reset the runs of one
        # process would share its recompile limit
        torch._dynamo.reset()
        graphs = counters["stats"]["unique_graphs"]
        step = torch.compile(one_step)

        def compiled(grads):  # Dynamo captured a graph and handed it to Inductor
            return counters["stats"]["unique_graphs"] > graphs

        def limit_hits() -> int:  # Dynamo's recompile limit hit: eager from then on
            return sum(n for k, n in counters["unimplemented"].items()
                       if "recompile_limit" in k)

        hits = limit_hits()  # the counters are the process's: this run's are new ones

        def gave_up() -> bool:
            return limit_hits() > hits
    else:  # JAX's compiled mode is already jit_compile=True (runner.SAME_AS)
        raise ValueError(f"no jit mode of its own on {backend}")
    checked = []

    def first_checked(grads):
        out = step(grads)
        if not checked and not compiled(grads):
            raise RuntimeError(f"jit mode ran uncompiled on {backend}")
        checked.append(True)
        if backend == "torch" and not first_checked.notes and gave_up():
            first_checked.notes.append(
                f"torch.compile compiled {counters['stats']['unique_graphs'] - graphs} graphs "
                f"of Keras's update in steps 1-{len(checked) - 1} and hit Dynamo's "
                f"recompile limit ({torch._dynamo.config.recompile_limit}) at step "
                f"{len(checked)}: from there the update ran eagerly, as under "
                "model.compile(jit_compile=True)")
        return out

    first_checked.notes = []
    return first_checked


def _tf_uses_xla(keras) -> bool:
    import tensorflow as tf
    return any(d.device_type != "CPU" for d in tf.config.list_physical_devices())


def _json_safe(value):
    return json.loads(json.dumps(value, default=repr))
