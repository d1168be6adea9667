"""Peers: torch.optim and optax optimizers as subjects beside Keras.

A peer configuration is data, written as a call (`torch:Adam(lr=0.01, eps=1e-7)`,
`optax:adam(learning_rate=0.01)`) or as a table of such strings in a TOML file.  The
classes it may name, how their arguments map to Keras's and which states they keep
under Keras's slot names are data too (classes.toml).  Each peer configuration
carries the Keras configuration with the same hyperparameters (`class_name`,
`config`), so the harness's reference families and variant spaces judge the peer's
stream exactly as they judge Keras's.

The peer runs in its own process (verify/peers/worker.py: torch without Keras, or
JAX with optax), which speaks the Keras worker's protocol; verify/peers/run.py runs
it through the harness's Runner.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import reference

CLASSES_FILE = Path(__file__).with_name("classes.toml")
WRAPPERS_FILE = Path(__file__).with_name("wrappers.toml")
CONFIGURATIONS_FILE = Path(__file__).with_name("configurations.toml")
# library -> the name of its process in reports (the runner's "backend")
LIBRARIES = {"torch": "torch.optim", "optax": "optax"}
ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class PeerError(ValueError):
    """A peer configuration that cannot be compared (bad input: one line, exit 2)."""


def _load_classes(path: Path = CLASSES_FILE) -> dict:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    return {(library, name): entry for library, classes in data.items()
            for name, entry in classes.items()}


CLASSES = _load_classes()
WRAPPERS = _load_classes(WRAPPERS_FILE)


@dataclass(frozen=True)
class PeerConfiguration:
    id: str
    library: str            # "torch" or "optax"
    peer_class: str         # torch.optim.<peer_class>, optax.<peer_class>
    arguments: dict         # as the user wrote them
    class_name: str         # the Keras class compared with
    config: dict            # the Keras configuration with the same hyperparameters
    states: dict = field(default_factory=dict)   # peer state -> Keras slot
    scale: dict = field(default_factory=dict)    # peer state -> factor to Keras's units
    wrappers: tuple = ()    # ((wrapper, {argument: value}), ...) as written
    not_kept: dict = field(default_factory=dict)  # Keras slot -> why partly not compared
    source = None  # the Keras class is keras.optimizers' (configurations.Configuration.source)

    @property
    def text(self) -> str:
        return f"{self.library}:" + " + ".join(
            _call(name, args) for name, args in ((self.peer_class, self.arguments),
                                                 *self.wrappers))

    @property
    def backend(self) -> str:
        return LIBRARIES[self.library]

    def describe(self) -> str:
        return self.text

    def peer_spec(self) -> dict:
        """What the peer worker needs to build and read the optimizer."""
        kwargs = dict(self.arguments)
        entry = CLASSES[self.library, self.peer_class]
        for name in entry.get("required", []):
            if name not in kwargs:
                kwargs[name] = self.config[entry["arguments"][name]]
        wrappers = {}
        for name, arguments in self.wrappers:
            w = WRAPPERS[self.library, name]
            wrappers[w["stage"]] = {"name": name,
                                    "kwargs": {**w.get("defaults", {}), **arguments}}
            if w.get("schedule") == "any":  # the worker computes the schedule's values
                own = {k: v for k, v in self.arguments.items() if k in entry["arguments"]}
                lr = keras_equivalent(self.library, self.peer_class, own)[1]["learning_rate"]
                wrappers[w["stage"]]["kwargs"] = {
                    "schedule": _any_schedule(name, arguments, lr, self.text)}
        if "schedule" in wrappers:  # the schedule starts from the optimizer's rate
            wrappers["schedule"]["kwargs"]["initial"] = self.initial_learning_rate
        return {"library": self.library, "class": self.peer_class, "kwargs": kwargs,
                "states": self.states, "scale": self.scale, "wrappers": wrappers,
                "shared": entry.get("shared", []), "initial": entry.get("initial", {}),
                "squeeze": entry.get("squeeze", {}), "factors": entry.get("factors", {}),
                "reduces": entry.get("reduces", {}), "takes": entry.get("takes"),
                "function": entry.get("function", self.peer_class)}

    @property
    def initial_learning_rate(self) -> float:
        return initial_learning_rate(self.config["learning_rate"])


def initial_learning_rate(value) -> float:
    """A constant learning rate, or a schedule's initial one (PiecewiseConstantDecay's
    first value)."""
    if not isinstance(value, dict):
        return value
    config = value["config"]
    return config["initial_learning_rate"] if "initial_learning_rate" in config else (
        config["values"][0])


def _call(name, arguments) -> str:
    return f"{name}(" + ", ".join(f"{k}={v!r}" for k, v in arguments.items()) + ")"


def _literal(node, text):
    try:
        value = ast.literal_eval(node)
    except ValueError:
        raise PeerError(f"{text!r}: argument values must be literals") from None
    return list(value) if isinstance(value, tuple) else value


def _one_call(node, text) -> tuple:
    if isinstance(node, ast.Name):
        return node.id, {}
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args
            and all(k.arg for k in node.keywords)):
        raise PeerError(f"{text!r}: not a call Class(name=value, ...) with named arguments")
    return node.func.id, {k.arg: _literal(k.value, text) for k in node.keywords}


def parse_call(text: str) -> tuple:
    """`library:Class(k=v, ...) + Wrapper(k=v, ...) + ...` -> (library, class, {k: v},
    [(wrapper, {k: v}), ...])."""
    library, sep, call = text.partition(":")
    if not sep or library.strip() not in LIBRARIES:
        raise PeerError(f"{text!r}: a peer configuration is LIBRARY:Class(...), LIBRARY one "
                        f"of {', '.join(LIBRARIES)}")
    try:
        node = ast.parse(call.strip(), mode="eval").body
    except SyntaxError:
        raise PeerError(f"{text!r}: not a call Class(name=value, ...)") from None
    calls = []
    while isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        calls.insert(0, _one_call(node.right, text))
        node = node.left
    name, arguments = _one_call(node, text)
    return library.strip(), name, arguments, calls


def _same(a, b) -> bool:
    """Equal values, a bool never equal to a number."""
    return a == b and (isinstance(a, bool) == isinstance(b, bool))


def _kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    return "list" if isinstance(value, list) else type(value).__name__


def _translate(entry: dict, arguments: dict, text: str) -> dict:
    """Peer arguments -> Keras arguments."""
    out = {}
    for name, value in arguments.items():
        target = entry["arguments"][name]
        if isinstance(target, list):
            if not isinstance(value, list) or len(value) != len(target):
                raise PeerError(f"{text!r}: {name} takes {len(target)} values")
            out.update(zip(target, value))
        else:
            out[target] = value
    return out


def peer_defaults(library: str, peer_class: str) -> dict:
    return dict(CLASSES[library, peer_class].get("defaults", {}))


def keras_equivalent(library: str, peer_class: str, arguments: dict, text="") -> tuple:
    """(Keras class, Keras config with the peer's hyperparameters: its arguments over
    its defaults)."""
    entry = CLASSES[library, peer_class]
    config = _translate(entry, {**peer_defaults(library, peer_class), **arguments}, text)
    config.update(entry.get("implies", {}))
    return entry["keras"], config


def _wrap(library: str, wrappers: list, config: dict, text: str) -> tuple:
    """The Keras configuration with each wrapper's arguments, and the wrappers' states
    and their scales."""
    config = dict(config)
    states, scales, stages = {}, {}, set()
    for name, arguments in wrappers:
        if (library, name) not in WRAPPERS:
            known = sorted(n for lib, n in WRAPPERS if lib == library)
            raise PeerError(f"{text!r}: no {library} wrapper {name} (choose from "
                            f"{', '.join(known)})")
        w = WRAPPERS[library, name]
        if w["stage"] in stages:
            raise PeerError(f"{text!r}: one {w['stage']} wrapper at most")
        stages.add(w["stage"])
        if w.get("schedule") == "any":
            config["learning_rate"] = _any_schedule(name, arguments, config["learning_rate"],
                                                    text)
            continue
        unknown = sorted(set(arguments) - set(w["keras"]))
        if unknown:
            raise PeerError(f"{text!r}: {name} takes no argument {unknown[0]!r} (choose "
                            f"from {', '.join(w['keras'])})")
        given = {**w.get("defaults", {}), **arguments}
        for k in w["keras"]:
            if k not in given:
                raise PeerError(f"{text!r}: {name} needs {k}")
            want = _kind(w["defaults"][k]) if k in w.get("defaults", {}) else "number"
            if _kind(given[k]) != want:
                raise PeerError(f"{text!r}: {k} must be a {want} (got {given[k]!r})")
        mapped = _translate({"arguments": w["keras"]}, given, text)
        for k, over in w.get("relative", {}).items():  # the wrapper's value over the class's
            mapped[w["keras"][k]] = given[k] / initial_learning_rate(config[over])
        if w["stage"] == "schedule":
            lr = config["learning_rate"]
            # every argument, as Keras serializes a schedule
            defaults = {k: v for k, v in reference.schedules.DEFAULTS[w["schedule"]].items()
                        if k != "name"}
            config["learning_rate"] = {"class_name": w["schedule"], "config": {
                **defaults, "initial_learning_rate": lr, **mapped, **w.get("implies", {})}}
        else:
            config.update(mapped)
            config.update(w.get("implies", {}))
        states.update(w.get("states", {}))
        scales.update(w.get("scale", {}))
    return config, states, scales


def _any_schedule(name: str, arguments: dict, lr, text: str) -> dict:
    """The serialized Keras schedule a LambdaLR / optax.Schedule wrapper computes:
    `keras` names its class, the other arguments are its own (Keras's names), and its
    initial_learning_rate is the optimizer's learning rate."""
    kind = arguments.get("keras")
    known = reference.schedules.DEFAULTS
    if kind not in known:
        raise PeerError(f"{text!r}: {name} needs keras=<one of {', '.join(known)}>")
    defaults = {k: v for k, v in known[kind].items() if k != "name"}
    given = {k: v for k, v in arguments.items() if k != "keras"}
    own = [a for a in defaults if a != "initial_learning_rate"]
    for k, v in given.items():
        if k not in own:
            raise PeerError(f"{text!r}: {name}(keras={kind!r}) takes no argument {k!r} "
                            f"(choose from {', '.join(own)}; the initial rate is the "
                            "optimizer's)")
        default = defaults[k]
        want = ("bool" if isinstance(default, bool) else "number" if isinstance(default, float)
                else _kind(v) if isinstance(v, (list, int, float)) else "number")
        if _kind(v) != want:
            raise PeerError(f"{text!r}: {k} must be a {want} (got {v!r})")
    config = {**defaults, **given}
    if "initial_learning_rate" in config:
        config["initial_learning_rate"] = lr
    missing = [k for k, v in config.items() if v is reference.schedules.REQUIRED]
    if missing:
        raise PeerError(f"{text!r}: {name}(keras={kind!r}) needs {missing[0]}")
    schedule = {"class_name": kind, "config": config}
    why = reference.schedules.unsupported(schedule)
    try:
        reference.schedules.values(schedule, 2)
    except (TypeError, ValueError) as exc:
        why = why or f"{name}(keras={kind!r}) cannot be evaluated: {exc}"
    if why:
        raise PeerError(f"{text!r}: {why}")
    return schedule


def parse(text: str, id: str | None = None) -> PeerConfiguration:
    library, peer_class, arguments, wrappers = parse_call(text)
    known = sorted(n for lib, n in CLASSES if lib == library)
    if (library, peer_class) not in CLASSES:
        raise PeerError(f"{text!r}: no {library} class {peer_class} with a Keras counterpart "
                        f"(choose from {', '.join(known)})")
    entry = CLASSES[library, peer_class]
    fixed = entry.get("fixed", {})
    free = entry.get("free", {})
    for name, value in arguments.items():
        if name in free:
            continue
        if name in fixed:
            if not _same(value, fixed[name]):
                raise PeerError(f"{text!r}: Keras's {entry['keras']} has no counterpart of "
                                f"{name}={value!r} (only {fixed[name]!r})")
        elif name not in entry["arguments"]:
            raise PeerError(f"{text!r}: {library}:{peer_class} takes no argument {name!r} "
                            f"here (choose from "
                            f"{', '.join([*entry['arguments'], *free, *fixed])})")
    stated = {**entry.get("defaults", {}), **free, **fixed}
    for name, value in arguments.items():
        want = (_kind(stated[name]) if name in stated else
                "list" if isinstance(entry["arguments"].get(name), list) else "number")
        if _kind(value) != want:
            raise PeerError(f"{text!r}: {name} must be a {want} (got {value!r})")
    for name, low in entry.get("minimum", {}).items():
        value = {**entry.get("defaults", {}), **arguments}.get(name)
        if value is not None and value < low:
            raise PeerError(f"{text!r}: {library}:{peer_class} refuses {name}={value!r} "
                            f"(at least {low!r})")
    for name in entry.get("required", []):
        if name not in arguments:
            raise PeerError(f"{text!r}: {library}:{peer_class} needs {name}")
    mapped = {k: v for k, v in arguments.items() if k not in fixed and k not in free}
    class_name, config = keras_equivalent(library, peer_class, mapped, text)
    # the optimizer's slots in its own units, at its constant learning rate
    scale = _scales(entry.get("scale", {}), config)
    config, wrapper_states, wrapper_scale = _wrap(library, wrappers, config, text)
    others = [name for name, _ in wrappers if WRAPPERS[library, name]["stage"] == "others"]
    if entry.get("others") and others != [entry["others"]]:
        takes = entry["takes"]
        raise PeerError(f"{text!r}: {library}:{peer_class} takes weights of rank "
                        f"{takes['rank']} not named {takes['not_named']!r} only: add "
                        f"+ {entry['others']}(...) for the others")
    if others and not entry.get("others"):
        raise PeerError(f"{text!r}: {others[0]} is for the weights a class such as Muon "
                        f"does not take; {peer_class} takes them all")
    scale.update(_scales(wrapper_scale, config))
    try:
        reference.get_rule("keras", class_name).hyperparameters(config)
    except reference.Unsupported as exc:
        raise PeerError(f"{text!r}: {exc}") from None
    if reference.schedules.unsupported(config["learning_rate"]):
        raise PeerError(f"{text!r}: {reference.schedules.unsupported(config['learning_rate'])}")
    if id is not None and not ID.fullmatch(id):
        raise PeerError(f"peer configuration id {id!r}: letters, digits, '_', '.', '-'")
    digest = hashlib.sha256(json.dumps([arguments, wrappers] if wrappers else arguments,
                                       sort_keys=True).encode()).hexdigest()[:8]
    return PeerConfiguration(id or f"{library}_{peer_class.lower()}_{digest}", library,
                             peer_class, dict(arguments), class_name, config,
                             {**entry["states"], **{k: k for k in entry.get("reduces", {})},
                              **wrapper_states}, scale,
                             tuple((name, dict(args)) for name, args in wrappers),
                             dict(entry.get("not_kept", {})))


def _scales(factors: dict, config: dict) -> dict:
    """state -> factor: "-name" is minus the Keras argument, "1" one, "1/(1-name)" one
    over one minus it (an average kept with weights 1 - beta where Keras sums)."""
    scale = {}
    for state, factor in factors.items():
        if factor.startswith("1/(1-") and factor.endswith(")"):
            scale[state] = 1.0 / (1.0 - float(config[factor[5:-1]]))
            continue
        sign = -1.0 if factor.startswith("-") else 1.0
        name = factor.lstrip("-")
        scale[state] = sign * (1.0 if name == "1" else float(config[name]))
    return scale


def load(path: Path = CONFIGURATIONS_FILE) -> dict:
    """id -> PeerConfiguration from a TOML table of `id = "library:Class(...)"`."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise PeerError(f"{path}: {exc}") from None
    out = {}
    for key, text in data.items():
        if not isinstance(text, str):
            raise PeerError(f"{path}: {key} must be a string LIBRARY:Class(...)")
        out[key] = parse(text, key)
    return out
