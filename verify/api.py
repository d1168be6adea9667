"""The harness as a function: `run(optimizers, ...)` verifies configurations
(built-in ids, `keras.optimizers.serialize` dicts, or Keras optimizer objects)
and returns a `Result` with the report rows, the per-step tables and the
report writer.  The main command runs through `execute`, as `run` does.

    from verify import api
    result = api.run([{"class_name": "Adam", "config": {"learning_rate": 3e-4}}],
                     backends=["jax"], families=["keras"], steps=50, size=64)
    result.rows[["optimizer", "backend", "verdict"]]
    result.write("reports/mine")

Bad input raises `verify.cli.UsageError` (a ValueError) before anything runs;
`configurations.ConfigError` (also a ValueError) for a bad configuration.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

import reference
from verify import scenarios as scenario_module
from verify.cli import (DEFAULT_MODES, DEFAULT_SIZE, DEFAULT_STEPS, DTYPES, FORMATS, MODES,
                        UsageError, _choices, check_has_runs, check_run_size, chosen_backends, report_order,
                        settings_of, timing_of, write_shard_file)
from verify.configurations import (CONFIGURATIONS, ConfigError, Configuration, from_keras,
                                   user_selection)
from verify.output import check_folder, replacing_folder
from verify.report import Sink
from verify.runner import Runner, Selection


@dataclass
class Result:
    rows: pd.DataFrame   # one row per family x configuration x backend x dtype x mode x scenario
    tables: dict         # (family, optimizer, backend, dtype, mode, scenario) -> per-step table
    settings: dict
    environment: dict
    _sink: Sink = field(repr=False)

    def failures(self, family="keras") -> pd.DataFrame:
        """The family's rows that are not exact or match (mismatch, error, n/a)."""
        rows = self.rows[self.rows.family == family]
        return rows[~rows.verdict.isin(["exact", "match"])]

    def write(self, folder, formats=FORMATS) -> Path:
        """The reports (summary.md/csv/json, steps/, report.html) into `folder`,
        which must be new, empty or an earlier report of the harness."""
        folder = Path(folder)
        check_folder(folder)
        with replacing_folder(folder, "api") as tmp:
            self._sink.replay(tmp, formats, self.environment)
        return folder


def configurations(optimizers) -> list:
    """Configuration ids, serialized dicts or Keras optimizer objects (one, or a
    list) -> Configurations, checked (ConfigError, ValueError)."""
    if isinstance(optimizers, (str, dict)) or hasattr(optimizers, "get_config"):
        optimizers = [optimizers]
    builtin, user = [], []
    for item in optimizers:
        if isinstance(item, str):
            if item not in CONFIGURATIONS:
                raise ConfigError(f"unknown configuration id {item!r} (see "
                                  "`verify-optimizers list`)")
            builtin.append(CONFIGURATIONS[item])
        elif isinstance(item, Configuration):
            user.append(item)
        elif isinstance(item, dict):
            user.append(from_keras(item, "configuration"))
        elif hasattr(item, "get_config"):  # a Keras optimizer: keras is importable here
            import keras
            user.append(from_keras(keras.optimizers.serialize(item), type(item).__name__))
        else:
            raise ConfigError(f"cannot verify {type(item).__name__} {str(item)[:40]!r}: give "
                              "a configuration id, a serialized config dict or a Keras "
                              "optimizer")
    if not builtin + user:
        raise ConfigError("no optimizer to verify")
    return builtin + user_selection(user)


def run(optimizers, *, backends=None, dtypes=None, families=None, scenarios=None, modes=None,
        steps=DEFAULT_STEPS, size=DEFAULT_SIZE, seed=0, output=None,
        formats=FORMATS) -> Result:
    """Verify `optimizers` (see `configurations`) on the selection (None: every
    installed backend, every dtype, family and scenario, the modes eager and
    compiled); with `output` the reports are written there too.  The per-step
    tables are kept in memory."""
    def names(values, allowed, what, default=None):
        values = [values] if isinstance(values, str) else list(values or [])
        return _choices(values, allowed, what) or list(default or allowed)

    for name, value in (("steps", steps), ("size", size), ("seed", seed)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise UsageError(f"{name} must be an integer (got {value!r})")
    chosen_scenarios = names(scenarios, scenario_module.SCENARIOS, "scenario")
    check_run_size(steps, size, len(chosen_scenarios), seed)
    sel = Selection(backends=chosen_backends([backends] if isinstance(backends, str)
                                             else list(backends or [])),
                    dtypes=names(dtypes, DTYPES, "dtype"),
                    families=names(families, reference.FAMILIES, "family"),
                    configurations=configurations(optimizers), scenarios=chosen_scenarios,
                    modes=names(modes, MODES, "mode", DEFAULT_MODES), steps=steps, size=size,
                    seed=seed)
    check_has_runs(sel)
    return execute(sel, output, names(formats, FORMATS, "format"), keep_tables=True)


def execute(sel: Selection, output=None, formats=FORMATS, *, progress=None, finish=None,
            command="run", keep_tables=False) -> Result:
    """Run `sel`; with `output`, write the reports there atomically (`finish(folder)`
    may add files before the folder appears)."""
    settings = settings_of(sel, formats)
    order = report_order(settings)
    if output is None:
        sink = Sink(None, (), settings, order, keep_tables=keep_tables)
        environment = _run(sel, sink, progress)
        rows = sink.frame()
    else:
        with replacing_folder(Path(output), command) as tmp:
            sink = Sink(tmp, formats, settings, order, keep_tables=keep_tables)
            environment = _run(sel, sink, progress)
            rows = sink.write(environment)
            if sel.shard:
                write_shard_file(tmp, sel, settings)
            if finish is not None:
                finish(tmp)
    return Result(rows, sink.tables, settings, environment, sink)


def _run(sel, sink, progress) -> dict:
    """Run the selection into `sink`; the environment block of the report."""
    started, cpu = time.perf_counter(), time.process_time()
    runner = Runner(sel, sink, progress=progress)
    runner.run()
    environment = {"python": sys.version.split()[0], "numpy": np.__version__,
                   "backends": runner.environment["backends"],
                   "pinned": runner.environment["pinned"],
                   "user_settings_not_used": runner.environment["user_settings_not_used"],
                   "wall_seconds": round(time.perf_counter() - started, 1)}
    environment["timing"] = timing_of(runner, time.process_time() - cpu)
    keras_versions = sorted({b["keras"] for b in runner.environment["backends"].values()})
    environment["keras"] = ", ".join(keras_versions)
    return environment


__all__ = ["ConfigError", "Result", "UsageError", "configurations", "execute",
           "run"]
