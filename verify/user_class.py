"""A user's own optimizer class, checked against the user's rule: `--class
FILE.py:ClassName` (or `package.module:ClassName`), its constructor's arguments in
`--config`, and `--rule FILE.py` (reference/user_rule.py).  The rule is family
`rule`, judged as `keras` is: a mismatch is exit 1.

Loading a class or a rule runs the user's code: the class in a worker (and once, before
anything is written, in a short check: verify/worker/user_class.py), the rule here.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from reference import base, user_rule
from reference.rule import REGISTRY
from verify import processes
from verify.configurations import Configuration, derived_id
from verify.selection import UsageError


def parse(spec: str) -> tuple:
    """--class FILE.py:ClassName or package.module:ClassName -> (source, class name):
    a file as its absolute path, checked to define the class (read, not run)."""
    source, sep, class_name = spec.rpartition(":")
    if not sep or not source or not class_name.isidentifier():
        raise UsageError(f"--class {spec!r}: expected FILE.py:ClassName or "
                         "package.module:ClassName")
    if source.endswith(".py"):
        path = Path(source).resolve()
        if not path.is_file():
            raise UsageError(f"--class: no such file {source}")
        try:
            tree = ast.parse(path.read_text(), str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
            raise UsageError(f"--class: {source} is not Python: {exc}") from None
        if not any(isinstance(node, ast.ClassDef) and node.name == class_name
                   for node in tree.body):
            raise UsageError(f"--class: {source} defines no class {class_name}")
        return str(path), class_name
    if not all(part.isidentifier() for part in source.split(".")):
        raise UsageError(f"--class {spec!r}: {source!r} is neither a .py file nor a module name")
    try:
        found = importlib.util.find_spec(source)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise UsageError(f"--class: no module {source} on the path")
    return source, class_name


def built_config(source: str, class_name: str, config: dict, backend: str) -> dict:
    """The class built with `config` on one variable in a worker for `backend`: its
    get_config(), every hyperparameter with the class's defaults (UsageError: why it
    cannot be built)."""
    with tempfile.TemporaryDirectory(prefix="verify-class-") as home:
        env = processes.pinned_environment(backend, Path(home))
        done = subprocess.run([sys.executable, "-m", "verify.worker.user_class", source,
                               class_name, json.dumps(config)], env=env, capture_output=True,
                              text=True, timeout=600)
    try:
        found = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise UsageError(f"--class {class_name}: the check on {backend} failed: {last}") from None
    if "error" in found:
        raise UsageError(f"--class: {found['error']}")
    return found["config"]


def configuration(spec: str, config: dict, backend: str) -> tuple:
    """The user's class with its arguments as a configuration (id: the class name and a
    hash of the arguments), checked by building it; and its get_config()."""
    if not isinstance(config, dict):
        raise UsageError("--config with --class: give the constructor's arguments as one "
                         "JSON object")
    source, class_name = parse(spec)
    built = built_config(source, class_name, config, backend)
    return Configuration(derived_id(class_name, config), class_name, config, source), built


def register_rule(path: str, chosen: Configuration, built: dict) -> None:
    """The rule file as family `rule` of the class: its hyperparameters are what the
    class holds (`built`: get_config()), the base optimizer's taken by the pipeline."""
    try:
        rule = user_rule.load(path)
    except user_rule.RuleError as exc:
        raise UsageError(f"--rule: {exc}") from None
    defaults = {**rule.hyperparameters,
                **{k: v for k, v in built.items() if k not in base.DEFAULTS and k != "name"}}
    REGISTRY[(user_rule.FAMILY, chosen.class_name)] = user_rule.optimizer(
        rule, chosen.class_name, defaults).rule(user_rule.FAMILY)
