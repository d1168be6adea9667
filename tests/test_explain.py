"""The variant search: a known variant used as the "Keras" side is recovered,
and only variants with the same math match it; on real Keras it names the
piece that separates the paper from Keras."""

import numpy as np
import pytest

from reference import PRECISIONS, SPACES, Arithmetic, name_of, register_variants
from reference.rule import REGISTRY
from verify import compare
from verify.cli import installed_backends
from verify.explain import analyse, main, run_variants
from verify.configurations import CONFIGURATIONS

N, STEPS = 6, 8
SHAPE = (2, 3)  # one matrix of N elements: Adafactor factors it, Muon orthogonalizes it
# the configurations of issue 9, each with the pieces separating the paper from Keras
NEW = {
    "adamax": [("epsilon", "none", "added")],
    "adadelta": [("learning_rate", "none", "applied")],
    "adam_amsgrad": [("epsilon_placement", "none", "outside"), ("bias_correction", "off", "on")],
    "ftrl": [("initial_accumulator", "zero", "configured"), ("shrinkage", "none", "applied"),
             ("l2_factor", "1", "2"), ("weights", "from_state", "stored")],
    "lamb": [("decay_form", "trust_ratio", "base_optimizer")],
    "schedule_free_adamw": [("epsilon", "hat", "plain"), ("averaging", "gamma_squared", "uniform"),
                            ("decay_form", "z_step", "base_optimizer")],
    "adafactor": [("factored_moments", "sum", "mean"), ("relative_step", "configured", "always")],
}


def variant_stream(class_name, config, choices, grads):
    """States after each step of one variant, as Keras would report them."""
    rule = SPACES[class_name].rule(choices)
    hp = rule.hyperparameters(config)
    ar = Arithmetic("float64", PRECISIONS["jax"], track=False)
    specs = [sp for sp in rule.states(hp) if sp.shape_for(SHAPE, "s") is not None]
    state = {"variable": np.linspace(-1, 1, N).reshape(SHAPE)}
    for spec in specs:
        state[spec.name] = (state["variable"].copy() if spec.copies_variable else
                            np.full(spec.shape_for(SHAPE, "s"), spec.initial))
    history = [{k: np.ravel(v) for k, v in state.items()}]
    per_variable = {"variable"} | {sp.name for sp in specs if sp.per_variable}
    for t in range(STEPS):
        tracked = {k: [ar.exact(v[None])] if k in per_variable else ar.exact(np.ravel(v))
                   for k, v in state.items()}
        out = rule(ar, hp, tracked, [ar.exact(grads[t].reshape(SHAPE)[None])],
                   ar.step_count([float(t)]), ["s"])
        state = {k: (v[0] if isinstance(v, list) else v).v[0].copy() for k, v in out.items()}
        history.append({k: np.ravel(v) for k, v in state.items()})
    return history


def verdicts_against(class_name, config, history, grads):
    out = {}
    for family, choices in register_variants(SPACES[class_name]):
        rule = REGISTRY[(family, class_name)]
        names = [n for n in history[0] if n != "variable"]
        c = compare.RunComparison(family, rule, config, "float64", PRECISIONS["jax"],
                                  compare.Segments(["s"], [SHAPE]), grads, names)
        batch = lambda hs: {n: np.stack([h[n] for h in hs]) for n in history[0]}
        c.start(batch(history[:1]), 0)
        c.feed(1, batch(history[1:]), np.arange(1, STEPS + 1))
        out[name_of(choices)] = c.verdict(0)
    return out


CASES = [("Adam", {"learning_rate": 0.01}, c) for c in SPACES["Adam"].points()] + [
    ("Nadam", {"learning_rate": 0.01}, c) for c in SPACES["Nadam"].points()] + [
    ("Adagrad", {"learning_rate": 0.01}, c) for c in SPACES["Adagrad"].points()] + [
    ("RMSprop", {"learning_rate": 0.01}, c) for c in SPACES["RMSprop"].points()] + [
    (c.class_name, c.config, p) for c in (CONFIGURATIONS[i] for i in NEW)
    for p in SPACES[c.class_name].points()]


def same_math(a: dict, b: dict) -> bool:
    """Points that are one formula: without bias correction (both corrections
    are 1) or without epsilon, epsilon hat and plain epsilon coincide; and
    ScheduleFreeAdamW's x_from matters only where a variable's value aliases
    it (not under JAX's precision settings, which these streams use)."""
    differ = {p for p in a if a[p] != b[p]} - {"x_from"}
    return not differ or (differ == {"epsilon"} and (a.get("bias_correction") == "off"
                                                     or a.get("epsilon_placement") == "none"))


@pytest.mark.parametrize("class_name,config,choices", CASES,
                         ids=[f"{c[0]}-{name_of(c[2])}" for c in CASES])
def test_a_known_variant_is_recovered_and_only_it(class_name, config, choices):
    rng = np.random.default_rng(0)
    # gradients near epsilon's scale, so that every piece changes the numbers
    grads = rng.standard_normal((STEPS, N)) * np.logspace(-7, 0, N)
    history = variant_stream(class_name, config, choices, grads)
    verdicts = verdicts_against(class_name, config, history, grads)
    result = analyse(SPACES[class_name], verdicts, config)
    assert choices in result["matching"], verdicts
    assert all(same_math(choices, other) for other in result["matching"]), verdicts


def test_separating_piece_is_named():
    space = SPACES["Adam"]
    keras_like = dict(space.paper({}), epsilon="hat")
    verdicts = {name_of(c): "match" if c == keras_like else "mismatch" for c in space.points()}
    result = analyse(space, verdicts, {})
    assert result["separating"] == [[("epsilon", "plain", "hat")]]


@pytest.fixture(scope="module")
def real_keras():
    backends = installed_backends()
    backend = next(b for b in ("jax", "torch", "tensorflow") if b in backends)
    configurations = [CONFIGURATIONS[i] for i in ("adam", "adamw", "nadam", "sgd_nesterov",
                                                  *NEW)]
    return run_variants(configurations, backend, ["gaussian", "tiny"], 30, 8, 0)


@pytest.mark.parametrize("opt_id,expected", [
    ("adam", [("epsilon", "plain", "hat")]),
    ("adamw", [("epsilon", "plain", "hat"), ("decay_scale", "schedule", "lr")]),
    ("nadam", [("schedule_psi", "0.004", "1")]),
    *NEW.items(),
])
def test_real_keras_is_the_paper_with_these_pieces(real_keras, opt_id, expected):
    variants, df = real_keras
    c = CONFIGURATIONS[opt_id]
    space = SPACES[c.class_name]
    verdicts = {name_of(ch): compare.worst(df[(df.optimizer == opt_id) & (df.family == f)].verdict)
                for f, ch in variants[opt_id]}
    result = analyse(space, verdicts, c.config)
    assert result["keras_matches"]
    assert expected in result["separating"]


def test_real_keras_nesterov_forms_are_equivalent(real_keras):
    variants, df = real_keras
    got = {ch["nesterov_form"]: compare.worst(df[(df.optimizer == "sgd_nesterov")
                                                 & (df.family == f)].verdict)
           for f, ch in variants["sgd_nesterov"]}
    assert got["momentum_then_gradient"] in ("exact", "match")
    assert got["look_ahead_weights"] in ("exact", "match")  # Bengio et al.'s form
    assert got["none"] == "mismatch"  # and a real change is still caught


def test_explain_bad_optimizer_is_a_usage_error():
    from verify.cli import UsageError

    with pytest.raises(UsageError):
        main(["no_such_optimizer"])
