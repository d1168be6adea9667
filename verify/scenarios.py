"""Gradient sequences and the weights they update: deterministic, seeded,
generated once per run.

Every scenario updates one set of weights of several ranks at once (WEIGHTS:
Muon and Adafactor branch on rank and path, Lamb takes norms per weight).  A
scenario's gradients are an array [steps, N] in float64, N the elements of
all its weights laid end to end in WEIGHTS' order (flattened, C order), and
every scenario starts from the same initial weights [N]; runs in float32
receive the same numbers rounded once to float32, on both the reference and
the Keras side.
"""

from __future__ import annotations

import os
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np

from reference.arithmetic import finfo, numpy_dtype
from verify.worker.dtypes import compute

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
    "nonfinite": "N(0, 1) entries with, at every step t (from 1) where t mod 25 is 8, NaN in "
                 "element 0 (the scalar weight); 9, +inf in element 1 (the vector's first); "
                 "20, -inf in the last element (the embedding's last); the matrix and the "
                 "kernel stay finite. Run with an optimizer of its own (NaN in one weight "
                 "reaches every weight through a global norm or a loss scale's skip)",
}
SCENARIOS = tuple(DESCRIPTIONS)
# (step within the period, element, value) of the `nonfinite` scenario
NONFINITE_PERIOD = 25
NONFINITE = ((8, 0, np.nan), (9, 1, np.inf), (20, -1, -np.inf))
# scenarios each run in a run (an optimizer) of their own
ISOLATED = ("nonfinite",)

# each about size / 4 elements (but the scalar)
WEIGHTS = {
    "scalar": "a scalar weight",
    "vector": "a bias",
    "matrix": "a tall dense kernel (2r, r): Muon orthogonalizes it (transposed), Adafactor "
              "factors it",
    "kernel": "a 4-D convolution kernel (3, 3, c, 2c)",
    "embedding": "a tall matrix (4d, d) whose path says embedding: Muon gives it to its AdamW "
                 "branch",
}


