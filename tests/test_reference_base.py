"""Keras's base-optimizer pipeline (reference/base.py), stage by stage, in numpy.

Each stage has a specificity test (the value worked out by hand from Keras's
source is accepted: scaled error <= TOLERANCE) beside a sensitivity test (the
same value with one constant or one order changed is rejected).
"""

import math

import numpy as np
import pytest

import reference
from reference import PRECISIONS, Arithmetic, base
from reference.arithmetic import Tracked
from verify.compare import TOLERANCE, element_errors


def run(class_name, config, variables, grads, t, states=None, dtype="float64",
        precision="exact", family="keras"):
    """One step of the rule on one batch row: variables and grads are lists of
    arrays (one per variable), `states` overrides the initial slots."""
    ar = Arithmetic(dtype, PRECISIONS[precision])
    rule = reference.get_rule(family, class_name)
    hp = rule.hyperparameters(config)
    s = {"variable": [ar.exact(np.asarray(w)[None]) for w in variables]}
    for spec in rule.states(hp):
        if spec.per_variable:
            s[spec.name] = [ar.exact(np.full((1,) + np.shape(w), spec.initial))
                            for w in variables]
        else:
            s[spec.name] = ar.exact([spec.initial])
    for name, values in (states or {}).items():
        s[name] = [ar.exact(np.asarray(v)[None]) for v in values]
    out = rule(ar, hp, s, [ar.exact(np.asarray(g)[None]) for g in grads],
               ar.step_count([float(t)]), [f"v{i}" for i in range(len(variables))])
    return out


def scaled(tracked, expected) -> float:
    """The comparison's scaled error of `expected` (as Keras would hold it)
    against the rule's value and bound."""
    expected = np.asarray(expected, dtype=tracked.v.dtype)[None]
    _, _, s = element_errors(expected, tracked.v, tracked.e, tracked.tie)
    return float(np.max(s))


def accepted(tracked, expected) -> bool:
    return scaled(tracked, expected) <= TOLERANCE


W = [np.array(1.5), np.array([0.5, -2.0, 3.0]), np.array([[1.0, 2.0, -1.0], [0.5, 0.0, 4.0]])]
G = [np.array(0.2), np.array([3.0, 4.0, 0.0]),
     np.array([[0.1, -0.2, 0.3], [-2.0, 1.0, 2.0]])]
SGD = {"learning_rate": 0.1}


def sgd_expected(grads, lr=0.1):
    return [w - lr * g for w, g in zip(W, grads)]


# --- what the keras point accepts, and what the others still refuse ---------------
def test_keras_point_takes_every_base_argument_and_the_others_refuse_them():
    config = {"clipnorm": 1.0, "use_ema": True, "ema_overwrite_frequency": 3,
              "loss_scale_factor": 2.0, "gradient_accumulation_steps": 2}
    hp = reference.get_rule("keras", "Adam").hyperparameters(config)
    assert {k: hp[k] for k in config} == config and hp["ema_momentum"] == 0.99
    for key, value in config.items():
        with pytest.raises(reference.Unsupported, match=key):
            reference.get_rule("article", "Adam").hyperparameters({key: value})
        # a paper without general stages of its own (Lion's decays in its update)
        with pytest.raises(reference.Unsupported, match=key):
            reference.get_rule("textbook", "Lion").hyperparameters({key: value})
    # the textbook forms (reference/base.py, run_textbook): what a paper states
    textbook = reference.get_rule("textbook", "Adam")
    for key in ("clipnorm", "use_ema", "loss_scale_factor"):
        assert textbook.hyperparameters({key: config[key]})[key] == config[key]
    for key, why in (("gradient_accumulation_steps", "no paper"),
                     ("ema_overwrite_frequency", "never write the average back")):
        with pytest.raises(reference.Unsupported, match=why):
            textbook.hyperparameters({"use_ema": True, key: config[key]})
    # neutral values stay accepted by every family
    reference.get_rule("textbook", "Adam").hyperparameters(
        {"clipnorm": None, "use_ema": False, "ema_momentum": 0.5, "name": "x"})


def test_new_slots_are_named_as_keras_names_them():
    rule = reference.get_rule("keras", "SGD")
    names = lambda config: [s.name for s in rule.states(rule.hyperparameters(config))]
    assert names({}) == []
    assert names({"use_ema": True}) == ["average"]
    assert names({"gradient_accumulation_steps": 3}) == ["gradient_accumulator"]
    assert names({"momentum": 0.9, "use_ema": True, "gradient_accumulation_steps": 3}) == [
        "momentum", "average", "gradient_accumulator"]
    assert all(s.initial == 0.0 and s.per_variable for s in rule.states(
        rule.hyperparameters({"use_ema": True, "gradient_accumulation_steps": 3})))


