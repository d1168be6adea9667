"""`verify-optimizers`: feed identical gradients to reference rules and to real
Keras optimizers, diff the states step by step, and write the reports.

Exit codes: 0 every `keras`-family comparison is exact or match, or could not run
because Keras itself raises or lacks the class (said on stderr and in the report);
1 a verified change in Keras's math (a `keras`-family mismatch); 2 bad input or a
harness failure (one line on stderr; an internal error's traceback goes to a log file
the line names, or to stderr with --debug); 130/143 interrupted by SIGINT or
SIGTERM.  Only 0 and 1 come with a report.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from verify import own_modules

# The harness's own imports failing (a user's `reference` module first on
# PYTHONPATH, a broken install) is exit 2 in one line, never a traceback (exit 1).
try:
    if (_foreign := own_modules.foreign()) is not None:
        raise ImportError(_foreign)
    from tabulate import tabulate

    import reference
    from verify import api, configurations, scenarios
    from verify.configurations import CONFIGURATIONS
    from verify.output import OutputRefused, check_folder
    from verify.report.tables import pivot
    from verify.runner import Selection
    from verify.selection import (DEFAULT_DTYPES, DEFAULT_SIZE, DEFAULT_STEPS, DTYPES, FORMATS,
                                  FULL_SIZE, FULL_STEPS, KERAS_REFUSES, UsageError,
                                  choices, chosen_backends, installed_backends)
except ImportError as _exc:
    print("".join(c if c.isprintable() else repr(c)[1:-1]
                  for c in f"verify-optimizers: error: cannot import the harness: {_exc}"),
          file=sys.stderr)
    raise SystemExit(2) from None


class Interrupted(BaseException):
    """SIGINT or SIGTERM: unwinds every cleanup on the way out (exit 128 + signal)."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _interrupt(signum, frame):
    # a second signal must not cut short the cleanup this one starts
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


@contextmanager
def interruptible():
    """SIGINT and SIGTERM raise Interrupted in the main thread while the block runs."""
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def add_shard_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shard", metavar="K/N",
                   help="run only the K-th of N deterministic parts of the runs (a run: "
                        "configuration x backend x dtype x mode, with every family and "
                        "scenario); `verify-optimizers merge` joins the N shard reports into "
                        "the report of the whole selection")