def weight_shapes(size: int) -> dict:
    """The weights of a scenario for --size: about size / 4 elements each, but
    for the scalar; at least one element along every axis."""
    quarter = max(1, size // 4)

    def side(area):
        return max(1, round((quarter / area) ** 0.5))

    r, c, d = side(2), side(18), side(4)
    return {"scalar": (), "vector": (quarter,), "matrix": (2 * r, r), "kernel": (3, 3, c, 2 * c),
            "embedding": (4 * d, d)}


def element_count(weights: dict) -> int:
    return sum(int(np.prod(shape, dtype=int)) for shape in weights.values())
# written by `python -m verify.convergence.record` (see its docstring)
MOONS_FILE = Path(__file__).with_name("data") / "moons_gradients.npz"


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def gradients(name: str, steps: int, size: int, seed: int) -> np.ndarray:
    """[steps, size]: size is the scenario's element count (all its weights)."""
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
    if name == "nonfinite":
        g = rng.standard_normal((steps, size))
        t = np.arange(1, steps + 1) % NONFINITE_PERIOD
        for step, element, value in NONFINITE:
            g[t == step, element] = value
        return g
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


WEIGHT_NAME = re.compile(r"[A-Za-z0-9_]{1,64}")


def _header(f):
    """(shape, dtype, data offset) from a .npy header, before any data is read."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(f)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return shape, dtype, f.tell()


def _checked_header(path, f, length, max_bytes, where=""):
    """The header of one array, refused unless it is real numbers [steps, ...]
    within `max_bytes` as float64 that the stored bytes can hold."""
    try:
        shape, dtype, offset = _header(f)
    except (OSError, ValueError, EOFError) as exc:
        raise GradientFileError(f"cannot read gradient file {path}{where}: {exc}") from None
    if dtype.kind not in "fiu" or dtype.hasobject:
        raise GradientFileError(f"gradient file {path}{where} holds {dtype}, not real numbers")
    count = int(np.prod(shape, dtype=object))
    if count * 8 > max_bytes:
        raise GradientFileError(f"gradient file {path}{where} claims shape {shape}: more than "
                                f"{max_bytes // 1024 ** 3} GiB as float64")
    actual = length - offset
    if actual != count * dtype.itemsize:
        raise GradientFileError(f"gradient file {path}{where} claims shape {shape} of {dtype} "
                                f"({count * dtype.itemsize} bytes) but holds {actual} bytes")
    return shape, count


def _finite(g: np.ndarray, path, where=""):
    g = g.astype(np.float64)
    bad = ~np.isfinite(g.reshape(len(g), -1))
    if bad.any():
        step, i = np.argwhere(bad)[0]
        raise GradientFileError(
            f"gradient file {path}{where} has {float(g.reshape(len(g), -1)[step, i])} at step "
            f"{step + 1}, element {i}: gradients must be finite numbers")
    return g


def load_gradient_file(path, max_bytes: int) -> tuple:
    """A user's own sequence -> (weights {name: shape}, gradients [steps, N]).

    A .npy array [steps, size] is one vector weight; a .npz archive holds one
    array [steps, *shape] per weight, named by its key (the weight's Keras
    variable name).  Headers are checked first: a shape that the file's length
    cannot hold, or that needs more than `max_bytes` as float64, is refused
    before any memory is taken; pickled objects are never loaded."""
    if str(path).endswith(".npz"):
        return _load_archive(path, max_bytes)
    try:
        with open(path, "rb") as f:
            shape, count = _checked_header(path, f, os.path.getsize(path), max_bytes)
    except OSError as exc:
        raise GradientFileError(f"cannot read gradient file {path}: {exc}") from None
    if len(shape) != 2 or min(shape, default=0) < 1:
        raise GradientFileError(
            f"gradient file {path} must hold an array of shape [steps, size], got shape {shape}")
    try:
        g = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise GradientFileError(f"cannot read gradient file {path}: {exc}") from None
    return {"vector": (shape[1],)}, _finite(g, path)


def _load_archive(path, max_bytes: int) -> tuple:
    try:
        archive = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise GradientFileError(f"cannot read gradient file {path}: {exc}") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if not members:
            raise GradientFileError(f"gradient file {path} holds no arrays")
        shapes, total = {}, 0
        for m in members:
            name = m.filename[:-4] if m.filename.endswith(".npy") else m.filename
            where = f", array {name!r}"
            if not WEIGHT_NAME.fullmatch(name):
                raise GradientFileError(
                    f"gradient file {path}{where}: weight names are letters, digits and "
                    "underscores (they become Keras variable names)")
            try:
                with archive.open(m) as f:
                    shape, count = _checked_header(path, f, m.file_size, max_bytes, where)
            except (OSError, zipfile.BadZipFile) as exc:
                raise GradientFileError(f"cannot read gradient file {path}{where}: "
                                        f"{exc}") from None
            if len(shape) < 1 or min(shape, default=1) < 1:
                raise GradientFileError(f"gradient file {path}{where} must be [steps, *shape] "
                                        f"with every axis at least 1, got shape {shape}")
            steps = next(iter(shapes.values()))[0] if shapes else shape[0]
            if shape[0] != steps:
                raise GradientFileError(f"gradient file {path}{where} has {shape[0]} steps, "
                                        f"the arrays before it {steps}")
            total += count
            if total * 8 > max_bytes:
                raise GradientFileError(f"gradient file {path} needs more than "
                                        f"{max_bytes // 1024 ** 3} GiB as float64")
            shapes[name] = tuple(shape)
        parts = []
        try:
            with np.load(path, allow_pickle=False) as data:
                for name, shape in shapes.items():
                    g = _finite(data[name], path, f", array {name!r}")
                    parts.append(g.reshape(shape[0], -1))
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise GradientFileError(f"cannot read gradient file {path}: {exc}") from None
    weights = {name: shape[1:] for name, shape in shapes.items()}
    return weights, np.concatenate(parts, axis=1)


def check_representable(g: np.ndarray, dtypes, path) -> None:
    """Refuse values that rounding to a working dtype would turn into infinity."""
    for dtype in dtypes:
        limit = float(finfo(compute(dtype)).max)
        with np.errstate(over="ignore"):
            rounded = np.isinf(g.astype(numpy_dtype(compute(dtype))))
        if rounded.any():
            step, i = np.argwhere(rounded.reshape(len(g), -1))[0]
            raise GradientFileError(
                f"gradient file {path} has {float(g[step, i])!r} at step {step + 1}, element {i}: "
                f"it overflows {dtype} (largest finite {limit:.7g}); leave {dtype} out with "
                "--dtype or scale the gradients")
