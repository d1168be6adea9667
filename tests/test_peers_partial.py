"""Peers that keep a Keras slot for some variables only, or in another shape
(Adafactor's factored moments; optax's Muon, a partition of two optimizers): those
parts are not compared, the weights and the parts the peer keeps are
(verify/compare.py, RunComparison.start `not_kept`).

Specificity: torch's Adafactor, whose weights are Keras's where no gradient is 0, is
a match although it keeps no full second moment of a matrix and keeps its factors
with an extra axis; optax's Adafactor where its factored axes are Keras's; optax's
heavy-ball Muon where epsilon is below rounding.  Sensitivity: a changed
hyperparameter (decay exponent, clipping threshold, momentum), a kept factor in other
units and an undeclared missing slot are each a mismatch."""

import dataclasses
import importlib.util

import pytest

from verify import peers
from verify.peers import port
from verify.peers import run as peer_run

HAS_TORCH = importlib.util.find_spec("torch") is not None
HAS_OPTAX = importlib.util.find_spec("optax") is not None
STEPS, SIZE, SCENARIO = 6, 8, ["gaussian"]


def _results(configurations, dtypes, size=SIZE, steps=STEPS, scenario=SCENARIO):
    variants, df, _ = peer_run.run_peers(configurations, dtypes, scenario, steps, size, 0)
    return {(r["configuration"].id, r["dtype"]): r
            for r in peer_run.analyse(configurations, variants, df, dtypes)}


@pytest.fixture(scope="module")
def torch_adafactor():
    if not HAS_TORCH:
        pytest.skip("torch not installed")
    c = peers.load()["torch_adafactor"]
    variants = [
        c,
        # the same torch stream against Keras's Adafactor with another decay exponent
        dataclasses.replace(c, id="other_decay",
                            config={**c.config, "beta_2_decay": -0.7}),
        # torch's row factor read in other units: a kept part is compared
        dataclasses.replace(c, id="row_var_doubled", scale={"row_var": 2.0}),
        # the missing parts not declared: one side has no such slot, a mismatch
        dataclasses.replace(c, id="undeclared", not_kept={}),
    ]
    return _results(variants, peer_run.DTYPES)


@pytest.mark.parametrize("dtype", peer_run.DTYPES)
def test_torch_adafactor_is_keras_math_where_it_keeps_the_slots(torch_adafactor, dtype):
    r = torch_adafactor["torch_adafactor", dtype]
    assert r["keras"] in ("exact", "match"), r["first"]
    assert "velocity" in peer_run.not_compared(r["configuration"])


@pytest.mark.parametrize("dtype", peer_run.DTYPES)
def test_a_changed_decay_is_caught(torch_adafactor, dtype):
    r = torch_adafactor["other_decay", dtype]
    # beta_2 = 1 - t^decay is 0 at t = 1 whatever the exponent: they part at step 2
    assert r["keras"] == "mismatch" and r["first"]["first_divergent_step"] == 2


@pytest.mark.parametrize("dtype", peer_run.DTYPES)
def test_a_kept_factor_is_compared(torch_adafactor, dtype):
    r = torch_adafactor["row_var_doubled", dtype]
    assert r["keras"] == "mismatch" and r["first"]["divergent_state"] == "r"


@pytest.mark.parametrize("dtype", peer_run.DTYPES)
def test_an_undeclared_missing_slot_is_a_mismatch(torch_adafactor, dtype):
    r = torch_adafactor["undeclared", dtype]
    assert r["keras"] == "mismatch" and r["first"]["first_divergent_step"] == 0


@pytest.mark.skipif(not HAS_OPTAX, reason="optax not installed")
def test_optax_adafactor_factors_as_keras_where_the_axes_agree():
    # at 1024 elements every weight's two largest axes are its last two, as Keras
    # factors them; optax's decay rate is float32 (a float64 mismatch from step 2)
    c = peers.load()["optax_adafactor"]
    other = dataclasses.replace(c, id="other_threshold",
                                config={**c.config, "clip_threshold": 0.9})
    results = _results([c, other], peer_run.DTYPES, size=1024, steps=3)
    assert results["optax_adafactor", "float32"]["keras"] in ("exact", "match")
    r = results["optax_adafactor", "float64"]
    assert r["keras"] == "mismatch" and r["first"]["first_divergent_step"] == 2
    assert results["other_threshold", "float32"]["keras"] == "mismatch"


def test_a_value_the_peer_refuses_blocks_its_port():
    with pytest.raises(peers.PeerError, match="refuses d=0.5"):
        peers.parse("torch:Adafactor(eps=(1e-30, 0.001), d=0.5)")
    found, blocked = port.candidates("torch", "Adafactor", {
        "learning_rate": 0.2, "epsilon_1": 1e-14, "epsilon_2": 2.0, "clip_threshold": 0.5})
    assert found == [] and any("refuses d=0.5" in why for why in blocked.values())
    # optax's step has Keras's epsilon_2 fixed at 1e-3
    found, blocked = port.candidates("optax", "Adafactor", {"epsilon_2": 2.0})
    assert found == [] and blocked["adafactor"] == "only for epsilon_2=0.001 (here 2.0)"


@pytest.fixture(scope="module")
def optax_muon():
    if not HAS_OPTAX:
        pytest.skip("optax not installed")
    c = peers.load()["optax_muon_heavy_ball"]
    # the same optax stream against Keras's Muon with another momentum
    other = dataclasses.replace(c, id="other_momentum", config={**c.config, "momentum": 0.9})
    return _results([c, other], ["float32"], steps=3, scenario=["large"])


def test_optax_muon_without_nesterov_is_keras_math_where_epsilon_is_small(optax_muon):
    # optax's partition: Muon's momentum (an average: over 1 - beta) for the 2-D weights,
    # Adam's for the others, each compared as Keras's `momentum`; Adam's nu as `velocity`.
    # In `large` Adam's epsilon placement is below float32 rounding.
    r = optax_muon["optax_muon_heavy_ball", "float32"]
    assert r["keras"] in ("exact", "match"), r["first"]


def test_optax_muon_changed_momentum_is_caught(optax_muon):
    r = optax_muon["other_momentum", "float32"]
    # the first momentum is the gradient whatever the coefficient: they part at step 2
    assert r["keras"] == "mismatch" and r["first"]["first_divergent_step"] == 2
