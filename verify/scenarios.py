"""Gradient sequences: deterministic, seeded, generated once per run.

Every scenario is an array [steps, size] in float64 plus the initial weights;
runs in float32 receive the same numbers rounded once to float32, on both the
reference and the Keras side.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

DESCRIPTIONS = {
    "gaussian": "independent N(0, 1) entries",
    "tiny": "|g| log-uniform in [1e-8, 1e-6], random signs: epsilon handling dominates",
    "large": "N(0, 1) * 1e3",
    "sparse": "90% of entries exactly 0, and every step with probability 0.1 all zero",
    "constant": "one N(0, 1) vector repeated every step",
    "alternating": "one N(0, 1) vector whose sign flips every step",
    "moons": "recorded: the 415 gradients per step of the article's make_moons MLP trained by "
             "Adam(learning_rate=0.01) with model.fit (seed 0, torch, 100 epochs = 1000 steps); "
             "step t and element i are recorded step t mod 1000 and parameter i mod 415 "
             "(longer sequences and weights repeat it); --seed does not change it",
}
SCENARIOS = tuple(DESCRIPTIONS)
# written by `python -m verify.convergence.record` (see its docstring)
MOONS_FILE = Path(__file__).with_name("data") / "moons_gradients.npz"


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def gradients(name: str, steps: int, size: int, seed: int) -> np.ndarray:
    rng = _rng(seed, name)
    if name == "gaussian":
        return rng.standard_normal((steps, size))
    if name == "tiny":
        magnitude = 10.0 ** rng.uniform(-8, -6, (steps, size))
        return magnitude * rng.choice([-1.0, 1.0], (steps, size))
    if name == "large":
        return 1e3 * rng.standard_normal((steps, size))
    if name == "sparse":
        g = rng.standard_normal((steps, size)) * (rng.random((steps, size)) < 0.1)
        g[rng.random(steps) < 0.1] = 0.0
        return g
    if name == "constant":
        return np.broadcast_to(rng.standard_normal(size), (steps, size)).copy()
    if name == "alternating":
        signs = np.where(np.arange(steps) % 2 == 0, 1.0, -1.0)[:, None]
        return signs * rng.standard_normal(size)
    if name == "moons":
        with np.load(MOONS_FILE) as data:
            recorded = data["gradients"].astype(np.float64)
        return recorded[np.ix_(np.arange(steps) % recorded.shape[0],
                               np.arange(size) % recorded.shape[1])]
    raise KeyError(name)


def initial_weights(size: int, seed: int) -> np.ndarray:
    return _rng(seed, "initial weights").standard_normal(size)


class GradientFileError(ValueError):
    pass


def _header(path):
    """(shape, dtype, data offset) from a .npy header, before any data is read."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        return shape, dtype, f.tell()


def load_gradient_file(path, max_bytes: int) -> np.ndarray:
    """A user's own sequence: a .npy array of finite real numbers, shape [steps, size].

    The header is checked first: a shape that the file's length cannot hold,
    or that needs more than `max_bytes` as float64, is refused before any
    memory is taken; pickled objects are never loaded."""
    try:
        shape, dtype, offset = _header(path)
    except (OSError, ValueError, EOFError) as exc:
        raise GradientFileError(f"cannot read gradient file {path}: {exc}") from None
    if len(shape) != 2 or min(shape, default=0) < 1:
        raise GradientFileError(
            f"gradient file {path} must hold an array of shape [steps, size], got shape {shape}")
    if dtype.kind not in "fiu" or dtype.hasobject:
        raise GradientFileError(f"gradient file {path} holds {dtype}, not real numbers")
    count = int(np.prod(shape, dtype=object))
    if count * 8 > max_bytes:
        raise GradientFileError(f"gradient file {path} claims shape {shape}: more than "
                                f"{max_bytes // 1024 ** 3} GiB as float64")
    actual = os.path.getsize(path) - offset
    if actual != count * dtype.itemsize:
        raise GradientFileError(f"gradient file {path} claims shape {shape} of {dtype} "
                                f"({count * dtype.itemsize} bytes) but holds {actual} bytes")
    try:
        g = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise GradientFileError(f"cannot read gradient file {path}: {exc}") from None
    g = g.astype(np.float64)
    bad = ~np.isfinite(g)
    if bad.any():
        step, i = np.argwhere(bad)[0]
        raise GradientFileError(f"gradient file {path} has {float(g[step, i])} at step {step + 1}, "
                                f"element {i}: gradients must be finite numbers")
    return g


def check_representable(g: np.ndarray, dtypes, path) -> None:
    """Refuse values that rounding to a working dtype would turn into infinity."""
    for dtype in dtypes:
        limit = float(np.finfo(dtype).max)
        with np.errstate(over="ignore"):
            rounded = np.isinf(g.astype(dtype))
        if rounded.any():
            step, i = np.argwhere(rounded)[0]
            raise GradientFileError(
                f"gradient file {path} has {float(g[step, i])!r} at step {step + 1}, element {i}: "
                f"it overflows {dtype} (largest finite {limit:.7g}); leave {dtype} out with "
                "--dtype or scale the gradients")
