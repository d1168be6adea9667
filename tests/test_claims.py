"""The article's math claims: each check can hold and can fail, on synthetic
trajectories and on real Keras."""

import numpy as np

from verify.commands import claims
from verify.selection import installed_backends


def traj(**states):
    return {k: np.asarray(v, dtype=float) for k, v in states.items()}


W = [[1.0, 2.0], [0.9, 1.8], [0.8, 1.7]]
CTX = {"a": "A", "b": "B", "config_a": {"learning_rate": 0.01, "epsilon": 1e-7}, "steps": 2,
       "gradients": np.array([[1.0, 1.0], [1.0, 1.0]])}


def test_same_trajectory_holds_and_fails():
    assert claims.same_trajectory(traj(variable=W), traj(variable=W), CTX)[0]
    other = np.array(W)
    other[2, 1] += 1e-12
    holds, evidence = claims.same_trajectory(traj(variable=W), traj(variable=other), CTX)
    assert not holds and "step 2" in evidence


def test_fewer_slots_holds_and_fails():
    one = traj(variable=W, momentum=W)
    two = traj(variable=W, momentum=W, velocity=W)
    assert claims.fewer_slots(one, two, CTX)[0]
    assert not claims.fewer_slots(two, one, CTX)[0]
    assert not claims.fewer_slots(one, one, CTX)[0]


def test_effective_step_size_holds_and_fails():
    m = np.ones((3, 2))
    v = np.ones((3, 2))
    constant = traj(variable=[[0, 0], [-0.01, -0.01], [-0.02, -0.02]], momentum=m, velocity=v)
    growing = traj(variable=[[0, 0], [-0.003, -0.003], [-0.011, -0.011]], momentum=m, velocity=v)
    ctx = dict(CTX, steps=4)  # step 2 is the last step with gradients
    assert not claims.effective_step_size_varies(constant, None, ctx)[0]
    assert claims.effective_step_size_varies(growing, None, ctx)[0]


def test_effective_rate_nonincreasing_holds_and_fails():
    decreasing = traj(variable=[[0, 0], [-0.01, -0.01], [-0.015, -0.015]])
    increasing = traj(variable=[[0, 0], [-0.01, -0.01], [-0.03, -0.015]])
    assert claims.effective_rate_nonincreasing(decreasing, None, CTX)[0]
    assert not claims.effective_rate_nonincreasing(increasing, None, CTX)[0]


def test_forgets_old_gradients_holds_and_fails():
    fading = traj(variable=W, velocity=[[0, 0], [1.0, 1.0], [1e-3, 1e-3]])
    keeping = traj(variable=W, accumulator=[[0, 0], [1.0, 1.0], [1.0, 1.0]])
    assert claims.forgets_old_gradients(fading, keeping, CTX)[0]
    assert not claims.forgets_old_gradients(traj(variable=W, velocity=keeping["accumulator"]),
                                            keeping, CTX)[0]


def test_claims_on_real_keras_hold_and_a_false_one_is_refuted():
    backend = installed_backends()[0]
    false = {"id": "momentum_does_nothing", "quote": "-", "holds_if": "-",
             "check": "same_trajectory",
             "a": {"class_name": "SGD", "config": {"learning_rate": 0.01, "momentum": 0.9}},
             "b": {"class_name": "SGD", "config": {"learning_rate": 0.01}}}
    results, _ = claims.run_claims([backend], claims=claims.load_claims() + [false])
    verdicts = {r["id"]: r["verdict"] for r in results}
    assert verdicts.pop("momentum_does_nothing") == "does not hold"
    assert set(verdicts.values()) == {"holds"}, verdicts
