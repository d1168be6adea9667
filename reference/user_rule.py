"""A user's optimizer rule, written in plain numpy, as a reference Optimizer.

A rule file defines

    def update(step, gradient, weight, slots, **hyperparameters) -> (weight, slots)

and may define `initial_slots(weight, **hyperparameters) -> {name: array}`, each
a constant or a copy of the weight (a slot it does not name starts as zeros of
the weight's shape).  `load(path)` runs the file and probes `update` once in
plain float64 numpy on a (3, 2) matrix and once on a (4,) vector, with the
hyperparameters its signature gives defaults for (and learning_rate): the slots
it returns are the states the rule keeps; a slot it reads but does not return
keeps its initial value (a constant) and is not compared.  A slot's shape is the
weight's, the weight's with its last or next-to-last axis left out (as the
matrix probe shows, for every rank above 1), or ().  The Optimizer probes again
with each configuration's hyperparameters, which may change the slots.

`optimizer(rule, class_name, defaults)` makes it an Optimizer with one point,
family "rule", which runs Keras's base-optimizer pipeline (reference/base.py:
loss scaling, accumulation, clipping, weight decay, EMA) around `update`, as the
`keras` points do.  `update` then computes on Tracked values
(reference/arithmetic.py: numpy's operations of NUMPY_UFUNCS and NUMPY_FUNCTIONS
carry the error bound, anything else raises) and receives
  step             Keras's local step, its iterations + 1, a scalar;
  gradient, weight, slots[name]   one step's values, of their own shapes;
  learning_rate    the value Keras holds (a float32 variable, or its schedule's);
  each other hyperparameter of the optimizer (not the base pipeline's): a float
                   as a Hyperparameter (reference/arithmetic.py: Python arithmetic
                   on it stays in Python floats, as in Keras's source; where it
                   meets a Tracked value its bound covers the float32 rounding
                   that Keras's ops apply to Python floats on TensorFlow and
                   torch), anything else as it is.
The comparison evaluates k steps at once ([k, *shape], reference/rule.py); a rule
written for one weight is called once per step, so that its reductions
(np.linalg.norm(weight)) reduce over the weight's own axes.
"""

from __future__ import annotations

import inspect
import runpy
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from reference import base
from reference.arithmetic import Arithmetic, Hyperparameter, Tracked, _lift
from reference.optimizer import Optimizer, Point
from reference.state import StateSpec

FAMILY = "rule"
SIGNATURE = "(step, gradient, weight, slots, **hyperparameters)"
PROBE_SHAPES = ((3, 2), (4,))  # a matrix and a vector, every axis of its own length
PROBE_LEARNING_RATE = 0.001  # where neither the signature nor a constant gives one


class RuleError(ValueError):
    """A rule file that cannot be a reference rule; the message is one line."""


@dataclass(frozen=True)
class Probe:
    """What a probe of `update` found."""

    states: tuple         # StateSpec of every slot it returns
    not_returned: dict    # slot it reads but does not return -> its constant initial value


@dataclass(frozen=True)
class UserRule:
    path: Path
    update: Callable
    initial_slots: Callable | None
    hyperparameters: dict  # the defaults update's signature gives, and learning_rate
    probe: Probe           # with those hyperparameters
    doc: str

    @property
    def not_returned(self) -> tuple:
        """The slots it reads but does not return: not compared."""
        return tuple(self.probe.not_returned)


