"""Keras's MultiOptimizer: each variable updated by the optimizer its path maps to.

keras/src/optimizers/multi_optimizer.py (Keras 3.15.1), with its `OptimizerMap`:

  - the inner optimizers are the map's values in order, then its default
    (`MultiOptimizer.__init__`); a variable goes to the optimizer whose key is
    its path, else to the one key that `re.fullmatch`es its path (two such keys:
    Keras raises), else to the default (`OptimizerMap.__getitem__`);
  - `apply` hands each inner optimizer its own variables and gradients, in the
    variables' order, and calls its `apply` (its whole base pipeline, its own
    iteration counter) only when it has variables; then counts its own
    iteration.  An inner optimizer without variables is never built;
  - the MultiOptimizer's `loss_scale_factor` replaces every inner optimizer's
    (`__init__` assigns it to each, None too), so each inner `apply` unscales
    by it.

The reference is the family's own rule of each inner optimizer on its
variables; each inner optimizer's states are named "<label>.<state>" with
label = its class name in lower case and its index ("adam0", "sgd1"), and
"<label>.iteration" is its iteration counter, compared like any state.
"""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np

from reference.rule import REGISTRY, Rule, StateSpec, Unsupported

CLASS_NAME = "MultiOptimizer"
DEFAULTS = {"optimizer_map": None, "loss_scale_factor": None}


def inner_optimizers(optimizer_map: dict) -> list:
    """A serialized OptimizerMap -> [(label, pattern or None, serialized optimizer)],
    in Keras's order of `MultiOptimizer.optimizers`."""
    config = optimizer_map["config"]
    entries = [*config.get("optimizer_map", {}).items(), (None, config["default_optimizer"])]
    return [(f"{inner['class_name'].lower()}{k}", pattern, inner)
            for k, (pattern, inner) in enumerate(entries)]


def owner(inners: list, path: str) -> int:
    """The index of the inner optimizer a variable's path maps to."""
    keys = [pattern for _, pattern, _ in inners if pattern is not None]
    if path in keys:
        return keys.index(path)
    matching = [k for k, key in enumerate(keys) if re.fullmatch(key, path)]
    if len(matching) > 1:
        raise Unsupported(f"Multiple optimizers assigned to variable {path} (Keras raises)")
    return matching[0] if matching else len(inners) - 1


def _inner_rules(family: str, hp: dict) -> list:
    """[(label, rule, its hyperparameters)] of every inner optimizer."""
    out = []
    for label, _, inner in inner_optimizers(hp["optimizer_map"]):
        rule = REGISTRY.get((family, inner["class_name"]))
        if rule is None:
            raise Unsupported(f"the {family} family does not state {inner['class_name']}")
        config = {**inner.get("config", {}), "loss_scale_factor": hp["loss_scale_factor"]}
        out.append((label, rule, rule.hyperparameters(config)))
    return out


def rule(family: str) -> Rule:
    def states(hp):
        inners = inner_optimizers(hp["optimizer_map"])
        out = []
        for k, (label, inner_rule, inner_hp) in enumerate(_inner_rules(family, hp)):
            out.append(StateSpec(f"{label}.iteration", 0.0, per_variable=False))
            for spec in inner_rule.states(inner_hp):
                def shape(variable_shape, path, spec=spec, k=k):
                    return (spec.shape_for(variable_shape, path)
                            if owner(inners, path) == k else None)
                out.append(replace(spec, name=f"{label}.{spec.name}",
                                   shape=shape if spec.per_variable else None))
        return out

    def step(ar, hp, state, grads, t, paths):
        inners = inner_optimizers(hp["optimizer_map"])
        owners = [owner(inners, path) for path in paths]
        out = {"variable": list(state["variable"])}
        for k, (label, inner_rule, inner_hp) in enumerate(_inner_rules(family, hp)):
            mine = [i for i, o in enumerate(owners) if o == k]
            names = [s.name for s in inner_rule.states(inner_hp)]
            counter = state[f"{label}.iteration"]
            if not mine:  # never built, never applied
                out[f"{label}.iteration"] = counter
                out.update({f"{label}.{n}": state[f"{label}.{n}"] for n in names})
                continue
            own = {"variable": [state["variable"][i] for i in mine]}
            for n in names:
                value = state[f"{label}.{n}"]
                own[n] = [value[i] for i in mine] if isinstance(value, list) else value
            result = inner_rule(ar, inner_hp, own, [grads[i] for i in mine], counter,
                                [paths[i] for i in mine])
            for n, value in result.items():
                if isinstance(value, list):
                    if n == "variable":
                        target = out["variable"]
                    else:
                        target = out.setdefault(f"{label}.{n}", [None] * len(paths))
                    for i, v in zip(mine, value):
                        target[i] = v
                else:
                    out[f"{label}.{n}"] = value
            out[f"{label}.iteration"] = ar.exact(np.asarray(counter.v) + 1)
        return out

    def unstated(hp):
        return None if hp["optimizer_map"] else "a MultiOptimizer needs its optimizer_map"

    return Rule(family, CLASS_NAME, dict(DEFAULTS), states, step, unstated=unstated,
                inner=lambda hp: _inner_rules(family, hp),
                source="keras/src/optimizers/multi_optimizer.py (Keras 3), each variable by "
                       f"the {family} rule of the optimizer its path maps to",
                doc="""inner optimizers: the OptimizerMap's values in order, then its default;
    a variable goes to the key equal to its path, else the one key re.fullmatch-ing it,
    else the default; each inner optimizer applies its own step (its base pipeline,
    loss_scale_factor replaced by the MultiOptimizer's) to its variables, then counts
    its iteration.""")
