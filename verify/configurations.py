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
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{self.class_name}({args})"


def load(path: Path = CONFIG_FILE) -> dict:
    with open(path, "rb") as f:
        data = tomllib.load(f)
    return {key: Configuration(key, entry["class_name"], dict(entry.get("config", {})))
            for key, entry in data.items()}


CONFIGURATIONS = load()
