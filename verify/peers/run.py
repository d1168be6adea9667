"""`verify-optimizers peers`: Keras 3 vs PyTorch vs optax under the same gradients.

Each peer configuration (verify/peers/configurations.toml, or --peer) runs in a peer
worker on the scenarios' gradient streams, and its states are compared, in lockstep,
with the `keras` and `textbook` families and with every point of the Keras class's
variant space (reference.SPACES, as `explain` searches it), at the peer's
hyperparameters.  Per optimizer the report tells which named pieces reproduce each
peer, whether Keras's math does (the `keras` point: exact or match means the peer
computes what Keras computes), where they first part, and why (explanations.toml,
citing the peer's source).

The harness's Runner runs the peers unchanged: PeerSelection pairs each peer
configuration with its own library's process, PeerRunner starts the peer worker
in place of Keras's and adds each run's peer spec to the job it writes.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from tabulate import tabulate

from reference import PRECISIONS, SPACES, name_of, register_variants
from verify import compare, peers, processes, scenarios
from verify.runner import Runner, Selection

EXPLANATIONS_FILE = Path(__file__).with_name("explanations.toml")
DTYPES = ("float32", "float64")
MODULES = {"torch": "torch", "optax": "optax"}


@dataclass
class PeerSelection(Selection):
    def runs(self, every=False) -> list:
        """Every run of a peer configuration is on its own library's process."""
        return [r for r in super().runs(every) if r[0].backend == r[1]]


class PeerRunner(Runner):
    def _start_worker(self, backend, x64, job_path, tmp, index, specs):
        job = json.loads(job_path.read_text())
        for spec in job["runs"]:
            spec["peer"] = self.runs[spec["id"]].configuration.peer_spec()
        job_path.write_text(json.dumps(job))
        env = processes.pinned_environment(backend, tmp / f"keras-home-{index}")
        log_path = tmp / f"worker-{index}.log"
        proc, log = processes.start("verify.peers.worker", job_path, log_path, env,
                                  self.sel.python)
        return {"proc": proc, "log": log, "log_path": log_path, "backend": backend,
                "runs": [s["id"] for s in specs]}

    def not_kept(self, run) -> dict:
        return run.configuration.not_kept


def run_peers(configurations, dtypes, names, steps, size, seed):
    """(variants per configuration id, the rows as a DataFrame, environment)."""
    from verify.report.tables import Sink

    variants = {c.id: register_variants(SPACES[c.class_name]) for c in configurations}
    families = list(dict.fromkeys(["keras", "textbook"]
                                  + [f for v in variants.values() for f, _ in v]))
    backends = list(dict.fromkeys(c.backend for c in configurations))
    sel = PeerSelection(backends=backends, dtypes=list(dtypes), families=families,
                        configurations=configurations, scenarios=names, modes=["eager"],
                        steps=steps, size=size, seed=seed)
    tmp = tempfile.mkdtemp(prefix="verify-peers-")
    try:
        order = {"family": families, "optimizer": [c.id for c in configurations],
                 "backend": backends, "dtype": list(dtypes), "mode": ["eager"],
                 "scenario": names}
        sink = Sink(Path(tmp), [], {"steps": steps}, order)
        runner = PeerRunner(sel, sink)
        runner.run()
        df = sink.frame()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return variants, df, runner.environment


def load_explanations(path: Path = EXPLANATIONS_FILE) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def _first(keras):
    first = keras[keras.verdict == "mismatch"].sort_values("first_divergent_step")
    return None if first.empty else first.iloc[0].to_dict()


def analyse(configurations, variants, df, dtypes) -> list:
    """Per configuration and dtype: the Keras point's verdict, the matching variants,
    where the Keras point first parts, over the scenarios of finite gradients; and the
    Keras point's verdict on those with NaN and inf (scenarios.ISOLATED), where a peer
    that computes Keras's math may still part by how it propagates them."""
    out = []
    for c in configurations:
        space = SPACES[c.class_name]
        rows = df[df.optimizer == c.id]
        for dtype in dtypes:
            every = rows[rows.dtype == dtype]
            isolated = every.scenario.isin(scenarios.ISOLATED)
            cell = every[~isolated] if (~isolated).any() else every
            keras = cell[cell.family == "keras"]
            odd = every[isolated & (every.family == "keras")]
            matching = [choices for family, choices in variants[c.id]
                        if compare.worst(cell[cell.family == family].verdict) in
                        ("exact", "match")]
            out.append({
                "configuration": c, "dtype": dtype, "space": space,
                "keras": compare.worst(keras.verdict),
                "textbook": compare.worst(cell[cell.family == "textbook"].verdict),
                "keras_scaled": float(keras.max_scaled_error.max()),
                "drift": float(keras.drift.max()),
                "final_drift": float(keras.final_drift.max()),
                "matching": matching,
                "first": _first(keras),
                "nonfinite": None if odd.empty or cell is every else compare.worst(odd.verdict),
                "nonfinite_first": _first(odd),
                "errors": every[every.verdict == "error"].reason.dropna().unique().tolist(),
            })
    return out