def test_only_the_norm_clippings_are_not_elementwise():
    rule = reference.get_rule("keras", "Adam")
    flag = lambda config: rule.elementwise(rule.hyperparameters(config))
    assert flag({}) and flag({"clipvalue": 0.3}) and flag({"use_ema": True})
    assert flag({"gradient_accumulation_steps": 2}) and flag({"loss_scale_factor": 8.0})
    assert not flag({"clipnorm": 1.0}) and not flag({"global_clipnorm": 1.0})
    # clipnorm = 0 turns clipping off in Keras (`self.clipnorm and self.clipnorm > 0`)
    assert flag({"clipnorm": 0.0})


# --- 1. unscale ------------------------------------------------------------------
def test_unscale_divides_by_the_loss_scale_factor():
    out = run("SGD", {**SGD, "loss_scale_factor": 4.0}, W, G, 0)
    for w, e in zip(out["variable"], sgd_expected([g / 4.0 for g in G])):
        assert accepted(w, e)


def test_unscale_multiplying_or_ignoring_the_factor_is_caught():
    out = run("SGD", {**SGD, "loss_scale_factor": 4.0}, W, G, 0)
    assert not accepted(out["variable"][1], sgd_expected([g * 4.0 for g in G])[1])
    assert not accepted(out["variable"][1], sgd_expected(G)[1])


# --- 3. clip ------------------------------------------------------------------------
def clip_norm_expected(g, c):
    """Pascanu et al. 2013: c / ||g|| * g where ||g|| > c (Keras: g c / max(||g||, c))."""
    n = math.sqrt(float(np.sum(np.square(g))))
    return g * c / max(n, c)


def test_clipnorm_clips_each_variable_by_its_own_norm_over_all_axes():
    c = 0.5
    out = run("SGD", {"learning_rate": 1.0, "clipnorm": c}, W, G, 0)
    for w, e in zip(out["variable"], sgd_expected([clip_norm_expected(g, c) for g in G], 1.0)):
        assert accepted(w, e)
    # the scalar gradient 0.2 is under the norm and passes (as 0.2 * c / c)
    assert accepted(out["variable"][0], W[0] - 0.2)


def test_clipnorm_by_rows_by_the_global_norm_or_without_max_is_caught():
    c = 0.5
    out = run("SGD", {"learning_rate": 1.0, "clipnorm": c}, W, G, 0)
    g = G[2]
    rows = g * c / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), c)
    assert not accepted(out["variable"][2], W[2] - rows)
    total = math.sqrt(sum(float(np.sum(np.square(x))) for x in G))
    assert not accepted(out["variable"][1], W[1] - G[1] * c / total)
    # without the max, the small scalar gradient would be scaled up to c
    assert not accepted(out["variable"][0], W[0] - 0.2 * c / 0.2)


def test_global_clipnorm_scales_all_variables_by_their_common_norm():
    c = 1.0
    total = math.sqrt(sum(float(np.sum(np.square(g))) for g in G))
    out = run("SGD", {"learning_rate": 1.0, "global_clipnorm": c}, W, G, 0)
    for w, e in zip(out["variable"], sgd_expected([g * c / total for g in G], 1.0)):
        assert accepted(w, e)
    # above the global norm nothing changes
    out = run("SGD", {"learning_rate": 1.0, "global_clipnorm": 2 * total}, W, G, 0)
    for w, e in zip(out["variable"], sgd_expected(G, 1.0)):
        assert accepted(w, e)


def test_global_clipnorm_per_variable_or_with_another_constant_is_caught():
    c = 1.0
    out = run("SGD", {"learning_rate": 1.0, "global_clipnorm": c}, W, G, 0)
    assert not accepted(out["variable"][1], W[1] - clip_norm_expected(G[1], c))
    total = math.sqrt(sum(float(np.sum(np.square(g))) for g in G))
    assert not accepted(out["variable"][1], W[1] - G[1] * 1.01 * c / total)


def test_clipvalue_clips_each_element():
    out = run("SGD", {"learning_rate": 1.0, "clipvalue": 0.3}, W, G, 0)
    for w, e in zip(out["variable"], sgd_expected([np.clip(g, -0.3, 0.3) for g in G], 1.0)):
        assert accepted(w, e)


def test_clipvalue_missing_or_one_sided_is_caught():
    out = run("SGD", {"learning_rate": 1.0, "clipvalue": 0.3}, W, G, 0)
    assert not accepted(out["variable"][2], W[2] - G[2])
    assert not accepted(out["variable"][2], W[2] - np.minimum(G[2], 0.3))


