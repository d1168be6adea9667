"""Is each committed report under reports/ still what its command would make from
today's code?  Cheaply: nothing runs a backend.  A report is compared by what it
records it was made from (the settings, the configurations and their Keras configs,
the variant spaces' pieces, the peer configurations, the claims and their criteria)
with the same computed from today's code and the command line that regenerates it
(reports/regenerate.py), never by its results; a stale report is named with that
command.

What is not checked: the results themselves (only a run can tell), and
- figures: a PNG records nothing it was made from;
- bench: bench.json records the selection's axes, not its configurations;
- claims: claims.json records each claim's statement, check and criterion, not the
  two configurations it compares;
- baseline: the configurations of its own selection (what `check --update-baseline`
  re-runs), so a configuration added since is not asked for;
- peers: the peer configurations and the Keras configurations ported, not what the
  candidates of a port are.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "reports"


def _regenerate():
    spec = importlib.util.spec_from_file_location("regenerate", REPORTS / "regenerate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REGENERATE = _regenerate()


def _args(report: str, index: int = 0) -> list:
    """The report's index-th command line, without its program."""
    return shlex.split(REGENERATE.REPORTS[report].commands[index])[1:]


def _plain(value):
    """As JSON gives it back: tuples as lists."""
    return json.loads(json.dumps(value))


def _differences(recorded: dict, today: dict, where: str = "") -> list:
    """What differs, named down to a dict's key and a list's items."""
    out = []
    for key in dict.fromkeys([*recorded, *today]):
        there, here, name = _plain(recorded.get(key)), _plain(today.get(key)), f"{where}{key}"
        if there == here:
            continue
        if isinstance(there, dict) and isinstance(here, dict):
            out += _differences(there, here, f"{name}.")
        elif isinstance(there, list) and isinstance(here, list) and all(
                isinstance(x, str) for x in there + here):
            only = [x for x in there if x not in here], [x for x in here if x not in there]
            out.append(f"{name}: {only[0]} there only, {only[1]} today only"
                       if any(only) else f"{name}: the same in another order")
        else:
            out.append(f"{name}: {json.dumps(there)[:80]} there, {json.dumps(here)[:80]} today")
    return out


def _settings(argv: list, previous: dict | None = None) -> dict:
    """settings_of the selection a run command makes today (`check --update-baseline`:
    its unset flags take the previous baseline's values, as it does)."""
    from verify import api, cli
    from verify.commands import bench, check, matrix
    from verify.configurations import CONFIGURATIONS
    from verify.selection import choices, settings_of

    parsers = {"check": check._parser, "matrix": matrix._parser, "bench": bench._parser}
    if argv[0] in parsers:
        args = parsers[argv[0]]().parse_args(argv[1:])
    else:
        args = cli.build_parser().parse_args(argv)
    if argv[0] == "check":
        check._defaults_from(args, previous)
    ids = choices(args.optimizer, list(CONFIGURATIONS), "optimizer")
    sel = api.selection(ids or None, backends=args.backend, dtypes=args.dtype,
                        families=args.family, scenarios=args.scenario, modes=args.mode,
                        steps=args.steps, size=args.size, full=args.full,
                        seed=args.seed if args.seed is not None else 0)
    return _plain(settings_of(sel, ()))


def _tables(text: str) -> list:
    """Every github table of a markdown text as (header cells, [row cells])."""
    tables, rows = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
        elif rows:
            tables.append((rows[0], rows[2:]))
            rows = []
    return tables


def baseline() -> list:
    recorded = json.loads((REPORTS / "baseline" / "baseline.json").read_text())
    from verify.commands.baseline import FORMAT

    today = _settings(_args("baseline"), recorded["settings"])
    return (_differences(recorded["settings"], today)
            + _differences({"format": recorded["format"]}, {"format": FORMAT}))


def bench() -> list:
    recorded = json.loads((REPORTS / "bench" / "bench.json").read_text())["settings"]
    today = _settings(_args("bench"))
    return _differences(recorded, {k: today[k] for k in recorded})


def matrix() -> list:
    recorded = json.loads((REPORTS / "matrix" / "releases.json").read_text())
    argv = _args("matrix")
    releases = argv[argv.index("--keras") + 1].split(",")
    return (_differences(recorded["settings"], _settings(argv))
            + _differences({"releases": sorted(recorded["releases"])},
                           {"releases": sorted(releases)}))


def low_precision() -> list:
    from verify.report.tables import settings_markdown

    def made_from(text):
        settings, configurations = _tables(text[:text.index("## Verdicts")])[:2]
        return {"settings": {row[0]: row[1] for row in settings[1]},
                "configurations": {row[0]: row[1:] for row in configurations[1]}}

    today = "\n".join(settings_markdown(_settings(_args("low_precision")))) + "\n## Verdicts"
    recorded = (REPORTS / "low_precision" / "summary.md").read_text()
    return _differences(made_from(recorded), made_from(today))


