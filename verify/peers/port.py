"""`verify-optimizers port`: the peer configuration that reproduces a Keras one, or why
none does; and the Keras configuration that reproduces a peer's.

`port CONFIG --to torch|optax`: every class of the peer library compared with the Keras
class (classes.toml) gives a candidate, the Keras hyperparameters mapped back to its
arguments, once per value of its `search` grid (arguments Keras has no name for, such as
torch NAdam's momentum_decay).  A Keras argument the class has no counterpart for
(clipnorm, use_ema, a schedule, ...) blocks it without a run.  The candidates run as
`peers` runs them (float64, every scenario); one the `keras` family finds exact or match
is a port, proved by that run.  Otherwise the answer names the pieces of Keras's variant
space the closest candidate implements differently and how far apart the weights are
after the run's steps.

`port PEER --from torch|optax`: the Keras configuration with the peer's hyperparameters,
proved (or refused, with the pieces) by the same run.
"""

from __future__ import annotations

import importlib.util
import itertools
import sys

from tabulate import tabulate

import reference
from reference import base
from verify import peers, scenarios
from verify.configurations import CONFIGURATIONS, _call
from verify.peers import run as peer_run

DTYPE = "float64"


def _neutral(key, value) -> bool:
    """A Keras argument at a value that changes nothing (no clipping, no EMA, ...)."""
    return key == "name" or value in (None, False, 0) or (
        key == "ema_momentum") or value == base.DEFAULTS.get(key, object())


def _normal(value):
    """A serialized schedule with every argument (Keras's defaults for the absent)."""
    if not reference.schedules.is_schedule(value):
        return value
    defaults = reference.schedules.DEFAULTS[value["class_name"]]
    return {"class_name": value["class_name"],
            "config": {k: v for k, v in {**defaults, **value.get("config", {})}.items()
                       if k != "name"}}


def wrapper_options(library, hp) -> tuple:
    """({stage: [(wrapper call, Keras arguments it says), ...]}, Keras arguments they
    cover, {wrapper: why not}) for the base-optimizer arguments and the schedule of a
    Keras configuration."""
    stages, covered, blocked = {}, set(), {}
    schedule = _normal(hp["learning_rate"])
    for (lib, name), w in sorted(peers.WRAPPERS.items()):
        if lib != library:
            continue
        if w["stage"] == "schedule" and w["schedule"] == "any":
            if not isinstance(schedule, dict) or "class_name" not in schedule:
                continue
            defaults = reference.schedules.DEFAULTS[schedule["class_name"]]
            args = {"keras": schedule["class_name"], **{
                k: v for k, v in schedule["config"].items()
                if k != "initial_learning_rate" and v != defaults[k]}}
            says = {"learning_rate"}
        elif w["stage"] == "schedule":
            if not isinstance(schedule, dict) or schedule["class_name"] != w["schedule"]:
                continue
            config = schedule["config"]
            stated = {**dict.fromkeys(w["keras"].values()), **w.get("implies", {}),
                      "initial_learning_rate": None}
            apart = [f"{k}={v!r}" for k, v in config.items()
                     if k in w.get("implies", {}) and w["implies"][k] != v or (
                         k not in stated
                         and v != reference.schedules.DEFAULTS[w["schedule"]][k])]
            if apart:
                blocked[name] = f"cannot express {', '.join(apart)}"
                continue
            args = {a: config[t] for a, t in w["keras"].items()}
            says = {"learning_rate"}
        elif w["stage"] == "others":  # beside a class that takes some weights only
            targets = {a: t if isinstance(t, list) else [t] for a, t in w["keras"].items()}
            if any(t not in hp for ts in targets.values() for t in ts):
                continue
            args = {a: [hp[t] for t in ts] if isinstance(w["keras"][a], list) else hp[ts[0]]
                    for a, ts in targets.items()}
            for a, over in w.get("relative", {}).items():  # the wrapper's value: Keras's times
                args[a] = hp[w["keras"][a]] * peers.initial_learning_rate(hp[over])
            says = {t for ts in targets.values() for t in ts}
        else:
            if any(hp.get(k) != v for k, v in w.get("implies", {}).items()):
                continue
            if not w.get("implies") and all(_neutral(t, hp.get(t)) for t in w["keras"].values()):
                continue
            args = {a: hp[t] for a, t in w["keras"].items() if hp.get(t) is not None}
            says = set(w["keras"].values()) | set(w.get("implies", {}))
        covered |= says
        stages.setdefault(w["stage"], []).append((peers._call(name, args), says))
    return stages, covered, blocked


