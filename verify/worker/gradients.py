"""The gradients Keras is fed, as both sides of the process boundary compute them:
the worker checks what it applied against them, the runner what it compares."""

from __future__ import annotations

import hashlib

import numpy as np


def gradient_digest(arrays) -> str:
    """The digest of gradients: each step's arrays in the variables' order, one step
    after another, in the working dtype, C order (the runner's rows of the same steps
    hash alike)."""
    digest = hashlib.blake2b(digest_size=8)
    for array in arrays:
        digest.update(array.tobytes())
    return digest.hexdigest()


def scale_factor(config: dict):
    """The `loss_scale_factor` the trainer's `scale_loss` multiplies the loss by
    (a LossScaleOptimizer's own scale is its state, handled by its reference)."""
    return config.get("loss_scale_factor")


def intended(gradients: np.ndarray, config: dict, dtype) -> np.ndarray:
    """The gradient `apply` receives in fit for scenario gradients [steps, N]:
    g * loss_scale_factor in the working dtype (IEEE, as the trainer's product),
    else g itself.  The comparison of a fit run feeds its reference these."""
    factor = scale_factor(config)
    if factor is None:
        return gradients
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(gradients, dtype=dtype) * np.asarray(factor, dtype=dtype)