def claims() -> list:
    from verify.commands.claims import load_claims

    recorded = json.loads((REPORTS / "claims" / "claims.json").read_text())["claims"]
    fields = ("id", "quote", "check", "criterion")
    return _differences(
        {"claims": [{k: c[k] for k in fields} for c in recorded]},
        {"claims": [{"id": c["id"], "quote": c["quote"], "check": c["check"],
                     "criterion": c["holds_if"]} for c in load_claims()]})


def convergence() -> list:
    from verify.configurations import CONFIGURATIONS
    from verify.convergence import claims as criteria
    from verify.convergence.cli import build_parser
    from verify.convergence.article import ARTICLE_EPOCHS

    recorded = json.loads((REPORTS / "convergence" / "claims.json").read_text())
    args = build_parser().parse_args(_args("convergence")[1:])
    ids = [i for value in args.optimizer for i in value.split(",")] or list(ARTICLE_EPOCHS)
    settings = {"optimizers": ids,
                "epochs": {i: args.epochs or ARTICLE_EPOCHS[i] for i in ids},
                "seeds": args.seeds,
                "configurations": {i: CONFIGURATIONS[i].keras_config() for i in ids},
                "configurations_described": {i: CONFIGURATIONS[i].describe() for i in ids}}
    return (_differences({k: recorded["settings"][k] for k in settings}, settings)
            + _differences({k: recorded[k] for k in ("thresholds", "measures", "not_from_curves")},
                           {"thresholds": criteria.THRESHOLDS, "measures": criteria.MEASURES,
                            "not_from_curves": criteria.NOT_FROM_CURVES})
            + _differences({"claims": [{k: c[k] for k in claim}
                                       for c, claim in zip(recorded["claims"], criteria.CLAIMS)]},
                           {"claims": criteria.CLAIMS}))


def explain() -> list:
    from reference import SPACES
    from verify import scenarios
    from verify.commands.explain import PREFERRED_BACKENDS, build_parser
    from verify.configurations import CONFIGURATIONS

    args = build_parser().parse_args(_args("explain")[1:])
    names = args.scenario or list(scenarios.SCENARIOS)
    text = (REPORTS / "explain.md").read_text()
    sections = dict(re.findall(r"^## (.+?)\n\n(\|.+?)\n\n", text, re.M | re.S))
    recorded = {"settings": text.split("real Keras (", 1)[1].split(")", 1)[0],
                "sections": list(sections)}
    today = {"settings": f"{args.backend or PREFERRED_BACKENDS[0]}, float64, eager, "
                         f"{args.steps} steps, {args.size} elements, scenarios "
                         f"{', '.join(names)}, seed {args.seed}", "sections": []}
    for i in args.optimizer or [i for i, c in CONFIGURATIONS.items() if c.class_name in SPACES]:
        c, heading = CONFIGURATIONS[i], f"{i}: {CONFIGURATIONS[i].describe()}"
        today["sections"].append(heading)
        if heading in sections:  # the points of its table, in order
            space = SPACES[c.class_name]
            (header, rows), = _tables(sections[heading])
            recorded[i] = [dict(zip(header, row[:len(space.pieces)])) for row in rows]
            today[i] = [{p: str(point[p]) for p in space.pieces} for point in space.points()]
    return _differences(recorded, today)


def peers() -> list:
    from verify import peers as peer_library
    from verify import scenarios
    from verify.configurations import CONFIGURATIONS
    from verify.peers.port import build_parser as port_parser
    from verify.peers.run import DTYPES, build_parser as peers_parser

    out = []
    args = peers_parser().parse_args(_args("peers", 0)[1:])
    text = (REPORTS / "peers" / "peers.md").read_text()
    recorded = {row[0]: row[1] for header, rows in _tables(text)
                if header[:2] == ["id", "peer configuration"] for row in rows}
    today = {i: c.describe() for i, c in peer_library.load().items()
             if not args.configuration or i in args.configuration}
    settings = (f"{args.steps} steps, {args.size} elements, scenarios "
                f"{', '.join(args.scenario or scenarios.SCENARIOS)}, seed {args.seed}, "
                f"{' and '.join(args.dtype or DTYPES)}")
    out += [f"peers.md: {d}" for d in _differences(recorded, today)]
    if f"gradient streams ({settings})" not in text:
        out.append(f"peers.md: its settings are not {settings}")
    for index in (1, 2):
        argv = _args("peers", index)
        args = port_parser().parse_args(argv[1:])
        text = (ROOT / argv[argv.index("--output") + 1]).read_text()
        recorded = re.findall(r"^## (.+)$", text, re.M)
        today = [f"Keras {i}: {CONFIGURATIONS[i].describe()}"
                 for i in args.configuration or CONFIGURATIONS]
        out += [f"{argv[-1]}: {d}" for d in _differences({"sections": recorded},
                                                         {"sections": today})]
        settings = (f"float64, {args.steps} steps, {args.size} elements, scenarios "
                    f"{', '.join(args.scenario or scenarios.SCENARIOS)}, seed {args.seed}:")
        if settings not in text:
            out.append(f"{argv[-1]}: its settings are not {settings}")
    return out