def load(path) -> UserRule:
    """Run a rule file and probe its `update` (see the module docstring)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise RuleError(f"{path}: no such rule file")
    try:
        namespace = runpy.run_path(str(path), run_name="user_rule")
    except Exception as error:  # the file's own code: any exception is bad input
        raise RuleError(_failure(path, "running the file", error)) from error
    update = namespace.get("update")
    if not callable(update):
        raise RuleError(f"{path}: defines no function update{SIGNATURE}")
    signature = inspect.signature(update)
    try:
        signature.bind(None, None, None, None, learning_rate=None)
        takes_hyperparameters = any(p.kind is p.VAR_KEYWORD
                                    for p in signature.parameters.values())
    except TypeError:
        takes_hyperparameters = False
    if not takes_hyperparameters:
        raise RuleError(f"{path}: update{signature} does not take {SIGNATURE} (every "
                        "parameter but the first four and learning_rate needs a default)")
    hyperparameters = {p.name: p.default for i, p in enumerate(signature.parameters.values())
                       if i >= 4 and p.default is not p.empty}
    hyperparameters.setdefault("learning_rate", PROBE_LEARNING_RATE)
    initial_slots = namespace.get("initial_slots")
    return UserRule(path, update, initial_slots, hyperparameters,
                    probe(path, update, initial_slots, hyperparameters),
                    inspect.getdoc(update) or inspect.getsource(update))


# --- the probe: plain float64 numpy --------------------------------------------
class _RecordingSlots(Mapping):
    """The slots of a probe: each its initial value, every name read recorded."""

    def __init__(self, initial: dict, shape: tuple):
        self.initial, self.shape, self.read = initial, shape, []

    def __getitem__(self, name):
        self.read.append(name)
        if name in self.initial:
            return np.array(self.initial[name], dtype=np.float64)
        return np.zeros(self.shape)

    def __iter__(self):
        return iter(self.initial)

    def __len__(self):
        return len(self.initial)


def probe(path: Path, update: Callable, initial_slots: Callable | None,
          hyperparameters: dict) -> Probe:
    """Call `update` on each of PROBE_SHAPES at step 1 in float64 numpy; the
    slots it returns, with their shapes and initial values, and those it only reads."""
    forms, initial_values, read = {}, {}, []
    for shape in PROBE_SHAPES:
        n = int(np.prod(shape))
        weight = np.linspace(0.5, 1.5, n).reshape(shape)
        gradient = np.linspace(-1.0, 1.0, n).reshape(shape)  # no element 0
        initial = {}
        if initial_slots is not None:
            initial = dict(_call(path, "initial_slots", initial_slots, weight.copy(),
                                 **hyperparameters))
        slots = _RecordingSlots(initial, shape)
        new_weight, new_slots = _returned(path, _call(
            path, "update", update, np.float64(1.0), gradient, weight.copy(), slots,
            **hyperparameters))
        if np.shape(new_weight) != shape:
            raise RuleError(f"{path}: update returns a weight of shape {np.shape(new_weight)} "
                            f"for a weight of shape {shape}")
        for name, value in new_slots.items():
            forms.setdefault(name, {})[len(shape)] = _form(path, name, np.shape(value), shape)
        for name in [*new_slots, *slots.read]:
            initial_values[name] = _initial_value(path, name, initial.get(name, 0.0), weight)
        read += slots.read
    states = tuple(_state(name, forms[name], initial_values[name]) for name in forms)
    not_returned = {}
    for name in dict.fromkeys(read):
        if name not in forms:
            if initial_values[name] is None:
                raise RuleError(f"{path}: slot {name!r} starts as a copy of the weight and is "
                                "read but not returned: return it")
            not_returned[name] = initial_values[name]
    return Probe(states, not_returned)


def _returned(path: Path, out) -> tuple:
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
        raise RuleError(f"{path}: update returns {type(out).__name__}, not (weight, slots) "
                        "with slots a dict")
    return out


def _form(path: Path, name: str, slot_shape: tuple, shape: tuple):
    """The slot's shape next to the weight's: "weight", "scalar", or the axis left out."""
    if slot_shape == shape:
        return "weight"
    if slot_shape == ():
        return "scalar"
    for axis in (-1, -2):
        if len(shape) >= 2 and slot_shape == tuple(np.delete(shape, axis)):
            return axis
    raise RuleError(f"{path}: slot {name!r} has shape {slot_shape} for a weight of shape "
                    f"{shape}: neither the weight's, nor the weight's with one axis left out, "
                    "nor ()")


def _initial_value(path: Path, name: str, initial, weight: np.ndarray) -> float | None:
    """A slot's initial value: one constant, or None for a copy of the weight."""
    values = np.asarray(initial, dtype=np.float64)
    if values.size and np.all(values == values.flat[0]):
        return float(values.flat[0])
    if np.array_equal(values, weight):
        return None
    raise RuleError(f"{path}: initial_slots gives {name!r} values that are neither one "
                    "constant nor a copy of the weight")


def _state(name: str, forms: dict, initial: float | None) -> StateSpec:
    """The slot as a StateSpec; its shape for a weight of any rank from the probe of
    that rank (the vector's for ranks 0 and 1, the matrix's above); None where the
    probe of that rank does not return it."""
    def shape(variable_shape, path):
        form = forms.get(2 if len(variable_shape) >= 2 else 1)
        if form is None or form == "weight":
            return None if form is None else tuple(variable_shape)
        return () if form == "scalar" else tuple(np.delete(variable_shape, form))
    return StateSpec(name, 0.0 if initial is None else initial,
                     copies_variable=initial is None, shape=shape)


