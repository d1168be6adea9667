"""Optimizer configurations: data, not code (configurations.toml), and the
user's own, as `keras.optimizers.serialize(optimizer)` returns them.

A user configuration is checked here, before any run: its class must be one
the reference models (reference.OPTIMIZERS), every key of its config one of
that class's arguments (the `keras` rule's defaults: the class's own and the
base optimizer's, reference/base.py) or `name`, each value of the kind of its
default; `learning_rate` may also be a serialized schedule, kept as it is for
the worker to deserialize and checked as Keras's constructor would take it (a
class of keras.optimizers.schedules, which reference/schedules.py models, its
arguments, their kinds, and what the constructor refuses), and a
MultiOptimizer's `optimizer_map` is a serialized OptimizerMap whose optimizers
are checked the same way.  Its id is the object's "id", else the class name and
a hash of the canonical config.  Once the run's backends and dtypes are known,
`check_magnitudes` refuses a number that a dtype it passes through in Keras
rounds to infinity, as gradient files are refused (verify/scenarios.py).

`exclude_from_weight_decay` is a method of every Keras optimizer, called before
build, not a constructor argument (get_config does not record it): it is given
beside "config", `"exclude_from_weight_decay": {"var_names": [...]}` (in TOML
`exclude_from_weight_decay = { var_names = [...] }` beside class_name), and kept
in the Configuration's config under that key, which the worker turns into the
call and the reference reads as a hyperparameter (reference/base.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import reference
from reference import schedules
from reference.arithmetic import finfo, numpy_dtype
from verify.worker import dtypes

CONFIG_FILE = Path(__file__).with_name("configurations.toml")
MAX_FILE_BYTES = 1024 ** 2
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# what keras.optimizers.serialize puts around the config: a built-in class has a
# module of keras (keras.optimizers; a backend's subclass under keras.src, whose
# registered name is then its class name)
ENVELOPE = ("module", "registered_name")
# keys a tf.keras (Keras 2) optimizer's get_config emits that Keras 3 does not take,
# at the only value that means the same optimizer in Keras 3
DROPPED = {"is_legacy_optimizer": False}
EXCLUDE = "exclude_from_weight_decay"
# a plain callable learning rate (verify/worker/run.py builds it; reference/schedules.py)
CALLABLE = "callable"


class ConfigError(ValueError):
    """A user configuration that cannot be verified (bad input: one line, exit 2)."""


@dataclass(frozen=True)
class Configuration:
    id: str
    class_name: str
    config: dict
    # a user's own class: its file (absolute path) or module (verify/user_class.py);
    # None: keras.optimizers
    source: str | None = None

    def keras_config(self) -> dict:
        """As given: class_name, config, and exclude_from_weight_decay beside them."""
        config = {k: v for k, v in self.config.items() if k != EXCLUDE}
        return {"class_name": self.class_name, "config": config,
                **({EXCLUDE: self.config[EXCLUDE]} if EXCLUDE in self.config else {})}

    def describe(self) -> str:
        given = self.keras_config()
        call = _call(self.class_name, given["config"])
        if EXCLUDE in given:
            call += f".{EXCLUDE}({_arguments(given[EXCLUDE])})"
        return call


def _call(class_name: str, config: dict) -> str:
    """Class(arg=value, ...); a serialized object (a schedule, an optimizer) written
    the same way, an OptimizerMap's map as {pattern: Class(...)}."""
    return f"{class_name}({_arguments(config)})"


def _arguments(config: dict) -> str:
    def value(v):
        if isinstance(v, dict) and CALLABLE in v:
            inner = v[CALLABLE]
            return "lambda: " + (value(inner) + "(optimizer.iterations)"
                                 if isinstance(inner, dict) else repr(inner))
        if isinstance(v, dict) and "class_name" in v:
            return _call(v["class_name"], v.get("config", {}))
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k!r}: {value(x)}" for k, x in v.items()) + "}"
        return repr(v)
    return ", ".join(f"{k}={value(v)}" for k, v in config.items())


