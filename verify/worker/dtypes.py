"""The dtype axis of a run: the dtype of the weights and optimizer slots, and the
dtype the gradients are computed in.

float32, float64, float16 and bfloat16 are the weights' dtype, the gradients in
the same dtype.  A mixed-precision policy (`keras.mixed_precision`:
"mixed_float16", "mixed_bfloat16") keeps the weights in float32 and computes the
layers in the low dtype; the optimizer then applies float32 gradients to float32
weights, and the only thing of the policy it receives is a gradient computed in
the low dtype: its values are representable there (the layer's cast of the weight
to the compute dtype has the cast back as its gradient).  Nothing in
keras/src/optimizers reads the dtype policy; model.compile wraps the optimizer in a
LossScaleOptimizer under mixed_float16, which is the trainer's doing and is
verified as the configuration `loss_scale_adam`.
"""

from __future__ import annotations

import numpy as np

from reference.arithmetic import numpy_dtype

POLICIES = {"mixed_float16": "float16", "mixed_bfloat16": "bfloat16"}
DTYPES = ("float32", "float64", "float16", "bfloat16", *POLICIES)
DEFAULT = ("float32", "float64")
LOW = ("float16", "bfloat16")  # compute dtypes whose runs report low-precision findings


def variables(name: str) -> str:
    """The weights' and slots' dtype of a run."""
    return "float32" if name in POLICIES else name


def compute(name: str) -> str:
    """The dtype the gradients are computed in."""
    return POLICIES.get(name, name)


def gradients(rows: np.ndarray, name: str) -> np.ndarray:
    """The float64 scenario gradients as the optimizer receives them in a run of
    dtype `name`: rounded once to the compute dtype, held in the weights' dtype."""
    low = np.asarray(rows).astype(numpy_dtype(compute(name)))
    return low.astype(numpy_dtype(variables(name)), copy=False)
