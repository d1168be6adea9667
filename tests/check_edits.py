"""Small real edits of Keras's optimizer source, applied to a copy of the
installed keras package (put first on the workers' import path by
`verify-optimizers check --keras-path`).

Each edit names the (optimizer, backend) pairs whose cells it must change;
an edit that only reassociates an operation must change no math class.
Edits are plain text replacements that must match exactly once, so a Keras
whose source moved makes the test fail loudly instead of passing vacuously.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass, field
from pathlib import Path

GENERIC = ("tensorflow", "jax")  # backends that run keras/src/optimizers/*.py as written


@dataclass(frozen=True)
class Edit:
    name: str
    replacements: tuple            # (path inside the keras package, old, new)
    changes: frozenset = field(default_factory=frozenset)  # {(optimizer, backend)}
    # dtypes in which every cell of those pairs must fail; in the others a cell may
    # stay within rounding (a change far below float32's resolution of the weights)
    always: tuple = ("float32", "float64")


def _pairs(optimizers, backends):
    return frozenset((o, b) for o in optimizers for b in backends)


ADAM = "src/optimizers/adam.py"
TORCH_ADAM = "src/backend/torch/optimizers/torch_adam.py"

EDITS = [
    # AdamW passes its own beta_2 to Adam.__init__: only Adam's cells change.
    Edit("changed-default", ((ADAM, "beta_2=0.999,", "beta_2=0.99,"),),
         _pairs(["adam"], ["tensorflow", "jax", "torch"])),
    # The torch backend has its own Adam kernel; AdamW inherits Adam's update.
    Edit("epsilon-inside-sqrt",
         ((ADAM, "ops.add(ops.sqrt(v), self.epsilon)", "ops.sqrt(ops.add(v, self.epsilon))"),),
         _pairs(["adam", "adamw"], GENERIC),
         # for |g| ~ 1 the denominator moves by ~5e-5 relative and the weights by ~5e-7:
         # float32 rounding of the weights; the `tiny` scenario shows it in float32 too
         always=("float64",)),
    Edit("off-by-one-step",
         ((ADAM, "local_step = ops.cast(self.iterations + 1, variable.dtype)",
           "local_step = ops.cast(self.iterations + 2, variable.dtype)"),),
         _pairs(["adam", "adamw"], GENERIC)),
    Edit("torch-only",
         ((TORCH_ADAM, "alpha = lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)",
           "alpha = lr * (1 - beta_2_power) / (1 - beta_1_power)"),),
         _pairs(["adam", "adamw"], ["torch"])),
    # Same math, other rounding: (lr * s) / d -> lr * (s / d), and the moment's
    # m + (g - m)(1 - b1) -> b1 m + (1 - b1) g (the torch kernels' form).
    Edit("reassociated",
         ((ADAM, "alpha = lr * ops.sqrt(1 - beta_2_power) / (1 - beta_1_power)",
           "alpha = lr * (ops.sqrt(1 - beta_2_power) / (1 - beta_1_power))"),
          (ADAM, "self.assign_add(\n            m, ops.multiply(ops.subtract(gradient, m), "
                 "1 - self.beta_1)\n        )",
           "self.assign(\n            m, ops.add(ops.multiply(m, self.beta_1), "
           "ops.multiply(gradient, 1 - self.beta_1))\n        )"))),
]


def installed_keras() -> Path:
    spec = importlib.util.find_spec("keras")
    return Path(list(spec.submodule_search_locations)[0])


def edited_keras(edit: Edit, root: Path) -> Path:
    """Copy the installed keras under root/site, apply the edit; return root/site."""
    site = root / "site"
    target = site / "keras"
    shutil.copytree(installed_keras(), target)
    for relative, old, new in edit.replacements:
        path = target / relative
        text = path.read_text()
        assert text.count(old) == 1, f"{edit.name}: {old!r} occurs {text.count(old)} times " \
                                     f"in {path}"
        path.write_text(text.replace(old, new))
    return site


BASE = "src/optimizers/base_optimizer.py"
# Serialization (what model.save writes) loses half the learning rate: every
# optimizer rebuilt from it computes differently, while the class itself does not.
SAVED_HALF_LEARNING_RATE = Edit(
    "saved-half-learning-rate",
    ((BASE, '"learning_rate": learning_rate,\n', '"learning_rate": learning_rate * 0.5,\n'),))
