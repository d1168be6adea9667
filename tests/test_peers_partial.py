"""Peers that keep a Keras slot for some variables only, or in another shape
(Adafactor's factored moments; optax's Muon, a partition of two optimizers; torch's
Muon beside the AdamW that takes the weights it refuses): those parts are not
compared, the weights and the parts the peer keeps are (verify/compare.py,
RunComparison.start `not_kept`).

Specificity: torch's Adafactor, whose weights are Keras's where no gradient is 0, is
a match although it keeps no full second moment of a matrix and keeps its factors
with an extra axis; optax's Adafactor where its factored axes are Keras's; optax's
heavy-ball Muon where epsilon is below rounding; torch's Muon without its bfloat16
cast.  Sensitivity: a changed hyperparameter (decay exponent, clipping threshold,
momentum, a Newton-Schulz coefficient), torch's bfloat16 iteration, a kept factor in
other units and an undeclared missing slot are each a mismatch."""

import dataclasses

import numpy as np
import pytest

from conftest import needs

from verify import peers
from verify.peers import port
from verify.peers import run as peer_run

STEPS, SIZE, SCENARIO = 6, 8, ["gaussian"]


def _results(configurations, dtypes, size=SIZE, steps=STEPS, scenario=SCENARIO):
    variants, df, _ = peer_run.run_peers(configurations, dtypes, scenario, steps, size, 0)
    return {(r["configuration"].id, r["dtype"]): r
            for r in peer_run.analyse(configurations, variants, df, dtypes)}


@pytest.fixture(scope="module")
def torch_adafactor():
    needs("torch")
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


@pytest.mark.needs("optax")
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
    needs("optax")
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


@pytest.fixture(scope="module")
def torch_muon():
    needs("torch")
    return _results([peers.load()["torch_muon"]], ["float32", "float64"], steps=4)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_torch_muon_beside_its_adamw_runs_and_parts_at_step_1(torch_muon, dtype):
    # torch's Muon takes the matrix, its AdamW the scalar, vector, kernel and embedding;
    # its bfloat16 iteration parts from every point of Keras's space at step 1
    r = torch_muon["torch_muon", dtype]
    assert not r["errors"] and r["keras"] == "mismatch" and r["matching"] == []
    assert r["first"]["first_divergent_step"] == 1


def _torch_muon_steps(w0, grads, bfloat16=True, **kwargs):
    """torch.optim.Muon's weights and momentum (in Keras's units) after each step, in
    float64; bfloat16=False makes its one `grad.bfloat16()` (torch/optim/_muon.py:55) a
    copy in the working dtype."""
    import torch

    p = torch.nn.Parameter(torch.from_numpy(w0.copy()))
    opt = torch.optim.Muon([p], adjust_lr_fn="match_rms_adamw", **kwargs)
    out, cast = [], torch.Tensor.bfloat16
    try:
        if not bfloat16:
            torch.Tensor.bfloat16 = lambda self: self.clone()
        for g in grads:
            p.grad = torch.from_numpy(g.copy())
            opt.step()
            buf = opt.state[p]["momentum_buffer"].numpy() / (1 - kwargs["momentum"])
            out.append((p.detach().numpy().copy(), buf))
    finally:
        torch.Tensor.bfloat16 = cast
    return out


@pytest.mark.parametrize("bfloat16, keras_config, apart", [
    (False, {}, False),                   # Keras's math, iterated in float64
    (True, {}, True),                     # torch as shipped: the bfloat16 iteration
    (False, {"muon_a": 3.4}, True),       # sensitivity: another coefficient
], ids=["without-bfloat16", "bfloat16", "other-coefficient"])
def test_torch_muon_is_keras_math_but_for_its_bfloat16_iteration(bfloat16, keras_config, apart):
    """The explanation's claim, step by step from torch's previous state: without its
    bfloat16 cast torch's Muon is Keras's (with the normalization x / ||x||_F, torch's
    norm clamped at eps instead of Keras's + 1e-7) to float64 rounding."""
    needs("torch")
    from test_reference_muon import step

    from reference import SPACES, name_of, register_variants

    space = SPACES["Muon"]
    register_variants(space)
    family = "variant:" + name_of({**space.keras, "ns_normalisation": "frobenius"})
    rng = np.random.default_rng(0)
    w0, grads = rng.standard_normal((12, 6)), [rng.standard_normal((12, 6)) for _ in range(3)]
    hp = {"lr": 0.01, "weight_decay": 0.1, "momentum": 0.9}
    theirs = _torch_muon_steps(w0, grads, bfloat16, **hp)
    config = {"learning_rate": 0.01, "weight_decay": 0.1, "momentum": 0.9, **keras_config}
    w, m = w0, np.zeros_like(w0)
    worst = 0.0
    for g, (w_torch, m_torch) in zip(grads, theirs):
        ours = step(family, config, [w], [g], ["matrix_0"], state={"momentum": {"matrix_0": m}})
        assert np.allclose(ours["momentum"][0], m_torch, rtol=1e-14, atol=0)
        update = np.abs(ours["variable"][0] - w).max()
        worst = max(worst, np.abs(ours["variable"][0] - w_torch).max() / update)
        w, m = w_torch, m_torch
    assert (worst > 1e-3) if apart else (worst < 1e-12), worst


def test_torch_muon_needs_its_adamw_and_adamw_needs_a_muon():
    with pytest.raises(peers.PeerError, match=r"add \+ AdamW\(\.\.\.\) for the others"):
        peers.parse("torch:Muon(lr=0.01, adjust_lr_fn='match_rms_adamw')")
    with pytest.raises(peers.PeerError, match="Adam takes them all"):
        peers.parse("torch:Adam(lr=0.01) + AdamW(lr=0.01)")
    c = peers.parse("torch:Muon(lr=0.01, adjust_lr_fn='match_rms_adamw') + "
                    "AdamW(lr=0.005, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)")
    assert {k: c.config[k] for k in ("adam_lr_ratio", "adam_beta_1", "adam_beta_2", "epsilon",
                                     "adam_weight_decay")} == {
        "adam_lr_ratio": 0.5, "adam_beta_1": 0.8, "adam_beta_2": 0.9, "epsilon": 1e-6,
        "adam_weight_decay": 0.1}


def test_port_gives_muons_adamw_branch_its_own_rate():
    config = {"learning_rate": 0.01, "adam_lr_ratio": 0.5, "adam_beta_2": 0.99}
    found, _ = port.candidates("torch", "Muon", config)
    assert [c.wrappers for c in found] == [(("AdamW", {
        "lr": 0.005, "betas": [0.9, 0.99], "eps": 1e-7, "weight_decay": 0.004}),)]
    # Keras's Muon with its embeddings in Muon: torch's partition gives them to AdamW
    found, blocked = port.candidates("torch", "Muon", {**config, "exclude_embeddings": False})
    assert found == [] and "exclude_embeddings=True" in blocked["Muon"]
