"""Keras's learning-rate schedules (reference/schedules.py) against Keras's own
schedule objects, evaluated in float32 on every installed backend (one
subprocess per backend, as the workers run): the reference's bound covers
Keras's value at every step (specificity), and the reference read one step
late is rejected (sensitivity)."""

import json
import subprocess
import sys

import numpy as np
import pytest

import reference
from reference import PRECISIONS, Arithmetic, schedules
from verify.compare import TOLERANCE, element_errors
from verify.configurations import CONFIGURATIONS
from verify.processes import pinned_environment
from verify.selection import installed_backends

# every step of the first 40 (the warmups, pieces, cycles and first restarts), then
# every 11th up to 1000 (later restarts and cycles, the ends of the decays) and the
# later restarts of the configurations' CosineDecayRestarts
STEPS = sorted(set(range(40)) | set(range(40, 1000, 11)) | {70, 150, 310, 630})

# the configurations' schedules and the branches they leave out
SCHEDULES = {c.id: c.config["learning_rate"] for c in CONFIGURATIONS.values()
             if schedules.is_schedule(c.config.get("learning_rate"))}
SCHEDULES.update({
    "exponential_staircase": {"class_name": "ExponentialDecay", "config": {
        "initial_learning_rate": 0.1, "decay_steps": 7, "decay_rate": 0.96,
        "staircase": True}},
    "inverse_time_smooth": {"class_name": "InverseTimeDecay", "config": {
        "initial_learning_rate": 0.1, "decay_steps": 3, "decay_rate": 0.7}},
    "polynomial_linear_capped": {"class_name": "PolynomialDecay", "config": {
        "initial_learning_rate": 0.1, "decay_steps": 300, "end_learning_rate": 0.01}},
    "cosine_plain": {"class_name": "CosineDecay", "config": {
        "initial_learning_rate": 0.1, "decay_steps": 300, "alpha": 0.05}},
    "cosine_restarts_constant_period": {"class_name": "CosineDecayRestarts", "config": {
        "initial_learning_rate": 0.1, "first_decay_steps": 30, "t_mul": 1.0, "m_mul": 0.9}},
    "cosine_restarts_t_mul_3": {"class_name": "CosineDecayRestarts", "config": {
        "initial_learning_rate": 0.1, "first_decay_steps": 7, "t_mul": 3.0, "alpha": 0.2}},
})

KERAS_VALUES = """
import json, sys
import numpy as np
import keras
from keras import ops
specs, steps = json.loads(sys.stdin.read())
out = {}
for name, spec in specs.items():
    schedule = keras.optimizers.schedules.deserialize(spec)
    values = [ops.convert_to_numpy(schedule(ops.convert_to_tensor(t, dtype="int32" if
              keras.backend.backend() == "jax" else "int64"))) for t in steps]
    out[name] = {"dtype": str(values[0].dtype), "values": [float(v) for v in values]}
print(json.dumps(out))
"""


# (backend, the working dtype of the runs it serves: JAX's x64 is on exactly for float64)
PROCESSES = [(b, d) for b in installed_backends()
             for d in (("float32", "float64") if b == "jax" else ("float32",))]


# JAX's x64 process computes the same float32 schedules with int64 steps: weekly (slow)
@pytest.fixture(scope="module", ids=["-".join(p) for p in PROCESSES], params=[
    pytest.param(p, marks=pytest.mark.slow if p == ("jax", "float64") else ()) for p in PROCESSES])
def keras_values(request, tmp_path_factory):
    backend, dtype = request.param
    env = pinned_environment(backend, tmp_path_factory.mktemp("keras_home"),
                             x64=dtype == "float64")
    done = subprocess.run([sys.executable, "-c", KERAS_VALUES], env=env, text=True,
                          capture_output=True, check=True,
                          input=json.dumps([SCHEDULES, STEPS]))
    return backend, dtype, json.loads(done.stdout.splitlines()[-1])


def reference_lr(backend, spec, steps, dtype="float32"):
    ar = Arithmetic(dtype, PRECISIONS[backend])
    return schedules.learning_rate(ar, spec, ar.step_count(np.asarray(steps, np.float64)))


