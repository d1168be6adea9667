"""The textbook family's forms of the base stages (reference/base.py,
`run_textbook`): each form worked out by hand from its paper is accepted
(specificity), and Keras's form of the same stage, where the two differ, is
rejected (sensitivity)."""

import numpy as np
import pytest

import reference
from test_reference_base import G, W, accepted, run

LR = 0.1


def sgd(config, grads=G, variables=W, t=0, states=None, family="textbook"):
    return run("SGD", {"learning_rate": LR, **config}, variables, grads, t, states,
               family=family)


def clipped_whole(grads, c):
    """Pascanu et al. 2013, Algorithm 1, on the gradient of all parameters."""
    norm = np.sqrt(sum(np.sum(np.square(g)) for g in grads))
    return [g * (c / norm) if norm >= c else g for g in grads]


def test_norm_clipping_is_pascanus_over_all_parameters():
    got = sgd({"clipnorm": 1.0})["variable"]
    want = [w - LR * g for w, g in zip(W, clipped_whole(G, 1.0))]
    assert all(accepted(x, y) for x, y in zip(got, want))
    # sensitivity: Keras's clipnorm, each variable by its own norm, is another rule
    per_variable = [g * min(1.0, 1.0 / np.sqrt(np.sum(np.square(g)))) for g in G]
    assert not all(accepted(x, w - LR * g) for x, w, g in zip(got, W, per_variable))


def test_a_gradient_below_the_threshold_is_kept_as_it_is():
    small = [g / 100 for g in G]
    got = sgd({"global_clipnorm": 10.0}, grads=small)["variable"]
    assert all(np.array_equal(x.v[0], w - LR * g) for x, w, g in zip(got, W, small))


def test_global_clipnorm_agrees_with_keras_for_finite_gradients():
    textbook = sgd({"global_clipnorm": 1.0})["variable"]
    keras = sgd({"global_clipnorm": 1.0}, family="keras")["variable"]
    assert all(accepted(x, k.v[0]) for x, k in zip(textbook, keras))


def test_a_nan_norm_leaves_the_gradient_unscaled_and_an_infinite_one_zeroes_it():
    grads = [G[0], np.array([np.nan, 1.0, 0.0]), G[2]]
    got = sgd({"global_clipnorm": 1.0}, grads=grads)["variable"]
    assert np.array_equal(got[2].v[0], W[2] - LR * G[2])  # NaN >= c is false
    grads = [G[0], np.array([np.inf, 1.0, 0.0]), G[2]]
    got = sgd({"global_clipnorm": 1.0}, grads=grads)["variable"]
    assert np.array_equal(got[2].v[0], W[2])  # scaled by c / inf = 0


def test_value_clipping_clips_each_component():
    got = sgd({"clipvalue": 0.5})["variable"]
    want = [w - LR * np.clip(g, -0.5, 0.5) for w, g in zip(W, G)]
    assert all(accepted(x, y) for x, y in zip(got, want))


def test_weight_decay_is_hanson_and_pratts_not_scaled_by_the_learning_rate():
    got = sgd({"weight_decay": 0.01})["variable"]
    assert all(accepted(x, (1 - 0.01) * w - LR * g) for x, w, g in zip(got, W, G))
    # sensitivity: Keras's decay, scaled by the learning rate
    assert not all(accepted(x, w - LR * 0.01 * w - LR * g) for x, w, g in zip(got, W, G))


def test_adams_weight_decay_is_its_own_algorithm_2_not_applied_twice():
    config = {"learning_rate": LR, "weight_decay": 0.01}
    adam = run("Adam", config, W, G, 0, family="textbook")["variable"]
    adamw = run("AdamW", config, W, G, 0, family="textbook")["variable"]
    assert all(np.array_equal(a.v, b.v) for a, b in zip(adam, adamw))


def test_the_average_is_the_uniform_mean_of_the_iterates():
    iterates = [W]
    average = [np.zeros_like(w) for w in W]
    for t in range(4):
        out = sgd({"use_ema": True, "ema_momentum": 0.9}, variables=iterates[-1], t=t,
                  states={"average": average})
        iterates.append([v.v[0] for v in out["variable"]])
        average = [a.v[0] for a in out["average"]]
        want = [np.mean([it[i] for it in iterates[1:]], axis=0) for i in range(len(W))]
        assert all(accepted(a, m) for a, m in zip(out["average"], want)), t
    # sensitivity: Keras's exponential average with momentum 0.9 is another rule
    previous = [np.mean([it[i] for it in iterates[1:-1]], axis=0) for i in range(len(W))]
    exponential = [0.9 * p + 0.1 * w for p, w in zip(previous, iterates[-1])]
    assert not all(accepted(a, e) for a, e in zip(out["average"], exponential))


def test_static_loss_scaling_divides_the_gradient():
    scaled_grads = [g * 128 for g in G]
    got = sgd({"loss_scale_factor": 128.0}, grads=scaled_grads)["variable"]
    assert all(accepted(x, w - LR * g) for x, w, g in zip(got, W, G))


@pytest.mark.parametrize("config,why", [
    ({"gradient_accumulation_steps": 4}, "gradient accumulation"),
    ({"use_ema": True, "ema_overwrite_frequency": 10}, "never write the average back"),
    ({"weight_decay": 0.01, "exclude_from_weight_decay": {"var_names": ["bias"]}},
     "decay every weight"),
], ids=["accumulation", "ema-overwrite", "exclusion"])
def test_what_no_paper_states_is_not_stated(config, why):
    with pytest.raises(reference.Unsupported, match=why):
        reference.get_rule("textbook", "SGD").hyperparameters({"learning_rate": LR, **config})
