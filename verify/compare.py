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

Low precision (float16, bfloat16 and the mixed policies, verify/worker/dtypes.py): the
keras family's comparison also runs the same rule in float64, each step from
Keras's own previous state (cast up exactly) with the scenario's float64
gradients (in float32, the weights' dtype, under a mixed policy), and names where the low dtype changes the math qualitatively
(`LowPrecision`): a state Keras leaves where it was although that formula
moves it (the update lost to rounding), a state Keras makes NaN or infinite where
that formula stays finite, and a hyperparameter of the configuration that
the dtype rounds to 0 or 1.  They are findings about Keras in that dtype, not
verdicts: the verdict still compares Keras with the rule in Keras's dtype.

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
from reference.arithmetic import numpy_dtype
from verify.worker import dtypes

TOLERANCE = 16.0
# a rule that overflows or divides by zero gives the IEEE result (inf, NaN), which is
# compared as it is; numpy's warnings about it would only be noise on the console
def ieee():
    return np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore")
# n/a: the family does not state this configuration (the article says nothing
# of Adadelta); not a verdict on Keras, and never the keras family's
VERDICT_ORDER = ("exact", "match", "n/a", "mismatch", "error")
METRICS = ("abs", "rel", "scaled")


def worst(verdicts) -> str:
    return max(verdicts, key=VERDICT_ORDER.index)


def difference(k: np.ndarray, r: np.ndarray) -> np.ndarray:
    """|k - r| in float64, 0 where both are the same NaN or infinity, inf where
    only one side is NaN or they are infinities of opposite signs."""
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.abs(k - r)
        odd = np.isnan(diff)
        if odd.any():
            same = (k == r) | (np.isnan(k) & np.isnan(r))
            diff[odd] = np.where(same[odd], 0.0, np.inf)
    return diff


def element_errors(keras: np.ndarray, reference: np.ndarray, bound: np.ndarray, tie=None):
    """Elementwise (|keras - reference|, relative error, scaled error).

    Identical values (NaN and infinities included) have error 0.  A bound of
    0 makes any difference infinite, and so does a non-finite reference value
    (inf or NaN is then the exact IEEE result).  A bound that is not finite
    at a finite reference value (the propagation overflowed: inf * 0 or a
    bound beyond float64) cannot judge a difference: its scaled error is NaN,
    unknown, neither a pass nor a mismatch (RunComparison makes the cell an
    error).  At a tie (see reference/arithmetic.py) any value is accepted.
    The relative error is taken against max(|keras|, |reference|), so a state
    one side leaves at zero reads 1, not an overflow.
    """
    k = keras.astype(np.float64, copy=False)
    r = reference.astype(np.float64, copy=False)
    diff = difference(k, r)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        bound = np.broadcast_to(bound, diff.shape)
        if not np.all(np.isfinite(r)):
            bound = np.where(np.isfinite(r), bound, 0.0)
        scaled = diff / (2 * bound)
        rel = diff / np.maximum(np.maximum(np.abs(k), np.abs(r)), np.finfo(np.float64).tiny)
    # NaN here is 0/0 (equal under an exact bound) or an equal value under a
    # bound that overflowed: both pass
    scaled[np.isnan(scaled)] = 0.0
    scaled[~np.isfinite(bound) & (diff > 0)] = np.nan
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
    weight: str = ""  # the weight (Keras variable) of the worst element; "" optimizer-wide


class LowPrecision:
    """Per scenario and state: the first step (and weight) and the number of
    element-steps where Keras's low-precision state departs qualitatively from the
    formula started at the same state with the unrounded gradient, in float64 for
    float16 or bfloat16 weights, and in the weights' own float32 under a mixed
    policy, so that only what the low dtype does is found (see the module
    docstring)."""

    KINDS = {"lost": "update lost (Keras keeps the value, the formula moves it)",
             "nonfinite": "NaN or inf where the formula stays finite"}

    def __init__(self, comparison: RunComparison):
        self.c = comparison
        weights = np.dtype(comparison.ar.dtype)
        self.ar = Arithmetic(np.float64 if weights.itemsize < 4 else weights,
                             comparison.ar.precision, track=False)
        # (kind, state) -> [first step per scenario (0: none), its weight, count, of how many]
        self.seen = {}
        self.S = comparison.segments.group_count

    def rounded_hyperparameters(self, rule=None, hp=None, prefix="") -> list:
        """[(name, value, rounded)] of the configuration's real hyperparameters that
        the dtype rounds to 0 or 1 (through the precision setting's ops.cast), and of
        the optimizers it wraps, named "<label>.<name>"."""
        rule, hp = (self.c.rule, self.c.hp) if rule is None else (rule, hp)
        out = []
        for name, value in hp.items():
            if isinstance(value, float) and value not in (0.0, 1.0):
                rounded = float(self.c.ar.cast(value).v)
                if rounded in (0.0, 1.0):
                    out.append((prefix + name, value, rounded))
        for label, inner_rule, inner_hp in rule.inner(hp):
            out += self.rounded_hyperparameters(inner_rule, inner_hp, f"{prefix}{label}.")
        return out

    def feed(self, steps, states, before, g64, t_before):
        k = len(steps)
        state, grads = self.c.layout.inputs(self.ar, {n: v.astype(self.ar.dtype) for n, v in
                                                 before.items()}, g64, k)
        with ieee():
            out = self.c.rule(self.ar, self.c.hp, state, grads, self.ar.step_count(t_before),
                              self.c.layout.paths)
        parts = self.c.layout.outputs(out)
        for name in self.c.layout.ref_states:
            if name not in states or name in self.c.layout.unmatched:
                continue
            new = states[name].reshape(k, -1).astype(np.float64)
            old = before[name].reshape(k, -1).astype(np.float64)
            r64 = _flat(parts[name], k, "v").reshape(k, -1)
            with np.errstate(invalid="ignore"):
                moves = np.isfinite(r64) & np.isfinite(old) & (r64 != old)
                kinds = {"lost": (moves & (new == old), moves),
                         "nonfinite": (~np.isfinite(new) & np.isfinite(old) & np.isfinite(r64),
                                       np.isfinite(old) & np.isfinite(r64))}
            for kind, (hit, eligible) in kinds.items():
                self._count(kind, name, steps, hit, eligible)

    def _count(self, kind, name, steps, hit, eligible):
        seg = self.c.layout.state_segments.get(name)
        if seg is None:  # optimizer-wide: one value for every scenario
            seg = Segments(["g"], [hit.shape[1]], [0], 1)
        record = self.seen.setdefault((kind, name), [np.zeros(self.S, int), [""] * self.S,
                                                      np.zeros(self.S, int),
                                                      np.zeros(self.S, int)])
        per = seg.reduce_max(hit.astype(np.int8)).astype(bool)
        if seg.group_count == 1 and self.S > 1:  # optimizer-wide: every scenario's
            per = np.repeat(per, self.S, axis=1)
        counts = _group_sums(seg, hit, self.S)
        totals = _group_sums(seg, eligible, self.S)
        record[2] += counts
        record[3] += totals
        for s in range(self.S):
            if record[0][s] == 0 and per[:, s].any():
                j = int(np.argmax(per[:, s]))
                record[0][s] = int(steps[j])
                if self.c.layout.state_segments.get(name) is not None:
                    _, weight = seg.argmax(hit[j].astype(float), s)
                    record[1][s] = seg.label(weight)

    def describe(self, s: int) -> str:
        """The findings of scenario s in one line ("" when none)."""
        dtype = dtypes.compute(self.c.run_dtype)
        parts = [f"{n}={v!r} rounds to {r:g} in {dtype}"
                 for n, v, r in self.rounded_hyperparameters()]
        for (kind, name), (first, weight, count, total) in sorted(
                self.seen.items(), key=lambda kv: (kv[1][0][s] or 1 << 30, kv[0])):
            if first[s]:
                where = f" ({weight[s]})" if weight[s] else ""
                parts.append(f"{name}: {self.KINDS[kind].split(' (')[0]} from step {first[s]}"
                             f"{where}, {count[s]} of {total[s]} element-steps")
        return "; ".join(parts)


def _group_sums(seg, values, S) -> np.ndarray:
    """[k, N] booleans -> [S] counts per group (scenario)."""
    out = np.zeros(S, int)
    for i in seg.present:
        o, n = seg.offsets[i], seg.sizes[i]
        g = seg.groups[i] if seg.group_count == S else slice(None)
        out[g] += int(np.count_nonzero(values[:, o:o + n]))
    return out


class Segments:
    """Arrays (one per variable) laid end to end, flattened: names, shapes,
    offsets, and the group (scenario) each belongs to.  A shape of None is a
    variable without this array (a slot Keras keeps for some variables only)."""

    def __init__(self, names, shapes, groups=None, group_count=None, labels=None):
        self.names = list(names)
        self._labels = dict(zip(self.names, labels or self.names))
        self.shapes = [None if s is None else tuple(s) if np.ndim(s) else (int(s),)
                       for s in shapes]
        self.sizes = np.asarray([0 if s is None else int(np.prod(s, dtype=int))
                                 for s in self.shapes], dtype=int)
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(int)
        self.groups = np.arange(len(self.names)) if groups is None else np.asarray(groups, int)
        self.group_count = (len(self.names) if group_count is None else group_count)
        self.present = np.flatnonzero(self.sizes > 0)
        # one group per present array, in order, and every group at most once:
        # the per-array maxima are already the per-group maxima
        self._one_per_group = (len(self.present) == self.group_count
                               and np.array_equal(self.groups[self.present],
                                                  np.arange(self.group_count)))

    def with_shapes(self, shapes) -> "Segments":
        """The same variables and groups holding arrays of other shapes."""
        return Segments(self.names, shapes, self.groups, self.group_count,
                        [self._labels[n] for n in self.names])

    def label(self, name: str) -> str:
        """How reports name an array (its weight within the scenario)."""
        return self._labels.get(name, name)

    @property
    def total(self) -> int:
        return int(self.sizes.sum())

    def reduce_max(self, values: np.ndarray) -> np.ndarray:
        """[k, N] -> [k, G] maxima per group (0 for a group without elements)."""
        k = values.shape[0]
        if not len(self.present):
            return np.zeros((k, self.group_count), values.dtype)
        per_array = np.maximum.reduceat(values, self.offsets[self.present], axis=1)
        if self._one_per_group:
            return per_array
        out = np.zeros((k, self.group_count), per_array.dtype)
        for j, g in enumerate(self.groups[self.present]):
            np.maximum(out[:, g], per_array[:, j], out=out[:, g])
        return out

    def argmax(self, values_row: np.ndarray, group: int) -> tuple:
        """(flat index, array name) of the largest value of a group."""
        best, where = -np.inf, (0, "")
        for i in self.present[self.groups[self.present] == group]:
            o, n = self.offsets[i], self.sizes[i]
            j = o + int(np.argmax(values_row[o:o + n]))
            if values_row[j] > best or where == (0, ""):
                best, where = values_row[j], (j, self.names[i])
        return where

    def split(self, flat: np.ndarray) -> list:
        """[k, N] -> one [k, *shape] view per variable (None where it has none)."""
        k = flat.shape[0]
        return [None if shape is None else flat[:, o:o + n].reshape((k,) + shape)
                for o, n, shape in zip(self.offsets, self.sizes, self.shapes)]


def _flat(parts, k, field):
    """Per-variable arrays (a Tracked field: values, bounds or ties) laid end to
    end as [k, N]; None when no part has one (ties)."""
    parts = [p for p in parts if p is not None]
    if not parts:  # a slot no variable has
        return None if field == "tie" else np.zeros((k, 0))
    arrays = [getattr(p, field) for p in parts]
    if all(a is None for a in arrays):
        return None
    flat = [np.broadcast_to(np.zeros((), bool) if a is None else a, np.shape(p.v)).reshape(k, -1)
            for a, p in zip(arrays, parts)]
    return flat[0] if len(flat) == 1 else np.concatenate(flat, axis=1)


def _describe(parts, segments) -> str:
    """A state's layout [(variable index or None, shape)] in words."""
    if parts == [(None, ())]:
        return "one optimizer-wide value"
    names = segments.names if segments is not None else []
    return "{" + ", ".join(f"{names[i] if i is not None and i < len(names) else 'global'}: "
                           f"{shape}" for i, shape in parts) + "}"


class StateLayout:
    """The states of one comparison and how each side lays them out: the rule's and
    Keras's, those only one side has, those Keras keeps in another layout
    (`unmatched`) or, as the subject declares, in part (`partial`); each state's
    variables laid end to end (segments), and the rule's inputs and outputs."""

    def __init__(self, rule, hp, segments: Segments, keras_states):
        # a slot that no variable of this run has (Muon's Adam velocity when every
        # weight is Muon's) is not a state of the run, on either side
        self.specs = {s.name: s for s in rule.states(hp)
                      if not s.per_variable or any(
                          s.shape_for(shape, path) is not None
                          for shape, path in zip(segments.shapes, segments.names))}
        self.ref_states = ["variable"] + list(self.specs)
        self.keras_states = list(keras_states)
        self.names = list(dict.fromkeys(["variable"] + self.keras_states + self.ref_states))
        self.only_keras = [n for n in self.keras_states if n not in self.ref_states]
        self.only_reference = [n for n in self.ref_states
                               if n != "variable" and n not in self.keras_states]
        self.unmatched = {}  # state -> how Keras's layout of it differs from the reference's
        # state -> (which of its elements the subject keeps, the parts it sends): a slot
        # a subject declares it keeps for some variables only, or under another shape
        # (a peer library's factored moments), is compared where it keeps it; the
        # rest continues the reference's own chain and is not compared
        self.partial = {}
        self.segments = segments  # the variables, grouped by scenario
        # each state's arrays laid end to end in the variables' order (None: optimizer-wide)
        self.state_segments = {"variable": segments}
        for name, spec in self.specs.items():
            self.state_segments[name] = segments.with_shapes(
                [spec.shape_for(shape, path) for shape, path in
                 zip(segments.shapes, segments.names)]) if spec.per_variable else None
        # the states as the rule sees them: per variable with its shape, or, for
        # an elementwise rule, all variables as one flat variable (the same numbers)
        if rule.elementwise(hp):
            self.layouts = {n: None if seg is None else Segments([""], [seg.total])
                            for n, seg in self.state_segments.items()}
            self.paths = [""]
        else:
            self.layouts = self.state_segments
            self.paths = segments.names

    def match(self, layout: dict | None, not_kept=()) -> None:
        """Keras's `layout` (state -> [(variable index or None, shape)]) against the
        reference's: a state laid out otherwise is `unmatched`, unless it is `not_kept`
        (see RunComparison.start), then `partial`."""
        for name, parts in (layout or {}).items():
            if name in self.state_segments and name != "variable":
                seg = self.state_segments[name]
                expected = ([(None, ())] if seg is None else
                            [(i, seg.shapes[i]) for i in seg.present])
                got = [(i, tuple(shape)) for i, shape in parts]
                if got != expected:
                    self.unmatched[name] = (f"Keras keeps {name} as {_describe(got, seg)}, "
                                            f"the reference as {_describe(expected, seg)}")
        for name in not_kept:
            seg = self.state_segments.get(name)
            if name == "variable" or seg is None:
                continue
            got = [(i, tuple(shape)) for i, shape in (layout or {}).get(name, [])]
            keep = np.zeros(seg.total, bool)
            for i, shape in got:
                if i is not None and seg.shapes[i] == shape:
                    keep[seg.offsets[i]:seg.offsets[i] + seg.sizes[i]] = True
            self.partial[name] = (keep, got)
            self.unmatched.pop(name, None)

    def reduce(self, name: str, values: np.ndarray) -> np.ndarray:
        """[k, N] errors of a state -> [k, S] maxima per scenario."""
        seg = self.state_segments.get(name)
        if seg is None:  # optimizer-wide: the same value for every scenario
            return np.repeat(values.reshape(len(values), -1)[:, :1], self.segments.group_count,
                             axis=1)
        return seg.reduce_max(values)

    def kept(self, name, values, fill) -> np.ndarray:
        """A partly kept state, [k, N]: the subject's parts of the reference's
        shape, `fill` (the reference's) elsewhere."""
        keep, got = self.partial[name]
        seg = self.state_segments[name]
        out = np.array(fill, dtype=fill.dtype if values is None else values.dtype)
        start = 0
        for i, shape in got:
            n = int(np.prod(shape, dtype=int))
            if i is not None and seg.shapes[i] == shape:
                out[:, seg.offsets[i]:seg.offsets[i] + n] = values[:, start:start + n]
            start += n
        return out

    def inputs(self, ar, flat: dict, g: np.ndarray, k: int):
        """Flat states and gradients -> the rule's per-variable Tracked inputs."""
        state = {}
        for name, value in flat.items():
            layout = self.layouts[name]
            if layout is None:
                state[name] = ar.exact(value.reshape(k))
            else:
                state[name] = [None if v is None else ar.exact(v) for v in layout.split(value)]
        return state, [ar.exact(v) for v in self.layouts["variable"].split(g)]

    def outputs(self, out: dict) -> dict:
        """The rule's states -> {name: list of Tracked parts, in the variables' order}."""
        return {n: out[n] if isinstance(out.get(n), list) else [out.get(n)]
                for n in self.ref_states}


class Lockstep:
    """The comparison that decides the verdict: each step the rule applied to Keras's
    own previous states (a state only the reference has continues its own chain),
    Keras's states against its result.  Keeps per scenario whether every state was
    exact, the first divergence, the first element its bound cannot judge, the
    steps over TOLERANCE and the largest of each error measure."""

    def __init__(self, layout: StateLayout, rule, hp, ar: Arithmetic):
        self.layout, self.rule, self.hp, self.ar = layout, rule, hp, ar
        S = layout.segments.group_count
        self.exact = np.ones(S, bool)
        self.divergence: list = [None] * S
        self.unverified: list = [None] * S  # per scenario: the first element its bound cannot judge
        self.notes: list = [[] for _ in range(S)]  # per scenario: after_last_step's
        self.mismatch_steps = np.zeros(S, int)
        # over all steps so far, per scenario: the largest error of each metric over the states
        self.largest = {m: np.full(S, -np.inf) for m in METRICS}
        self.ties = {}

    def keep(self, states: dict, ref: dict, iteration: int) -> None:
        """The states the next step starts from: Keras's, and the reference's
        for the states only it has."""
        self.prev = {n: v[-1] for n, v in states.items()}
        self.prev_iteration = int(iteration)
        self.last_ref = {n: v[-1] for n, v in ref.items()}

    def apply(self, states, g, t_before):
        """The rule applied to Keras's previous states, k steps at once: its values,
        their bounds, and the states it started from."""
        k = len(t_before)
        before = {}
        for name in self.layout.ref_states:
            if name in states and name not in self.layout.unmatched:
                seq = np.concatenate([self.prev[name][None], states[name][:-1]])
            else:  # a state only the reference has continues its own chain
                seq = np.repeat(self.last_ref[name][None], k, axis=0)
            before[name] = seq
        state, grads = self.layout.inputs(self.ar, before, g, k)
        with ieee():
            out = self.rule(self.ar, self.hp, state, grads, self.ar.step_count(t_before),
                            self.layout.paths)
        parts = self.layout.outputs(out)
        ref = {n: _flat(parts[n], k, "v") for n in self.layout.ref_states}
        bounds = {n: _flat(parts[n], k, "e") for n in self.layout.ref_states}
        self.ties = {n: _flat(parts[n], k, "tie") for n in self.layout.ref_states}
        return ref, bounds, before

    def judge(self, steps, keras, ref, bounds, drift) -> dict:
        """Keras's states of `steps` against the reference's: the per-step table
        {"step": [k], "drift": [k,S], (state, metric): [k,S]}."""
        layout = self.layout
        k, S = len(steps), layout.segments.group_count
        table = {"step": steps, "drift": drift}
        over = np.zeros((k, S), bool)
        scaled_by_state = {}
        elementwise = {}
        for name in layout.names:
            if name in keras and name in ref and name not in layout.unmatched:
                kv, rv = keras[name].reshape(k, -1), ref[name].reshape(k, -1)
                diff, rel, scaled = element_errors(kv, rv, bounds[name],
                                                   self.ties.get(name))
                unknown = np.isnan(scaled)
                if unknown.any():
                    self._unverified(name, steps, kv, rv, unknown)
                    scaled = np.where(unknown, 0.0, scaled)  # the rest is still judged
                # a counter Keras keeps as an integer is exact as its value
                if kv.dtype != rv.dtype and not np.issubdtype(kv.dtype, np.integer):
                    self.exact[:] = False
                self.exact &= ~layout.reduce(name, diff != 0).any(axis=0)
                elementwise[name] = (kv, rv, np.broadcast_to(bounds[name], kv.shape), scaled)
                for metric, values in zip(METRICS, (diff, rel, scaled)):
                    table[(name, metric)] = layout.reduce(name, values)
            else:  # a state that one side does not have at all
                self.exact[:] = False
                for metric in METRICS:
                    table[(name, metric)] = np.full((k, S), np.inf)
            scaled_by_state[name] = table[(name, "scaled")]
            over |= scaled_by_state[name] > TOLERANCE
        for metric in METRICS:
            for name in layout.names:
                self.largest[metric] = np.maximum(self.largest[metric],
                                                  table[(name, metric)].max(axis=0))
        self.mismatch_steps += over.sum(axis=0)
        for s in range(S):
            if self.divergence[s] is not None or not over[:, s].any():
                continue
            j = int(np.argmax(over[:, s]))
            name = max(layout.names,
                       key=lambda n: (scaled_by_state[n][j, s], -layout.names.index(n)))
            weight = ""
            if name in elementwise:
                kv, rv, bv, sc = elementwise[name]
                seg = layout.state_segments.get(name)
                i, weight = (0, "") if seg is None else seg.argmax(sc[j], s)
                detail = (float(kv[j, i]), float(rv[j, i]), float(bv[j, i]))
            else:
                detail = (np.nan, np.nan, np.nan)
            self.divergence[s] = Divergence(int(steps[j]), name, detail[0], detail[1],
                                            abs(detail[0] - detail[1]),
                                            float(scaled_by_state[name][j, s]), detail[2],
                                            layout.segments.label(weight))
        return table

    def _unverified(self, name, steps, kv, rv, unknown):
        """Record, per scenario, the first step and element of state `name` whose
        error bound overflowed while Keras's value differs: the harness cannot
        verify that scenario (its verdict is `error`, unless a mismatch was found)."""
        segments = self.layout.segments
        per = self.layout.reduce(name, unknown.astype(np.int8)).astype(bool)
        seg = self.layout.state_segments.get(name)
        for s in np.flatnonzero(per.any(axis=0)):
            if self.unverified[s] is not None:
                continue
            j = int(np.argmax(per[:, s]))
            i, weight = (0, "") if seg is None else seg.argmax(unknown[j].astype(float), s)
            where = f" ({segments.label(weight)})" if weight else ""
            self.unverified[s] = (
                f"cannot verify {name} at step {int(steps[j])}{where}: its error bound "
                f"overflowed in the reference's {self.ar.dtype.name} arithmetic (Keras "
                f"{float(kv[j, i])!r}, reference {float(rv[j, i])!r})")
            self.notes[s].append(self.unverified[s])  # the row's reason

    def after_last_step(self, step: int, place: int, keras: float, expected: float,
                        why: str) -> None:
        """See RunComparison.after_last_step."""
        segments = self.layout.segments
        s = int(segments.groups[place])
        self.exact[s] = False
        self.notes[s].append(why)
        gap = abs(keras - expected)
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = np.float64(gap) / abs(expected) if gap else 0.0
        for metric, value in zip(METRICS, (gap, np.inf if np.isnan(rel) else rel, np.inf)):
            self.largest[metric][s] = max(self.largest[metric][s], value)
        if self.divergence[s] is None:
            self.divergence[s] = Divergence(step, "variable", keras, expected, gap, np.inf, 0.0,
                                            segments.label(segments.names[place]))

    def verdict(self, s: int) -> str:
        if self.divergence[s] is not None:  # a verified change, whatever else happened
            return "mismatch"
        if self.unverified[s] is not None:
            return "error"
        return "exact" if self.exact[s] else "match"


class FreeRun:
    """The rule on its own from the same start as Keras, step by step: the distance
    of its weights from Keras's per scenario (drift), reported, not judged."""

    def __init__(self, layout: StateLayout, rule, hp, ar: Arithmetic):
        self.layout, self.rule, self.hp, self.ar = layout, rule, hp, ar
        S = layout.segments.group_count
        # over all steps so far, per scenario: the largest and the last drift
        self.drift = np.full(S, -np.inf)
        self.final_drift = np.full(S, np.nan)

    def start(self, ref: dict, dtype) -> np.ndarray:
        """From the rule's initial states; the drift of step 0 (none), [1, S]."""
        self.states = {n: np.asarray(ref[n][-1], dtype=dtype) for n in self.layout.ref_states}
        return self._record(np.zeros((1, self.layout.segments.group_count)))

    def feed(self, states, g, t_before) -> np.ndarray:
        """The drift after each of the k steps of Keras's `states`, [k, S]."""
        layout, segments = self.layout, self.layout.segments
        k = len(t_before)
        drift = np.zeros((k, segments.group_count))
        tiny = np.finfo(np.float64).tiny
        for j in range(k):
            state, grads = layout.inputs(self.ar, {n: v[None] for n, v in self.states.items()},
                                         g[j][None], 1)
            with ieee():
                out = self.rule(self.ar, self.hp, state, grads,
                                self.ar.step_count(np.asarray([t_before[j]])), layout.paths)
            parts = layout.outputs(out)
            self.states = {n: _flat(parts[n], 1, "v")[0] for n in layout.ref_states}
            w_ref = self.states["variable"].astype(np.float64).reshape(1, -1)
            w_keras = states["variable"][j].astype(np.float64).reshape(1, -1)
            # NaN and infinities count as in the verdict: equal where both sides agree
            gap = segments.reduce_max(difference(w_keras, w_ref))[0]
            finite = np.where(np.isfinite(w_ref), np.abs(w_ref), 0.0)
            scale = np.maximum(segments.reduce_max(finite)[0], tiny)
            with np.errstate(invalid="ignore", over="ignore"):
                d = gap / scale
            drift[j] = np.where(np.isnan(d), np.inf, d)
        return self._record(drift)

    def _record(self, drift):
        self.drift = np.maximum(self.drift, drift.max(axis=0))
        self.final_drift = drift[-1].copy()
        return drift


class RunComparison:
    """One family x configuration x backend x dtype x mode, all scenarios.

    Fed chunk by chunk with Keras's states, which go to the lockstep comparison
    (the verdict), the free run (drift) and, in a low dtype, LowPrecision; keeps
    per step and per scenario (the segments' groups) the maxima of each error
    measure over every weight of the scenario, and per scenario the verdict state.
    """

    def __init__(self, family, rule, config, dtype, precision, segments: Segments,
                 gradients: np.ndarray, keras_states):
        self.family = family
        self.rule = rule
        self.hp = rule.hyperparameters(config)
        self.layout = StateLayout(rule, self.hp, segments, keras_states)
        self.run_dtype = dtype  # a dtype or a mixed policy (verify/worker/dtypes.py)
        self.dtype = numpy_dtype(dtypes.variables(dtype))
        self.segments = segments  # the variables, grouped by scenario
        self.gradients = gradients  # [steps, N] float64, the variables laid end to end
        self.ar = Arithmetic(self.dtype, precision, tie_width=2 * TOLERANCE)
        self.lockstep = Lockstep(self.layout, rule, self.hp, self.ar)
        self.free_run = FreeRun(self.layout, rule, self.hp,
                                Arithmetic(self.dtype, precision, track=False))
        # each chunk's per-step table (Lockstep.judge) goes to on_table: kept in
        # `tables`, unless the runner sends it to the report's files as it comes
        # (report.StepFiles)
        self.tables: list = []
        self.on_table = self.tables.append
        self.error = None
        self.low_precision = (LowPrecision(self) if family == "keras"
                              and dtypes.compute(dtype) in dtypes.LOW else None)

    @property
    def divergence(self) -> list:
        """Per scenario: its first Divergence, or None."""
        return self.lockstep.divergence

    @property
    def unverified(self) -> list:
        """Per scenario: the first element its bound cannot judge, or None."""
        return self.lockstep.unverified

    @property
    def notes(self) -> list:
        """Per scenario: what its row's reason says besides the states."""
        return self.lockstep.notes

    # --- feeding ----------------------------------------------------------
    def start(self, initial: dict, iteration: int, layout: dict | None = None,
              not_kept=()) -> None:
        """Step 0: Keras's states before any update against the rule's initial state.

        `layout` is Keras's: state -> [(variable index or None, shape)], for the
        slots Keras keeps; a state whose layout differs from the reference's is
        compared as one that side does not have, unless it is `not_kept` (states
        the subject declares it keeps for some variables only or in another
        shape): then its parts of the reference's shape are compared, the others
        not."""
        w0 = initial["variable"]
        ref, bounds = {"variable": w0}, {"variable": np.zeros(1)}
        for name, spec in self.layout.specs.items():
            seg = self.layout.state_segments[name]
            if spec.copies_variable:
                ref[name], bounds[name] = w0, np.zeros(1)
                continue
            c = (self.ar.cast if spec.initial_via_cast else self.ar.const)(spec.initial)
            shape = (1, 1) if seg is None else (1, seg.total)
            ref[name] = np.broadcast_to(c.v, shape).astype(numpy_dtype(spec.dtype or self.dtype))
            bounds[name] = np.broadcast_to(c.e, shape)
        self.layout.match(layout, not_kept)
        initial = {**initial, **{n: self.layout.kept(n, initial.get(n), ref[n])
                                 for n in self.layout.partial}}
        drift = self.free_run.start(ref, self.dtype)
        self.on_table(self.lockstep.judge(np.array([0]), initial, ref, bounds, drift))
        self.lockstep.keep(initial, ref, iteration)

    def feed(self, start: int, states: dict, iterations: np.ndarray) -> None:
        """States after steps start .. start+k-1 (1-based), [k, N] or [k, 1]."""
        lockstep = self.lockstep
        k = len(iterations)
        g = dtypes.gradients(self.gradients[start - 1:start - 1 + k], self.run_dtype)
        t_before = np.concatenate([[lockstep.prev_iteration], iterations[:-1]])
        states = {**states, **{n: self.layout.kept(n, states.get(n), np.repeat(
            lockstep.last_ref[n][None], k, axis=0)) for n in self.layout.partial}}
        drift = self.free_run.feed(states, g, t_before)
        ref, bounds, before = lockstep.apply(states, g, t_before)
        for name, (keep, _) in self.layout.partial.items():
            states[name][:, ~keep] = ref[name][:, ~keep]
        if self.low_precision is not None:
            self.low_precision.feed(np.arange(start, start + k), states, before,
                                    self.gradients[start - 1:start - 1 + k], t_before)
        self.on_table(lockstep.judge(np.arange(start, start + k), states, ref, bounds, drift))
        lockstep.keep(states, ref, iterations[-1])

    def after_last_step(self, step: int, place: int, keras: float, expected: float,
                        why: str) -> None:
        """What happened to a variable after the last step compared (fit's end): its
        value, `keras`, is not the `expected` one.  A divergence of its scenario in
        `variable` at that step, unless an earlier one is recorded; `why` goes into
        the row's reason."""
        self.lockstep.after_last_step(step, place, keras, expected, why)

    # --- results ------------------------------------------------------------
    def verdict(self, s: int) -> str:
        return "error" if self.error else self.lockstep.verdict(s)

    def summary(self, s: int) -> dict:
        lockstep = self.lockstep
        return {
            "verdict": self.verdict(s),
            "divergence": lockstep.divergence[s],
            "mismatch_steps": int(lockstep.mismatch_steps[s]),
            **{f"max_{m}_error": float(lockstep.largest[m][s]) for m in METRICS},
            "drift": float(self.free_run.drift[s]),
            "final_drift": float(self.free_run.final_drift[s]),
            "low_precision": "" if self.low_precision is None else self.low_precision.describe(s),
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
