"""Optimizer configurations: data, not code (configurations.toml)."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

CONFIG_FILE = Path(__file__).with_name("configurations.toml")


@dataclass(frozen=True)
class Configuration:
    id: str
    class_name: str
    config: dict

    def keras_config(self) -> dict:
        return {"class_name": self.class_name, "config": dict(self.config)}

    def describe(self) -> str:
        return _call(self.class_name, self.config)


def _call(class_name: str, config: dict) -> str:
    """Class(arg=value, ...); a serialized object (a schedule) written the same way."""
    def value(v):
        return _call(v["class_name"], v.get("config", {})) if isinstance(v, dict) else repr(v)
    return f"{class_name}({', '.join(f'{k}={value(v)}' for k, v in config.items())})"


def load(path: Path = CONFIG_FILE) -> dict:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    return {key: Configuration(key, entry["class_name"], dict(entry.get("config", {})))
            for key, entry in data.items()}


CONFIGURATIONS = load()
