"""tests/keras_refusals.toml, the table of Keras's own refusals the other tests read:
its entries name real configurations, and refused_by_keras fails on a refusal the table
does not list and on a listed one that Keras no longer makes."""

import pandas as pd
import pytest

from conftest import CELL_KEYS, REFUSALS, refused_by_keras
from verify.configurations import CONFIGURATIONS
from verify.selection import BACKENDS, DTYPES, MODES


def test_every_entry_names_a_configuration_and_an_exception():
    known = {"optimizer": set(CONFIGURATIONS), "backend": set(BACKENDS), "dtype": set(DTYPES),
             "mode": set(MODES)}
    for entry in REFUSALS:
        assert set(entry) <= {*CELL_KEYS, "raises"} and entry["raises"], entry
        for key in CELL_KEYS:
            assert key not in entry or entry[key] in known[key], (key, entry)


def cells(*rows):
    return pd.DataFrame([dict(family="keras", optimizer=o, backend=b, dtype=d, mode="eager",
                              scenario="gaussian", verdict=v, reason=r)
                         for o, b, d, v, r in rows])


MUON_RAISES = ("muon", "tensorflow", "float64", "error", "Keras raises TypeError: float32")


def test_listed_refusals_are_set_apart_and_the_rest_returned():
    refused, ran = refused_by_keras(cells(MUON_RAISES, ("adam", "jax", "float64", "match", "")))
    assert list(refused.optimizer) == ["muon"] and list(ran.optimizer) == ["adam"]


@pytest.mark.parametrize("row", [
    ("adam", "jax", "float64", "error", "Keras raises ValueError: new"),   # not listed
    ("muon", "tensorflow", "float64", "match", ""),                        # no longer raised
    ("muon", "tensorflow", "float64", "error", "Keras raises KeyError: other"),
], ids=["unlisted", "no-longer-raised", "another-exception"])
def test_a_refusal_the_table_does_not_state_fails(row):
    with pytest.raises(AssertionError):
        refused_by_keras(cells(MUON_RAISES, row))