def nonfinite_text(r) -> str:
    """The Keras point's verdict with NaN and inf, and where it first parts."""
    if r["nonfinite"] is None:
        return ""
    first = r["nonfinite_first"]
    return r["nonfinite"] + ("" if first is None else
                             f" (step {int(first['first_divergent_step'])}, "
                             f"{first['divergent_state']})")


def pieces_text(space, matching) -> str:
    """Keras's choices if they reproduce the peer, else the matching combinations
    nearest to them, each written as the pieces where it differs."""
    if not matching:
        return "none of the space"
    if space.keras in matching:
        return "Keras's"
    diffs = [[f"{p}={v}" for p, v in choices.items() if space.keras[p] != v]
             for choices in matching]
    fewest = min(len(d) for d in diffs)
    return "; or ".join(", ".join(d) for d in diffs if len(d) == fewest)


def default_differences(c) -> str:
    """The peer's defaults that differ from Keras's for the same class (None and 0
    both mean no weight decay)."""
    entry = peers.CLASSES[c.library, c.peer_class]
    keras_defaults = SPACES[c.class_name].defaults
    theirs = peers.keras_equivalent(c.library, c.peer_class, {})[1]
    diff = [f"{k} {v!r} (Keras {keras_defaults[k]!r})" for k, v in theirs.items()
            if k in keras_defaults and k not in entry.get("implies", {})
            and v != keras_defaults[k] and (v or keras_defaults[k])]
    diff += [f"{k} {v!r} (Keras: none)" for k, v in entry.get("free", {}).items()]
    return "; ".join(diff) or "same"


def not_compared(c) -> str:
    """The Keras slots the peer keeps for some variables only or in another shape:
    their other parts are not compared (the weights and the kept parts are)."""
    return "; ".join(f"{state}: {reason}" for state, reason in c.not_kept.items())


def why(c, explanations) -> str:
    """The explanations of the peer class and of each of its wrappers."""
    keys = [c.peer_class, *(name for name, _ in c.wrappers)]
    return " ".join(explanations[f"{c.library}.{k}"] for k in keys
                    if f"{c.library}.{k}" in explanations)


