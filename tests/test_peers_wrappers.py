"""Peers' training-loop wrappers (verify/peers/wrappers.toml): clipping, schedules, EMA
and accumulation around a torch.optim or optax optimizer, judged against the Keras
configuration with the same arguments.

Specificity: around SGD (Keras's math in both libraries) a wrapper that computes what
Keras's base optimizer computes is exact or match.  Sensitivity: the same peer stream
judged against a Keras configuration with a wrong mapping (a global clip against
Keras's per-variable clipnorm, and the reverse; another decay rate, EMA momentum or
accumulation count) is a mismatch, and the differences explanations.toml states are
found by the comparison (torch's 1e-6 in the clip norm in float64, optax's float32
schedule, optax.ema averaging the updates, incremental_update's first average)."""

import dataclasses
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

from conftest import needs

from verify import cli, peers, scenarios
from verify.configurations import CONFIGURATIONS
from verify.peers import port
from verify.peers import run as peer_run

STEPS, SIZE, SCENARIO = 24, 8, ["gaussian"]


def test_wrappers_map_to_keras_arguments():
    c = peers.parse("torch:SGD(lr=0.05, momentum=0.9) + ExponentialLR(gamma=0.9)"
                    " + clip_grad_norm_(max_norm=1.0)")
    assert c.config["learning_rate"] == {"class_name": "ExponentialDecay", "config": {
        "initial_learning_rate": 0.05, "decay_steps": 1, "decay_rate": 0.9,
        "staircase": False}}
    assert c.config["global_clipnorm"] == 1.0 and "clipnorm" not in c.config
    # the momentum buffer in Keras's units at the optimizer's own (initial) rate
    assert c.scale == {"momentum_buffer": -0.05}
    assert peers.parse("torch:SGD(lr=0.1) + clip_grad_norm_each(max_norm=2.0)").config[
        "clipnorm"] == 2.0
    ema = peers.parse("torch:Adam(lr=0.01) + AveragedModel(decay=0.9, overwrite_every=10)")
    assert {k: ema.config[k] for k in ("use_ema", "ema_momentum",
                                       "ema_overwrite_frequency")} == {
        "use_ema": True, "ema_momentum": 0.9, "ema_overwrite_frequency": 10}
    acc = peers.parse("optax:adam(learning_rate=0.01) + MultiSteps(every_k_schedule=4)")
    assert acc.config["gradient_accumulation_steps"] == 4
    assert acc.states["acc_grads"] == "gradient_accumulator"
    spec = acc.peer_spec()["wrappers"]
    assert spec == {"accumulate": {"name": "MultiSteps", "kwargs": {"every_k_schedule": 4}}}
    # the written order does not matter, and the id tells wrapped from plain
    a = peers.parse("torch:SGD(lr=0.1) + clip_grad_value_(clip_value=0.5) + StepLR(step_size=5)")
    b = peers.parse("torch:SGD(lr=0.1) + StepLR(step_size=5) + clip_grad_value_(clip_value=0.5)")
    assert a.config == b.config and a.id != peers.parse("torch:SGD(lr=0.1)").id


@pytest.mark.parametrize("text, words", [
    ("torch:SGD(lr=0.1) + clip(max_delta=1.0)", "no torch wrapper clip"),
    ("torch:SGD(lr=0.1) + clip_grad_norm_(max_norm=1.0) + clip_grad_value_(clip_value=1.0)",
     "one clip wrapper at most"),
    ("torch:SGD(lr=0.1) + StepLR(gamma=0.5)", "StepLR needs step_size"),
    ("torch:SGD(lr=0.1) + ExponentialLR(gamma=0.9, foo=1)", "no argument 'foo'"),
    ("torch:SGD(lr=0.1) + AveragedModel(decay='a')", "decay must be a number"),
    ("optax:sgd(learning_rate=0.1) + ema()", "ema needs decay"),
])
def test_wrapper_refused(text, words):
    with pytest.raises(peers.PeerError, match=words):
        peers.parse(text)


