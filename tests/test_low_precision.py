"""float16, bfloat16 and the mixed policies (verify/worker/dtypes.py).

Transport: every bfloat16 and float16 bit pattern crosses the worker protocol
unchanged.  The reference: the error scale is the dtype's; the keras rule against
its own stream is exact in both low dtypes (specificity), a rule that keeps
beta_2 out of the dtype (a kernel computing with float32 constants) mismatches
Adam in bfloat16 (sensitivity).  Findings: Adam in bfloat16 (beta_2 = 0.999
rounds to 1.0, the step size is 0, the weights never move) is found by comparison
with float64, and a float32 run reports none.  Real Keras on one backend: the keras
family exact or match in float16, bfloat16 and mixed_bfloat16, the perturbed rule
mismatching, the finding in the row.
"""

import io
from dataclasses import replace
from functools import partial

import numpy as np
import pytest

import reference
from conftest import fast_backend, make_selection, run_selection
from reference import PRECISIONS, Arithmetic
from reference.arithmetic import Tracked, finfo, numpy_dtype
from reference.optimizers import loss_scale
from reference.rule import REGISTRY
from test_compare import S, judge, stream
from verify import compare
from verify.configurations import CONFIGURATIONS, Configuration
from verify.worker import dtypes
from verify.worker.messages import read_message, write_message

ADAM = ("Adam", {"learning_rate": 0.01})
UNROUNDED = "adam-in-float32"
KERAS_ADAM = reference.get_rule("keras", "Adam")


def _in_float32(ar, hp, s, g, t, paths):
    """Keras's Adam computed in float32 from the low-precision states, each result
    rounded once to the dtype (a kernel computing in float32 throughout): beta_2 is
    never rounded to the dtype."""
    f32 = Arithmetic("float32", ar.precision, track=ar.track, tie_width=ar.tie_width)
    up = lambda x: Tracked(x.v.astype(np.float32), x.e, f32, x.tie)
    out = KERAS_ADAM.step(f32, hp, {n: [up(x) for x in v] if isinstance(v, list) else up(v)
                                    for n, v in s.items()}, [up(x) for x in g], up(t), paths)

    def down(x):
        z = x.v.astype(ar.dtype)
        e = None if x.e is None else x.e + ar.u * np.abs(z.astype(np.float64))
        return Tracked(z, e, ar, x.tie)
    return {n: [down(x) for x in v] if isinstance(v, list) else down(v) for n, v in out.items()}


REGISTRY[(UNROUNDED, "Adam")] = replace(KERAS_ADAM, family=UNROUNDED, step=_in_float32)


@pytest.mark.parametrize("name", ["bfloat16", "float16"])
def test_every_bit_pattern_crosses_the_protocol_unchanged(name):
    bits = np.arange(1 << 16, dtype=np.uint16)
    values = bits.view(numpy_dtype(name))
    buf = io.BytesIO()
    write_message(buf, {"type": "chunk"}, {"a": values.reshape(256, 256)})
    buf.seek(0)
    _, arrays = read_message(buf)
    assert arrays["a"].dtype == numpy_dtype(name)
    assert np.array_equal(arrays["a"].view(np.uint16).ravel(), bits)


def test_mixed_policies_give_float32_gradients_representable_in_the_compute_dtype():
    rows = np.random.default_rng(0).standard_normal((3, 50))
    for policy, low in dtypes.POLICIES.items():
        g = dtypes.gradients(rows, policy)
        assert g.dtype == np.float32 and dtypes.variables(policy) == "float32"
        assert np.array_equal(g, g.astype(numpy_dtype(low)).astype(np.float32))
        assert not np.array_equal(g, rows.astype(np.float32))
    assert dtypes.gradients(rows, "bfloat16").dtype == numpy_dtype("bfloat16")


def test_the_error_scale_is_the_dtypes_unit_roundoff():
    for name, bits in (("float16", 11), ("bfloat16", 8), ("float32", 24)):
        ar = Arithmetic(name, PRECISIONS["jax"])
        assert ar.u == 2.0 ** -bits == float(finfo(name).eps) / 2
        assert ar.smallest_normal == float(finfo(name).smallest_normal)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("config", [ADAM, ("SGD", {"learning_rate": 0.01, "momentum": 0.9}),
                                    ("RMSprop", {"learning_rate": 0.01})])
def test_the_keras_rule_against_its_own_stream_is_exact(dtype, config):
    g, history = stream(*config, steps=12, dtype=dtype)
    c = judge(*config, g, history, dtype=dtype)
    assert [c.verdict(s) for s in range(S)] == ["exact"] * S