def candidates(library, class_name, config) -> tuple:
    """([PeerConfiguration], {peer class: why it cannot port}) for a Keras configuration."""
    hp = reference.get_rule("keras", class_name).hyperparameters(config)
    found, blocked = [], {}
    for (lib, peer_class), entry in sorted(peers.CLASSES.items()):
        also = entry.get("also", {}).get(class_name)  # another Keras class, where it sets this
        if lib != library or (entry["keras"] != class_name
                              and (also is None or _neutral(also, hp.get(also)))):
            continue
        if any(hp.get(k) != v for k, v in entry.get("implies", {}).items()):
            blocked[peer_class] = "only for " + ", ".join(
                f"{k}={v!r} (here {hp.get(k)!r})" for k, v in entry["implies"].items()
                if hp.get(k) != v)
            continue
        stages, wrapped, why = wrapper_options(library, hp)
        others = stages.pop("others", [])
        if entry.get("others"):  # the optimizer for the weights the class does not take
            stages["others"] = [(call, says) for call, says in others
                                if call.startswith(entry["others"] + "(")]
        else:
            wrapped -= {t for _, says in others for t in says}
        own = {t for target in entry["arguments"].values()
               for t in (target if isinstance(target, list) else [target])} - {"learning_rate"}
        # a stage whose Keras arguments the class itself takes is the class's (AdamW's
        # decay); a schedule is never the class's constant rate
        options = [[call for call, _ in calls] for calls in stages.values()
                   if not all(says <= own for _, says in calls)]
        schedule = hp["learning_rate"]
        if reference.schedules.is_schedule(schedule) and "learning_rate" not in wrapped:
            blocked[peer_class] = (f"no {library} schedule reproduces {schedule['class_name']}"
                                   + "".join(f" ({w}: {r})" for w, r in why.items()))
            continue
        ignored = set(entry.get("ignored", []))
        arguments, covered = {}, set(entry.get("implies", {})) | wrapped | ignored
        for name, target in entry["arguments"].items():
            targets = target if isinstance(target, list) else [target]
            covered |= set(targets)
            values = [peers.initial_learning_rate(hp["learning_rate"]) if t == "learning_rate"
                      else hp[t] for t in targets]
            keras_default = [reference.get_rule("keras", class_name).defaults.get(t)
                             for t in targets]
            if values == [None] and name in entry.get("defaults", {}):
                values = [0.0]  # Keras's None (no decay) is the peer's 0
            if None in values or (values == keras_default and name not in entry.get(
                    "defaults", {}) and name not in entry.get("required", [])):
                continue  # left out: the peer's own absent default means Keras's
            arguments[name] = values if isinstance(target, list) else values[0]
        arguments.update({name: entry["fixed"][name] for name in entry.get("required", [])
                          if name in entry.get("fixed", {})})  # Keras's behaviour, not a default
        loose = [f"{k}={v!r}" for k, v in hp.items() if k not in covered and not _neutral(k, v)]
        if loose:
            blocked[peer_class] = f"no counterpart of {', '.join(loose)}" + "".join(
                f" ({w}: {reason})" for w, reason in why.items())
            continue
        grid = entry.get("search", {})
        for values, wrappers in itertools.product(itertools.product(*grid.values()),
                                                  itertools.product(*options)):
            chosen = {**arguments, **dict(zip(grid, values))}
            text = f"{library}:" + " + ".join([peers._call(peer_class, chosen), *wrappers])
            try:
                candidate = peers.parse(text)
            except peers.PeerError as exc:  # a value the peer refuses
                blocked[text] = str(exc).removeprefix(f"{text!r}: ")
                continue
            theirs = reference.get_rule("keras", class_name).hyperparameters(candidate.config)
            apart = [f"{k}={hp[k]!r}" for k in hp if _normal(theirs.get(k)) != _normal(hp[k])
                     and not (_neutral(k, theirs.get(k)) and _neutral(k, hp[k]))
                     and k not in ignored]
            if apart:  # the candidate would be compared with another Keras configuration
                blocked[candidate.describe()] = f"cannot express {', '.join(apart)}"
                continue
            found.append(candidate)
    return found, blocked


def parted_by(r) -> str:
    """The pieces a candidate implements otherwise, or where it first parts."""
    text = peer_run.pieces_text(r["space"], r["matching"])
    if not r["matching"] and r["first"]:
        text += (f" (first: {r['first']['divergent_state']} at step "
                 f"{int(r['first']['first_divergent_step'])})")
    return text


def answer(results, blocked) -> list:
    """Rows: each candidate's verdict; the port first, else the closest."""
    rows = [[r["configuration"].describe(), r["keras"], peer_run.nonfinite_text(r),
             "" if r["keras"] in ("exact", "match") else parted_by(r),
             f"{r['final_drift']:.2g}"]
            for r in sorted(results, key=lambda r: (r["keras"] not in ("exact", "match"),
                                                    r["final_drift"]))]
    rows += [[f"{name}: not a candidate", "blocked", "", why, ""]
             for name, why in blocked.items()]
    return rows


def build_parser():
    from verify.cli import Parser

    p = Parser(prog="verify-optimizers port",
                description="The peer configuration that reproduces a Keras one, or why "
                            "none does (--to); the Keras configuration of a peer's (--from)")
    p.add_argument("configuration", nargs="*",
                   help="Keras configuration ids (--to; default: every one), or peer "
                        "configuration ids or LIBRARY:Class(...) (--from; default: every one "
                        "of the library)")
    direction = p.add_mutually_exclusive_group(required=True)
    direction.add_argument("--to", choices=sorted(peers.LIBRARIES))
    direction.add_argument("--from", dest="source", choices=sorted(peers.LIBRARIES))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenario", action="append", default=[])
    p.add_argument("--output", default=None, help="also write the answers (markdown) here")
    return p


