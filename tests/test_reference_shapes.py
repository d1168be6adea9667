"""Rules work per variable, on variables of any rank, and may see all of them.

Every rule of every family runs on a scalar, a vector, a matrix and a 4-D
variable at once; for an elementwise rule, evaluating all variables as one
flat variable (what the comparison does) must give bit for bit what the
per-variable evaluation gives, and what each variable gives alone.
"""

import numpy as np
import pytest

import reference
from reference import PRECISIONS, Arithmetic
from reference.arithmetic import Tracked, norm, sqrt, sum_over
from reference.optimizer import Optimizer, Point
from verify.configurations import CONFIGURATIONS

SHAPES = [(), (3,), (2, 3), (2, 1, 2, 2), (4, 2)]
PATHS = ["scalar", "vector", "matrix", "kernel", "embedding"]  # Muon routes on "embedding"
K = 4  # steps evaluated at once


def slot_shapes(spec, shapes, paths):
    return [spec.shape_for(s, p) for s, p in zip(shapes, paths)]


def inputs(ar, rule, hp, shapes, seed=0, paths=PATHS):
    rng = np.random.default_rng(seed)
    state = {"variable": [ar.exact(rng.standard_normal((K,) + s)) for s in shapes]}
    for spec in rule.states(hp):
        if spec.per_variable:
            state[spec.name] = [None if s is None else ar.exact(np.abs(
                rng.standard_normal((K,) + s))) for s in slot_shapes(spec, shapes, paths)]
        else:
            state[spec.name] = ar.exact(0.5 + 0.1 * rng.random(K))
    grads = [ar.exact(rng.standard_normal((K,) + s)) for s in shapes]
    return state, grads, ar.step_count(np.arange(K, dtype=float) * 3)


def same(a, b):
    def arr(x):
        return np.broadcast_to(x, np.shape(a.v))
    return (np.array_equal(a.v, b.v, equal_nan=True)
            and np.array_equal(arr(a.e), np.broadcast_to(b.e, np.shape(b.v)), equal_nan=True)
            and np.array_equal(arr(False if a.tie is None else a.tie),
                               np.broadcast_to(False if b.tie is None else b.tie,
                                               np.shape(b.v))))


def stated(family, opt_id):
    configuration = CONFIGURATIONS[opt_id]
    try:
        reference.get_rule(family, configuration.class_name).hyperparameters(configuration.config)
    except reference.Unsupported:
        return False  # test_not_stated's subject
    return True


CELLS = [(f, c) for c in CONFIGURATIONS for f in reference.FAMILIES if stated(f, c)]


def flat(xs):
    """Variables [K, *shape] laid end to end as one [K, N] variable."""
    v = np.concatenate([np.reshape(x.v, (K, -1)) for x in xs], axis=1)
    e = np.concatenate([np.broadcast_to(x.e, np.shape(x.v)).reshape(K, -1) for x in xs], axis=1)
    tie = None
    if any(x.tie is not None for x in xs):  # a tied step (a schedule's restart)
        tie = np.concatenate([np.broadcast_to(False if x.tie is None else x.tie,
                                              np.shape(x.v)).reshape(K, -1) for x in xs], axis=1)
    return Tracked(v, e, xs[0].ar, tie)