def test_a_beta_2_kept_out_of_bfloat16_mismatches_at_the_first_step():
    # Adam's first step moves each weight by about lr; in bfloat16 a step is beyond
    # rounding only where it exceeds the tolerance, 16 ulps of the weight (2**-7 |w|
    # each): lr = 0.1 moves the weights of |w| below about 0.8 beyond it
    adam = ("Adam", {"learning_rate": 0.1})
    g, history = stream(*adam, steps=12, dtype="bfloat16")
    try:
        REGISTRY[("keras", "Adam")] = REGISTRY[(UNROUNDED, "Adam")]
        c = judge(*adam, g, history, dtype="bfloat16")
    finally:
        REGISTRY[("keras", "Adam")] = KERAS_ADAM
    assert [c.verdict(s) for s in range(S)] == ["mismatch"] * S
    assert c.divergence[0].step == 1 and c.divergence[0].state == "variable"


def test_adam_in_bfloat16_is_a_finding_derived_from_float64():
    g, history = stream(*ADAM, steps=12, dtype="bfloat16")
    weights = [h["variable"] for h in history]
    assert all(np.array_equal(w, weights[0]) for w in weights)  # they never move
    text = judge(*ADAM, g, history, dtype="bfloat16").summary(0)["low_precision"]
    assert text.startswith("beta_2=0.999 rounds to 1 in bfloat16; variable: update lost "
                           "from step 1"), text
    assert "96 of 96 element-steps" in text  # every element at every step: 12 x 8


def test_float16_adam_keeps_its_hyperparameters_and_float32_has_no_findings():
    g, history = stream(*ADAM, steps=12, dtype="float16")
    assert "rounds to" not in judge(*ADAM, g, history, dtype="float16").summary(0)[
        "low_precision"]
    g, history = stream(*ADAM, steps=12, dtype="float32")
    c = judge(*ADAM, g, history, dtype="float32")
    assert c.low_precision is None and c.summary(0)["low_precision"] == ""


def test_an_overflow_to_inf_is_a_finding_with_its_step_and_state():
    g = np.random.default_rng(1).standard_normal((6, 8 * S))
    g[3] *= 1e3  # g**2 overflows float16 (largest finite 65504)
    with compare.ieee():
        g, history = stream(*ADAM, steps=6, dtype="float16", grads=g)
    text = judge(*ADAM, g, history, dtype="float16").summary(0)["low_precision"]
    assert "velocity: NaN or inf where the formula stays finite from step 4" in text


@pytest.fixture(scope="module")
def low_precision_run(tmp_path_factory):
    sel = make_selection([fast_backend()], ["keras", UNROUNDED],
                         configurations=["sgd_momentum", "adam", "rmsprop"],
                         dtypes=["float16", "bfloat16", "mixed_bfloat16"], modes=["eager"],
                         names=["gaussian", "sparse"], steps=10, size=64)
    # steps of about 0.1: beyond bfloat16's rounding of most weights (see above)
    sel.configurations.append(Configuration("adam_fast", "Adam", {"learning_rate": 0.1}))
    return run_selection(sel, tmp_path_factory.mktemp("low-precision"))


def test_keras_is_exact_or_match_in_low_precision(low_precision_run):
    keras = low_precision_run[low_precision_run.family == "keras"]
    assert len(keras) == 4 * 3 * 2
    assert set(keras.verdict) <= {"exact", "match"}, keras[["optimizer", "dtype", "reason"]]


def test_real_keras_adam_in_bfloat16_against_an_unrounded_beta_2(low_precision_run):
    df = low_precision_run
    perturbed = df[(df.family == UNROUNDED) & (df.optimizer == "adam_fast")]
    assert set(perturbed[perturbed.dtype == "bfloat16"].verdict) == {"mismatch"}
    # under the policy the variables are float32: beta_2 is not rounded, nothing to catch
    assert set(perturbed[perturbed.dtype == "mixed_bfloat16"].verdict) <= {"exact", "match"}
    row = df[(df.family == "keras") & (df.optimizer == "adam") & (df.dtype == "bfloat16")]
    assert row.low_precision.str.startswith("beta_2=0.999 rounds to 1 in bfloat16").all()


