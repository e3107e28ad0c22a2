"""SettingError: one message, worded with field names for a library caller and with flags for the CLI."""

from __future__ import annotations

import pickle

import pytest

from mner.cache.datasets import DataConfig
from mner.runtime import SettingError


def test_the_settings_are_the_template_fields_that_are_not_values():
    err = SettingError("give {data_dir}, or {dataset} with {data_root}; got {got!r}", got="{x}")
    assert err.settings == ("data_dir", "dataset", "data_root")
    # A value is formatted once: the braces inside it are not read as a setting.
    assert str(err) == "give data_dir, or dataset with data_root; got '{x}'"
    assert err.worded({"data_dir": "--data-dir", "dataset": "--dataset"}) == (
        "give --data-dir, or --dataset with data_root; got '{x}'"
    )


def test_a_setting_error_survives_pickling():
    """A DataLoader worker or another rank re-raises it: it must come back with its parts."""
    err = pickle.loads(pickle.dumps(SettingError("{topk} must be >= 1, got {got}", got=0)))
    assert err.worded({"topk": "--topk"}) == "--topk must be >= 1, got 0"


def test_config_validation_raises_it_naming_the_fields():
    with pytest.raises(SettingError) as refused:
        DataConfig(data_dir="a", dataset="b")
    assert refused.value.settings == ("data_dir", "dataset", "data_root")
    assert str(refused.value) == "give either data_dir or dataset (with data_root), not both"
