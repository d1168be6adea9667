"""A plain callable learning rate, {"callable": x} in a configuration: Keras's
`lambda: x` (a Python float through each update's ops.cast, never a float32
variable) or `lambda: schedule(optimizer.iterations)` (the property: _iterations
// n under gradient accumulation).  The keras family agrees with Keras on every
installed backend (specificity); a reference that takes the callable's float for
a float32 variable, or that calls the schedule with the stored counter, is a
mismatch (sensitivity)."""

import pytest

from reference import schedules
from verify import api
from verify.configurations import ConfigError, from_keras
from verify.selection import installed_backends

DECAY = {"class_name": "ExponentialDecay", "config": {
    "initial_learning_rate": 0.01, "decay_steps": 3, "decay_rate": 0.5}}
CONFIGS = [
    # 0.003 is not a float32 number: its float32 variable and its float64 cast differ
    {"id": "adamw_callable", "class_name": "AdamW",
     "config": {"learning_rate": {"callable": 0.003}, "weight_decay": 0.01}},
    {"id": "sgd_callable_schedule", "class_name": "SGD",
     "config": {"learning_rate": {"callable": DECAY}, "momentum": 0.9,
                "gradient_accumulation_steps": 3}},
]
RUN = dict(backends=installed_backends(), dtypes=["float64"], families=["keras"],
           scenarios=["gaussian"], steps=12, size=8)


def verdicts(result):
    return dict(zip(result.rows.optimizer + "/" + result.rows.backend + "/"
                    + result.rows["mode"], result.rows.verdict))


@pytest.fixture(scope="module")
def verified():
    return api.run(CONFIGS, **RUN)


def test_the_keras_family_agrees_on_every_backend_and_mode(verified):
    assert set(verified.rows.backend) == set(installed_backends())
    assert verified.failures().empty, verified.failures()[
        ["optimizer", "backend", "mode", "verdict", "first_divergent_step"]].to_string()


def test_the_callables_float_as_a_float32_variable_is_a_mismatch(monkeypatch):
    real = schedules.learning_rate

    def as_variable(ar, value, t, accumulation=None):
        if schedules.python_float(value) is not None:
            return ar.learning_rate(schedules.python_float(value))
        return real(ar, value, t, accumulation)

    # TensorFlow's ops.cast rounds a Python float through float32 (the precision
    # setting cast_rounds_to_float32): there the two are the same numbers
    apart = [b for b in installed_backends() if b != "tensorflow"]
    if not apart:
        pytest.skip("only TensorFlow installed, where the two are the same numbers")
    monkeypatch.setattr(schedules, "learning_rate", as_variable)
    got = verdicts(api.run(CONFIGS[:1], **{**RUN, "backends": apart, "modes": ["eager"]}))
    assert all(v == "mismatch" for v in got.values()), got


def test_the_schedule_called_with_the_stored_counter_is_a_mismatch(monkeypatch):
    real = schedules.learning_rate
    monkeypatch.setattr(schedules, "learning_rate",
                        lambda ar, value, t, accumulation=None: real(ar, value, t))
    got = verdicts(api.run(CONFIGS[1:], **{**RUN, "modes": ["eager"]}))
    assert all(v == "mismatch" for v in got.values()), got


@pytest.mark.parametrize("value,message", [
    ({"callable": "0.1"}, "returns a string"),
    ({"callable": True}, "returns a boolean"),
    ({"callable": 0.1, "extra": 1}, "alone"),
    ({"callable": {"config": {}}}, "class_name"),
], ids=["string", "boolean", "extra-key", "bad-schedule"])
def test_a_malformed_callable_is_a_config_error(value, message):
    with pytest.raises(ConfigError, match=message):
        from_keras({"class_name": "SGD", "config": {"learning_rate": value}})


def test_the_configuration_reads_as_the_users_code():
    c = from_keras(CONFIGS[1], "test")
    assert "learning_rate=lambda: ExponentialDecay(" in c.describe()
    assert "(optimizer.iterations)" in c.describe()
