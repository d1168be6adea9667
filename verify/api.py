"""The harness as a function: `run(optimizers, ...)` verifies configurations
(built-in ids, `keras.optimizers.serialize` dicts, or Keras optimizer objects)
and returns a `Result` with the report rows, the per-step tables and the
report writer.  `selection` is the one way a selection is built (the main
command's flags are its arguments) and `execute` the one way it is run: the
main command, check, matrix's per-release child, explain and claims all go
through them.

    from verify import api
    result = api.run([{"class_name": "Adam", "config": {"learning_rate": 3e-4}}],
                     backends=["jax"], families=["keras"], steps=50, size=64)
    result.rows[["optimizer", "backend", "verdict"]]
    result.write("reports/mine")

Bad input raises `verify.selection.UsageError` (a ValueError) before anything runs;
`configurations.ConfigError` (also a ValueError) for a bad configuration.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from verify import own_modules

if (_foreign := own_modules.foreign()) is not None:  # before the harness's own imports
    raise ImportError(_foreign)

import numpy as np
import pandas as pd

import reference
from reference.user_rule import FAMILY as USER_FAMILY
from verify import scenarios as scenario_module
from verify.configurations import (CONFIGURATIONS, EXCLUDE, ConfigError, Configuration,
                                   check_magnitudes, from_keras, user_selection)
from verify.output import check_folder, replacing_folder
from verify.report.tables import Sink
from verify.runner import Runner, Selection
from verify.selection import (DEFAULT_DTYPES, DEFAULT_MODES, DEFAULT_SIZE, DEFAULT_STEPS, DTYPES,
                              FORMATS, FULL_SIZE, FULL_STEPS, MAX_GRADIENT_BYTES, MODES,
                              UsageError, check_has_runs, check_run_size, choices,
                              chosen_backends, parse_shard, report_order, settings_of, timing_of,
                              write_shard_file)


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
    """Configuration ids, serialized dicts, Keras optimizer objects or
    Configurations (one, or a list) -> Configurations in the order given, checked
    (ConfigError, ValueError)."""
    if isinstance(optimizers, (str, dict, Configuration)) or hasattr(optimizers, "get_config"):
        optimizers = [optimizers]
    chosen, user = [], []
    for item in optimizers:
        if isinstance(item, str):
            if item not in CONFIGURATIONS:
                raise ConfigError(f"unknown configuration id {item!r} (see "
                                  "`verify-optimizers list`)")
            chosen.append(CONFIGURATIONS[item])
            continue
        if isinstance(item, Configuration) and item.source is not None:
            c = item  # a user's own class, checked by building it (verify/user_class.py)
        elif isinstance(item, Configuration):  # one not built in is checked as a dict would be
            c = item if CONFIGURATIONS.get(item.id) == item else from_keras(
                item.keras_config(), f"configuration {item.id!r}", explicit_id=item.id)
        elif isinstance(item, dict):
            c = from_keras(item, "configuration")
        elif hasattr(item, "get_config"):  # a Keras optimizer: keras is importable here
            c = from_keras(_serialized(item), type(item).__name__)
        else:
            raise ConfigError(f"cannot verify {type(item).__name__} {str(item)[:40]!r}: give "
                              "a configuration id, a serialized config dict or a Keras "
                              "optimizer")
        chosen.append(c)
        if CONFIGURATIONS.get(c.id) != c:
            user.append(c)
    if not chosen:
        raise ConfigError("no optimizer to verify")
    user_selection(user)
    return chosen


def _serialized(optimizer) -> dict:
    """keras.optimizers.serialize(optimizer), with the exclusion from weight decay
    that serialization drops (a method call, not in get_config): the pattern
    BaseOptimizer.exclude_from_weight_decay compiled from var_names."""
    import keras

    serialized = keras.optimizers.serialize(optimizer)
    if getattr(optimizer, "_exclude_from_weight_decay", None):
        raise ConfigError(f"{type(optimizer).__name__}: exclude_from_weight_decay(var_list=...) "
                          "names variables of your model, which the harness does not have; "
                          "give var_names instead")
    pattern = getattr(optimizer, "_exclude_from_weight_decay_pattern", None)
    if pattern is not None:
        serialized[EXCLUDE] = {"var_names": [pattern.pattern]}
    return serialized


def _names(values, allowed, what, default=None) -> list:
    """A name or names (each may be comma-separated), checked; none: `default`, else
    all of `allowed`."""
    values = [values] if isinstance(values, str) else list(values or [])
    return choices(values, allowed, what) or list(default or allowed)


def selection(optimizers=None, *, backends=None, dtypes=None, families=None, scenarios=None,
              modes=None, steps=None, size=None, full=False, seed=0, gradients=None,
              shard=None) -> Selection:
    """The selection to verify, checked (UsageError, ConfigError): the main
    command's flags are these arguments, so this is the one place a selection is
    built.  `optimizers` as for `configurations` (None: every built-in one); the
    lists take a name or names, None meaning all (backends: every installed one);
    `steps` and `size` default to the default run's (`full`: the article's);
    `gradients` a .npy or .npz file replacing the scenarios; `shard` "K/N"."""
    for name, value in (("steps", steps), ("size", size), ("seed", seed)):
        if (value is not None or name == "seed") and (not isinstance(value, int)
                                                      or isinstance(value, bool)):
            raise UsageError(f"{name} must be an integer (got {value!r})")
    chosen_dtypes = _names(dtypes, DTYPES, "dtype", DEFAULT_DTYPES)
    if full and (steps is not None or size is not None or gradients):
        raise UsageError("--full sets --steps and --size; give either --full or those")
    weights, arrays = None, None
    if gradients:
        if scenarios:
            raise UsageError("--gradients replaces the scenarios; do not combine it with "
                             "--scenario")
        try:
            weights, g = scenario_module.load_gradient_file(gradients,
                                                            max_bytes=MAX_GRADIENT_BYTES)
            scenario_module.check_representable(g, chosen_dtypes, gradients)
        except scenario_module.GradientFileError as exc:
            raise UsageError(str(exc)) from None
        for flag, value, actual in (("--steps", steps, g.shape[0]), ("--size", size, g.shape[1])):
            if value is not None and value != actual:
                raise UsageError(f"{flag} {value} disagrees with the gradient file "
                                 f"({g.shape[0]} steps of {g.shape[1]} elements)")
        (steps, size), names, arrays = g.shape, ["file"], {"file": g}
    else:
        names = _names(scenarios, scenario_module.SCENARIOS, "scenario")
        steps = steps if steps is not None else FULL_STEPS if full else DEFAULT_STEPS
        size = size if size is not None else FULL_SIZE if full else DEFAULT_SIZE
    check_run_size(steps, size, len(names), seed)
    part = parse_shard(shard)
    chosen = configurations(list(CONFIGURATIONS) if optimizers is None else optimizers)
    # a user's own class is judged by its rule (verify/user_class.py)
    own = [c for c in chosen if c.source is not None]
    known_families = reference.FAMILIES + ((USER_FAMILY,) if own else ())
    sel = Selection(backends=chosen_backends([backends] if isinstance(backends, str)
                                             else list(backends or [])),
                    dtypes=chosen_dtypes,
                    families=_names(families, known_families, "family",
                                    [USER_FAMILY] if len(own) == len(chosen) else None),
                    configurations=chosen,
                    scenarios=names, modes=_names(modes, MODES, "mode", DEFAULT_MODES),
                    steps=steps, size=size, seed=seed, gradients=arrays, weights=weights,
                    shard=part)
    check_magnitudes(sel.configurations, sel.dtypes, sel.backends)
    check_has_runs(sel)
    if part is not None and part[1] > len(sel.runs(every=True)):
        raise UsageError(f"--shard {shard}: the selection has only {len(sel.runs(every=True))} "
                         "runs (configuration x backend x dtype x mode) to share out")
    return sel


def run(optimizers, *, backends=None, dtypes=None, families=None, scenarios=None, modes=None,
        steps=DEFAULT_STEPS, size=DEFAULT_SIZE, seed=0, output=None,
        formats=FORMATS) -> Result:
    """Verify `optimizers` (see `configurations`) on the selection (None: every
    installed backend, every dtype, family and scenario, the modes eager and
    compiled); with `output` the reports are written there too.  The per-step
    tables are kept in memory."""
    sel = selection(optimizers, backends=backends, dtypes=dtypes, families=families,
                    scenarios=scenarios, modes=modes, steps=steps, size=size, seed=seed)
    return execute(sel, output, _names(formats, FORMATS, "format"), keep_tables=True)


def execute(sel: Selection, output=None, formats=FORMATS, *, progress=None, finish=None,
            command="run", keep_tables=False, observer=None) -> Result:
    """Run `sel` (`observer` as the Runner's: it sees Keras's raw states); with
    `output`, write the reports there atomically (`finish(folder, result)` may add
    files before the folder appears)."""
    settings = settings_of(sel, formats)
    order = report_order(settings)
    if output is None:
        sink = Sink(None, (), settings, order, keep_tables=keep_tables)
        environment = _run(sel, sink, progress, observer)
        return Result(sink.frame(), sink.tables, settings, environment, sink)
    with replacing_folder(Path(output), command) as tmp:
        sink = Sink(tmp, formats, settings, order, keep_tables=keep_tables)
        environment = _run(sel, sink, progress, observer)
        result = Result(sink.write(environment), sink.tables, settings, environment, sink)
        if sel.shard:
            write_shard_file(tmp, sel, settings)
        if finish is not None:
            finish(tmp, result)
    return result


def _run(sel, sink, progress, observer) -> dict:
    """Run the selection into `sink`; the environment block of the report."""
    started, cpu = time.perf_counter(), time.process_time()
    runner = Runner(sel, sink, progress=progress, observer=observer)
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
           "run", "selection"]