def _call(path: Path, what: str, function: Callable, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except Exception as error:  # the user's code: any exception is reported as bad input
        raise RuleError(_failure(path, what, error)) from error


def _failure(path: Path, what: str, error: Exception) -> str:
    """One line: the exception and the line of the rule file it came from."""
    lines = [frame.lineno for frame in traceback.extract_tb(error.__traceback__)
             if frame.filename == str(path)]
    if isinstance(error, SyntaxError) and error.filename == str(path):
        lines.append(error.lineno)
    where = f", line {lines[-1]}" if lines else ""
    message = " ".join(str(error).split())
    return f"{path}{where}: {what} raised {type(error).__name__}" + (
        f": {message}" if message else "")


# --- the Optimizer ------------------------------------------------------------
def handed(value):
    """A hyperparameter as `update` receives it: a float as a Hyperparameter,
    anything else (int, bool, None, str) as it is."""
    return Hyperparameter(value) if isinstance(value, float) else value


def optimizer(rule: UserRule, class_name: str, defaults: dict) -> Optimizer:
    """The rule as the reference Optimizer of Keras's `class_name`, whose
    hyperparameters and their defaults are `defaults` (see the module docstring)."""
    probes = {}

    def probed(hp: dict) -> Probe:
        own = {name: value for name, value in hp.items() if name not in base.DEFAULTS}
        if not isinstance(own.get("learning_rate"), (int, float)):
            own["learning_rate"] = PROBE_LEARNING_RATE  # a schedule: any constant will do
        key = repr(sorted(own.items()))
        if key not in probes:
            probes[key] = probe(rule.path, rule.update, rule.initial_slots, own)
        return probes[key]

    def states(hp, c):
        return list(probed(hp).states)

    def update(ar, hp, c, s, g, t, lr):
        found = probed(hp)
        hyperparameters = {name: handed(value) for name, value in hp.items()
                           if name not in base.DEFAULTS and name != "learning_rate"}
        names = [spec.name for spec in found.states if spec.name in s]
        step = t + 1
        w = s["variable"]
        steps = []
        for i in range(np.shape(w.v)[0]):
            weight = _at_step(w, i)
            slots = {name: _at_step(s[name], i) for name in names}
            slots.update({name: _constant(ar, value, weight.shape)
                          for name, value in found.not_returned.items()})
            new_weight, new_slots = _returned(rule.path, _call(
                rule.path, "update", rule.update, _at_step(step, i).reshape(()),
                _at_step(g, i), weight, slots, learning_rate=_at_step(lr, i).reshape(()),
                **hyperparameters))
            missing = [name for name in names if name not in new_slots]
            if missing:
                raise RuleError(f"{rule.path}: update does not return the slot {missing[0]!r} "
                                f"for a weight of shape {weight.shape}")
            steps.append({"variable": new_weight, **{name: new_slots[name] for name in names}})
        return {name: _stacked(rule.path, ar, name, [out[name] for out in steps],
                               np.shape(s[name].v)[1:])
                for name in steps[0]}

    point = Point({}, source=str(rule.path), doc=rule.doc, keras_base=True)
    return Optimizer(class_name, dict(defaults), {}, states, update, {FAMILY: point},
                     elementwise=False)


def _at_step(x: Tracked, i: int) -> Tracked:
    """Step i of a [k, ...] value; a scalar, the same at every step, as it is."""
    if np.ndim(x.v) == 0:
        return x

    def part(a):
        return a if a is None or np.ndim(a) == 0 else np.broadcast_to(a, np.shape(x.v))[i]
    return Tracked(x.v[i], part(x.e), x.ar, part(x.tie))


def _constant(ar: Arithmetic, value: float, shape: tuple) -> Tracked:
    c = ar.const(value)
    return Tracked(np.full(shape, c.v), c.e, ar)


def _stacked(path: Path, ar: Arithmetic, name: str, values: list, shape: tuple) -> Tracked:
    """The steps' values of one state as one [k, *shape] value."""
    values = [_lift(ar, v) for v in values]
    for v in values:
        if np.shape(v.v) != shape:
            raise RuleError(f"{path}: update returns {name!r} of shape {np.shape(v.v)}, not "
                            f"{shape}")
    e = None
    if ar.track:
        e = np.stack([np.broadcast_to(v.e, shape) for v in values])
    tie = None
    if any(v.tie is not None for v in values):
        tie = np.stack([np.broadcast_to(False if v.tie is None else v.tie, shape)
                        for v in values])
    return Tracked(np.stack([v.v for v in values]), e, ar, tie)
