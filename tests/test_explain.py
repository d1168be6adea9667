"""The variant search: a known variant used as the "Keras" side is recovered,
and only variants with the same math match it; on real Keras it names the
piece that separates the paper from Keras."""

import numpy as np
import pytest

from reference import PRECISIONS, SPACES, Arithmetic, name_of, register_variants
from reference.rule import REGISTRY
from verify import compare
from verify.commands.explain import analyse, main, run_variants
from verify.configurations import CONFIGURATIONS
from verify.selection import installed_backends

STEPS = 8
# a matrix (Adafactor factors it, Muon orthogonalizes it) and a vector (Muon's AdamW
# branch), one scenario
LAYOUT = compare.Segments(["s_matrix", "s_vector"], [(3, 2), (3,)], groups=[0, 0],
                          group_count=1)
N = LAYOUT.total
# gradient scales near epsilon's, so that every piece changes the numbers: the matrix's
# of the order of Muon's 1e-7 in ||x||_F + 1e-7, the vector's from 1e-7 to 1
SCALE = np.concatenate([np.full(6, 3e-8), np.logspace(-7, 0, 3)])
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
    "muon": [("ns_normalisation", "frobenius", "frobenius_plus_1e-7"), ("adam_epsilon", "plain", "hat"),
             ("adam_decay_lr", "adam_lr", "lr")],
}


def variant_stream(class_name, config, choices, grads):
    """States after each step of one variant, as Keras would report them: each
    state the variables' arrays laid end to end."""
    rule = SPACES[class_name].rule(choices)
    hp = rule.hyperparameters(config)
    ar = Arithmetic("float64", PRECISIONS["jax"], track=False)
    weights = [ar.exact(p) for p in LAYOUT.split(np.linspace(-1, 1, N)[None])]
    state = {"variable": weights}
    for spec in rule.states(hp):
        if not spec.per_variable:
            state[spec.name] = ar.exact(np.full(1, spec.initial))
            continue
        shapes = [spec.shape_for(s, p) for s, p in zip(LAYOUT.shapes, LAYOUT.names)]
        if all(s is None for s in shapes):
            continue
        state[spec.name] = [None if s is None else w if spec.copies_variable
                            else ar.exact(np.full((1,) + s, spec.initial))
                            for s, w in zip(shapes, weights)]

    def flat(v):
        parts = v if isinstance(v, list) else [v]
        return np.concatenate([np.ravel(p.v) for p in parts if p is not None])

    history = [{k: flat(v) for k, v in state.items()}]
    for t in range(STEPS):
        out = rule(ar, hp, state, [ar.exact(p) for p in LAYOUT.split(grads[t][None])],
                   ar.step_count([float(t)]), LAYOUT.names)
        state = {k: out[k] for k in state}
        history.append({k: flat(v) for k, v in state.items()})
    return history


def verdicts_against(class_name, config, history, grads):
    out = {}
    for family, choices in register_variants(SPACES[class_name]):
        rule = REGISTRY[(family, class_name)]
        names = [n for n in history[0] if n != "variable"]
        c = compare.RunComparison(family, rule, config, "float64", PRECISIONS["jax"],
                                  LAYOUT, grads, names)
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
    grads = rng.standard_normal((STEPS, N)) * SCALE
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
    from verify.selection import UsageError

    with pytest.raises(UsageError):
        main(["no_such_optimizer"])
