"""Does `import reference` (or `verify`) reach the harness's own package?

A user's module of the same name earlier on sys.path (PYTHONPATH, the current
folder under `python -m`) would be imported in its place, and the harness would
fail on it with a traceback (issue 30).  This module imports nothing of the
harness, so that verify/cli.py and verify/api.py can ask before they do.

The workers need no such check: they run `python -m` in the harness's folder
with it first on PYTHONPATH (verify/workers.py), so its packages come first.
A user's `verify.py` (a module, not a package) cannot be caught here: the
console script's `from verify.cli import main` fails before any code of ours runs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("reference", "verify")


def _locations(name) -> list:
    """Where `import name` takes (or took) the package from, first first."""
    module = sys.modules.get(name)
    spec = module.__spec__ if module is not None else importlib.util.find_spec(name)
    if spec is None:
        return []
    return [Path(p) for p in (spec.submodule_search_locations or [spec.origin]) if p
            and Path(p).exists()]


def foreign() -> str | None:
    """One line saying which package of the harness would come from elsewhere, from
    where, and what to do; None when both are the harness's own."""
    for name in PACKAGES:
        ours = ROOT / name
        try:
            places = _locations(name)
        except (ImportError, ValueError) as exc:
            return f"the harness's package {name!r} cannot be found: {exc}"
        if not places:
            return f"the harness's package {name!r} cannot be found (reinstall the harness)"
        if places[0].resolve() != ours:
            return (f"the harness's package {name!r} would be imported from "
                    f"{str(places[0])!r}, not from {str(ours)!r}: a module of yours has "
                    f"its name; rename it, or take {str(places[0].parent)!r} off "
                    "PYTHONPATH (and out of the current folder under `python -m`)")
    return None