def load(path: Path = CONFIG_FILE) -> dict:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    return {key: Configuration(key, entry["class_name"], {
        **entry.get("config", {}), **({EXCLUDE: entry[EXCLUDE]} if EXCLUDE in entry else {})})
        for key, entry in data.items()}


CONFIGURATIONS = load()


def canonical(class_name: str, config: dict) -> str:
    return json.dumps({"class_name": class_name, "config": config}, sort_keys=True,
                      separators=(",", ":"))


def derived_id(class_name: str, config: dict) -> str:
    """e.g. adam_3f2a9c1d: the same for the same config, whatever its key order."""
    digest = hashlib.sha256(canonical(class_name, config).encode()).hexdigest()[:8]
    return f"{class_name.lower()}_{digest}"


def _kind(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return "null" if value is None else type(value).__name__


def _plain(value, where):
    """ConfigError unless `value` is JSON data with finite numbers (TOML has dates, NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {value} is not a finite number")
    if isinstance(value, list):
        for item in value:
            _plain(item, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _plain(item, f"{where}: {key}")
    elif not (value is None or isinstance(value, (bool, int, float, str))):
        raise ConfigError(f"{where}: {value} is {type(value).__name__}, not JSON data")


def _serialized_object(value, where) -> None:
    """A nested Keras object as serialize writes it (a schedule): class_name, config."""
    extra = set(value) - {"class_name", "config", "module", "registered_name"}
    if extra:
        raise ConfigError(f"{where}: unknown key {sorted(extra)[0]!r} in a serialized object "
                          "(expected class_name, config, module, registered_name)")
    if not isinstance(value.get("class_name"), str) or not isinstance(value.get("config"),
                                                                      dict):
        raise ConfigError(f"{where}: a serialized object needs a string class_name and an "
                          "object config")


def _schedule(value, where) -> None:
    """A serialized learning-rate schedule as Keras's constructor takes it: a class of
    keras.optimizers.schedules (reference/schedules.py states each), only the
    arguments it takes and those it needs, each of its kind, and none of the values
    its constructor refuses (decay_steps <= 0; boundaries and values of
    PiecewiseConstantDecay, one value more than boundaries)."""
    _serialized_object(value, where)
    name, config = value["class_name"], value["config"]
    module, registered = value.get("module", "keras.optimizers.schedules"), value.get(
        "registered_name")
    if registered not in (None, name) or not (isinstance(module, str)
                                              and module.split(".")[0] == "keras"):
        raise ConfigError(f"{where}: module {json.dumps(module)[:60]}, registered_name "
                          f"{json.dumps(registered)[:60]}: not a built-in Keras schedule")
    if name not in schedules.DEFAULTS:
        raise ConfigError(f"{where}: unknown learning-rate schedule class {name!r}: "
                          f"keras.optimizers.schedules has {', '.join(schedules.DEFAULTS)}")
    takes = schedules.DEFAULTS[name]
    for key, given in config.items():
        if key not in takes:
            raise ConfigError(f"{where}: {name} has no argument {key!r} (it takes "
                              f"{', '.join(takes)})")
        default = takes[key]
        if key == "name":
            expected = ("a string", "null")
        elif key in ("boundaries", "values"):
            expected = ("a list of numbers",)
        elif default is schedules.REQUIRED or default is None:
            expected = ("a number",) + (("null",) if default is None else ())
        else:
            expected = (_kind(default),)
        kind = _kind(given)
        if kind == "a list" and all(_kind(x) == "a number" for x in given):
            kind = "a list of numbers"
        if kind not in expected:
            raise ConfigError(f"{where}: {name} {key}={json.dumps(given)[:60]} is {_kind(given)}"
                              f", expected {' or '.join(expected)}")
    if reason := schedules.unsupported(value):  # a missing argument; boundaries vs values
        raise ConfigError(f"{where}: {reason}")
    for steps in ("decay_steps", "first_decay_steps"):
        if steps in config and not config[steps] > 0:
            raise ConfigError(f"{where}: {name} {steps}={config[steps]}: Keras's constructor "
                              "refuses it (it must be > 0)")


def _plain_callable(value, where) -> None:
    """A plain callable learning rate, {"callable": x}: `lambda: x` for a number x,
    `lambda: schedule(optimizer.iterations)` for a serialized schedule x."""
    if set(value) != {CALLABLE}:
        raise ConfigError(f"{where}: a plain callable learning rate is {{\"{CALLABLE}\": x}} "
                          "alone, x a number or a serialized schedule")
    inner = value[CALLABLE]
    if isinstance(inner, dict):
        _schedule(inner, where)
    elif isinstance(inner, bool) or not isinstance(inner, (int, float)):
        raise ConfigError(f"{where}: the callable returns {_kind(inner)}, expected a number "
                          "or a serialized schedule")


def _exclusion(value, where) -> dict:
    """exclude_from_weight_decay's arguments: var_names, regular expressions."""
    what = f"{where}: {EXCLUDE}={json.dumps(value)[:60]}"
    if not isinstance(value, dict) or set(value) != {"var_names"}:
        raise ConfigError(f"{what}: expected an object with var_names, a list of regular "
                          "expressions searched in the variables' names (var_list takes "
                          "Keras variables, which a configuration cannot name)")
    names = value["var_names"]
    if not (isinstance(names, list) and names and all(isinstance(n, str) for n in names)):
        raise ConfigError(f"{what}: var_names must be a non-empty list of strings")
    for name in names:
        try:
            re.compile(name)
        except re.error as exc:
            raise ConfigError(f"{what}: {name!r} is not a regular expression: {exc}") from None
    return {"var_names": list(names)}


def _optimizer_map(value, where) -> None:
    """A MultiOptimizer's optimizer_map as serialize writes it: an OptimizerMap with
    default_optimizer and optionally optimizer_map {pattern: optimizer}, each a
    serialized optimizer the reference models (not a MultiOptimizer, as Keras says)."""
    what = f"{where}: optimizer_map"
    if not isinstance(value, dict):
        raise ConfigError(f"{what} is {_kind(value)}, expected a serialized OptimizerMap")
    _serialized_object(value, what)
    if value["class_name"] != "OptimizerMap":
        raise ConfigError(f"{what}: class_name {value['class_name']!r}, expected "
                          "'OptimizerMap'")
    config = value["config"]
    extra = set(config) - {"default_optimizer", "optimizer_map"}
    if extra:
        raise ConfigError(f"{what}: unknown key {sorted(extra)[0]!r} in the OptimizerMap's "
                          "config (expected default_optimizer, optimizer_map)")
    if "default_optimizer" not in config:
        raise ConfigError(f"{what}: the OptimizerMap needs a default_optimizer (every "
                          "variable no pattern matches goes to it)")
    mapping = config.get("optimizer_map", {})
    if not isinstance(mapping, dict):
        raise ConfigError(f"{what}: the OptimizerMap's optimizer_map must be an object "
                          "{pattern: serialized optimizer}")
    for pattern in mapping:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{what}: {pattern!r} is not a regular expression: "
                              f"{exc}") from None
    for name, inner in [("default_optimizer", config["default_optimizer"]),
                        *mapping.items()]:
        place = f"{what} {name}"
        if isinstance(inner, dict) and ({"id", EXCLUDE} & set(inner)):
            raise ConfigError(f"{place}: {sorted({'id', EXCLUDE} & set(inner))[0]} is not "
                              "taken inside a MultiOptimizer")
        checked = from_keras(inner, place)
        if checked.class_name == "MultiOptimizer":
            raise ConfigError(f"{place}: a MultiOptimizer cannot be inside a MultiOptimizer")


