"""`verify-optimizers claims`: the article's statements about the math,
checked on real Keras (claims.toml holds the statements and their criteria).

Keras is compared with Keras here: the runner's observer records the raw
states of short runs (100 steps, 16 elements, float64) on every backend and
mode, and a named check turns them into a verdict and its evidence.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
from tabulate import tabulate

from verify import scenarios
from verify.configurations import Configuration
from verify.output import replacing_folder

CLAIMS_FILE = Path(__file__).with_name("claims.toml")
STEPS, SIZE, DTYPE = 100, 16, "float64"
MODES = ("eager", "compiled")


def load_claims(path: Path = CLAIMS_FILE) -> list:
    with open(path, "rb") as f:
        return tomllib.load(f)["claim"]


def pause_gradients(steps: int, size: int, seed: int) -> np.ndarray:
    """N(0, 1) for the first half of the run, then exactly zero."""
    g = scenarios.gradients("gaussian", steps, size, seed)
    g[steps // 2:] = 0.0
    return g


class Recorder:
    """Observer keeping every state of every (small) run."""

    def __init__(self):
        self.parts, self.configs = {}, {}

    def __call__(self, run, first_step, states, header):
        key = (run.configuration.id, run.backend, run.dtype, run.mode)
        self.parts.setdefault(key, []).append(states)
        if "keras_config" in header:
            self.configs[key] = header["keras_config"]

    def trajectory(self, key) -> dict:
        parts = self.parts.get(key)
        if not parts:
            return {}
        return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}


# --- checks: (a, b, context) -> (holds, evidence) ---------------------------------
def _per_variable(traj):
    n = traj["variable"].shape[1]
    return [k for k, v in traj.items() if k != "variable" and v.shape[1] == n]


def same_trajectory(a, b, ctx):
    shared = ["variable"] + [k for k in _per_variable(a) if k in b]
    for step in range(len(a["variable"])):
        for name in shared:
            if not np.array_equal(a[name][step], b[name][step]):
                gap = float(np.max(np.abs(a[name][step] - b[name][step])))
                return False, f"first differs at step {step} in {name} (max |a - b| = {gap:.3g})"
    return True, (f"bitwise equal in {', '.join(shared)} at all {len(a['variable']) - 1} steps")


def fewer_slots(a, b, ctx):
    sa, sb = _per_variable(a), _per_variable(b)
    return len(sa) < len(sb), (f"{ctx['a']}: {', '.join(sa) or 'none'} ({len(sa)}); "
                               f"{ctx['b']}: {', '.join(sb) or 'none'} ({len(sb)})")


def effective_step_size_varies(a, b, ctx):
    eps = ctx["config_a"].get("epsilon", 1e-7)
    lr = ctx["config_a"]["learning_rate"]
    last = ctx["steps"] // 2  # the last step with gradients
    sizes = {}
    for t in (1, last):
        dw = np.abs(a["variable"][t] - a["variable"][t - 1])
        m = np.abs(a["momentum"][t])
        ok = m > 0
        sizes[t] = float(np.median(dw[ok] * (np.sqrt(a["velocity"][t][ok]) + eps) / m[ok]))
    holds = abs(sizes[last] - sizes[1]) > 0.01 * lr
    return holds, f"step size {sizes[1]:.4g} at step 1, {sizes[last]:.4g} at step {last} (lr {lr})"


def effective_rate_nonincreasing(a, b, ctx):
    g = ctx["gradients"]
    rates = []
    for t in range(1, len(a["variable"])):
        nz = g[t - 1] != 0
        rate = np.full(g.shape[1], np.nan)
        rate[nz] = np.abs(a["variable"][t][nz] - a["variable"][t - 1][nz]) / np.abs(g[t - 1][nz])
        rates.append(rate)
    rates = np.array(rates)
    worst = 0.0
    for i in range(rates.shape[1]):
        r = rates[:, i][~np.isnan(rates[:, i])]
        if len(r) > 1:
            worst = max(worst, float(np.max(r[1:] / r[:-1])))
    return worst <= 1 + 1e-6, f"largest step-to-step ratio of the rate: {worst:.8f}"


def forgets_old_gradients(a, b, ctx):
    half = ctx["steps"] // 2
    ra = float(np.max(a["velocity"][-1] / a["velocity"][half]))
    rb = float(np.min(b["accumulator"][-1] / b["accumulator"][half]))
    return ra < 0.01 and rb >= 0.99, (
        f"after {ctx['steps'] - half} zero-gradient steps: {ctx['a']} velocity keeps at most "
        f"{ra:.3g} of its value, {ctx['b']} accumulator at least {rb:.3g}")


CHECKS = {f.__name__: f for f in (same_trajectory, fewer_slots, effective_step_size_varies,
                                  effective_rate_nonincreasing, forgets_old_gradients)}


def run_claims(backends, *, seed=0, claims=None):
    from verify import api
    from verify.runner import Selection, distinct

    claims = claims or load_claims()
    configurations = {}
    for claim in claims:
        for side in ("a", "b"):
            if side in claim:
                cid = f"{claim['id']}:{side}"
                configurations[cid] = Configuration(cid, claim[side]["class_name"],
                                                    dict(claim[side]["config"]))
    gradients = pause_gradients(STEPS, SIZE, seed)
    sel = Selection(backends=list(backends), dtypes=[DTYPE], families=[],
                    configurations=list(configurations.values()), scenarios=["pause"],
                    modes=list(MODES), steps=STEPS, size=SIZE, seed=seed,
                    gradients={"pause": gradients}, weights={"vector": (SIZE,)})
    recorder = Recorder()
    environment = api.execute(sel, observer=recorder).environment
    results = []
    for claim in claims:
        outcomes = []
        for backend in backends:
            for mode in (m for m in MODES if distinct(backend, m)):
                key_a = (f"{claim['id']}:a", backend, DTYPE, mode)
                key_b = (f"{claim['id']}:b", backend, DTYPE, mode)
                a, b = recorder.trajectory(key_a), recorder.trajectory(key_b)
                if not a or ("b" in claim and not b):
                    outcomes.append((backend, mode, None, "could not run"))
                    continue
                ctx = {"a": claim["a"]["class_name"], "b": claim.get("b", {}).get("class_name"),
                       "config_a": recorder.configs.get(key_a, claim["a"]["config"]),
                       "gradients": gradients, "steps": STEPS}
                holds, evidence = CHECKS[claim["check"]](a, b, ctx)
                outcomes.append((backend, mode, holds, evidence))
        verdicts = [o[2] for o in outcomes]
        if any(v is None for v in verdicts):
            verdict = "error"
        elif all(verdicts):
            verdict = "holds"
        elif any(verdicts):
            verdict = "holds on some backends"
        else:
            verdict = "does not hold"
        results.append({"id": claim["id"], "quote": claim["quote"], "criterion": claim["holds_if"],
                        "check": claim["check"], "verdict": verdict,
                        "evidence": [{"backend": b, "mode": m, "holds": h, "evidence": e}
                                     for b, m, h, e in outcomes]})
    return results, environment


def markdown(results, backends) -> str:
    how = (f"Real Keras on {', '.join(backends)}, {DTYPE}, eager and compiled, {STEPS} steps "
           f"of {SIZE} elements: N(0, 1) gradients for {STEPS // 2} steps, then zeros.")
    rows = []
    for r in results:
        distinct = list(dict.fromkeys(e["evidence"] for e in r["evidence"]))
        evidence = distinct[0] + ("" if len(distinct) == 1 else
                                  f" (and {len(distinct) - 1} other readings, see claims.json)")
        rows.append([f"\"{r['quote']}\"", r["criterion"], r["verdict"], evidence])
    return "\n".join(["# The article's statements about the math, checked on Keras", "", how, "",
                      tabulate(rows, headers=["statement", "criterion (fixed beforehand)",
                                              "verdict", "evidence"], tablefmt="github"), ""])


def main(argv) -> int:
    from verify.cli import Parser, claim_output
    from verify.selection import chosen_backends

    p = Parser(prog="verify-optimizers claims",
                description="Check the article's statements about the math on real Keras.")
    p.add_argument("--backend", action="append", default=[])
    p.add_argument("--output", default="reports/claims")
    args = p.parse_args(argv)
    backends = chosen_backends(args.backend)
    output = claim_output(args.output, [])
    results, environment = run_claims(backends)
    with replacing_folder(output, "claims") as tmp:
        (tmp / "claims.md").write_text(markdown(results, backends))
        (tmp / "claims.json").write_text(json.dumps(
            {"environment": environment, "claims": results}, indent=1, sort_keys=True) + "\n")
    print(tabulate([(r["id"], r["verdict"]) for r in results], headers=["claim", "verdict"]))
    print(f"Report: {output}/claims.md")
    return 0