def build_parser(shard=True) -> argparse.ArgumentParser:
    p = Parser(prog="verify-optimizers", description=__doc__.split("\n\n")[0],
                formatter_class=argparse.RawDescriptionHelpFormatter,
                epilog="Subcommand: `verify-optimizers list` prints configurations, "
                       "families and scenarios.")
    p.add_argument("--backend", action="append", default=[],
                   help="tensorflow, jax, torch (default: every installed one)")
    p.add_argument("--dtype", action="append", default=[], help=f"{', '.join(DTYPES)} (default {', '.join(DEFAULT_DTYPES)}; "
                        "mixed_*: float32 weights, gradients computed in the low dtype)")
    p.add_argument("--family", action="append", default=[],
                   help=f"{', '.join(reference.FAMILIES)} (default all)")
    p.add_argument("--optimizer", action="append", default=[],
                   help="configuration ids (default all, or none when --config or "
                        "--config-file is given; see `list`)")
    p.add_argument("--config", action="append", default=[], metavar="JSON|FILE.json",
                   help="your own configuration, as keras.optimizers.serialize(optimizer) "
                        "returns it (an optional \"id\" names it), inline or in a file "
                        "holding one or a list; repeatable. Alone it replaces the built-in "
                        "configurations; with --optimizer it joins those")
    p.add_argument("--class", dest="class_spec", metavar="FILE.py:ClassName",
                   help="your own keras.optimizers.Optimizer subclass (or "
                        "package.module:ClassName), its constructor's arguments as one JSON "
                        "object in --config, checked against --rule; runs your code")
    p.add_argument("--rule", metavar="FILE.py",
                   help="with --class: update(step, gradient, weight, slots, "
                        "**hyperparameters) in plain numpy, the family `rule` (docs/rules.md)")
    p.add_argument("--config-file", action="append", default=[], metavar="FILE.toml",
                   help="configurations in verify/configurations.toml's format (the table "
                        "names are the ids); as --config")
    p.add_argument("--scenario", action="append", default=[],
                   help="gradient scenarios (default all; see `list`)")
    p.add_argument("--mode", action="append", default=[],
                   help="eager, compiled, jit, fit, resume (default eager and compiled; "
                        "resume: saved after steps//3 to .keras and after 2*steps//3 to "
                        "weights, each loaded in a fresh process)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps (default {DEFAULT_STEPS}; --full: {FULL_STEPS})")
    p.add_argument("--size", type=int, default=None,
                   help=f"elements per scenario, shared by its weights (default {DEFAULT_SIZE}; "
                        f"--full: {FULL_SIZE})")
    p.add_argument("--full", action="store_true",
                   help=f"the article's scale: --steps {FULL_STEPS} --size {FULL_SIZE} "
                        "(about ten times the default's time)")
    p.add_argument("--seed", type=int, default=0, help="seed of gradients and weights (default 0)")
    p.add_argument("--gradients", metavar="FILE.npy|FILE.npz",
                   help="your own gradient sequence, replacing the scenarios: a .npy of shape "
                        "[steps, size] (one vector weight), or a .npz with one [steps, *shape] "
                        "array per weight, named by its key")
    p.add_argument("--output", default="reports/latest", help="report folder (default %(default)s)")
    p.add_argument("--format", action="append", default=[], help="md, csv, json, html (default all)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true",
                   help="print the traceback of an internal error (default: to a log file)")
    if shard:
        add_shard_flag(p)
    return p


def selection_parser(command: str, description: str, output: str) -> argparse.ArgumentParser:
    """The main command's selection flags, for a subcommand that runs a selection
    (--shard is the main command's and check's only)."""
    p = build_parser(shard=False)
    p.prog = f"verify-optimizers {command}"
    p.description = description
    p.epilog = None
    p.set_defaults(output=output)
    return p


def selection_from_args(args, replace_output=True) -> tuple:
    """The main command's flags -> (api.selection of them, the --output folder
    checked, formats); UsageError for bad input."""
    formats = choices(args.format, FORMATS, "format") or list(FORMATS)
    if getattr(args, "shard", None) is not None and not {"csv", "json"} <= set(formats):
        raise UsageError("a shard report needs the csv and json formats (merge reads them)")
    user = own_class(args) if getattr(args, "class_spec", None) else user_configurations(args)
    known = {**CONFIGURATIONS, **getattr(args, "recorded", {})}
    optimizer_ids = choices(args.optimizer, list(known), "optimizer") or (
        [] if user else list(CONFIGURATIONS))
    try:
        sel = api.selection([known[i] for i in optimizer_ids if i not in {c.id for c in user}]
                            + user, backends=args.backend, dtypes=args.dtype,
                            families=args.family, scenarios=args.scenario, modes=args.mode,
                            steps=args.steps, size=args.size, full=args.full, seed=args.seed,
                            gradients=args.gradients, shard=getattr(args, "shard", None))
    except configurations.ConfigError as exc:
        raise UsageError(str(exc)) from None
    output = claim_output(args.output, [("the gradient file", args.gradients)]
                          + list(getattr(args, "inputs", [])), replace=replace_output)
    return sel, output, formats


def own_class(args) -> list:
    """--class with --rule and --config: the user's class as the one configuration, its
    rule registered as family `rule` (UsageError)."""
    import json

    from verify import user_class

    if not args.rule:
        raise UsageError("--class needs --rule FILE.py, the update your class should compute")
    if len(args.config) > 1 or args.config_file:
        raise UsageError("--class takes its constructor's arguments as one JSON object in "
                         "--config")
    try:
        config = json.loads(args.config[0]) if args.config else {}
    except json.JSONDecodeError as exc:
        raise UsageError(f"--config: not JSON: {exc}") from None
    backends = chosen_backends(args.backend)
    chosen, built = user_class.configuration(args.class_spec, config, backends[0])
    user_class.register_rule(args.rule, chosen, built)
    return [chosen]


