"""Real Keras on every installed backend, both dtypes, both modes, every
scenario: the keras family must agree (specificity); a reference with one
real formula change must not (sensitivity); the article's known departures
must be found where they start."""

import numpy as np
import pytest

import perturbations
from verify.configurations import CONFIGURATIONS
from verify.scenarios import SCENARIOS


def rows(df, **where):
    mask = np.ones(len(df), bool)
    for key, value in where.items():
        mask &= (df[key] == value).to_numpy()
    return df[mask]


def test_every_cell_is_present(verification, backends):
    for family in ("article", "keras"):
        got = rows(verification, family=family)
        assert len(got) == len(CONFIGURATIONS) * len(backends) * 2 * 2 * len(SCENARIOS)


@pytest.mark.parametrize("optimizer", list(CONFIGURATIONS))
def test_keras_family_matches_real_keras_everywhere(verification, optimizer):
    got = rows(verification, family="keras", optimizer=optimizer)
    bad = got[~got.verdict.isin(["exact", "match"])]
    assert bad.empty, bad[["backend", "dtype", "mode", "scenario", "verdict",
                           "first_divergent_step", "divergent_state", "reason"]].to_string()
    assert (got.max_scaled_error <= 16).all()


SENSITIVITY = [(family, class_name) for family, names in perturbations.PERTURBED.items()
               for class_name in names]


@pytest.mark.parametrize("family,class_name", SENSITIVITY,
                         ids=[f"{f}-{c}" for f, c in SENSITIVITY])
def test_one_real_formula_change_is_a_float64_mismatch_on_every_backend(
        verification, backends, family, class_name):
    ids = [k for k, c in CONFIGURATIONS.items() if c.class_name == class_name]
    got = verification[(verification.family == family) & verification.optimizer.isin(ids)
                       & (verification.dtype == "float64")]
    for backend in backends:
        verdicts = got[got.backend == backend].verdict
        assert len(verdicts) and (verdicts == "mismatch").any(), (backend, verdicts.tolist())
        # every mode and configuration catches it in some scenario
        for _, cell in got[got.backend == backend].groupby(["optimizer", "mode"]):
            assert (cell.verdict == "mismatch").any(), cell[["optimizer", "mode"]].iloc[0]


@pytest.mark.parametrize("optimizer,step,state", [
    ("adagrad", 0, "accumulator"),    # the article starts the accumulator at 0, Keras at 0.1
    ("nadam", 0, "u_product"),        # the article's u_product has no initial value: 0
    ("sgd_momentum", 1, "variable"),  # the article never updates the weights
])
def test_article_departure_is_found_where_it_starts(verification, optimizer, step, state):
    got = rows(verification, family="article", optimizer=optimizer)
    assert (got.verdict == "mismatch").all()
    assert (got.first_divergent_step == step).all()
    assert (got.divergent_state == state).all()


def test_article_formula_identical_to_keras_matches(verification):
    # the article's Adam is Keras's Adam written another way (except TF's
    # float32 hyperparameters in float64, a precision matter, not a formula)
    got = rows(verification, family="article", optimizer="adam")
    got = got[~((got.backend == "tensorflow") & (got.dtype == "float64"))]
    assert got.verdict.isin(["exact", "match"]).all()


def test_drift_is_reported_for_every_comparison(verification):
    got = verification[verification.verdict != "error"]
    assert got.drift.notna().all() and (got.drift >= 0).all()