def _inner_optimizer(value, where) -> None:
    """A LossScaleOptimizer's inner_optimizer as serialize writes it: a serialized
    optimizer the reference models, not another LossScaleOptimizer or a MultiOptimizer."""
    place = f"{where}: inner_optimizer"
    if isinstance(value, dict) and ({"id", EXCLUDE} & set(value)):
        raise ConfigError(f"{place}: {sorted({'id', EXCLUDE} & set(value))[0]} is not taken "
                          "inside a LossScaleOptimizer")
    checked = from_keras(value, place)
    if checked.class_name in ("LossScaleOptimizer", "MultiOptimizer"):
        raise ConfigError(f"{place}: a {checked.class_name} cannot be the inner optimizer")


def _check_value(key, value, default, where):
    what = f"{where}: {key}={json.dumps(value)[:60]}"
    if key == "learning_rate" and isinstance(value, dict) and CALLABLE in value:
        _plain_callable(value, what)
        return
    if key == "learning_rate" and isinstance(value, dict):
        _schedule(value, what)
        return
    if key == "optimizer_map":
        _optimizer_map(value, where)
        return
    if key == "inner_optimizer":
        _inner_optimizer(value, where)
        return
    if isinstance(value, dict):
        raise ConfigError(f"{what} is an object, expected {_kind(default)}")
    if value is None and (default is None or key == "name"):
        return
    allowed = {"a boolean": ("a boolean",), "a number": ("a number",),
               "a string": ("a string",), "null": ("a number", "a list")}[_kind(default)]
    if _kind(value) not in allowed:
        raise ConfigError(f"{what} is {_kind(value)}, expected {' or '.join(allowed)}"
                          + (" or null" if default is None else ""))
    if isinstance(value, list) and not all(isinstance(x, str) for x in value):
        raise ConfigError(f"{what}: expected a list of strings")