def user_configurations(args) -> list:
    """--config and --config-file, checked (UsageError)."""
    try:
        return configurations.user_selection(
            [c for text in args.config for c in configurations.parse_json(text, "--config")]
            + [c for path in args.config_file for c in configurations.parse_toml(path)])
    except configurations.ConfigError as exc:
        raise UsageError(str(exc)) from None


def claim_report_file(value):
    """--output of a subcommand that writes one report file: the path, checked
    (UsageError if the harness may not write it), or None when not given."""
    from verify.output import check_file

    if not value:
        return None
    try:
        return check_file(Path(value))
    except OutputRefused as exc:
        raise UsageError(str(exc)) from None


def claim_output(output, inputs, replace=True) -> Path:
    """--output, checked before any work: UsageError unless the harness may write it."""
    try:
        return check_folder(Path(output), inputs=inputs, replace=replace)
    except OutputRefused as exc:
        raise UsageError(str(exc)) from None
    except (OSError, ValueError) as exc:  # e.g. a NUL byte or a folder we may not read
        raise UsageError(f"--output {output!r} cannot be used: {exc}") from None


class LineProgress:
    """Progress as one line per tenth of the work, for logs that are not a terminal."""

    def __init__(self, total: int, started: float, stream):
        self.total, self.started, self.stream = max(total, 1), started, stream
        self.done, self.printed = 0, 0

    def __call__(self, n: int) -> None:
        self.done += n
        tenth = min(10, self.done * 10 // self.total)
        if tenth > self.printed:
            self.printed = tenth
            print(f"optimizer steps: {self.done}/{self.total} ({10 * tenth}%), "
                  f"{time.perf_counter() - self.started:.0f} s", file=self.stream, flush=True)


@contextmanager
def progress_display(total: int, quiet: bool):
    """A progress callback for the Runner (None when quiet): a bar on a terminal,
    a line per tenth of the work in a log."""
    if quiet:
        yield None
    elif not sys.stderr.isatty():  # a CI log: a plain line at every tenth of the work
        yield LineProgress(total, time.perf_counter(), sys.stderr)
    else:
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)
        from rich.console import Console
        with Progress(TextColumn("optimizer steps"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TimeRemainingColumn(),
                      console=Console(stderr=True)) as bar:
            task = bar.add_task("steps", total=total)
            yield lambda n: bar.advance(task, n)


def run(sel: Selection, output: Path, formats, *, quiet=False, console=None):
    """Run the selection and write the reports to `output` atomically."""
    console = console or sys.stdout
    with progress_display(len(sel.runs()) * len(sel.scenario_groups()) * sel.steps,
                          quiet) as progress:
        df = api.execute(sel, output, formats, progress=progress).rows
    return conclude(df, output, formats, console)


def conclude(df, output, formats, console) -> int:
    """Print a report's verdicts; the main command's exit code for its rows."""
    print(pivot(df), file=console)
    counts = df.groupby(["family", "verdict"]).size()
    print("\n" + ", ".join(f"{fam} {verdict}: {n}" for (fam, verdict), n in counts.items()),
          file=console)
    written = {"md": "summary.md, steps.md", "csv": "summary.csv, steps/", "json": "summary.json",
               "html": "report.html"}
    print(f"Full tables in {output}/: " + "; ".join(written[f] for f in formats), file=console)
    judged = df[df.family.isin(reference.JUDGED)]
    if (judged.verdict == "mismatch").any():
        return 1
    errors = judged[judged.verdict == "error"]
    of_keras = errors.reason.str.startswith(KERAS_REFUSES)
    for what, part, code in (("note", errors[of_keras], 0), ("error", errors[~of_keras], 2)):
        if len(part):
            first = part.iloc[0]
            family = "/".join(sorted(set(part.family), key=reference.JUDGED.index))
            print(one_line(f"verify-optimizers: {what}: {len(part)} {family}-family comparison(s) "
                           f"could not run, e.g. {first['optimizer']} {first['backend']} "
                           f"{first['dtype']} {first['mode']}: {first['reason']} (report in "
                           f"{output})"), file=sys.stderr)
    return 2 if (~of_keras).any() else 0


def list_command(console=None) -> int:
    console = console or sys.stdout
    rows = [(c.id, c.describe()) for c in CONFIGURATIONS.values()]
    print(tabulate(rows, headers=["configuration", "Keras optimizer"]), file=console)
    print("\nfamilies: " + ", ".join(reference.FAMILIES), file=console)
    print("\n" + tabulate(list(scenarios.DESCRIPTIONS.items()), headers=["scenario", "gradients"]),
          file=console)
    print("\nbackends installed: " + (", ".join(installed_backends()) or "none"), file=console)
    return 0


# Subcommands other than the default verification: name -> "module:function".
# Each function takes the remaining argv and returns an exit code; it raises
# UsageError for bad input.
SUBCOMMANDS = {
    "explain": "verify.commands.explain:main",
    "claims": "verify.commands.claims:main",
    "check": "verify.commands.check:main",
    "matrix": "verify.commands.matrix:main",
    "bench": "verify.commands.bench:main",
    "merge": "verify.commands.merge:main",
    "convergence": "verify.convergence.cli:main",
    "peers": "verify.peers.run:main",
    "port": "verify.peers.port:main",
}


def _subcommand(name, argv):
    import importlib

    module, function = SUBCOMMANDS[name].split(":")
    return getattr(importlib.import_module(module), function)(argv)


def _dispatch(argv) -> int:
    if argv[:1] == ["list"]:
        if len(argv) > 1:
            raise UsageError(f"`list` takes no arguments (got {' '.join(argv[1:])})")
        return list_command()
    if argv[:1] and argv[0] in SUBCOMMANDS:
        return _subcommand(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    sel, output, formats = selection_from_args(args)
    return run(sel, output, formats, quiet=args.quiet)


def one_line(text) -> str:
    """A message as one printable line: control characters (a user's path may hold
    a newline or a carriage return) are shown escaped."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _crash_log(text: str) -> Path:
    fd, path = tempfile.mkstemp(prefix="verify-optimizers-crash-", suffix=".log")
    with open(fd, "w") as f:
        f.write(text)
    return Path(path)


def main(argv=None) -> int:
    """Every outcome is an exit code: 0, 1 (a verified change), 2 (one line),
    130/143 (interrupted); never a traceback unless --debug asks for it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    name = "verify-optimizers" + (f" {argv[0]}" if argv[:1] and argv[0] in SUBCOMMANDS else "")
    try:
        with interruptible():
            return _dispatch(argv)
    except (UsageError, OutputRefused) as exc:
        print(one_line(f"verify-optimizers: error: {exc}"), file=sys.stderr)
        return 2
    except Interrupted as exc:
        print(f"{name}: stopped by {signal.Signals(exc.signum).name}; nothing written, an "
              "earlier report is left as it was", file=sys.stderr)
        return 128 + exc.signum
    except OSError as exc:
        print(one_line(f"{name}: error: {exc}"), file=sys.stderr)
        return 2
    except Exception as exc:  # a harness failure: never exit 1, never a bare traceback
        text = traceback.format_exc()
        first = (str(exc).splitlines() or [""])[0]
        if debug:
            print(text, file=sys.stderr, end="")
            where = "traceback above"
        else:
            where = f"traceback in {_crash_log(text)}"
        print(one_line(f"{name}: internal error: {type(exc).__name__}: {first} ({where})"),
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m verify.cli`: run the imported module's main (this __main__ copy has
    # classes of its own, which the modules it calls do not raise)
    from verify.cli import main as module_main
    sys.exit(module_main())