def _subjects(args, library):
    """[(subject text, [candidates], {peer class: why blocked}, Keras class)]."""
    from verify.selection import UsageError

    out = []
    if args.to:
        ids = args.configuration or list(CONFIGURATIONS)
        for i in ids:
            if i not in CONFIGURATIONS:
                raise UsageError(f"unknown configuration {i!r} (choose from "
                                 f"{', '.join(CONFIGURATIONS)})")
            c = CONFIGURATIONS[i]
            out.append((f"Keras {i}: {c.describe()}",
                        *candidates(library, c.class_name, c.config), c.class_name))
        return out
    known = peers.load()
    chosen = ([known.get(t) or peers.parse(t) for t in args.configuration]
              or [p for p in known.values() if p.library == library])
    for p in chosen:
        if p.library != library:
            raise UsageError(f"{p.describe()} is not a {library} configuration")
        out.append((p.describe(), [p], {}, p.class_name))
    return out


def main(argv) -> int:
    from verify.cli import claim_report_file, one_line
    from verify.selection import UsageError, check_run_size, choices
    from verify.output import replace_file

    args = build_parser().parse_args(argv)
    names = choices(args.scenario, scenarios.SCENARIOS, "scenario") or list(scenarios.SCENARIOS)
    check_run_size(args.steps, args.size, len(names), args.seed)
    library = args.to or args.source
    if importlib.util.find_spec(peer_run.MODULES[library]) is None:
        raise UsageError(f"not installed: {library} (pip install -e '.[peers]')")
    output = claim_report_file(args.output)
    try:
        subjects = _subjects(args, library)
    except peers.PeerError as exc:
        raise UsageError(str(exc)) from None
    unique = list({c.id: c for _, found, _, _ in subjects for c in found}.values())
    by_id = {}
    if unique:
        variants, df, _ = peer_run.run_peers(unique, [DTYPE], names, args.steps, args.size,
                                             args.seed)
        by_id = {r["configuration"].id: r
                 for r in peer_run.analyse(unique, variants, df, [DTYPE])}
    lines, summary = [], []
    for subject, found, blocked, class_name in subjects:
        results = [by_id[c.id] for c in found]
        ported = [r for r in results if r["keras"] in ("exact", "match")]
        if args.source:
            p = found[0]
            keras = "Keras " + _call(p.class_name, p.config)
            r = results[0]
            odd = f" (with NaN and inf: {peer_run.nonfinite_text(r)})" if r["nonfinite"] else ""
            verdict = (f"{keras}: {r['keras']}{odd}" if ported else
                       f"{keras} does not reproduce it: {parted_by(r)}, "
                       f"{r['final_drift']:.2g} apart after {args.steps} steps")
            summary.append([subject, verdict])
            continue
        closest = min(results, key=lambda r: r["final_drift"], default=None)
        verdict = (f"port: {ported[0]['configuration'].describe()} ({ported[0]['keras']}"
                   + (f"; with NaN and inf: {peer_run.nonfinite_text(ported[0])})"
                      if ported[0]["nonfinite"] else ")")
                   if ported else f"no {library} port" + (
                       f": {parted_by(closest)}; closest "
                       f"{closest['configuration'].describe()}, "
                       f"{closest['final_drift']:.2g} apart after {args.steps} steps"
                       if closest else ": " + ("; ".join(f"{k}: {v}" for k, v
                                                         in blocked.items())
                                               or f"no {library} class is compared with "
                                                  f"Keras's {class_name}")))
        summary.append([subject, verdict])
        lines += [f"## {subject}", "", verdict, "",
                  tabulate(answer(results, blocked),
                           headers=[f"{library} candidate", "Keras's math", "with NaN and inf",
                                    "parts by",
                                    f"weights apart after {args.steps} steps"],
                           tablefmt="github", disable_numparse=True), ""]
    direction = f"to {library}" if args.to else f"from {library}"
    print(tabulate(summary, headers=["configuration", f"port {direction}"],
                   disable_numparse=True))
    errors = [e for r in by_id.values() for e in r["errors"]]
    if errors:  # nothing written
        print(one_line(f"verify-optimizers port: error: {errors[0]}"), file=sys.stderr)
        return 2
    if output is not None:
        text = "\n".join([f"# Ports {direction}", "",
                          f"float64, {args.steps} steps, {args.size} elements, scenarios "
                          f"{', '.join(names)}, seed {args.seed}: a port is a {library} "
                          "configuration the `keras` family finds exact or match over the "
                          "scenarios of finite gradients; its verdict with NaN and inf "
                          "(nonfinite) is given beside it (`verify-optimizers port`, "
                          "docs/peers.md).", "",
                          tabulate(summary, headers=["configuration", f"port {direction}"],
                                   tablefmt="github", disable_numparse=True), ""] + lines)
        replace_file(output, text)
        print(f"Report: {output}")
    return 0
