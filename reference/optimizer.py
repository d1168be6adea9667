"""An optimizer as a space of named pieces; the families are points of it.

Each module in reference/optimizers/ defines one `Optimizer` per Keras class:
its defaults, the state it keeps, and the update of one variable, written top
to bottom, whose pieces are chosen by name (`c["piece"]`).  A `Point` is one
choice of every piece plus where it comes from; the families `keras`,
`textbook` and `article` are named points, and `explain` varies the pieces an
optimizer lists in `explained`, keeping the others at Keras's choice.

A step of a point (`Optimizer.rule`):
  1. the learning rate, from Keras's float32 variable, or a schedule's float32
     value at the stored iteration (reference/schedules.py);
  2. for the `keras` point, Keras's base-optimizer pipeline (reference/base.py,
     `base.run`) around steps 3 and 4: unscaling, gradient accumulation,
     clipping and weight decay before, the EMA of the weights after; for a
     `textbook` point with `textbook_base`, the papers' forms of those stages
     (`base.run_textbook`);
  3. `prepare`, once per step, over all variables: the optimizer-wide states
     (Nadam's u_product; Keras's `_backend_update_step`);
  4. `update`, once per variable (Keras's `update_step`), which sees the
     optimizer-wide states and the iteration shaped to broadcast against its
     variable ([k] -> [k, 1, ..., 1]), and the variable's path as s["path"]
     (a str); a slot the variable does not have is absent from s, and the
     update leaves it out of what it returns.
A rule says whether it is elementwise for given hyperparameters (the update
and every stage used treat each element on its own); the comparison then
evaluates all variables as one flat [k, N] variable, the same numbers with one
numpy call per operation instead of one per variable (verify/compare.py).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from reference import base, schedules
from reference.arithmetic import Tracked
from reference.rule import REGISTRY, Rule


@dataclass(frozen=True)
class Point:
    choices: object          # {piece: option}, or hyperparameters -> that dict
    source: str
    doc: str                 # the formula as this point states it (shown in reports)
    notes: str = ""          # the choices its source leaves open (the reports' "Choices")
    keras_base: bool = False  # runs Keras's base-optimizer pipeline (reference/base.py)
    # runs the textbook forms of those stages (base.run_textbook): for a point whose
    # paper leaves clipping, decay, loss scaling and averaging to the general ones
    textbook_base: bool = False
    # hyperparameters -> why the source does not state this configuration, or None
    unstated: Callable[[dict], str | None] | None = None

    def resolve(self, hp: dict) -> dict:
        return self.choices(hp) if callable(self.choices) else self.choices


@dataclass(frozen=True)
class Optimizer:
    class_name: str
    defaults: dict
    pieces: dict              # piece -> its options, Keras's first
    states: Callable          # (hp, choices) -> [StateSpec]
    update: Callable          # (ar, hp, c, s, g, t, lr) -> {state: Tracked}, one variable
    points: dict              # family -> Point
    explained: tuple = ()     # the pieces `explain` varies
    # (ar, hp, c, state, grads, t) -> {optimizer-wide state: Tracked [k]}, once
    # per step, seeing every variable and gradient
    prepare: Callable | None = None
    elementwise: bool = True  # update treats every element on its own

    def rule(self, family: str) -> Rule:
        point = self.points[family]
        has_base = point.keras_base or point.textbook_base
        defaults = {**base.DEFAULTS, **self.defaults} if has_base else dict(self.defaults)

        def states(hp):
            own = self.states(hp, point.resolve(hp))
            if point.keras_base:
                return own + base.states(hp)
            return own + base.textbook_states(hp) if point.textbook_base else own

        def unstated(hp):
            if schedules.is_schedule(hp["learning_rate"]):
                if not point.keras_base:
                    return (f"{family} states a constant learning rate, not "
                            + ("a callable" if schedules.is_callable(hp["learning_rate"])
                               else f"Keras's {hp['learning_rate'].get('class_name')} "
                                    "schedule"))
                if reason := schedules.unsupported(hp["learning_rate"]):
                    return reason
            if point.textbook_base and (reason := base.textbook_unstated(hp)):
                return reason
            return point.unstated(hp) if point.unstated else None

        return Rule(family, self.class_name, defaults, states, self._step(point),
                    point.source, point.notes, point.doc, unstated,
                    lambda hp: self.elementwise and (
                        not has_base or base.elementwise(hp, point.resolve(hp))))

    def _step(self, point: Point):
        def step(ar, hp, state, grads, t, paths):
            c = point.resolve(hp)
            lr = schedules.learning_rate(ar, hp["learning_rate"], t,
                                         hp.get("gradient_accumulation_steps"))

            def own(state, grads, t):
                return self._apply(ar, hp, c, state, grads, t, lr, paths)

            if point.keras_base:
                return base.run(ar, hp, c, state, grads, t, lr, own, paths)
            if point.textbook_base:
                return base.run_textbook(ar, hp, c, state, grads, t, lr, own, paths)
            return own(state, grads, t)
        return step

    def _apply(self, ar, hp, c, state, grads, t, lr, paths):
        """The optimizer's own step over all variables: `prepare`, then `update`
        per variable (Keras's `_backend_update_step`)."""
        shared = self.prepare(ar, hp, c, state, grads, t) if self.prepare else {}
        own = {s.name for s in self.states(hp, c)}
        per_variable = [n for n, v in state.items()
                        if isinstance(v, list) and n != "variable" and n in own]
        results = []
        for i, (w, g) in enumerate(zip(state["variable"], grads)):
            s = {n: state[n][i] for n in per_variable if state[n][i] is not None}
            s["variable"] = w
            s["path"] = paths[i]
            s.update({n: broadcastable(x, w) for n, x in shared.items()})
            results.append(self.update(ar, hp, c, s, g, broadcastable(t, w),
                                       broadcastable(lr, w)))
        names = list(dict.fromkeys(n for r in results for n in r)) or ["variable"]
        out = {n: [r.get(n) for r in results] for n in names}
        out.update(shared)
        return out

    # --- the variant space, for `explain` ------------------------------------
    def space(self) -> "Space":
        return Space(self)


def broadcastable(x: Tracked, w: Tracked) -> Tracked:
    """A [k] value (iteration, optimizer-wide state, scheduled learning rate)
    shaped [k, 1, ..., 1] to broadcast against the variable w [k, *shape]; a
    scalar (a constant learning rate) stays as it is."""
    if np.ndim(x.v) == 0:
        return x
    return x.reshape((-1,) + (1,) * (np.ndim(w.v) - 1))


def name_of(choices: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in choices.items())


@dataclass(frozen=True)
class Space:
    """The pieces `explain` varies, each point a rule comparable with Keras."""

    optimizer: Optimizer

    @property
    def class_name(self) -> str:
        return self.optimizer.class_name

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    @property
    def pieces(self) -> dict:
        return {p: self.optimizer.pieces[p] for p in self.optimizer.explained}

    def _project(self, family: str, config: dict) -> dict:
        hp = {**self.optimizer.defaults, **config}
        c = self.optimizer.points[family].resolve(hp)
        return {p: c[p] for p in self.optimizer.explained}

    @property
    def keras(self) -> dict:
        """Keras's choices (the point stated from Keras's source)."""
        return self._project("keras", {})

    def paper(self, config: dict) -> dict:
        """The paper's point for a configuration (it may depend on it)."""
        return self._project("textbook", config)

    def points(self):
        names = list(self.pieces)
        for values in itertools.product(*(self.pieces[n] for n in names)):
            yield dict(zip(names, values))

    def rule(self, choices: dict) -> Rule:
        """Keras's point with the explained pieces set to `choices`."""
        opt = self.optimizer
        keras = opt.points["keras"]
        point = Point(lambda hp: {**keras.resolve(hp), **choices},
                      source=f"variant of {opt.class_name}: {name_of(choices)}", doc="",
                      keras_base=True)
        return Optimizer(opt.class_name, opt.defaults, opt.pieces, opt.states, opt.update,
                         {"variant": point}, opt.explained, opt.prepare,
                         opt.elementwise).rule("variant")


def register_variants(space: Space) -> list:
    """Register every point of a space as a family "variant:<name>"; return
    [(family, choices)] in the space's order."""
    out = []
    for choices in space.points():
        family = "variant:" + name_of(choices)
        if (family, space.class_name) not in REGISTRY:
            rule = space.rule(choices)
            REGISTRY[(family, space.class_name)] = Rule(
                family, rule.class_name, rule.defaults, rule.states, rule.step, rule.source,
                elementwise=rule.elementwise)
        out.append((family, choices))
    return out