def scaled(tracked, values):
    _, _, s = element_errors(np.asarray(values, tracked.v.dtype), tracked.v, tracked.e,
                             tracked.tie)
    return s


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_the_reference_covers_kerass_float32_schedule_at_every_step(keras_values, name):
    backend, dtype, values = keras_values
    keras = np.asarray(values[name]["values"])
    # the runs of this process's dtype; a float32 process serves float64 runs too
    for working in (dtype,) if dtype == "float64" or backend == "jax" else ("float32",
                                                                           "float64"):
        lr = reference_lr(backend, SCHEDULES[name], STEPS, working)
        s = scaled(lr, keras)
        assert s.max() <= TOLERANCE, (working, STEPS[int(s.argmax())], float(s.max()))
        assert np.mean(lr.v == keras) > 0.5  # mostly bit for bit, not a loose bound
        # ties only where log(.) / log(t_mul) is within rounding of a restart
        assert lr.tie is None or np.sum(lr.tie) <= 8


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_the_schedule_read_one_step_late_is_rejected(keras_values, name):
    backend, dtype, values = keras_values
    keras = np.asarray(values[name]["values"])
    late = reference_lr(backend, SCHEDULES[name], np.asarray(STEPS) + 1, dtype)
    assert scaled(late, keras).max() > TOLERANCE


def test_each_configuration_schedule_moves_within_a_short_run():
    """Every configured schedule changes its value within 30 steps and within
    1000 (so a shifted read shows in the short test runs and in the default)."""
    for name in [c.id for c in CONFIGURATIONS.values()
                 if schedules.is_schedule(c.config.get("learning_rate"))]:
        lr = reference_lr("jax", SCHEDULES[name], np.arange(1000)).v
        assert len(set(lr[:30])) > 2 and len(set(lr[30:])) > 1, name


def test_a_schedule_uses_the_stored_iteration_also_under_accumulation():
    """`_get_current_learning_rate` calls the schedule with `_iterations`, not the
    `iterations` property (_iterations // n): the keras rule's update at stored
    iteration 7 with n = 4 takes the rate of step 7."""
    spec = SCHEDULES["adagrad_inverse_time_decay"]
    rule = reference.get_rule("keras", "SGD")
    ar = Arithmetic("float64", PRECISIONS["jax"])
    hp = rule.hyperparameters({"learning_rate": spec, "gradient_accumulation_steps": 4})
    state = {"variable": [ar.exact([1.0])], "gradient_accumulator": [ar.exact([0.0])]}
    out = rule(ar, hp, state, [ar.exact([4.0])], ar.step_count([7.0]))
    rate = reference_lr("jax", spec, [7], "float64").v[0]
    assert rate != reference_lr("jax", spec, [1], "float64").v[0]
    assert out["variable"][0].v[0] == 1.0 - rate * 1.0


def test_the_article_and_textbook_families_do_not_state_a_schedule():
    config = CONFIGURATIONS["sgd_momentum_exponential_decay"].config
    for family in ("article", "textbook"):
        with pytest.raises(reference.Unsupported, match="constant learning rate"):
            reference.get_rule(family, "SGD").hyperparameters(config)
    reference.get_rule("keras", "SGD").hyperparameters(config)


@pytest.mark.parametrize("spec,reason", [
    ({"class_name": "StepDecay", "config": {}}, "no model of the learning-rate schedule"),
    ({"class_name": "CosineDecay", "config": {"initial_learning_rate": 0.1}},
     "needs 'decay_steps'"),
    ({"class_name": "CosineDecay", "config": {"initial_learning_rate": 0.1,
                                              "decay_steps": 5, "beta": 1}},
     "has no argument 'beta'"),
])
def test_a_schedule_the_reference_does_not_model_is_unsupported(spec, reason):
    with pytest.raises(reference.Unsupported, match=reason):
        reference.get_rule("keras", "Adam").hyperparameters({"learning_rate": spec})


@pytest.mark.parametrize("name", list(schedules.DEFAULTS))
def test_a_schedule_with_only_its_required_arguments_is_modelled(name):
    """An argument with a default of None (CosineDecay's warmup_target) is not required."""
    required = {k: 1 for k, v in schedules.DEFAULTS[name].items() if v is schedules.REQUIRED}
    assert schedules.unsupported({"class_name": name, "config": required}) is None
    assert "warmup_target" not in required
    if required:  # sensitivity: one required argument left out is refused
        missing = dict(list(required.items())[1:])
        assert "needs" in schedules.unsupported({"class_name": name, "config": missing})
