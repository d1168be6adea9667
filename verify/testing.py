"""A pytest helper for your own test suite: Keras must compute what the
reference states for your optimizer configuration, step by step.

    from verify.testing import assert_matches_keras_reference

    def test_our_optimizer():
        assert_matches_keras_reference(
            {"class_name": "Adam", "config": {"learning_rate": 3e-4, "beta_2": 0.98,
                                              "clipnorm": 1.0, "weight_decay": 0.05}},
            backends=["jax"], steps=50)
"""

from __future__ import annotations

import math

from verify import api, compare

SHOWN = 10  # failing cells spelled out in the message


def _number(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.17g}"


def describe(row) -> str:
    """One failing keras-family cell, as the assertion message states it."""
    cell = f"{row.optimizer} {row.backend} {row['dtype']} {row['mode']} {row.scenario}"
    if row.verdict != "mismatch":
        return f"{cell}: could not be verified: {row.reason}"
    weight = f" of weight {row.divergent_weight}" if isinstance(row.divergent_weight, str) else ""
    return (f"{cell}: mismatch at step {int(row.first_divergent_step)} in "
            f"{row.divergent_state}{weight}: Keras {_number(row.keras_value)}, reference "
            f"{_number(row.reference_value)} (rounding bound {row.error_bound:.3g}); largest "
            f"scaled error {row.max_scaled_error:.3g} > {compare.TOLERANCE:g}")


def assert_matches_keras_reference(optimizer, *, backends=None, dtypes=None, modes=None,
                                   scenarios=None, steps=30, size=64, seed=0) -> api.Result:
    """Run `optimizer` (a `keras.optimizers.serialize` dict, a Keras optimizer, or a
    configuration id) through Keras and the reference's `keras` family on every
    installed backend (or `backends`), dtype, mode and scenario; AssertionError
    naming each cell that is not exact or match (its first divergent step, state,
    weight and values, or why it could not run).  A configuration the reference
    cannot take (an unknown class or argument) raises ValueError before any run.
    Returns the api.Result for further checks."""
    result = api.run(optimizer, backends=backends, dtypes=dtypes, families=["keras"],
                     scenarios=scenarios, modes=modes, steps=steps, size=size, seed=seed)
    bad = result.failures("keras")
    if len(bad):
        lines = [describe(row) for _, row in bad.head(SHOWN).iterrows()]
        more = [f"... and {len(bad) - SHOWN} more"] if len(bad) > SHOWN else []
        raise AssertionError(f"{len(bad)} of {len(result.rows)} keras-family comparisons "
                             "are not exact or match:\n" + "\n".join(lines + more))
    return result