def from_keras(obj, where="--config", explicit_id=None) -> Configuration:
    """A configuration from `keras.optimizers.serialize`'s dict (optionally with
    "id"), checked against the reference; ConfigError naming the problem."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected an object with class_name and config, got "
                          f"{_kind(obj)}")
    extra = set(obj) - {"class_name", "config", "id", EXCLUDE, *ENVELOPE}
    if extra:
        raise ConfigError(f"{where}: unknown key {sorted(extra)[0]!r} (expected class_name, "
                          f"config, and optionally id, {EXCLUDE}, module, registered_name)")
    class_name = obj.get("class_name")
    if not isinstance(class_name, str):
        raise ConfigError(f"{where}: class_name must be a string naming a Keras optimizer")
    module, registered = obj.get("module", "keras.optimizers"), obj.get("registered_name")
    if registered not in (None, class_name) or not (isinstance(module, str)
                                                    and module.split(".")[0] == "keras"):
        raise ConfigError(f"{where}: module {json.dumps(module)[:60]}, registered_name "
                          f"{json.dumps(registered)[:60]}: not a built-in Keras optimizer "
                          "(a module of keras, registered_name null or the class name), "
                          "which alone have a reference")
    if class_name not in reference.CLASSES:
        raise ConfigError(f"{where}: unknown optimizer class {class_name!r}: the reference "
                          f"models {', '.join(reference.CLASSES)}")
    config = obj.get("config", {})
    if not isinstance(config, dict):
        raise ConfigError(f"{where}: config must be an object, got {_kind(config)}")
    where = f"{where} ({class_name})"
    _plain(config, where)
    defaults = {"name": "", **reference.get_rule("keras", class_name).defaults}
    kept = {}
    for key, value in config.items():
        if key in DROPPED and key not in defaults:
            if value != DROPPED[key]:
                raise ConfigError(f"{where}: {key}={json.dumps(value)} is not a Keras 3 "
                                  "optimizer")
            continue
        if key == EXCLUDE:
            raise ConfigError(f"{where}: {EXCLUDE} is a method of the optimizer, not an "
                              f"argument: give it beside config, \"{EXCLUDE}\": "
                              '{"var_names": [...]}')
        if key not in defaults:
            raise ConfigError(f"{where}: unknown argument {key!r} (it takes "
                              f"{', '.join(sorted(k for k in defaults if k != EXCLUDE))})")
        _check_value(key, value, defaults[key], where)
        kept[key] = value
    for needed in ("optimizer_map", "inner_optimizer"):
        if needed in defaults and needed not in kept:
            raise ConfigError(f"{where}: {class_name} needs {needed}")
    if EXCLUDE in obj:
        if EXCLUDE not in defaults:
            raise ConfigError(f"{where}: {class_name} has no weight decay of its own to "
                              "exclude variables from")
        kept[EXCLUDE] = _exclusion(obj[EXCLUDE], where)
    given = obj.get("id", explicit_id)
    if given is None:
        given = derived_id(class_name, kept)
    elif not (isinstance(given, str) and ID.fullmatch(given)):
        raise ConfigError(f"{where}: id {json.dumps(given)[:70]} must be 1 to 64 letters, "
                          "digits, '_', '.' or '-', starting with a letter or digit")
    return Configuration(given, class_name, kept)


def _no_duplicate_keys(pairs):
    keys = [k for k, _ in pairs]
    for k in keys:
        if keys.count(k) > 1:
            raise ConfigError(f"key {k!r} given twice in one object")
    return dict(pairs)


def _reject_constant(name):
    raise ConfigError(f"{name} is not JSON")


def _read(path: Path, what: str) -> bytes:
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise ConfigError(f"{what} {path}: larger than {MAX_FILE_BYTES // 1024} KiB")
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file (give a JSON object, or the path of "
                          "a file holding one or a list of them)") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot be read: {exc.strerror or exc}") from None


def parse_json(text: str, where: str) -> list:
    """--config's value, inline JSON or the path of a .json file -> Configurations."""
    stripped = text.lstrip()
    if stripped[:1] in ("{", "["):
        source, raw = f"{where} {stripped[:40]}", stripped
    else:
        source = f"{where} {text}"
        try:
            raw = _read(Path(text), where).decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"{source}: not UTF-8 text") from None
    try:
        doc = json.loads(raw, object_pairs_hook=_no_duplicate_keys,
                         parse_constant=_reject_constant)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source}: invalid JSON: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{source}: invalid JSON: nested too deeply") from None
    items = doc if isinstance(doc, list) else [doc]
    if not items:
        raise ConfigError(f"{source}: an empty list")
    return [from_keras(item, source if len(items) == 1 else f"{source} item {i + 1}")
            for i, item in enumerate(items)]


