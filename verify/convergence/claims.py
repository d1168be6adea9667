"""The article's statements about its loss curves, as measurable criteria.

Every statement that can be read off the article's curves is quoted verbatim in
CLAIMS with a criterion: a measure of one run (one seed on one backend), a
comparison and a value.  The thresholds below were fixed, with their reasons,
before the first full run (see the git history of this file); none is tuned to
the results.  A claim's verdict counts the runs (seed x backend) on which its
criterion holds: all of them "holds", none "does not hold", otherwise "holds on
some seeds".

Epochs are counted from 1: epoch k is Keras's epoch-mean loss of the k-th epoch,
history["loss"][k - 1], the value the article plots.
"""

from __future__ import annotations

import math
import operator

import numpy as np

NEAR_ZERO = 0.05
REBOUND = 0.05
MUCH = 0.5

THRESHOLDS = {
    "near_zero": {
        "value": NEAR_ZERO,
        "why": "The article's curves start near ln 2 = 0.69 (two balanced classes) and are "
               "drawn on a linear axis down to 0; 0.05 is 7% of that span, a curve below it "
               "looks as if it lies on the axis. An epoch-mean cross-entropy of 0.05 means "
               "the geometric-mean probability of the right class is at least 0.95.",
    },
    "around": {
        "value": 0.25,
        "why": "\"around N epochs\" is N +- 25%, [30, 50] for 40: the article tells \"around "
               "40\" (RMSprop) apart from \"by the 20th\" (Adam), so its reading is finer "
               "than 20 epochs; +-10 epochs around 40 is that resolution.",
    },
    "rebound": {
        "value": REBOUND,
        "why": "\"not very stable\" and \"stability issues\" mean the loss climbs back at "
               "least 0.05 above the lowest epoch loss reached before (a bump as tall as "
               "the whole near-zero band, plainly visible on the article's axes); "
               "\"smoothly\" means no such bump.",
    },
    "faster": {
        "value": 1.0,
        "why": "\"faster\", \"speeds up\", \"slower\", \"not as good as\" compare the mean "
               "epoch loss over the epochs both runs cover (the area under the curve per "
               "epoch), paired by seed (same initial weights and batch order) and backend. "
               "It is defined even when a run never gets near zero and rewards getting low "
               "early. A ratio below 1 is faster.",
    },
    "much": {
        "value": MUCH,
        "why": "\"much\" is a factor 2 in that mean loss, both ways: \"much faster\" is a "
               "ratio of at most 0.5; \"the improvement ... is not much\" is a ratio above "
               "0.5 (which also holds when there is no improvement at all).",
    },
}

