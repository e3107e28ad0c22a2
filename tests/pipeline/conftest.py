"""Shared by the CLI and demo tests: the tiny presets live in a private folder (tests/conftest.py already
puts torch on one thread)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session", autouse=True)
def preset_dir(tmp_path_factory):
    """Materialise the tiny presets (tiny-clip, tiny-frcnn, tiny-bert) in a private folder, never in
    ~/.cache; extract/models.py and train/text.py both read $MNER_PRESET_DIR."""
    folder = tmp_path_factory.mktemp("presets")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MNER_PRESET_DIR", str(folder))
        yield folder
