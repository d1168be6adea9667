"""Curated causes of rule differences (explanations.toml), looked up by cell."""

from __future__ import annotations

import tomllib
from functools import lru_cache
from pathlib import Path

FILE = Path(__file__).with_name("explanations.toml")


@lru_cache(maxsize=1)
def _causes() -> dict:
    with open(FILE, "rb") as f:
        return {key: entry["cause"] for key, entry in tomllib.load(f).items()}


def cause(family: str, configuration: str, backend: str, dtype: str) -> str | None:
    """The curated cause for this cell: one for this configuration on this
    backend and dtype, else for this configuration, else for the family on
    this backend and dtype (a precision effect), else None."""
    causes = _causes()
    for key in (f"{family}.{configuration}@{backend}-{dtype}",
                f"{family}.{configuration}",
                f"{family}.*@{backend}-{dtype}"):
        if key in causes:
            return causes[key]
    return None