def test_torch_float64_clipnorm_divides_by_a_float32_norm():
    """ops.maximum(norm, c) is a float32 tensor on torch (min_max_float32): the
    rule holds that value, and its bound covers it; without the setting the
    same value is rejected."""
    g = [np.array([1.0, 1.0, 1.0])]
    n32 = float(np.float32(math.sqrt(3.0)))
    keras_like = 1.0 - np.ones(3) * 0.5 / n32
    torch = run("SGD", {"learning_rate": 1.0, "clipnorm": 0.5}, [np.ones(3)], g, 0,
                precision="torch")["variable"][0]
    exact = run("SGD", {"learning_rate": 1.0, "clipnorm": 0.5}, [np.ones(3)], g, 0,
                precision="jax")["variable"][0]
    assert np.array_equal(torch.v[0], keras_like)
    assert accepted(torch, keras_like) and not accepted(exact, keras_like)


def test_an_infinite_norm_rounds_to_float32_exactly_and_an_overflow_does_not():
    """inf and NaN are themselves in float32: an exact one (bound 0) stays exact, not
    inf - inf = NaN; a float64 value beyond float32's range overflows to inf (bound
    inf).  So torch's float64 clipnorm of a gradient holding inf leaves the other
    elements' updates judged: w - lr * 0 there, and a value off by 1e-9 is rejected."""
    ar = Arithmetic("float64", PRECISIONS["torch"])
    x = ar.exact([np.inf, -np.inf, np.nan, 1e300, 0.1])
    out = base.rounded_to_float32(x)
    np.testing.assert_array_equal(out.e[:3], 0.0)
    assert out.e[3] == np.inf and np.isinf(out.v[3])
    assert out.e[4] == abs(float(np.float32(0.1)) - 0.1)
    w, g = np.array([0.5, -2.0, 3.0]), np.array([np.inf, 4.0, -1.0])
    torch = run("SGD", {"learning_rate": 1.0, "clipnorm": 0.5}, [w], [g], 0,
                precision="torch")["variable"][0]
    assert np.isnan(torch.v[0, 0]) and np.array_equal(torch.v[0, 1:], w[1:])
    assert np.all(np.isfinite(torch.e))
    finite = run("SGD", {"learning_rate": 1.0, "clipnorm": 0.5}, [w[1:]], [g[1:]], 0,
                 precision="torch")["variable"][0]
    assert accepted(Tracked(torch.v[:, 1:], torch.e[:, 1:], torch.ar), w[1:])
    assert not accepted(Tracked(torch.v[:, 1:], torch.e[:, 1:], torch.ar), w[1:] + 1e-9)
    assert not np.array_equal(finite.v[0], w[1:])  # without the inf the norm clips them


# --- 2. accumulate ----------------------------------------------------------------
ADAM = {"learning_rate": 0.01}


def adam_expected(w, g, step, m=0.0, v=0.0, lr=0.01, b1=0.9, b2=0.999, eps=1e-7):
    m = m + (g - m) * (1 - b1)
    v = v + (g * g - v) * (1 - b2)
    alpha = lr * math.sqrt(1 - b2 ** step) / (1 - b1 ** step)
    return w - m * alpha / (np.sqrt(v) + eps), m, v


def test_accumulation_step_that_is_not_an_update_only_adds_the_gradient():
    acc = [np.full(np.shape(g), 0.25) for g in G]
    out = run("Adam", {**ADAM, "gradient_accumulation_steps": 3}, W, G, 4,
              states={"gradient_accumulator": acc})
    for i in range(3):
        assert accepted(out["gradient_accumulator"][i], acc[i] + G[i])
        assert accepted(out["variable"][i], W[i])
        assert accepted(out["momentum"][i], np.zeros(np.shape(W[i])))


def test_accumulation_update_uses_the_average_and_counts_updates():
    """At _iterations = 5 with n = 3 (the second update): the gradient is
    (g + accumulator) / 3, Adam's bias corrections see iterations = 5 // 3 = 1
    (local step 2), and the accumulators reset."""
    acc = [np.full(np.shape(g), 0.25) for g in G]
    m0 = [np.full(np.shape(g), 0.05) for g in G]
    v0 = [np.full(np.shape(g), 0.01) for g in G]
    out = run("Adam", {**ADAM, "gradient_accumulation_steps": 3}, W, G, 5,
              states={"gradient_accumulator": acc, "momentum": m0, "velocity": v0})
    for i in range(3):
        w, m, v = adam_expected(W[i], (G[i] + acc[i]) / 3, 2, m0[i], v0[i])
        assert accepted(out["variable"][i], w)
        assert accepted(out["momentum"][i], m) and accepted(out["velocity"][i], v)
        assert accepted(out["gradient_accumulator"][i], np.zeros(np.shape(W[i])))