def test_schedule_functions_map_to_keras_schedules():
    """LambdaLR and optax.Schedule compute the Keras schedule they name, whose initial
    rate is the optimizer's (PiecewiseConstantDecay has its own values)."""
    c = peers.parse("torch:SGD(lr=0.01) + LambdaLR(keras='PolynomialDecay', decay_steps=20,"
                    " end_learning_rate=0.001, power=2.0, cycle=True)")
    assert c.config["learning_rate"] == {"class_name": "PolynomialDecay", "config": {
        "initial_learning_rate": 0.01, "decay_steps": 20, "end_learning_rate": 0.001,
        "power": 2.0, "cycle": True}}
    assert c.peer_spec()["wrappers"]["schedule"]["kwargs"]["schedule"] == c.config[
        "learning_rate"]
    p = peers.parse("optax:sgd(learning_rate=0.02) + Schedule(keras='PiecewiseConstantDecay',"
                    " boundaries=[10, 25], values=[0.02, 0.01, 0.005])")
    assert p.config["learning_rate"] == {"class_name": "PiecewiseConstantDecay", "config": {
        "boundaries": [10, 25], "values": [0.02, 0.01, 0.005]}}
    assert p.initial_learning_rate == 0.02


@pytest.mark.parametrize("wrapper, words", [
    ("LambdaLR(decay_steps=20)", "LambdaLR needs keras=<one of ExponentialDecay"),
    ("LambdaLR(keras='ExponentialDecay', decay_steps=20)", "needs decay_rate"),
    ("LambdaLR(keras='ExponentialDecay', decay_steps=20, decay_rate=0.9,"
     " initial_learning_rate=1.0)", "takes no argument 'initial_learning_rate'"),
    ("LambdaLR(keras='ExponentialDecay', decay_steps=20, decay_rate=0.9, staircase=1)",
     "staircase must be a bool"),
    ("LambdaLR(keras='PiecewiseConstantDecay', boundaries=[1], values=[1.0])",
     "one value more than boundaries"),
    ("LambdaLR(keras='CosineDecay', decay_steps=10, warmup_target=[1])", "cannot be evaluated"),
])
def test_schedule_function_refused(wrapper, words):
    with pytest.raises(peers.PeerError, match=re.escape(words)):
        peers.parse(f"torch:SGD(lr=0.05) + {wrapper}")


