"""How the worker tells which weight each optimizer variable belongs to.

Stand-ins with the attributes the worker reads (`name`, `path`, `shape`), laid
out as Keras 3 releases lay out their optimizers: slots named
`<weight>_<slot>` (3.10+), slots named only `<slot>` but kept in a list indexed
like the weights (Adagrad before 3.10), scalar optimizer-wide state.
"""

from types import SimpleNamespace

import pytest

from verify.worker import _state_layout


def var(name, shape=(3,), path=None):
    return SimpleNamespace(name=name, path=path or name, shape=shape)


def optimizer(variables, **attributes):
    o = SimpleNamespace(**attributes)
    o.variables = variables
    return o


WEIGHTS = [var("v0", (3,)), var("v1", (2,))]


def layout(o):
    return [(i, name) for i, name, _ in _state_layout(o, WEIGHTS)]


def test_prefixed_slots_and_scalar_state():
    it, lr, u = var("iteration", ()), var("learning_rate", ()), var("variable", ())
    m0, m1 = var("v0_momentum"), var("v1_momentum", (2,))
    o = optimizer([it, lr, u, m0, m1], iterations=it, _learning_rate=lr, _u_product=u,
                  _momentums=[m0, m1])
    assert layout(o) == [(None, "u_product"), (0, "momentum"), (1, "momentum")]


def test_unprefixed_slots_found_through_their_index_list():
    it, lr = var("iteration", ()), var("learning_rate", ())
    a0, a1 = var("accumulator"), var("accumulator", (2,))
    o = optimizer([it, lr, a0, a1], iterations=it, _learning_rate=lr, _accumulators=[a0, a1])
    assert layout(o) == [(0, "accumulator"), (1, "accumulator")]


def test_unprefixed_slots_follow_their_list_not_the_variable_order():
    weights = [var("v0"), var("v1")]
    it = var("iteration", ())
    a0, a1 = var("accumulator"), var("accumulator")
    o = optimizer([it, a0, a1], iterations=it, _accumulators=[a1, a0])
    assert [(i, n) for i, n, _ in _state_layout(o, weights)] == [(1, "accumulator"),
                                                                 (0, "accumulator")]


def test_unprefixed_slot_with_no_index_is_an_error():
    it = var("iteration", ())
    o = optimizer([it, var("accumulator")], iterations=it)
    with pytest.raises(ValueError, match="names no weight"):
        _state_layout(o, WEIGHTS)


def test_learning_rate_not_owned_by_the_optimizer_is_not_skipped_by_name():
    it, lr = var("iteration", ()), var("learning_rate", ())
    o = optimizer([it, lr], iterations=it, _learning_rate=var("learning_rate", ()))
    assert layout(o) == [(None, "learning_rate")]


def test_a_list_of_other_variables_is_not_taken_for_a_slot_index():
    it, lr = var("iteration", ()), var("learning_rate", ())
    a0, a1 = var("accumulator", (2,)), var("accumulator", (3,))
    # the same length as the weights, but the shapes say it is not indexed like them
    o = optimizer([it, lr, a0, a1], iterations=it, _learning_rate=lr, _all=[a0, a1])
    with pytest.raises(ValueError, match="names no weight"):
        _state_layout(o, WEIGHTS)