def test_accumulation_with_another_count_divisor_or_schedule_is_caught():
    acc = [np.full(np.shape(g), 0.25) for g in G]
    m0 = [np.full(np.shape(g), 0.05) for g in G]
    v0 = [np.full(np.shape(g), 0.01) for g in G]
    out = run("Adam", {**ADAM, "gradient_accumulation_steps": 3}, W, G, 5,
              states={"gradient_accumulator": acc, "momentum": m0, "velocity": v0})
    i = 2
    # the raw call count as Adam's step (local step 6, not 2)
    assert not accepted(out["variable"][i], adam_expected(W[i], (G[i] + acc[i]) / 3, 6,
                                                          m0[i], v0[i])[0])
    # the sum, or the average over n - 1
    assert not accepted(out["momentum"][i], adam_expected(W[i], G[i] + acc[i], 2,
                                                          m0[i], v0[i])[1])
    assert not accepted(out["momentum"][i], adam_expected(W[i], (G[i] + acc[i]) / 2, 2,
                                                          m0[i], v0[i])[1])
    # an update one call early (at _iterations = 4, (4 + 1) % 3 != 0)
    early = run("Adam", {**ADAM, "gradient_accumulation_steps": 3}, W, G, 4,
                states={"gradient_accumulator": acc, "momentum": m0, "velocity": v0})
    assert not accepted(early["variable"][i], adam_expected(W[i], (G[i] + acc[i]) / 3, 2,
                                                            m0[i], v0[i])[0])


def test_accumulation_keeps_optimizer_wide_states_between_updates():
    """Nadam's u_product changes only on an update call."""
    rule = reference.get_rule("keras", "Nadam")
    config = {"learning_rate": 0.01, "gradient_accumulation_steps": 2}
    kept = run("Nadam", config, W, G, 0)
    assert float(kept["u_product"].v[0]) == 1.0
    updated = run("Nadam", config, W, G, 1)
    assert float(updated["u_product"].v[0]) != 1.0
    assert rule.elementwise(rule.hyperparameters(config))


def test_clipping_and_unscaling_sit_around_accumulation_in_keras_order():
    """Unscale before accumulating (the accumulator holds g / s); clip the
    averaged gradient, not each call's."""
    config = {"learning_rate": 1.0, "loss_scale_factor": 2.0, "clipvalue": 0.3,
              "gradient_accumulation_steps": 2}
    first = run("SGD", config, [np.array(1.0)], [np.array(2.0)], 0)
    assert accepted(first["gradient_accumulator"][0], 1.0)
    assert not accepted(first["gradient_accumulator"][0], 2.0)
    # accumulator 1.0 (= 2.0 / 2), gradient -1.5 / 2: the average is 0.125, unclipped
    second = run("SGD", config, [np.array(1.0)], [np.array(-1.5)], 1,
                 states={"gradient_accumulator": [np.array(1.0)]})
    assert accepted(second["variable"][0], 1.0 - 0.125)
    # clipping each call's gradient first would give (0.3 - 0.3) / 2 = 0
    assert not accepted(second["variable"][0], 1.0 - 0.0)


# --- 6. EMA --------------------------------------------------------------------------
EMA = {"learning_rate": 0.1, "use_ema": True, "ema_momentum": 0.9}


def test_ema_starts_as_the_updated_weights_and_then_averages_them():
    first = run("SGD", EMA, W, G, 0)
    for i, e in enumerate(sgd_expected(G)):
        assert accepted(first["average"][i], e) and accepted(first["variable"][i], e)
    avg = [np.full(np.shape(w), 0.7) for w in W]
    later = run("SGD", EMA, W, G, 4, states={"average": avg})
    for i, e in enumerate(sgd_expected(G)):
        assert accepted(later["average"][i], 0.9 * avg[i] + 0.1 * e)
        assert accepted(later["variable"][i], e)  # no overwrite without a frequency


def test_ema_of_the_old_weights_or_with_the_momentum_swapped_is_caught():
    first = run("SGD", EMA, W, G, 0)
    assert not accepted(first["average"][1], 0.1 * sgd_expected(G)[1])  # m = 0.9 at t = 0
    avg = [np.full(np.shape(w), 0.7) for w in W]
    later = run("SGD", EMA, W, G, 4, states={"average": avg})
    e = sgd_expected(G)[1]
    assert not accepted(later["average"][1], 0.9 * avg[1] + 0.1 * W[1])
    assert not accepted(later["average"][1], 0.1 * avg[1] + 0.9 * e)