def test_bad_wrapper_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "report.md"
    assert cli.main(["peers", "--peer", "torch:SGD(lr=0.1) + clip(max_delta=1.0)",
                     "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no torch wrapper clip" in err[0] and not out.exists()


def _functions():
    out = {}
    if importlib.util.find_spec("torch"):
        import torch
        from torch.optim import swa_utils
        out.update({("torch", "StepLR"): torch.optim.lr_scheduler.StepLR.__init__,
                    ("torch", "ExponentialLR"): torch.optim.lr_scheduler.ExponentialLR.__init__,
                    ("torch", "AveragedModel"): swa_utils.get_ema_multi_avg_fn,
                    ("torch", "clip_grad_norm_"): torch.nn.utils.clip_grad_norm_,
                    ("torch", "clip_grad_value_"): torch.nn.utils.clip_grad_value_})
    if importlib.util.find_spec("optax"):
        import optax
        out.update({("optax", name): getattr(optax, name) for name in (
            "clip_by_global_norm", "clip", "exponential_decay", "cosine_decay_schedule",
            "ema")})
        out["optax", "MultiSteps"] = optax.MultiSteps.__init__
    return out


def test_wrappers_toml_states_the_installed_arguments():
    """Every argument a wrapper passes on exists, with the default wrappers.toml states
    (overwrite_every, steps and the per-parameter loop are the loop's own)."""
    needs("torch", "optax")
    functions = _functions()
    for key, function in functions.items():
        w = peers.WRAPPERS[key]
        parameters = inspect.signature(function).parameters
        for argument in w["keras"]:
            if argument == "overwrite_every":
                continue
            assert argument in parameters, (key, argument)
            if argument in w.get("defaults", {}):
                assert parameters[argument].default == w["defaults"][argument], (key, argument)


def _run(configurations, dtype, scenarios=SCENARIO, steps=STEPS):
    variants, df, _ = peer_run.run_peers(configurations, [dtype], scenarios, steps, SIZE, 0)
    return {r["configuration"].id: r
            for r in peer_run.analyse(configurations, variants, df, [dtype])}


def _judged_as(c, id, **config):
    """The same peer stream judged against another Keras configuration."""
    return dataclasses.replace(c, id=id, config={**c.config, **config})


@pytest.fixture(scope="module")
def torch_results():
    needs("torch")
    known = peers.load()
    base = [known[i] for i in ("torch_sgd_clipnorm", "torch_sgd_global_clipnorm",
                               "torch_sgd_clipvalue", "torch_sgd_exponentiallr",
                               "torch_sgd_steplr", "torch_sgd_momentum_ema",
                               "torch_sgd_momentum_accumulation")]
    c = {x.id: x for x in base}
    exponential = c["torch_sgd_exponentiallr"].config["learning_rate"]
    wrong = [
        # a per-parameter clip judged as Keras's global one, and the reverse
        _judged_as(c["torch_sgd_clipnorm"], "clipnorm_as_global", clipnorm=None,
                   global_clipnorm=1.0),
        _judged_as(c["torch_sgd_global_clipnorm"], "global_as_clipnorm", clipnorm=1.0,
                   global_clipnorm=None),
        _judged_as(c["torch_sgd_exponentiallr"], "other_decay_rate", learning_rate={
            **exponential, "config": {**exponential["config"], "decay_rate": 0.99}}),
        _judged_as(c["torch_sgd_momentum_ema"], "other_ema_momentum", ema_momentum=0.8),
        _judged_as(c["torch_sgd_momentum_accumulation"], "other_accumulation",
                   gradient_accumulation_steps=2),
    ]
    return {dtype: _run(base + wrong, dtype) for dtype in peer_run.DTYPES}


@pytest.mark.parametrize("id", ["torch_sgd_clipvalue", "torch_sgd_exponentiallr",
                                "torch_sgd_steplr", "torch_sgd_momentum_ema",
                                "torch_sgd_momentum_accumulation"])
@pytest.mark.parametrize("dtype", peer_run.DTYPES)
def test_torch_wrapper_is_keras_math(torch_results, id, dtype):
    r = torch_results[dtype][id]
    assert r["keras"] in ("exact", "match"), (id, dtype, r["first"])


@pytest.mark.parametrize("id", ["torch_sgd_clipnorm", "torch_sgd_global_clipnorm"])
def test_torch_clip_norm_epsilon_shows_in_float64_only(torch_results, id):
    assert torch_results["float32"][id]["keras"] in ("exact", "match")
    r = torch_results["float64"][id]
    assert r["keras"] == "mismatch" and r["first"]["first_divergent_step"] == 1


@pytest.mark.parametrize("id, step", [("clipnorm_as_global", 1), ("global_as_clipnorm", 1),
                                      ("other_decay_rate", 2), ("other_ema_momentum", 2),
                                      ("other_accumulation", 2)])
@pytest.mark.parametrize("dtype", peer_run.DTYPES)
def test_a_wrong_mapping_is_caught(torch_results, id, step, dtype):
    r = torch_results[dtype][id]
    assert r["keras"] == "mismatch" and r["first"]["first_divergent_step"] <= step, r["first"]


SCHEDULED = {
    "torch": "torch:SGD(lr=0.01) + LambdaLR(keras='PolynomialDecay', decay_steps=20,"
             " end_learning_rate=0.001, power=2.0, cycle=True)",
    "optax": "optax:rmsprop(learning_rate=0.1, decay=0.9, eps=1e-07) + Schedule("
             "keras='InverseTimeDecay', decay_steps=5, decay_rate=0.5, staircase=True)",
}


@pytest.mark.parametrize("library", ["torch", "optax"])
def test_schedule_function_is_keras_schedule(library):
    """Specificity: Keras's formula as the peer's schedule is Keras's rate (match in both
    dtypes).  Sensitivity: the same stream judged against the schedule with another
    argument, or with momentum (the rate outside the peer's buffer), parts."""
    needs(library)
    c = peers.parse(SCHEDULED[library], f"{library}_scheduled")
    schedule = c.config["learning_rate"]
    other = {"PolynomialDecay": {"power": 1.0}, "InverseTimeDecay": {"decay_rate": 0.25}}[
        schedule["class_name"]]
    wrong = _judged_as(c, "other_schedule", learning_rate={
        **schedule, "config": {**schedule["config"], **other}})
    momentum = peers.parse(
        {"torch": "torch:SGD(lr=0.05, momentum=0.9)", "optax":
         "optax:sgd(learning_rate=0.05, momentum=0.9)"}[library]
        + " + " + {"torch": "LambdaLR", "optax": "Schedule"}[library]
        + "(keras='ExponentialDecay', decay_steps=20, decay_rate=0.9)", "momentum_scheduled")
    for dtype in peer_run.DTYPES:
        r = _run([c, wrong, momentum], dtype)
        assert r[c.id]["keras"] in ("exact", "match"), (dtype, r[c.id]["first"])
        assert r["other_schedule"]["keras"] == "mismatch", dtype
        first = r["momentum_scheduled"]["first"]
        assert r["momentum_scheduled"]["keras"] == "mismatch" and (
            first["first_divergent_step"] == 2), first


@pytest.mark.parametrize("library", ["torch", "optax"])
def test_decoupled_decay_is_keras_weight_decay(library):
    """Specificity: the weights multiplied by 1 - lr * wd before the step is Keras's
    base weight decay (match in both dtypes).  Sensitivity: the same stream judged
    against another weight_decay parts at step 1."""
    needs(library)
    c = peers.load()[f"{library}_sgd_momentum_decoupled_decay"]
    assert c.config["weight_decay"] == 0.01
    wrong = _judged_as(c, "other_weight_decay", weight_decay=0.02)
    for dtype in peer_run.DTYPES:
        r = _run([c, wrong], dtype)
        assert r[c.id]["keras"] in ("exact", "match"), (dtype, r[c.id]["first"])
        assert r["other_weight_decay"]["keras"] == "mismatch", dtype
        assert r["other_weight_decay"]["first"]["first_divergent_step"] == 1


def test_port_takes_the_class_decay_over_the_wrapper():
    """decoupled_decay is offered for a class without its own decay (SGD, Adam), never
    beside one that has it (AdamW)."""
    config = {"learning_rate": 0.01, "momentum": 0.9, "weight_decay": 0.01}
    found, _ = port.candidates("torch", "SGD", config)
    assert [c.describe() for c in found] == [
        "torch:SGD(lr=0.01, momentum=0.9, nesterov=False) + decoupled_decay(weight_decay=0.01)"]
    found, _ = port.candidates("optax", "AdamW", {"learning_rate": 0.01, "weight_decay": 0.01})
    assert [c.wrappers for c in found] == [()]


@pytest.mark.needs("optax")
def test_port_through_a_schedule_function_proved(capsys):
    code = cli.main(["port", "adagrad_inverse_time_decay", "--to", "optax", "--steps",
                     str(STEPS), "--size", str(SIZE), "--scenario", SCENARIO[0]])
    out = capsys.readouterr().out
    assert code == 0 and ("port: optax:adagrad(learning_rate=0.1, initial_accumulator_value="
                          "0.1, eps=1e-07) + Schedule(keras='InverseTimeDecay', decay_steps=5,"
                          " decay_rate=0.5, staircase=True) (match)") in out


@pytest.mark.needs("optax")
def test_optax_wrappers():
    known = peers.load()
    ids = ["optax_sgd_global_clipnorm", "optax_sgd_clipvalue", "optax_sgd_exponential_decay",
           "optax_sgd_cosine_decay", "optax_sgd_momentum_incremental_update",
           "optax_sgd_momentum_ema", "optax_sgd_momentum_multisteps"]
    c = [known[i] for i in ids]
    wrong = _judged_as(known["optax_sgd_global_clipnorm"], "optax_global_as_clipnorm",
                       clipnorm=1.0, global_clipnorm=None)
    f32, f64 = (_run(c + [wrong], dtype) for dtype in peer_run.DTYPES)
    for id in ids[:4]:
        assert f32[id]["keras"] in ("exact", "match"), id
    for id in ("optax_sgd_global_clipnorm", "optax_sgd_clipvalue", "optax_sgd_cosine_decay"):
        assert f64[id]["keras"] in ("exact", "match"), id
    # the schedule's float32 value shows in float64, from the first step
    assert f64["optax_sgd_exponential_decay"]["keras"] == "mismatch"
    assert f64["optax_sgd_exponential_decay"]["first"]["first_divergent_step"] == 1
    for r in (f32, f64):
        assert r["optax_global_as_clipnorm"]["keras"] == "mismatch"
        # optax.ema moves the weights by averaged steps: the weights part, not only the average
        assert r["optax_sgd_momentum_ema"]["keras"] == "mismatch"
        assert r["optax_sgd_momentum_ema"]["final_drift"] > 1e-3
        # incremental_update's average starts at the initial weights, Keras's at 0 and
        # then at the weights after step 1
        first = r["optax_sgd_momentum_incremental_update"]["first"]
        assert (first["divergent_state"], first["first_divergent_step"]) == ("average", 0)
    # MultiSteps's float32 accumulator in float64 runs
    first = f64["optax_sgd_momentum_multisteps"]["first"]
    assert (first["divergent_state"], first["first_divergent_step"]) == (
        "gradient_accumulator", 1)


def test_port_finds_wrappers():
    found, blocked = port.candidates("torch", "Adam", {"learning_rate": 0.01, "clipnorm": 1.0})
    assert [c.describe() for c in found] == [
        "torch:Adam(lr=0.01, betas=[0.9, 0.999], eps=1e-07, amsgrad=False)"
        " + clip_grad_norm_each(max_norm=1.0)"]
    found, blocked = port.candidates("optax", "Adam", {"learning_rate": 0.01,
                                                       "global_clipnorm": 1.0})
    assert [c.wrappers for c in found] == [(("clip_by_global_norm", {"max_norm": 1.0}),)]
    # a Keras ExponentialDecay over 20 steps: torch's ExponentialLR cannot say it, only
    # LambdaLR with Keras's formula; optax has its own schedule and the formula
    schedule = {"class_name": "ExponentialDecay", "config": {
        "initial_learning_rate": 0.05, "decay_steps": 20, "decay_rate": 0.9}}
    found, blocked = port.candidates("torch", "SGD", {"learning_rate": schedule})
    assert [c.describe() for c in found] == [
        "torch:SGD(lr=0.05, momentum=0.0, nesterov=False) + LambdaLR(keras='ExponentialDecay',"
        " decay_steps=20, decay_rate=0.9)"]
    assert "ExponentialLR" not in str(blocked)
    found, _ = port.candidates("optax", "SGD", {"learning_rate": schedule})
    assert sorted(name for c in found for name, _ in c.wrappers) == [
        "Schedule", "exponential_decay"]
    assert all(c.config["learning_rate"] == {**schedule, "config": {
        **schedule["config"], "staircase": False}} for c in found)
    # EMA with an overwrite: optax.ema has none, incremental_update is the candidate
    found, blocked = port.candidates("optax", "Adam", {
        "learning_rate": 0.01, "use_ema": True, "ema_momentum": 0.9,
        "ema_overwrite_frequency": 10})
    assert [name for c in found for name, _ in c.wrappers] == ["incremental_update"]
    assert any("ema(decay=0.9)" in k and "ema_overwrite_frequency=10" in v
               for k, v in blocked.items())


@pytest.mark.needs("torch")
def test_port_with_a_wrapper_proved(capsys):
    code = cli.main(["port", "sgd_clipvalue", "--to", "torch", "--steps", str(STEPS),
                     "--size", str(SIZE), "--scenario", SCENARIO[0]])
    out = capsys.readouterr().out
    assert code == 0 and ("port: torch:SGD(lr=0.01, momentum=0.0, nesterov=False)"
                          " + clip_grad_value_(clip_value=0.5) (match)") in out


REPORTS = Path(__file__).resolve().parent.parent / "reports" / "peers"


def stale(text: str, ids) -> list:
    """What a committed peers/port report lacks of the current selection: a scenario
    not in its settings, an id not in its tables."""
    settings = re.search(r"scenarios ([a-z, ]+), seed", text)
    named = settings.group(1).split(", ") if settings else []
    return ([f"scenario {s}" for s in scenarios.SCENARIOS if s not in named]
            + [i for i in ids if f"| {i} " not in text])


def test_committed_reports_are_current():
    assert stale((REPORTS / "peers.md").read_text(), peers.load()) == []
    for library in peers.LIBRARIES:
        text = (REPORTS / f"port-to-{library}.md").read_text()
        assert stale(text, [f"Keras {i}:" for i in CONFIGURATIONS]) == [], library


def test_a_stale_report_is_told():
    text = (REPORTS / "peers.md").read_text()
    assert stale(text.replace(", nonfinite", ""), []) == ["scenario nonfinite"]
    assert stale(text.replace("| torch_sgd_steplr ", "| "), peers.load()) == [
        "torch_sgd_steplr"]


@pytest.mark.needs("torch")
def test_nonfinite_judged_apart():
    """torch's EMA lerp makes NaN of inf - inf where Keras keeps the infinity: Keras's
    math on finite gradients, a mismatch with NaN and inf, told apart; a run of the
    nonfinite scenario alone is judged on it."""
    c = peers.load()["torch_sgd_momentum_ema"]
    r = _run([c], "float64", ["gaussian", "nonfinite"], 12)[c.id]
    assert r["keras"] in ("exact", "match") and r["nonfinite"] == "mismatch"
    assert peer_run.nonfinite_text(r) == "mismatch (step 10, variable)"
    alone = _run([c], "float64", ["nonfinite"], 12)[c.id]
    assert alone["keras"] == "mismatch" and alone["nonfinite"] is None



def test_schedule_under_accumulation_counts_updates_where_keras_counts_calls():
    """Keras calls its schedule with _iterations, the calls, also under accumulation
    (keras/src/optimizers/base_optimizer.py, _get_current_learning_rate); torch's
    scheduler steps once per update.  Sensitivity: the peer parts from Keras's
    configuration with the same schedule at the first update, step 4.  Specificity:
    judged against the Keras schedule that gives the update count's rate at the call
    count 4k + 3, lr' 0.9^((4k + 3) / 4) with lr' = 0.05 * 0.9^-0.75, it is Keras's math.
    (optax's MultiSteps counts updates too, its inner state stepped only on them, but its
    float32 running mean parts first: explanations.toml.)"""
    needs("torch")
    c = peers.parse("torch:SGD(lr=0.05) + ExponentialLR(gamma=0.9) + accumulate(steps=4)",
                    "accumulated_schedule")
    schedule = c.config["learning_rate"]
    read_at_calls = _judged_as(c, "read_at_calls", learning_rate={**schedule, "config": {
        **schedule["config"], "initial_learning_rate": 0.05 * 0.9 ** -0.75,
        "decay_steps": 4}})
    for dtype in peer_run.DTYPES:
        r = _run([c, read_at_calls], dtype, steps=12)
        first = r[c.id]["first"]
        assert r[c.id]["keras"] == "mismatch" and first["first_divergent_step"] == 4, first
        assert r["read_at_calls"]["keras"] in ("exact", "match"), r["read_at_calls"]["first"]
