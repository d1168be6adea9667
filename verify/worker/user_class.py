"""A user's own optimizer class (`verify-optimizers --class FILE.py:ClassName` or
`package.module:ClassName`), imported in the worker.  Loading it runs the user's code.

`python -m verify.worker.user_class SOURCE CLASS CONFIG_JSON` (KERAS_BACKEND set) is
the harness's check before anything is written: it builds the class with its
arguments on one variable and prints, as JSON on its last line, {"config": the
optimizer's get_config()} or {"error": one line}.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from pathlib import Path


class ClassRefused(TypeError):
    """The user's class cannot be built as an optimizer; the message is one line."""


def load_class(keras, source: str, class_name: str):
    """The class `class_name` of the file or module `source`, checked to be a
    keras.optimizers.Optimizer subclass."""
    if source.endswith(".py"):
        path = Path(source)
        name = f"verify_user_{path.stem}"
        module = sys.modules.get(name)
        if module is None:
            if str(path.parent) not in sys.path:  # its own imports, as `python FILE.py` finds them
                sys.path.insert(0, str(path.parent))
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # a class registered for serialization finds it
            spec.loader.exec_module(module)
    else:
        module = importlib.import_module(source)
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ClassRefused(f"{source} has no class {class_name}")
    if not issubclass(cls, keras.optimizers.Optimizer):
        raise ClassRefused(f"{source}:{class_name} is not a subclass of "
                           "keras.optimizers.Optimizer")
    return cls


def _check(source: str, class_name: str, config: dict) -> dict:
    import keras

    try:
        cls = load_class(keras, source, class_name)
    except ClassRefused as exc:
        return {"error": str(exc)}
    except Exception as exc:  # the user's module fails to import
        return {"error": f"importing {source} fails: {type(exc).__name__}: {exc}"}
    try:
        optimizer = cls(**config)
    except Exception as exc:
        return {"error": f"{class_name}(**{json.dumps(config)[:80]}) fails: "
                         f"{type(exc).__name__}: {exc}"}
    try:
        variable = keras.Variable([1.0, 2.0], name="probe")
        optimizer.build([variable])
        found = optimizer.get_config()
    except Exception as exc:
        return {"error": f"{class_name}: building it on a variable fails: "
                         f"{type(exc).__name__}: {exc}"}
    return {"config": {k: v for k, v in found.items()
                       if isinstance(v, (bool, int, float, str, type(None)))}}


if __name__ == "__main__":
    found = _check(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]))
    print(json.dumps({k: (v.splitlines()[0] if isinstance(v, str) else v)
                      for k, v in found.items()}))