def test_the_summary_groups_a_finding_over_backends_and_scenarios():
    import pandas as pd

    from verify.report.tables import low_precision
    text = ("beta_2=0.999 rounds to 1 in bfloat16; variable: update lost from step 1 (scalar), "
            "{} of 10 element-steps")
    df = pd.DataFrame([{"optimizer": "adam", "dtype": "bfloat16", "backend": b, "mode": "eager",
                        "scenario": s, "low_precision": text.format(n)}
                       for b, s, n in (("jax", "tiny", 10), ("torch", "tiny", 10),
                                       ("torch", "large", 0))])
    rows = [line.split("|")[1:-1] for line in low_precision(df)[0].splitlines()[2:]]
    assert [[c.strip() for c in r] for r in rows] == [
        ["adam", "bfloat16", "beta_2=0.999 rounds to 1 in bfloat16", "jax, torch", "eager", "2",
         "1", ""],
        ["adam", "bfloat16", "variable: update lost", "jax, torch", "eager", "2", "1", "66.7%"]]


@pytest.mark.parametrize("g0,lr,found", [(1e-9, 0.01, False), (2e-8, 1.0, True)],
                         ids=["lost-in-float32-too", "lost-to-the-float16-gradient"])
def test_under_a_mixed_policy_only_the_low_gradients_rounding_is_a_finding(g0, lr, found):
    """float32 weights: an update float32 itself cannot hold is not the policy's doing
    (specificity); a gradient float16 rounds to 0 that float32 would apply is
    (sensitivity)."""
    sgd = ("SGD", {"learning_rate": lr})
    g = np.full((6, 8 * S), g0)
    seen = np.asarray(dtypes.gradients(g, "mixed_float16"), np.float64)
    _, history = stream(*sgd, steps=6, dtype="float32", grads=seen)
    text = judge(*sgd, g, history, dtype="mixed_float16").summary(0)["low_precision"]
    assert ("variable: update lost from step 1" in text) == found, text


# LossScaleOptimizer on torch: g / scale is torch.divide of the float16 gradient by the
# float32 scale, float32 only for a rank-0 weight (reference/optimizers/loss_scale.py);
# torch's own Adam kernel squares the gradient in the dtype it arrives in.  The model
# that took every quotient as float32 is a family here.
LOSS_SCALE = reference.get_rule("keras", "LossScaleOptimizer")
EVERY_QUOTIENT_FLOAT32 = "loss-scale-every-quotient-float32"


REGISTRY[(EVERY_QUOTIENT_FLOAT32, "LossScaleOptimizer")] = replace(
    LOSS_SCALE, family=EVERY_QUOTIENT_FLOAT32,
    step=partial(loss_scale.step, arrives_float32=lambda quotient: True))


@pytest.mark.needs("torch")
def test_torch_squares_a_loss_scaled_float16_gradient_of_rank_1_in_float16(tmp_path):
    # `large` (N(0, 1) * 1e3): g**2 overflows float16 (largest finite 65504) for |g| >
    # 256, at the first step the scale lets through (it halves from 1024 on every step
    # whose g * scale overflows: step 7, at 16)
    sel = make_selection(["torch"], ["keras", EVERY_QUOTIENT_FLOAT32],
                         configurations=["loss_scale_adam"], dtypes=["float16", "bfloat16"],
                         modes=["eager"], names=["gaussian", "large"], steps=30, size=64)
    df = run_selection(sel, tmp_path)
    keras = df[df.family == "keras"]
    assert set(keras.verdict) <= {"exact", "match"}, keras[
        ["dtype", "scenario", "verdict", "first_divergent_step", "divergent_state"]]
    wide = df[(df.family == EVERY_QUOTIENT_FLOAT32) & (df.scenario == "large")
              & (df.dtype == "float16")]
    assert wide.verdict.tolist() == ["mismatch"], wide.verdict
    assert wide.divergent_state.tolist() == ["velocity"]


@pytest.mark.parametrize("configuration,name", [("adam", "beta_2"),
                                                ("loss_scale_adam", "inner_optimizer.beta_2"),
                                                ("multi_optimizer", "adam0.beta_2")])
def test_a_wrapped_optimizers_hyperparameter_that_rounds_is_found_as_a_plain_ones(
        configuration, name):
    config = CONFIGURATIONS[configuration]
    rule = reference.get_rule("keras", config.class_name)
    segments = compare.Segments(["s_vector", "s_matrix"], [(4,), (2, 2)], [0, 0], 1)

    def rounded(dtype):
        c = compare.RunComparison("keras", rule, config.config, dtype, PRECISIONS["torch"],
                                  segments, np.zeros((3, 8)), [])
        return c.low_precision.rounded_hyperparameters()
    assert rounded("bfloat16") == [(name, 0.999, 1.0)]  # Adam's beta_2, inner or not
    assert rounded("float16") == []