@pytest.mark.parametrize("family,opt_id", CELLS, ids=[f"{f}-{c}" for f, c in CELLS])
@pytest.mark.parametrize("precision", ["tensorflow", "torch"])
def test_flat_per_variable_and_alone_agree_on_every_rank(family, opt_id, precision):
    configuration = CONFIGURATIONS[opt_id]
    rule = reference.get_rule(family, configuration.class_name)
    hp = rule.hyperparameters(configuration.config)
    ar = Arithmetic("float32", PRECISIONS[precision])
    state, grads, t = inputs(ar, rule, hp, SHAPES)
    a = rule(ar, hp, state, grads, t, PATHS)
    expected = {spec.name: slot_shapes(spec, SHAPES, PATHS) for spec in rule.states(hp)}
    expected["variable"] = SHAPES
    for name in a:
        if isinstance(a[name], list):
            assert [None if x is None else np.shape(x.v) for x in a[name]] == [
                None if s is None else (K,) + s for s in expected[name]], name
    if rule.elementwise(hp):  # Lamb's per-variable norms are not
        b = rule(ar, hp, {n: [flat(v)] if isinstance(v, list) else v
                          for n, v in state.items()}, [flat(grads)], t)
        assert a.keys() == b.keys()
        for name in a:
            if isinstance(a[name], list):
                assert same(flat(a[name]), b[name][0]), name
            else:
                assert np.shape(a[name].v) == (K,) and same(a[name], b[name]), name
    if hp.get("global_clipnorm") is not None or (family == "textbook" and hp.get("clipnorm")):
        # one norm over all variables (the textbook's clipnorm is Pascanu et al.'s, over
        # all parameters): a variable alone is another computation
        return
    for i in range(len(SHAPES)):  # each variable alone
        alone = {n: [v[i]] if isinstance(v, list) else v for n, v in state.items()}
        c = rule(ar, hp, alone, [grads[i]], t, [PATHS[i]])
        for name in c:
            if isinstance(c[name], list):
                x, y = c[name][0], a[name][i]
                assert (x is None and y is None) or same(x, y), (name, i)


def test_a_swapped_variable_order_is_seen():
    """Sensitivity of the test above: results follow their own variable."""
    rule = reference.get_rule("keras", "Adam")
    hp = rule.hyperparameters({})
    ar = Arithmetic("float32", PRECISIONS["jax"])
    state, grads, t = inputs(ar, rule, hp, [(3,), (3,)], paths=["a", "b"])
    a = rule(ar, hp, state, grads, t)
    swapped = rule(ar, hp, {n: v[::-1] for n, v in state.items()}, grads, t)
    assert not same(a["variable"][0], swapped["variable"][0])


def _normalized_update(ar, hp, c, s, g, t, lr):
    """w = w - lr * g / |g| per variable, or / the global norm of all gradients."""
    scale = s["global_norm"] if c["norm"] == "global" else norm(g, tuple(range(1, g.v.ndim)),
                                                                keepdims=True)
    return {"variable": s["variable"] - lr * g / scale}


def _global_norm(ar, hp, c, state, grads, t):
    return {"global_norm": sqrt(sum(sum_over(g * g, tuple(range(1, g.v.ndim)))
                                    for g in grads))}


def _toy(norm_choice):
    point = Point({"norm": norm_choice}, source="test", doc="", keras_base=True)
    return Optimizer("Toy", {"learning_rate": 0.1}, {"norm": ("variable", "global")},
                     lambda hp, c: [], _normalized_update, {"keras": point},
                     prepare=_global_norm if norm_choice == "global" else None,
                     elementwise=False).rule("keras")


def test_a_rule_that_reduces_is_not_evaluated_flat():
    assert not _toy("variable").elementwise({"learning_rate": 0.1, "weight_decay": None})


def test_a_rule_may_reduce_over_its_variable_and_over_all_variables():
    ar = Arithmetic("float64", PRECISIONS["exact"])
    rng = np.random.default_rng(1)
    w = [rng.standard_normal((2,) + s) for s in [(3,), (2, 3)]]
    g = [rng.standard_normal((2,) + s) for s in [(3,), (2, 3)]]
    t = ar.step_count([0.0, 1.0])
    state = {"variable": [ar.exact(x) for x in w]}
    out = _toy("variable")(ar, {"learning_rate": 0.1, "weight_decay": None}, state,
                           [ar.exact(x) for x in g], t)
    for wi, gi, o in zip(w, g, out["variable"]):
        n = np.sqrt(np.sum(gi.reshape(2, -1) ** 2, axis=1)).reshape((2,) + (1,) * (gi.ndim - 1))
        np.testing.assert_allclose(o.v, wi - 0.1 * gi / n, rtol=1e-14)
        assert np.all(o.e > 0)
    # all variables: the prepare stage sees every gradient
    out = _toy("global")(ar, {"learning_rate": 0.1, "weight_decay": None}, state,
                         [ar.exact(x) for x in g], t)
    total = np.sqrt(sum(np.sum(x.reshape(2, -1) ** 2, axis=1) for x in g))
    for wi, gi, o in zip(w, g, out["variable"]):
        np.testing.assert_allclose(
            o.v, wi - 0.1 * gi / total.reshape((2,) + (1,) * (gi.ndim - 1)), rtol=1e-14)
