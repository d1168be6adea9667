"""`verify-optimizers explain [OPTIMIZER ...]`: which variant does Keras implement?

Every combination of an optimizer's named pieces (reference/optimizers/) is
compared with real Keras in float64, on one backend, in lockstep over the
chosen scenarios.  The report lists the combinations that reproduce Keras and
the piece(s) separating the paper's rule from them.
"""

from __future__ import annotations

import sys

from tabulate import tabulate

from reference import SPACES, base, name_of, register_variants, schedules
from verify import compare, scenarios
from verify.configurations import CONFIGURATIONS

PREFERRED_BACKENDS = ("jax", "torch", "tensorflow")  # TF rounds hyperparameters in float64


def analyse(space, verdicts: dict, config: dict) -> dict:
    """verdicts: variant name -> worst verdict over the scenarios."""
    textbook = space.paper(config)
    matching = [c for c in space.points() if verdicts[name_of(c)] in ("exact", "match")]

    def distance(c):
        return [p for p in space.pieces if c[p] != textbook[p]]

    nearest = []
    if matching and textbook not in matching:
        fewest = min(len(distance(c)) for c in matching)
        nearest = [c for c in matching if len(distance(c)) == fewest]
    return {"matching": matching, "textbook_matches": textbook in matching,
            "keras_matches": space.keras in matching,
            "separating": [[(p, textbook[p], c[p]) for p in distance(c)] for c in nearest]}


def sentence(opt_id: str, result: dict, config: dict, own: dict) -> str:
    """`own`: the optimizer class's own hyperparameters (its defaults)."""
    if not result["matching"]:
        return f"no combination of the pieces reproduces Keras's {opt_id}"
    around = _around_the_update(config, own)
    if result["textbook_matches"]:
        return "the paper's rule as published" + around
    options = [" and ".join(f"{piece} = {got} (paper: {want})" for piece, want, got in diff)
               for diff in result["separating"]]
    return "the paper's rule with " + "; or ".join(options) + around


def _around_the_update(config: dict, own: dict) -> str:
    """The pieces vary the optimizer's own update; what Keras runs around it (its
    base stages, a schedule) stays Keras's in every combination, so a sentence
    about the paper's rule says so (the textbook family states those stages)."""
    used = sorted(k for k, v in config.items() if k in base.DEFAULTS and k not in own
                  and v not in (None, False, base.DEFAULTS[k]))
    if schedules.is_schedule(config.get("learning_rate")):
        used.append("the learning-rate schedule")
    if not used:
        return ""
    return (f", in its own update ({', '.join(used)} as Keras runs them; the textbook "
            "family's row says where the papers' forms differ)")


def build_parser():
    from verify.cli import Parser

    p = Parser(prog="verify-optimizers explain",
                description="Which combination of named pieces reproduces Keras?")
    p.add_argument("optimizer", nargs="*", help="configuration ids (default: all)")
    p.add_argument("--backend", default=None,
                   help="one backend (default: jax, else torch, else tensorflow)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scenario", action="append", default=[])
    p.add_argument("--output", default=None, help="also write the report (markdown) to this file")
    return p


def run_variants(configurations, backend, names, steps, size, seed):
    """One worker run of every configuration against every point of its space."""
    from verify import api
    from verify.runner import Selection

    variants = {c.id: register_variants(SPACES[c.class_name]) for c in configurations}
    families = list(dict.fromkeys(f for v in variants.values() for f, _ in v))
    sel = Selection(backends=[backend], dtypes=["float64"], families=families,
                    configurations=configurations, scenarios=names, modes=["eager"],
                    steps=steps, size=size, seed=seed)
    return variants, api.execute(sel).rows


def main(argv) -> int:
    from verify.cli import claim_report_file, one_line
    from verify.selection import UsageError, check_run_size, installed_backends
    from verify.selection import choices as chosen
    from verify.output import replace_file

    args = build_parser().parse_args(argv)
    ids = (chosen(args.optimizer, list(CONFIGURATIONS), "optimizer")
           or [i for i, c in CONFIGURATIONS.items() if c.class_name in SPACES])
    unknown = [i for i in ids if CONFIGURATIONS[i].class_name not in SPACES]
    if unknown:
        raise UsageError(f"no variant space for {', '.join(unknown)}")
    installed = installed_backends()
    backend = args.backend or next((b for b in PREFERRED_BACKENDS if b in installed), None)
    if backend not in installed:
        raise UsageError(f"backend not installed: {backend}")
    names = chosen(args.scenario, scenarios.SCENARIOS, "scenario") or list(scenarios.SCENARIOS)
    check_run_size(args.steps, args.size, len(names), args.seed)
    output = claim_report_file(args.output)

    configurations = [CONFIGURATIONS[i] for i in ids]
    variants, df = run_variants(configurations, backend, names, args.steps, args.size,
                                args.seed)
    lines, summary, keras_point_ok = [], [], []
    for c in configurations:
        space = SPACES[c.class_name]
        rows = df[df.optimizer == c.id]
        verdicts, worst_scaled = {}, {}
        for family, choices in variants[c.id]:
            cell = rows[rows.family == family]
            verdicts[name_of(choices)] = compare.worst(cell.verdict)
            worst_scaled[name_of(choices)] = cell.max_scaled_error.max()
        result = analyse(space, verdicts, c.config)
        keras_point_ok.append(result["keras_matches"])
        summary.append((c.id, c.describe(), sentence(c.id, result, c.config, space.defaults)))
        table = [[*(choices[p] for p in space.pieces), verdicts[name_of(choices)],
                  f"{worst_scaled[name_of(choices)]:.3g}",
                  ", ".join(label for label, point in (("paper", space.paper(c.config)),
                                                       ("Keras source", space.keras))
                            if point == choices)]
                 for _, choices in variants[c.id]]
        lines += [f"## {c.id}: {c.describe()}", "",
                  tabulate(table, headers=[*space.pieces, "verdict", "max scaled error",
                                           "stated by"], tablefmt="github",
                           disable_numparse=True),
                  "", f"Keras's {c.id} is {sentence(c.id, result, c.config, space.defaults)}.", ""]
    headers = ["configuration", "Keras optimizer", "Keras computes"]
    text = "\n".join([
        "# Keras 3 vs the papers", "",
        f"Every combination of named pieces, run against real Keras ({backend}, float64, "
        f"eager, {args.steps} steps, {args.size} elements, scenarios {', '.join(names)}, "
        f"seed {args.seed}); a combination reproduces Keras when every scenario is exact or "
        "match.", "", tabulate(summary, headers=headers, tablefmt="github"), ""] + lines)
    print(tabulate(summary, headers=headers))
    if output is not None:
        replace_file(output, text)
        print(f"Report: {output}")
    errors = df[df.verdict == "error"]
    if len(errors):
        first = errors.iloc[0]
        print(one_line(f"verify-optimizers explain: error: {len(errors)} comparison(s) could "
                       f"not run, e.g. {first['optimizer']}: {first['reason']}"), file=sys.stderr)
        return 2
    # 1 when the point stated from Keras's source does not reproduce Keras
    return 0 if all(keras_point_ok) else 1
