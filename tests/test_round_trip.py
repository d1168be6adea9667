"""Each configuration built from its class and through Keras's own serialization
(serialize, JSON, deserialize: the path of model.save / load_model): a rebuilt
optimizer that computes differently is a finding, on the real Keras and on a copy
whose serialization was edited."""

import pytest

import check_edits
from conftest import fast_backend, make_selection
from verify.configurations import CONFIGURATIONS, EXCLUDE
from verify.report.tables import Sink
from verify.runner import Runner


def round_trips(tmp_path, edit):
    site = check_edits.edited_keras(edit, tmp_path)
    sel = make_selection([fast_backend()], ["keras"], dtypes=["float32"], modes=["eager"],
                         names=["gaussian"], steps=3, size=4, python_path=[str(site)])
    runner = Runner(sel, Sink(tmp_path / "out", [], {"steps": 3}, {}))
    runner.run()
    return {run.configuration.id: run.round_trip for run in runner.runs.values()}


# what Keras's deserialize gives back when it is not an optimizer (a structural
# finding, e.g. Lamb in Keras 3.15.1: the str 'Lamb'), as opposed to an optimizer
# that computes differently
STRUCTURAL = "keras.optimizers.deserialize gives"
# what a configuration with exclude_from_weight_decay meets: a method call, which
# get_config does not record (a finding for every user of model.save)
LOST_EXCLUSION = "keras.optimizers.serialize does not keep exclude_from_weight_decay"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return round_trips(tmp_path_factory.mktemp("pristine"), check_edits.Edit("none", ()))


def test_every_configuration_survives_keras_serialization(pristine):
    found = pristine
    assert set(found) == set(CONFIGURATIONS)
    for configuration, finding in found.items():
        if EXCLUDE in CONFIGURATIONS[configuration].config:
            assert finding.startswith(LOST_EXCLUSION), (configuration, finding)
            continue
        assert finding is None or finding.startswith(STRUCTURAL), (configuration, finding)
    assert sum(finding is None for finding in found.values()) >= 10


def test_a_serialization_that_changes_the_math_is_a_finding(tmp_path, pristine):
    found = round_trips(tmp_path, check_edits.SAVED_HALF_LEARNING_RATE)
    for configuration, finding in found.items():
        if pristine[configuration] is not None:  # not rebuilt at all: the same finding
            assert finding == pristine[configuration]
            continue
        assert finding is not None and "computes differently" in finding, (configuration,
                                                                          finding)
        assert "after step 1" in finding
