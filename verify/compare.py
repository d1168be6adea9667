"""Diffing Keras's states against a reference rule, step by step.

Scaled error.  For each element of each state after a step,

    scaled = |keras - reference| / (eps * M)

where M is the reference's running error bound in units of the unit roundoff
u = eps / 2 (reference/arithmetic.py), so eps * M = 2 * bound.  A faithful
implementation of the same formula differs from the exact result by at most
about `bound`, and so does the reference: two faithful implementations differ
by at most 2 * bound, scaled <= 1.  Evaluating the same formula in another
order changes that by a small factor; TOLERANCE is the one headroom used for
every optimizer (the README gives the argument).  A bound of 0 means both
sides must agree bit for bit.

Two comparisons share one stream of Keras states:
  lockstep  each step, the reference starts from Keras's own previous state,
            so each step's formula is checked without drift; step 0 compares
            the initial states.  This decides the verdict.
  free-run  the reference runs on its own from the same start; the distance of
            its weights from Keras's is reported as drift, not judged.

Each scenario of a run is one variable of the optimizer.  The rule receives
one array per variable ([k, *shape], reference/rule.py), or all of them as one
flat variable when it is elementwise; the comparison keeps each state as the
variables laid end to end, flattened ("segments"), so that errors are computed
once per chunk for all of them and reduced per segment (per scenario).  Only
per-step statistics are kept, never the trajectories.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reference import Arithmetic, Unsupported

TOLERANCE = 16.0
# n/a: the family does not state this configuration (the article says nothing
# of Adadelta); not a verdict on Keras, and never the keras family's
VERDICT_ORDER = ("exact", "match", "n/a", "mismatch", "error")
METRICS = ("abs", "rel", "scaled")


def worst(verdicts) -> str:
    return max(verdicts, key=VERDICT_ORDER.index)


def element_errors(keras: np.ndarray, reference: np.ndarray, bound: np.ndarray, tie=None):
    """Elementwise (|keras - reference|, relative error, scaled error).

    Identical values (NaN and infinities included) have error 0.  A bound of
    0 makes any difference infinite, and so does a non-finite reference value
    (inf or NaN is then the exact IEEE result).  At a tie (see
    reference/arithmetic.py) any value is accepted.  The relative error is
    taken against max(|keras|, |reference|), so a state one side leaves at
    zero reads 1, not an overflow.
    """
    k = keras.astype(np.float64, copy=False)
    r = reference.astype(np.float64, copy=False)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        diff = np.abs(k - r)
        odd = np.isnan(diff)
        if odd.any():
            same = (k == r) | (np.isnan(k) & np.isnan(r))
            diff[odd] = np.where(same[odd], 0.0, np.inf)
        bound = np.broadcast_to(bound, diff.shape)
        if not np.all(np.isfinite(r)):
            bound = np.where(np.isfinite(r), bound, 0.0)
        scaled = diff / (2 * bound)
        rel = diff / np.maximum(np.maximum(np.abs(k), np.abs(r)), np.finfo(np.float64).tiny)
    # NaN here is 0/0 (equal under an exact bound) or a NaN bound from inf * 0
    # in the propagation: both pass
    scaled[np.isnan(scaled)] = 0.0
    if tie is not None:
        scaled[np.broadcast_to(tie, scaled.shape)] = 0.0
    rel[np.isnan(rel)] = np.where(diff[np.isnan(rel)] == 0, 0.0, np.inf)
    return diff, rel, scaled


@dataclass
class Divergence:
    step: int
    state: str
    keras: float
    reference: float
    abs_error: float
    scaled_error: float
    bound: float


class Segments:
    """The variables (one per scenario) laid end to end: names, shapes, offsets."""

    def __init__(self, names, shapes):
        self.names = list(names)
        self.shapes = [tuple(s) if np.ndim(s) else (int(s),) for s in shapes]
        self.sizes = np.asarray([int(np.prod(s)) for s in self.shapes], dtype=int)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(int)

    def reduce_max(self, values: np.ndarray) -> np.ndarray:
        """[k, N] -> [k, S] maxima per segment; [k, 1] (a global) -> [k, S]."""
        if values.shape[1] == 1:
            return np.repeat(values, len(self.names), axis=1)
        return np.maximum.reduceat(values, self.offsets, axis=1)

    def argmax(self, values_row: np.ndarray, s: int) -> int:
        if values_row.shape[0] == 1:
            return 0
        o = self.offsets[s]
        return o + int(np.argmax(values_row[o:o + self.sizes[s]]))

    def split(self, flat: np.ndarray) -> list:
        """[k, N] -> one [k, *shape] view per variable."""
        k = flat.shape[0]
        return [flat[:, o:o + n].reshape((k,) + shape)
                for o, n, shape in zip(self.offsets, self.sizes, self.shapes)]


def _flat(parts, k, field):
    """Per-variable arrays (a Tracked field: values, bounds or ties) laid end to
    end as [k, N]; None when no part has one (ties)."""
    arrays = [getattr(p, field) for p in parts]
    if all(a is None for a in arrays):
        return None
    flat = [np.broadcast_to(np.zeros((), bool) if a is None else a, np.shape(p.v)).reshape(k, -1)
            for a, p in zip(arrays, parts)]
    return flat[0] if len(flat) == 1 else np.concatenate(flat, axis=1)


class RunComparison:
    """One family x configuration x backend x dtype x mode, all scenarios.

    Fed chunk by chunk with Keras's states; keeps per step and per scenario
    the maxima of each error measure, and per scenario the verdict state.
    """

    def __init__(self, family, rule, config, dtype, precision, segments: Segments,
                 gradients: np.ndarray, keras_states):
        self.family = family
        self.rule = rule
        self.hp = rule.hyperparameters(config)
        self.specs = {s.name: s for s in rule.states(self.hp)}
        self.ref_states = ["variable"] + list(self.specs)
        self.keras_states = list(keras_states)
        self.names = list(dict.fromkeys(["variable"] + self.keras_states + self.ref_states))
        self.only_keras = [n for n in self.keras_states if n not in self.ref_states]
        self.only_reference = [n for n in self.ref_states
                               if n != "variable" and n not in self.keras_states]
        self.dtype = np.dtype(dtype)
        self.segments = segments
        # the variables as the rule sees them: each with its shape, or, for an
        # elementwise rule, all of them as one flat variable (the same numbers)
        self.layout = (Segments(["all"], [int(segments.sizes.sum())])
                       if rule.elementwise(self.hp) else segments)
        self.gradients = gradients  # [steps, N] float64, the variables laid end to end
        self.ar = Arithmetic(dtype, precision, tie_width=2 * TOLERANCE)
        self.free_ar = Arithmetic(dtype, precision, track=False)
        S = len(segments.names)
        self.exact = np.ones(S, bool)
        self.divergence: list = [None] * S
        self.mismatch_steps = np.zeros(S, int)
        self.tables: list = []  # per chunk: {"step": [k], "drift": [k,S], (state, metric): [k,S]}
        self.error = None

    # --- feeding ----------------------------------------------------------
    def start(self, initial: dict, iteration: int) -> None:
        """Step 0: Keras's states before any update against the rule's initial state."""
        w0 = initial["variable"]
        ref, bounds = {"variable": w0}, {"variable": np.zeros(1)}
        for name, spec in self.specs.items():
            c = (self.ar.cast if spec.initial_via_cast else self.ar.const)(spec.initial)
            shape = w0.shape if spec.per_variable else (1, 1)
            ref[name] = np.broadcast_to(c.v, shape).astype(self.dtype)
            bounds[name] = np.broadcast_to(c.e, shape)
        self.ties = {}
        self._judge(np.array([0]), initial, ref, bounds, np.zeros((1, len(self.segments.names))))
        self.prev = {n: v[-1] for n, v in initial.items()}
        self.prev_iteration = int(iteration)
        self.last_ref = {n: v[-1] for n, v in ref.items()}
        self.free = {n: np.asarray(ref[n][-1], dtype=self.dtype) for n in self.ref_states}

    def feed(self, start: int, states: dict, iterations: np.ndarray) -> None:
        """States after steps start .. start+k-1 (1-based), [k, N] or [k, 1]."""
        k = len(iterations)
        g = self.gradients[start - 1:start - 1 + k].astype(self.dtype)
        t_before = np.concatenate([[self.prev_iteration], iterations[:-1]])
        drift = self._free_run(states, g, t_before)
        ref, bounds = self._lockstep(states, g, t_before)
        self._judge(np.arange(start, start + k), states, ref, bounds, drift)
        self.prev = {n: v[-1] for n, v in states.items()}
        self.prev_iteration = int(iterations[-1])
        self.last_ref = {n: v[-1] for n, v in ref.items()}

    def _inputs(self, ar, flat: dict, g: np.ndarray, k: int):
        """Flat states and gradients -> the rule's per-variable Tracked inputs."""
        state = {}
        for name, value in flat.items():
            if name == "variable" or self.specs[name].per_variable:
                state[name] = [ar.exact(v) for v in self.layout.split(value)]
            else:
                state[name] = ar.exact(value.reshape(k))
        return state, [ar.exact(v) for v in self.layout.split(g)]

    def _outputs(self, out: dict) -> dict:
        """The rule's states -> {name: list of Tracked parts, in the variables' order}."""
        return {n: out[n] if isinstance(out[n], list) else [out[n]] for n in self.ref_states}

    def _lockstep(self, states, g, t_before):
        """The rule applied to Keras's previous states, k steps at once."""
        k = len(t_before)
        before = {}
        for name in self.ref_states:
            if name in states:
                seq = np.concatenate([self.prev[name][None], states[name][:-1]])
            else:  # a state only the reference has continues its own chain
                seq = np.repeat(self.last_ref[name][None], k, axis=0)
            before[name] = seq
        state, grads = self._inputs(self.ar, before, g, k)
        out = self.rule(self.ar, self.hp, state, grads, self.ar.step_count(t_before))
        parts = self._outputs(out)
        ref = {n: _flat(parts[n], k, "v") for n in self.ref_states}
        bounds = {n: _flat(parts[n], k, "e") for n in self.ref_states}
        self.ties = {n: _flat(parts[n], k, "tie") for n in self.ref_states}
        return ref, bounds

    def _free_run(self, states, g, t_before):
        k = len(t_before)
        drift = np.zeros((k, len(self.segments.names)))
        tiny = np.finfo(np.float64).tiny
        for j in range(k):
            state, grads = self._inputs(self.free_ar, {n: v[None] for n, v in self.free.items()},
                                        g[j][None], 1)
            out = self.rule(self.free_ar, self.hp, state, grads,
                            self.free_ar.step_count(np.asarray([t_before[j]])))
            parts = self._outputs(out)
            self.free = {n: _flat(parts[n], 1, "v")[0] for n in self.ref_states}
            w_ref = self.free["variable"].astype(np.float64).reshape(1, -1)
            w_keras = states["variable"][j].astype(np.float64).reshape(1, -1)
            with np.errstate(invalid="ignore", over="ignore"):
                gap = self.segments.reduce_max(np.abs(w_keras - w_ref))[0]
                scale = np.maximum(self.segments.reduce_max(np.abs(w_ref))[0], tiny)
                d = gap / scale
            drift[j] = np.where(np.isnan(d), np.inf, d)
        return drift

    def _judge(self, steps, keras, ref, bounds, drift):
        k, S = len(steps), len(self.segments.names)
        table = {"step": steps, "drift": drift}
        over = np.zeros((k, S), bool)
        scaled_by_state = {}
        elementwise = {}
        for name in self.names:
            if name in keras and name in ref:
                kv, rv = keras[name].reshape(k, -1), ref[name].reshape(k, -1)
                diff, rel, scaled = element_errors(kv, rv, bounds[name],
                                                   self.ties.get(name))
                if kv.dtype != rv.dtype:
                    self.exact[:] = False
                self.exact &= ~self.segments.reduce_max(diff != 0).any(axis=0)
                elementwise[name] = (kv, rv, np.broadcast_to(bounds[name], kv.shape), scaled)
                for metric, values in zip(METRICS, (diff, rel, scaled)):
                    table[(name, metric)] = self.segments.reduce_max(values)
            else:  # a state that one side does not have at all
                self.exact[:] = False
                for metric in METRICS:
                    table[(name, metric)] = np.full((k, S), np.inf)
            scaled_by_state[name] = table[(name, "scaled")]
            over |= scaled_by_state[name] > TOLERANCE
        self.tables.append(table)
        self.mismatch_steps += over.sum(axis=0)
        for s in range(S):
            if self.divergence[s] is not None or not over[:, s].any():
                continue
            j = int(np.argmax(over[:, s]))
            name = max(self.names, key=lambda n: (scaled_by_state[n][j, s], -self.names.index(n)))
            if name in elementwise:
                kv, rv, bv, sc = elementwise[name]
                i = self.segments.argmax(sc[j], s)
                detail = (float(kv[j, i]), float(rv[j, i]), float(bv[j, i]))
            else:
                detail = (np.nan, np.nan, np.nan)
            self.divergence[s] = Divergence(int(steps[j]), name, detail[0], detail[1],
                                            abs(detail[0] - detail[1]),
                                            float(scaled_by_state[name][j, s]), detail[2])

    # --- results ------------------------------------------------------------
    def verdict(self, s: int) -> str:
        if self.error:
            return "error"
        if self.divergence[s] is not None:
            return "mismatch"
        return "exact" if self.exact[s] else "match"

    def step_table(self, s: int) -> dict:
        """Per-step maxima for scenario s: column name -> 1-D array."""
        columns = {"step": np.concatenate([t["step"] for t in self.tables])}
        columns["drift"] = np.concatenate([t["drift"][:, s] for t in self.tables])
        for name in self.names:
            for metric in METRICS:
                columns[f"{name}_{metric}"] = np.concatenate(
                    [t[(name, metric)][:, s] for t in self.tables])
        return columns

    def summary(self, s: int) -> dict:
        table = self.step_table(s) if self.tables else {}

        def mx(metric):
            cols = [table[f"{n}_{metric}"] for n in self.names if f"{n}_{metric}" in table]
            return float(np.max(np.concatenate(cols))) if cols else float("nan")

        return {
            "verdict": self.verdict(s),
            "divergence": self.divergence[s],
            "mismatch_steps": int(self.mismatch_steps[s]),
            "max_abs_error": mx("abs"),
            "max_rel_error": mx("rel"),
            "max_scaled_error": mx("scaled"),
            "drift": float(np.max(table["drift"])) if table else float("nan"),
            "final_drift": float(table["drift"][-1]) if table else float("nan"),
        }


def build(family, rule_lookup, configuration, dtype, precision, segments, gradients,
          keras_states):
    """A RunComparison, or the reason the rule cannot model this configuration."""
    try:
        rule = rule_lookup(family, configuration.class_name)
        comparison = RunComparison(family, rule, configuration.config, dtype, precision,
                                   segments, gradients, keras_states)
        return comparison, None
    except Unsupported as exc:
        return None, str(exc)