CLAIMS = [
    {"id": "momentum_speeds_up", "section": "SGD",
     "quote": "You can see that `momentum` speeds up loss convergence",
     "subject": "sgd_momentum", "measure": "mean_loss_ratio", "others": ["sgd"],
     "op": "<", "value": 1.0, "thresholds": ["faster"]},
    {"id": "adagrad_slower_than_sgd", "section": "Adagrad",
     "quote": "From the chart, we can see that Adagrad does not converge losses very quickly, "
              "even slower than the default SGD algorithm",
     "subject": "adagrad", "measure": "mean_loss_ratio", "others": ["sgd"],
     "op": ">", "value": 1.0, "thresholds": ["faster"]},
    {"id": "rmsprop_not_stable", "section": "RMSprop",
     "quote": "although loss convergence isn't very stable",
     "subject": "rmsprop", "measure": "max_rebound",
     "op": ">=", "value": REBOUND, "thresholds": ["rebound"]},
    {"id": "rmsprop_near_zero_around_40", "section": "RMSprop",
     "quote": "it reaches near zero around 40 epochs",
     "subject": "rmsprop", "measure": "epochs_to_near_zero",
     "op": "between", "value": [30, 50], "thresholds": ["near_zero", "around"]},
    {"id": "rmsprop_much_faster", "section": "RMSprop",
     "quote": "much faster than Adagrad and SGD",
     "subject": "rmsprop", "measure": "mean_loss_ratio", "others": ["adagrad", "sgd"],
     "op": "<=", "value": MUCH, "thresholds": ["faster", "much"]},
    {"id": "centered_momentum_faster", "section": "RMSprop",
     "quote": "You can see that using the momentum and centered parameters, RMSprop converges "
              "losses faster",
     "subject": "rmsprop_momentum_centered", "measure": "mean_loss_ratio",
     "others": ["rmsprop"], "op": "<", "value": 1.0, "thresholds": ["faster"]},
    {"id": "centered_momentum_not_stable", "section": "RMSprop",
     "quote": "but still has stability issues",
     "subject": "rmsprop_momentum_centered", "measure": "max_rebound",
     "op": ">=", "value": REBOUND, "thresholds": ["rebound"]},
    {"id": "adam_smooth", "section": "Adam",
     "quote": "the Adam optimizer converges losses very quickly and smoothly",
     "subject": "adam", "measure": "max_rebound",
     "op": "<", "value": REBOUND, "thresholds": ["rebound"]},
    {"id": "adam_near_zero_by_20", "section": "Adam",
     "quote": "reaching near zero by the 20th epoch",
     "subject": "adam", "measure": "epochs_to_near_zero",
     "op": "<=", "value": 20, "thresholds": ["near_zero"]},
    {"id": "nadam_little_improvement", "section": "Nadam",
     "quote": "However, for some simple classification tasks, the improvement from Nadam is "
              "not much.",
     "subject": "nadam", "measure": "mean_loss_ratio", "others": ["adam"],
     "op": ">", "value": MUCH, "thresholds": ["faster", "much"]},
    {"id": "lion_worse_than_adam_family", "section": "Lion",
     "quote": "You can see that the performance of this optimizer isn't as good as the Adam "
              "series",
     "subject": "lion", "measure": "mean_loss_ratio", "others": ["adam", "adamw", "nadam"],
     "op": ">", "value": 1.0, "thresholds": ["faster"]},
]

# Statements about the experiment that its curves cannot decide.
NOT_FROM_CURVES = [
    {"section": "SGD", "quote": "This makes it easy to get stuck in local minima",
     "why": "a general property of SGD the article defers to elsewhere, not read off its "
            "chart"},
    {"section": "SGD (Nesterov)", "quote": "(no statement about the Nesterov curve)",
     "why": "the article shows the curve but says nothing about it"},
    {"section": "AdamW", "quote": "From the source code, it's clear that the AdamW optimizer "
                                  "is actually calling the Adam optimizer",
     "why": "about Keras's source, checked by the formula harness, not by a curve"},
    {"section": "Lion", "quote": "probably the price paid for saving resources",
     "why": "an explanation (memory), not an observation of the curve"},
]

MEASURES = {
    "epochs_to_near_zero": f"first epoch with loss < {NEAR_ZERO} (never: infinite)",
    "max_rebound": "largest rise of the epoch loss above the lowest loss of the earlier epochs",
    "mean_loss_ratio": "mean epoch loss over the epochs both runs cover, subject / other",
}

OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
       "between": lambda x, bounds: bounds[0] <= x <= bounds[1]}


def epochs_to(loss: np.ndarray, threshold: float = NEAR_ZERO) -> float:
    below = np.flatnonzero(np.asarray(loss) < threshold)
    return float(below[0] + 1) if below.size else math.inf


def max_rebound(loss: np.ndarray) -> float:
    loss = np.asarray(loss, dtype=float)
    if loss.size < 2:
        return 0.0
    return float(max(0.0, np.max(loss[1:] - np.minimum.accumulate(loss)[:-1])))


def mean_loss_ratio(loss: np.ndarray, other: np.ndarray) -> float:
    epochs = min(len(loss), len(other))
    return float(np.mean(loss[:epochs]) / np.mean(other[:epochs]))


def describe(claim: dict) -> str:
    """The criterion in words, e.g. 'mean loss ratio vs sgd < 1'."""
    value = claim["value"]
    bound = f"in [{value[0]}, {value[1]}]" if claim["op"] == "between" else f"{claim['op']} {value}"
    if claim["measure"] == "mean_loss_ratio":
        others = ", ".join(claim["others"])
        scope = "each of " if len(claim["others"]) > 1 else ""
        return (f"mean epoch loss of {claim['subject']} / that of {scope}{others} "
                f"(same seed and backend, common epochs) {bound}")
    return f"{claim['subject']}: {MEASURES[claim['measure']]} {bound}"


