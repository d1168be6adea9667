"""`verify-optimizers convergence`: the article's make_moons experiment with real
model.fit for every configuration, seed and backend; plots, claims table, HTML report.

Exit codes: 0 report written; 1 a backend worker failed (nothing written);
2 usage or environment error (one line on stderr, nothing written).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import time

import numpy as np
from tabulate import tabulate

from verify.cli import Parser, claim_output, one_line
from verify.configurations import CONFIGURATIONS
from verify.convergence.article import ARTICLE_EPOCHS
from verify.output import replacing_folder
from verify.selection import UsageError, choices, chosen_backends

MAX_EPOCHS, MAX_SEEDS = 100_000, 1000  # beyond these a run would not end or not fit

EXTRA_MODULES = {"sklearn": "scikit-learn", "matplotlib": "matplotlib"}


def build_parser():
    p = Parser(prog="verify-optimizers convergence", description=__doc__.split("\n\n")[0])
    p.add_argument("--optimizer", action="append", default=[],
                   help="configuration ids, repeatable or comma-separated (default all ten)")
    p.add_argument("--epochs", type=int, default=None,
                   help="epochs for every configuration (default the article's: 800 for sgd, "
                        "sgd_momentum, sgd_nesterov, adagrad; 100 for the others)")
    p.add_argument("--seeds", type=int, default=10,
                   help="seeds 0..N-1: initial weights and batch order (default 10)")
    p.add_argument("--backend", action="append", default=[],
                   help="tensorflow, jax, torch (default every installed one)")
    p.add_argument("--output", default="reports/convergence",
                   help="report folder (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def parse(argv):
    args = build_parser().parse_args(argv)
    missing = [pip for module, pip in EXTRA_MODULES.items()
               if importlib.util.find_spec(module) is None]
    if missing:
        raise UsageError(f"the convergence experiment needs {' and '.join(missing)}: "
                         f"pip install 'verify-optimizers[convergence]'")
    backends = chosen_backends(args.backend)
    # the article's experiment: its ten configurations (the stacked seeds also need
    # an elementwise optimizer, which Lamb's per-variable trust ratio is not)
    ids = choices(args.optimizer, list(ARTICLE_EPOCHS), "optimizer") or list(ARTICLE_EPOCHS)
    if args.epochs is not None and not 1 <= args.epochs <= MAX_EPOCHS:
        raise UsageError(f"--epochs must be from 1 to {MAX_EPOCHS} (got {args.epochs})")
    if not 1 <= args.seeds <= MAX_SEEDS:
        raise UsageError(f"--seeds must be from 1 to {MAX_SEEDS} (got {args.seeds})")
    output = claim_output(args.output, [])
    epochs = {i: args.epochs or ARTICLE_EPOCHS[i] for i in ids}
    return {"backends": backends, "optimizers": ids, "epochs": epochs, "seeds": args.seeds,
            "output": output, "quiet": args.quiet}


def _progress_bars(settings):
    """A rich progress bar per configuration (epochs over all backends)."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn)

    bars = Progress(TextColumn("{task.description:<26}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("epochs"), TimeElapsedColumn(), console=Console(stderr=True))
    n = len(settings["backends"])
    tasks = {i: bars.add_task(i, total=settings["epochs"][i] * n) for i in settings["optimizers"]}

    def advance(event):
        if event["event"] == "epoch":
            bars.advance(tasks[event["id"]])
    return bars, advance


def run(settings: dict, *, console=None) -> int:
    from verify.convergence import report, runner

    console = console or sys.stdout
    output = settings["output"]
    with replacing_folder(output, "convergence") as tmp:
        runs = [{"id": i, "keras_config": CONFIGURATIONS[i].keras_config(),
                 "epochs": settings["epochs"][i]} for i in settings["optimizers"]]
        seeds = list(range(settings["seeds"]))
        started = time.perf_counter()
        work = tmp / ".work"
        if settings["quiet"]:
            curves, env = runner.run(settings["backends"], runs, seeds, work)
        else:
            bars, advance = _progress_bars(settings)
            with bars:
                curves, env = runner.run(settings["backends"], runs, seeds, work,
                                         progress=advance)
        shutil.rmtree(work)
        import matplotlib
        import sklearn

        environment = {"python": sys.version.split()[0], "numpy": np.__version__,
                       "scikit-learn": sklearn.__version__,
                       "matplotlib": matplotlib.__version__, **env}
        environment["keras"] = ", ".join(sorted({e["keras"] for e in env["backends"].values()}))
        saved = {"backends": settings["backends"], "optimizers": settings["optimizers"],
                 "epochs": settings["epochs"], "seeds": settings["seeds"],
                 "configurations": {i: CONFIGURATIONS[i].keras_config()
                                    for i in settings["optimizers"]},
                 "configurations_described": {i: CONFIGURATIONS[i].describe()
                                              for i in settings["optimizers"]},
                 "data": "make_moons(n_samples=300, noise=0.1, random_state=42)",
                 "model": "Dense(12, relu), Dense(13, relu), Dense(13, relu), Dense(2, softmax)",
                 "loss": "sparse_categorical_crossentropy", "batch_size": 32}
        environment["wall_seconds"] = round(time.perf_counter() - started, 1)
        rows = report.write(tmp, curves, saved, environment)
    print(tabulate([(r["id"], f"{r['holding']}/{r['runs']}", r["verdict"]) for r in rows],
                   headers=["claim", "runs where it holds", "verdict"]), file=console)
    print(f"\nReport in {output}/: report.html, claims.md, claims.json, PNGs "
          f"({environment['wall_seconds']:.0f} s)", file=console)
    return 0


def main(argv) -> int:
    settings = parse(argv)
    from verify.convergence.runner import WorkerError

    try:
        return run(settings)
    except WorkerError as exc:
        print(one_line(f"verify-optimizers convergence: error: {exc}; nothing written"),
              file=sys.stderr)
        return 2