CHECKS = {"baseline": baseline, "bench": bench, "claims": claims, "convergence": convergence,
          "explain": explain, "low_precision": low_precision, "matrix": matrix, "peers": peers}
NOT_CHECKED = {"figures"}


def stale() -> dict:
    """Report name -> how it differs from what its command makes today."""
    return {name: found for name, check in CHECKS.items() if (found := check())}


@pytest.fixture(autouse=True)
def every_backend(monkeypatch):
    """The committed reports were made with the three backends installed; a
    selection here names them whether or not this machine has them."""
    from verify import selection
    from verify.commands import check

    for module in (selection, check):
        monkeypatch.setattr(module, "installed_backends", lambda: list(selection.BACKENDS))


def test_every_report_has_a_check_or_says_why_not():
    assert set(CHECKS) | NOT_CHECKED == set(REGENERATE.REPORTS)


def test_committed_reports_are_fresh():
    found = stale()
    assert not found, "\n".join(
        f"reports/{name} is stale ({'; '.join(why)[:400]}): regenerate it with "
        f"`python reports/regenerate.py {name}` ({' && '.join(REGENERATE.REPORTS[name].commands)})"
        for name, why in found.items())


def test_a_changed_configuration_makes_its_reports_stale(monkeypatch):
    from verify import configurations

    adafactor = configurations.CONFIGURATIONS["adafactor"]
    changed = configurations.from_keras(
        {"class_name": "Adafactor", "config": {**adafactor.config, "learning_rate": 0.3}},
        "test", explicit_id="adafactor")
    monkeypatch.setitem(configurations.CONFIGURATIONS, "adafactor", changed)
    assert set(stale()) == {"baseline", "explain", "low_precision", "matrix", "peers"}


def test_a_changed_article_configuration_makes_convergence_stale(monkeypatch):
    from verify import configurations

    adam = configurations.CONFIGURATIONS["adam"]
    changed = configurations.from_keras(
        {"class_name": "Adam", "config": {**adam.config, "learning_rate": 0.02}},
        "test", explicit_id="adam")
    monkeypatch.setitem(configurations.CONFIGURATIONS, "adam", changed)
    assert "convergence" in stale()


def test_a_changed_claim_or_criterion_is_noticed(monkeypatch):
    from verify.commands import claims as math_claims
    from verify.convergence import claims as criteria

    edited = [dict(c) for c in math_claims.load_claims()]
    edited[0]["holds_if"] += " (edited)"
    monkeypatch.setattr(math_claims, "load_claims", lambda: edited)
    monkeypatch.setitem(criteria.THRESHOLDS["near_zero"], "value", 0.04)
    assert {"claims", "convergence"} <= set(stale())


def test_a_changed_tolerance_or_variant_space_is_noticed(monkeypatch):
    from reference import SPACES
    from verify import compare

    with monkeypatch.context() as patch:
        patch.setattr(compare, "TOLERANCE", compare.TOLERANCE * 2)
        assert {"baseline", "low_precision", "matrix"} <= set(stale())
    monkeypatch.setattr(type(SPACES["Adam"]), "points", lambda self: [])
    assert "explain" in stale()


def test_a_changed_peer_configuration_is_noticed(monkeypatch):
    from verify import peers as peer_library

    known = peer_library.load()
    dropped = next(iter(known))
    monkeypatch.setattr(peer_library, "load",
                        lambda: {i: c for i, c in known.items() if i != dropped})
    assert any(dropped in why for why in stale()["peers"])


def test_regenerate_runs_a_reports_commands_in_order(monkeypatch, tmp_path):
    out = tmp_path / "out.txt"
    write = "python -c \"import sys; open(sys.argv[1], 'a').write(sys.argv[2] + ' ')\" " + str(out)
    monkeypatch.setitem(REGENERATE.REPORTS, "test", REGENERATE.Report("0 min", (
        f"{write} {{scratch}}", "verify-optimizers list", "python -c 'raise SystemExit(2)'",
        f"{write} never")))
    assert REGENERATE.main(["test"]) == 2
    scratch, = out.read_text().split()
    assert Path(scratch).name.startswith("regenerate-") and not Path(scratch).exists()
