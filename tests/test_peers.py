"""Peers: torch.optim and optax optimizers judged by the reference families.

Specificity: a peer whose math is Keras's (torch SGD, optax SGD) is exact or match
under the `keras` family.  Sensitivity: the same run with a changed learning rate on
the Keras side is a mismatch, and known differences are found and named by the
variant search (torch Adam's epsilon added to sqrt(v_hat), torch Adagrad's epsilon
outside the square root; its initial accumulator 0 against Keras's 0.1 among the
defaults)."""

import dataclasses
import inspect

import pytest

from conftest import needs

from reference import SPACES
from verify import cli, peers
from verify.peers import port
from verify.peers import run as peer_run

STEPS, SIZE, SCENARIO = 10, 8, ["gaussian"]


def test_parse_maps_arguments_to_keras():
    c = peers.parse("torch:Adam(lr=0.01, eps=1e-7, betas=(0.8, 0.99))")
    assert (c.library, c.peer_class, c.class_name, c.backend) == ("torch", "Adam", "Adam",
                                                                   "torch.optim")
    assert c.config == {"learning_rate": 0.01, "beta_1": 0.8, "beta_2": 0.99,
                        "epsilon": 1e-7, "amsgrad": False}
    sgd = peers.parse("torch:SGD(lr=0.1, momentum=0.9)")
    assert sgd.scale == {"momentum_buffer": -0.1}  # Keras's momentum is -lr times torch's
    assert peers.parse("optax:adam(learning_rate=0.1)").peer_spec()["kwargs"] == {
        "learning_rate": 0.1}
    # an id from the class and the arguments, whatever their order
    assert c.id == peers.parse("torch:Adam(betas=(0.8, 0.99), eps=1e-7, lr=0.01)").id
    assert peers.ID.fullmatch(c.id) and c.id != sgd.id


@pytest.mark.parametrize("text, words", [
    ("keras:Adam()", "LIBRARY:Class"),
    ("torch:Adamm()", "no torch class Adamm"),
    ("torch:Adam(foo=1)", "no argument 'foo'"),
    ("torch:SGD(lr=0.1, dampening=0.5)", "no counterpart of dampening=0.5"),
    ("torch:Adam(lr=x)", "literals"),
    ("torch:Adam(0.1)", "named arguments"),
    ("optax:adam()", "needs learning_rate"),
    ("torch:Adam(betas=0.9)", "betas must be a list"),
    ("torch:Adam(lr='a')", "lr must be a number"),
    ("torch:SGD(nesterov=1)", "nesterov must be a bool"),
])
def test_parse_refuses(text, words):
    with pytest.raises(peers.PeerError, match=words):
        peers.parse(text)