def parse_toml(path: str, where: str = "--config-file") -> list:
    """A file in configurations.toml's format -> Configurations, ids its table names."""
    source = f"{where} {path}"
    try:
        data = tomllib.loads(_read(Path(path), where).decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: invalid TOML: {exc}") from None
    if not data:
        raise ConfigError(f"{source}: no configurations in it")
    out = []
    for key, entry in data.items():
        if isinstance(entry, dict) and "id" in entry:
            raise ConfigError(f"{source} [{key}]: the table name is the id; drop `id`")
        out.append(from_keras(entry, f"{source} [{key}]", explicit_id=key))
    return out


def user_selection(configurations: list, known=CONFIGURATIONS) -> list:
    """ConfigError for an id given twice or clashing with a built-in's."""
    seen = set()
    for c in configurations:
        if c.id in known:
            raise ConfigError(f"configuration id {c.id!r} is a built-in configuration's; give "
                              "yours another \"id\"")
        if c.id in seen:
            raise ConfigError(f"configuration id {c.id!r} given twice (ids must differ; the "
                              "same config given twice has the same derived id)")
        seen.add(c.id)
    return configurations


def check_names(configurations: list, names: list, known=CONFIGURATIONS) -> None:
    """ConfigError for a user configuration whose exclude_from_weight_decay, or one
    of whose OptimizerMap patterns, names no variable of the run (`names`): it would
    verify nothing of it.  A built-in one is verified as it is."""
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    for c in configurations:
        if known.get(c.id) is c:
            continue
        exclude = c.config.get(EXCLUDE)
        if exclude and not any(re.search("|".join(exclude["var_names"]), n) for n in names):
            raise ConfigError(f"configuration {c.id!r}: {EXCLUDE} var_names "
                              f"{json.dumps(exclude['var_names'])[:60]} match no variable of "
                              f"this run (its variables: {shown})")
        mapping = c.config.get("optimizer_map")
        for pattern in (mapping["config"].get("optimizer_map", {}) if mapping else {}):
            if not any(n == pattern or re.fullmatch(pattern, n) for n in names):
                raise ConfigError(f"configuration {c.id!r}: the OptimizerMap's pattern "
                                  f"{pattern[:40]!r} fullmatches no variable of this run, so "
                                  f"its optimizer would update nothing (its variables: {shown})")


def _numbers(value, path="", rate=None):
    """(path, number, role) for every number of a configuration; role "rate" for a
    constant learning rate (a float32 variable in Keras), "schedule" inside a
    learning-rate schedule, else None (a plain callable's number included: a Python
    float each update casts)."""
    if isinstance(value, dict):
        for key, item in value.items():
            role = rate
            if key == "learning_rate":
                role = "rate" if _kind(item) == "a number" else "schedule"
            elif key == CALLABLE:
                role = None if _kind(item) == "a number" else "schedule"
            yield from _numbers(item, f"{path}.{key}" if path else key, role)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _numbers(item, f"{path}[{i}]", rate)
    elif _kind(value) == "a number":
        yield path, value, rate


def _overflows(value, dtype: str) -> bool:
    try:
        wide = np.float64(value)
    except OverflowError:  # an integer beyond float64
        return True
    with np.errstate(over="ignore"):
        return bool(np.isinf(wide.astype(numpy_dtype(dtype))))


def check_magnitudes(configurations: list, dtype_names, backends) -> None:
    """ConfigError for a number of a configuration that a dtype it passes through in
    Keras rounds to infinity: the weights' dtype of each run (every hyperparameter
    meets the weights there), and float32 for the learning rate (Keras keeps it in a
    float32 variable; a schedule computes in float32, floatx, except on JAX in
    float64: Precision.schedule_float64) and for any number on a backend that rounds
    Python floats through float32 (Precision.cast_rounds_to_float32, operand_float32).
    Keras would compute with infinity, and the reference with it: NaN or inf states
    on both sides, `exact`, saying nothing."""
    for c in configurations:
        for path, value, role in _numbers(c.config):
            for backend in backends:
                p = reference.PRECISIONS[backend]
                for name in dtype_names:
                    weights = dtypes.variables(name)
                    why = {}
                    if role == "rate":
                        why["float32"] = ("Keras keeps the learning rate in a float32 "
                                          "variable; give a smaller value")
                    elif role == "schedule" and not (p.schedule_float64
                                                     and weights == "float64"):
                        why["float32"] = (f"a schedule computes in float32 on {backend}; "
                                          "give a smaller value")
                    elif role is None and (p.cast_rounds_to_float32 or p.operand_float32):
                        why["float32"] = (f"{backend} rounds Python floats through float32; "
                                          "give a smaller value")
                    why.setdefault(weights, f"the weights' dtype of the {name} runs; give a "
                                            f"smaller value or leave {name} out with --dtype")
                    for dtype, reason in why.items():
                        if _overflows(value, dtype):
                            limit = float(finfo(dtype).max)
                            raise ConfigError(
                                f"configuration {c.id!r}: {path}={json.dumps(value)[:60]} "
                                f"overflows {dtype}, largest finite {limit:.7g} ({reason})")