def report(results, explanations, settings, environment) -> str:
    by_class = {}
    for r in results:
        by_class.setdefault(r["configuration"].class_name, []).append(r)
    head = ["# Keras 3 vs PyTorch vs optax", "",
             f"Each peer runs on the harness's gradient streams ({settings}) and is compared "
             "in lockstep with the reference families at its own hyperparameters. `Keras's "
             "math` is the `keras` family's verdict on the peer's states over the scenarios "
             "of finite gradients (exact or match: the "
             "peer computes what Keras 3 computes, up to rounding; the `keras` family is "
             "verified against real Keras by the main run). `pieces` are the combinations of "
             "the named pieces of Keras's variant space that reproduce the peer in every "
             "scenario of finite gradients (`explain`'s search), written as where they are not "
             "Keras's choice; `with NaN and inf`: the `keras` family's verdict on the "
             "scenarios with non-finite gradients (nonfinite), apart, as a peer computing "
             "Keras's math may still propagate NaN and inf otherwise. "
             "`not compared`: the parts of Keras's slots the peer does not keep (a factored "
             "moment), each with why; the verdict is from the weights and the parts it keeps. "
             "`weights apart`: the largest distance, over the steps and those scenarios, between "
             "the peer's weights and those of Keras's math run on its own from the same "
             "start, relative to the weights' size. `defaults differ`: the peer's defaults "
             "where they are not Keras's.",
             "", "Peers: " + "; ".join(f"{b}: {v.get('version')}"
                                        for b, v in sorted(environment["backends"].items())),
             "", "Precision settings: " + "; ".join(
                 f"{b}: {PRECISIONS[b].describe()}" for b in sorted(environment["backends"])),
             ""]
    lines, summary = [], []
    for class_name, rs in by_class.items():
        space = rs[0]["space"]
        table = []
        for c in {r["configuration"].id: r["configuration"] for r in rs}.values():
            cells = {r["dtype"]: r for r in rs if r["configuration"] is c}
            verdicts = " / ".join(f"{cells[d]['keras']}" for d in cells)
            pieces = " / ".join(dict.fromkeys(pieces_text(space, cells[d]["matching"])
                                              for d in cells))
            first = next((cells[d]["first"] for d in cells if cells[d]["first"]), None)
            where = ("" if first is None else
                     f"step {int(first['first_divergent_step'])}, {first['divergent_state']}")
            drift = " / ".join(f"{cells[d]['drift']:.2g}" for d in cells)
            odd = " / ".join(nonfinite_text(cells[d]) for d in cells)
            table.append([c.id, c.describe(), verdicts, pieces, where, drift, odd,
                          not_compared(c), default_differences(c), why(c, explanations)])
            summary.append([class_name, c.library, c.id, verdicts, pieces,
                            " / ".join(cells[d]["nonfinite"] or "" for d in cells)])
        lines += [f"## {class_name}", "",
                  f"Keras's point: {name_of(space.keras)}.", "",
                  tabulate(table, headers=["id", "peer configuration",
                                           f"Keras's math ({' / '.join(cells)})", "pieces",
                                           "first parts", "weights apart", "with NaN and inf",
                                           "not compared", "defaults differ", "why"],
                           tablefmt="github", disable_numparse=True), ""]
    return "\n".join(head + [tabulate(summary, headers=[
        "optimizer", "peer", "id", "Keras's math", "pieces", "with NaN and inf"], tablefmt="github",
        disable_numparse=True), ""] + lines)


def build_parser():
    from verify.cli import Parser

    p = Parser(prog="verify-optimizers peers",
                description="Keras 3 vs torch.optim vs optax under the same gradients")
    p.add_argument("configuration", nargs="*",
                   help="peer configuration ids (verify/peers/configurations.toml; default: all)")
    p.add_argument("--peer", action="append", default=[],
                   help="a peer configuration, e.g. 'torch:Adam(lr=0.01, eps=1e-7)'")
    p.add_argument("--dtype", action="append", default=[])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenario", action="append", default=[])
    p.add_argument("--output", default=None, help="also write the report (markdown) here")
    return p


def main(argv) -> int:
    from verify.cli import claim_report_file, one_line
    from verify.selection import UsageError, check_run_size, choices
    from verify.output import replace_file

    args = build_parser().parse_args(argv)
    try:
        known = peers.load()
        chosen = [peers.parse(text) for text in args.peer]
    except peers.PeerError as exc:
        raise UsageError(str(exc)) from None
    ids = choices(args.configuration, list(known), "peer configuration")
    configurations = [known[i] for i in ids] + chosen
    if not configurations:
        configurations = list(known.values())
    if len({c.id for c in configurations}) != len(configurations):
        raise UsageError("a peer configuration is given twice")
    missing = sorted({c.library for c in configurations
                      if importlib.util.find_spec(MODULES[c.library]) is None})
    if missing:
        raise UsageError(f"not installed: {', '.join(missing)} (pip install -e '.[peers]')")
    dtypes = choices(args.dtype, list(DTYPES), "dtype") or list(DTYPES)
    names = choices(args.scenario, scenarios.SCENARIOS, "scenario") or list(scenarios.SCENARIOS)
    check_run_size(args.steps, args.size, len(names), args.seed)
    output = claim_report_file(args.output)
    variants, df, environment = run_peers(configurations, dtypes, names, args.steps,
                                          args.size, args.seed)
    results = analyse(configurations, variants, df, dtypes)
    settings = (f"{args.steps} steps, {args.size} elements, scenarios {', '.join(names)}, "
                f"seed {args.seed}, {' and '.join(dtypes)}")
    text = report(results, load_explanations(), settings, environment)
    print(tabulate([[r["configuration"].id, r["dtype"], r["keras"],
                     pieces_text(r["space"], r["matching"])] for r in results],
                   headers=["peer", "dtype", "Keras's math", "pieces"]))
    errors = [e for r in results for e in r["errors"]]
    if errors:  # nothing written
        print(one_line(f"verify-optimizers peers: error: {errors[0]}"), file=sys.stderr)
        return 2
    if output is not None:
        replace_file(output, text)
        print(f"Report: {output}")
    return 0