def test_bad_peer_is_one_line_and_exit_2(tmp_path, capsys):
    out = tmp_path / "report.md"
    assert cli.main(["peers", "--peer", "torch:Adam(foo=1)", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "foo" in err[0] and not out.exists()


@pytest.mark.needs("torch")
def test_a_peer_that_refuses_its_arguments_is_exit_2_nothing_written(tmp_path, capsys):
    out = tmp_path / "report.md"
    assert cli.main(["peers", "--peer", "torch:Adam(lr=-1.0)", "--output", str(out),
                     "--steps", "2", "--size", "4", "--scenario", "gaussian",
                     "--dtype", "float32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "torch raises ValueError" in err[0] and not out.exists()


def _signature_defaults(library, name):
    if library == "torch":
        import torch
        function = getattr(torch.optim, name).__init__
    else:
        import optax
        function = optax
        for part in peers.CLASSES[library, name].get("function", name).split("."):
            function = getattr(function, part)  # optax.contrib.muon
    return {k: p.default for k, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("library, name", sorted(peers.CLASSES))
def test_classes_toml_states_the_installed_defaults(library, name):
    needs(library)
    entry = peers.CLASSES[library, name]
    actual = _signature_defaults(library, name)
    # a fixed value the peer must be given is Keras's behaviour, not its default
    stated = {k: v for k, v in {**entry.get("defaults", {}), **entry.get("free", {}),
                                **entry.get("fixed", {})}.items()
              if k not in entry.get("required", [])}
    for argument, value in stated.items():
        got = actual[argument]
        assert (list(got) if isinstance(got, tuple) else got) == value, (library, name,
                                                                         argument)


@pytest.fixture(scope="module")
def torch_rows():
    needs("torch")
    known = peers.load()
    chosen = [known[i] for i in ("torch_sgd", "torch_sgd_momentum", "torch_adam",
                                 "torch_adagrad_defaults")]
    # the same torch SGD stream against a Keras configuration with another learning rate
    wrong = dataclasses.replace(known["torch_sgd"], id="torch_sgd_wrong_lr",
                                config={**known["torch_sgd"].config, "learning_rate": 0.0101})
    # torch's momentum buffer read in the wrong units (Keras's momentum is -lr times it)
    unscaled = dataclasses.replace(known["torch_sgd_momentum"], id="torch_sgd_unscaled",
                                   scale={"momentum_buffer": 0.01})
    configurations = chosen + [wrong, unscaled]
    variants, df, environment = peer_run.run_peers(configurations, peer_run.DTYPES, SCENARIO,
                                                   STEPS, SIZE, 0)
    return configurations, variants, df, environment


def _result(rows, id, dtype):
    configurations, variants, df, _ = rows
    results = peer_run.analyse(configurations, variants, df, [dtype])
    return next(r for r in results if r["configuration"].id == id)


@pytest.mark.parametrize("dtype", peer_run.DTYPES)
def test_torch_sgd_is_keras_math(torch_rows, dtype):
    for id in ("torch_sgd", "torch_sgd_momentum"):
        r = _result(torch_rows, id, dtype)
        assert r["keras"] in ("exact", "match"), (id, r["first"])
        assert peer_run.pieces_text(r["space"], r["matching"]) == "Keras's"


@pytest.mark.parametrize("dtype", peer_run.DTYPES)
def test_a_changed_learning_rate_is_caught(torch_rows, dtype):
    r = _result(torch_rows, "torch_sgd_wrong_lr", dtype)
    assert r["keras"] == "mismatch" and r["first"]["first_divergent_step"] == 1


@pytest.mark.parametrize("dtype", peer_run.DTYPES)
def test_a_slot_in_the_wrong_units_is_caught(torch_rows, dtype):
    r = _result(torch_rows, "torch_sgd_unscaled", dtype)
    assert r["keras"] == "mismatch" and r["first"]["divergent_state"] == "momentum"


def test_torch_adam_epsilon_found_and_named(torch_rows):
    r = _result(torch_rows, "torch_adam", "float64")
    assert r["keras"] == "mismatch"
    assert peer_run.pieces_text(r["space"], r["matching"]) == "epsilon=plain"


def test_torch_adagrad_defaults_named(torch_rows):
    c = peers.load()["torch_adagrad_defaults"]
    assert "initial_accumulator_value 0.0 (Keras 0.1)" in peer_run.default_differences(c)
    r = _result(torch_rows, "torch_adagrad_defaults", "float64")
    assert r["keras"] == "mismatch"
    # with torch's initial accumulator (0) both initial-accumulator pieces coincide
    assert peer_run.pieces_text(r["space"], r["matching"]) == "epsilon_placement=outside"


def test_peer_versions_in_environment(torch_rows):
    import torch
    assert torch.__version__ in torch_rows[3]["backends"]["torch.optim"]["version"]


@pytest.mark.needs("optax")
@pytest.mark.parametrize("dtype", peer_run.DTYPES)
def test_optax_sgd_matches_and_adam_epsilon_named(dtype):
    known = peers.load()
    configurations = [known["optax_sgd_momentum"], known["optax_adam"]]
    variants, df, _ = peer_run.run_peers(configurations, [dtype], SCENARIO, STEPS, SIZE, 0)
    sgd, adam = peer_run.analyse(configurations, variants, df, [dtype])
    assert sgd["keras"] in ("exact", "match")
    assert adam["keras"] == "mismatch"
    assert "epsilon=plain" in peer_run.pieces_text(SPACES["Adam"], adam["matching"])


@pytest.mark.needs("optax")
@pytest.mark.parametrize("dtype", peer_run.DTYPES)
def test_optax_schedule_free_adamw(dtype):
    """Keras's math at a constant rate (specificity); with warmup and decay optax's
    warmup starts from 0 and z parts at step 1 (sensitivity: the same stream judged
    against Keras's configuration with another beta_1 parts too)."""
    known = peers.load()
    plain = known["optax_schedule_free_adamw"]
    configurations = [plain, known["optax_schedule_free_adamw_warmup_decay"],
                      dataclasses.replace(plain, id="other_beta_1",
                                          config={**plain.config, "beta_1": 0.8})]
    variants, df, _ = peer_run.run_peers(configurations, [dtype], SCENARIO, STEPS, SIZE, 0)
    r = {x["configuration"].id: x for x in peer_run.analyse(configurations, variants, df,
                                                           [dtype])}
    assert r[plain.id]["keras"] in ("exact", "match"), r[plain.id]["first"]
    warm = r["optax_schedule_free_adamw_warmup_decay"]
    assert warm["keras"] == "mismatch" and (warm["first"]["first_divergent_step"],
                                            warm["first"]["divergent_state"]) == (1, "momentum")
    assert r["other_beta_1"]["keras"] == "mismatch"


def _port(capsys, *argv):
    code = cli.main(["port", *argv, "--steps", str(STEPS), "--size", str(SIZE),
                     "--scenario", SCENARIO[0]])
    return code, capsys.readouterr().out


@pytest.mark.needs("torch")
def test_port_found_and_proved(capsys):
    code, out = _port(capsys, "sgd_momentum", "--to", "torch")
    assert code == 0
    assert "port: torch:SGD(lr=0.01, momentum=0.9, nesterov=False) (match)" in out


@pytest.mark.needs("torch")
def test_no_port_names_the_piece(capsys):
    code, out = _port(capsys, "adam", "--to", "torch")
    assert code == 0 and "no torch port: epsilon=plain; closest torch:Adam(" in out


def test_port_blocked_by_an_argument_without_counterpart():
    found, blocked = port.candidates("optax", "Adam", {"learning_rate": 0.01, "clipnorm": 1.0})
    assert found == [] and blocked["adam"] == "no counterpart of clipnorm=1.0"
    # Keras's Lion has no decay: optax's lion (default weight_decay 1e-3) gets 0
    found, _ = port.candidates("optax", "Lion", {"learning_rate": 0.001})
    assert [c.describe() for c in found] == [
        "optax:lion(learning_rate=0.001, b1=0.9, b2=0.99, weight_decay=0.0)"]
    found, blocked = port.candidates("torch", "Adam", {"learning_rate": 0.01})
    assert [c.describe() for c in found] == [
        "torch:Adam(lr=0.01, betas=[0.9, 0.999], eps=1e-07, amsgrad=False)"]


@pytest.mark.needs("torch")
def test_port_from_torch(capsys):
    code, out = _port(capsys, "torch_sgd", "--from", "torch")
    assert code == 0 and "Keras SGD(learning_rate=0.01, momentum=0.0, nesterov=False): match" in out
    code, out = _port(capsys, "torch:Adagrad()", "--from", "torch")
    assert code == 0 and "does not reproduce it: epsilon_placement=outside" in out


def test_port_bad_input(capsys):
    assert cli.main(["port", "nosuch", "--to", "torch"]) == 2
    assert cli.main(["port", "optax_adam", "--from", "torch"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2


def test_port_of_adam_with_decay_tries_adamw():
    # Keras's AdamW is its Adam with a weight_decay default: where Keras's Adam decays,
    # the peer's AdamW is a candidate (with the training loop's wrappers), and its Adam
    # with the loop's decoupled_decay
    found, blocked = port.candidates("torch", "Adam", {
        "learning_rate": 0.01, "weight_decay": 0.01, "clipnorm": 1.0,
        "gradient_accumulation_steps": 4})
    assert [c.describe() for c in found] == [
        "torch:Adam(lr=0.01, betas=[0.9, 0.999], eps=1e-07, amsgrad=False) + accumulate("
        "steps=4) + clip_grad_norm_each(max_norm=1.0) + decoupled_decay(weight_decay=0.01)",
        "torch:AdamW(lr=0.01, betas=[0.9, 0.999], eps=1e-07, weight_decay=0.01, "
        "amsgrad=False) + accumulate(steps=4) + clip_grad_norm_each(max_norm=1.0)"]
    assert found[1].class_name == "AdamW" and blocked == {}
    # without decay only Adam is
    found, _ = port.candidates("torch", "Adam", {"learning_rate": 0.01})
    assert [c.peer_class for c in found] == ["Adam"]
