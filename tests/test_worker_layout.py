"""How the worker tells which weight each optimizer variable belongs to.

Stand-ins with the attributes the worker reads (`name`, `path`, `shape`), laid
out as Keras 3 releases lay out their optimizers: slots named
`<weight>_<slot>` (3.10+), slots named only `<slot>` but kept in a list indexed
like the weights (Adagrad before 3.10), scalar optimizer-wide state.
"""

from types import SimpleNamespace

import pytest

from verify.worker.run import _state_layout


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


def test_slots_of_their_own_shape_follow_their_list_and_absent_ones_are_none():
    # Adafactor: r and c named after the weight itself, shaped like it minus one axis,
    # a () placeholder for a weight of rank < 2; Muon: a velocity for some weights only
    weights = [var("s_vector", (4,)), var("s_matrix", (6, 3)), var("s_embedding", (8, 2))]
    it = var("iteration", ())
    r0, r1 = var("s_vector", ()), var("s_matrix", (6,))
    c1 = var("s_matrix", (3,))
    v2 = var("s_embedding_velocity", (8, 2))
    o = optimizer([it, r0, r1, c1, v2], iterations=it, _r=[r0, r1, None],
                  _c=[None, c1, None], _velocities=[None, None, v2])
    assert [(i, n) for i, n, _ in _state_layout(o, weights)] == [
        (0, "r"), (1, "r"), (1, "c"), (2, "velocity")]


def test_the_longest_weight_path_owns_a_prefixed_slot():
    weights = [var("a"), var("a_b")]
    it = var("iteration", ())
    m0, m1 = var("a_momentum"), var("a_b_momentum")
    o = optimizer([it, m0, m1], iterations=it)
    assert [(i, n) for i, n, _ in _state_layout(o, weights)] == [(0, "momentum"),
                                                                 (1, "momentum")]