def _summary(values) -> dict:
    values = np.asarray(list(values), dtype=float)
    finite = values[np.isfinite(values)]
    out = {"runs": int(values.size), "finite": int(finite.size)}
    if values.size:
        out.update(median=_num(np.median(values)), min=_num(values.min()),
                   max=_num(values.max()))
    return out


def _num(x):
    x = float(x)
    return x if math.isfinite(x) else "inf"


def run_values(claim: dict, subject: np.ndarray, others: dict) -> dict:
    """The measured values of one run: {'': value} or {other: ratio}."""
    if claim["measure"] == "mean_loss_ratio":
        return {o: mean_loss_ratio(subject, others[o]) for o in claim["others"]}
    measure = {"epochs_to_near_zero": epochs_to, "max_rebound": max_rebound}[claim["measure"]]
    return {"": measure(subject)}


def holds(claim: dict, values: dict) -> bool:
    return all(OPS[claim["op"]](v, claim["value"]) for v in values.values())


# Loss levels whose epochs-to-reach the report also lists, to show how the
# epoch counts depend on where "near zero" is put (verdicts use NEAR_ZERO only).
LEVELS = (0.1, NEAR_ZERO, 0.01)


def configuration_stats(losses: np.ndarray) -> dict:
    """losses [runs, epochs] of one configuration over seeds (and backends)."""
    return {"epochs_to_near_zero": _summary(epochs_to(row) for row in losses),
            "epochs_to": {str(level): _summary(epochs_to(row, level) for row in losses)
                          for level in LEVELS},
            "final_loss": _summary(losses[:, -1]),
            "max_rebound": _summary(max_rebound(row) for row in losses),
            "epochs": int(losses.shape[1])}


def needed_epochs(claim: dict) -> int:
    """An epoch-count criterion can only be decided by runs at least as long as
    its latest epoch; the other measures are read over whatever the run covers."""
    if claim["measure"] != "epochs_to_near_zero":
        return 1
    value = claim["value"]
    return int(max(value) if isinstance(value, list) else value)


def evaluate(claim: dict, curves: dict) -> dict:
    """curves: backend -> configuration id -> loss [seeds, epochs]."""
    involved = [claim["subject"], *claim.get("others", [])]
    row = {key: claim[key] for key in ("id", "section", "quote", "subject", "measure", "op",
                                       "value")}
    row.update(others=claim.get("others", []), criterion=describe(claim),
               thresholds=claim["thresholds"])
    backends = [b for b in curves if all(c in curves[b] for c in involved)]
    if not backends:
        missing = sorted({c for c in involved for b in curves if c not in curves[b]})
        row.update(verdict="not measured", reason=f"not run: {', '.join(missing)}",
                   runs=0, holding=0, fraction=None, by_backend={}, values={}, stats={})
        return row
    needed = needed_epochs(claim)
    short = [b for b in backends if curves[b][claim["subject"]].shape[1] < needed]
    if short:
        row.update(verdict="not measured", reason=f"needs runs of at least {needed} epochs",
                   runs=0, holding=0, fraction=None, by_backend={}, values={}, stats={})
        return row
    per_key, by_backend, holding, runs = {}, {}, 0, 0
    for b in backends:
        seeds = curves[b][claim["subject"]].shape[0]
        ok = 0
        for s in range(seeds):
            values = run_values(claim, curves[b][claim["subject"]][s],
                                {o: curves[b][o][s] for o in row["others"]})
            for key, v in values.items():
                per_key.setdefault(key, []).append(v)
            ok += holds(claim, values)
        by_backend[b] = {"holding": ok, "runs": seeds}
        holding += ok
        runs += seeds
    fraction = holding / runs
    verdict = ("holds" if holding == runs else "does not hold" if holding == 0
               else "holds on some seeds")
    stats = {c: configuration_stats(np.concatenate([curves[b][c] for b in backends]))
             for c in involved}
    row.update(verdict=verdict, runs=runs, holding=holding, fraction=round(fraction, 4),
               by_backend=by_backend, values={k: _summary(v) for k, v in per_key.items()},
               stats=stats, backends=backends)
    return row


def evaluate_all(curves: dict, claims=CLAIMS) -> list:
    return [evaluate(c, curves) for c in claims]