def test_ema_overwrites_the_weights_every_f_th_iteration():
    config = {**EMA, "ema_overwrite_frequency": 3}
    avg = [np.full(np.shape(w), 0.7) for w in W]
    for t in range(6):
        out = run("SGD", config, W, G, t, states={"average": avg})
        e = sgd_expected(G)[2]
        new_avg = e if t == 0 else 0.9 * avg[2] + 0.1 * e
        assert accepted(out["average"][2], new_avg)
        # (iterations + 1) % 3 == 0: after the 3rd and 6th calls
        assert accepted(out["variable"][2], new_avg if t in (2, 5) else e), t
        if t > 0:  # at t = 0 the average is the weights
            assert not accepted(out["variable"][2], e if t in (2, 5) else new_avg), t


def test_ema_overwrite_with_the_old_average_is_caught():
    config = {**EMA, "ema_overwrite_frequency": 3}
    avg = [np.full(np.shape(w), 0.7) for w in W]
    out = run("SGD", config, W, G, 2, states={"average": avg})
    assert not accepted(out["variable"][1], avg[1])


def test_ema_under_accumulation_counts_updates_and_averages_every_call():
    """`iterations` is _iterations // n: with n = 2 the average copies the
    weights on calls 0 and 1, and the overwrite with f = 2 happens on both
    calls of the second block (_iterations 2 and 3)."""
    config = {**EMA, "gradient_accumulation_steps": 2, "ema_overwrite_frequency": 2}
    avg = [np.full(np.shape(w), 0.7) for w in W]
    acc = [np.full(np.shape(w), 0.1) for w in W]
    states = {"average": avg, "gradient_accumulator": acc}
    call1 = run("SGD", config, W, G, 1, states=states)
    updated = W[1] - 0.1 * (G[1] + acc[1]) / 2
    assert accepted(call1["average"][1], updated)
    assert not accepted(call1["average"][1], 0.9 * avg[1] + 0.1 * updated)
    # a call that is not an update still moves the average toward the weights
    call2 = run("SGD", config, W, G, 2, states=states)
    assert accepted(call2["average"][1], 0.9 * avg[1] + 0.1 * W[1])
    assert accepted(call2["variable"][1], 0.9 * avg[1] + 0.1 * W[1])  # overwritten
    call4 = run("SGD", config, W, G, 4, states=states)
    assert accepted(call4["variable"][1], W[1])
    assert not accepted(call4["variable"][1], 0.9 * avg[1] + 0.1 * W[1])


# --- the pipeline as a whole ---------------------------------------------------------
def test_weight_decay_comes_after_clipping_and_before_the_step():
    """AdamW with clipvalue: the clipped gradient, the decayed weights."""
    config = {"learning_rate": 0.01, "weight_decay": 0.5, "clipvalue": 0.3}
    out = run("AdamW", config, [np.array(2.0)], [np.array(5.0)], 0)
    w, _, _ = adam_expected(2.0 * (1 - 0.5 * 0.01), 0.3, 1)
    assert accepted(out["variable"][0], w)
    w_undecayed, _, _ = adam_expected(2.0, 0.3, 1)
    assert not accepted(out["variable"][0], w_undecayed)
    # Adam's first step is nearly scale-free (m / sqrt(v) is about the sign):
    # the clipped gradient is seen in the moments
    assert accepted(out["momentum"][0], 0.1 * 0.3)
    assert not accepted(out["momentum"][0], 0.1 * 5.0)


def test_without_base_arguments_the_pipeline_is_the_identity():
    """The default configuration runs only the optimizer's own step: the
    keras SGD point gives w - lr g bit for bit."""
    out = run("SGD", SGD, W, G, 7)
    for w, e in zip(out["variable"], sgd_expected(G)):
        assert np.array_equal(w.v[0], e)
    assert set(out) == {"variable"}


def test_run_accepts_a_partial_hyperparameter_set():
    """Rules called with only their own hyperparameters (as some tests do) run
    the pipeline at Keras's defaults."""
    ar = Arithmetic("float64", PRECISIONS["exact"])
    out = base.run(ar, {"learning_rate": 0.1}, {}, {"variable": [ar.exact([1.0])]},
                   [ar.exact([2.0])], ar.step_count([0.0]), ar.const(0.1),
                   lambda state, grads, t: {"variable": [state["variable"][0] - grads[0]]},
                   [""])
    assert float(out["variable"][0].v[0]) == -1.0
