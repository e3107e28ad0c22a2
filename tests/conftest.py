"""Suite-wide settings.

Every model in the tests is tiny; on a 2-core machine torch's intra-op threads cost more than they give
(a tiny Linear ran ~20x slower with 2 threads than with 1 under load), so the suite runs on one thread.
The tiny presets are written to a private folder, never to the user's cache (`preset_dir`).
"""

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def preset_dir(tmp_path_factory):
    """Materialise the tiny presets (tiny-clip, tiny-frcnn, tiny-resnet, tiny-bert) once per session in a
    private folder, never in ~/.cache; extract/models.py and train/zoo/text.py both read $MNER_PRESET_DIR."""
    folder = tmp_path_factory.mktemp("presets")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MNER_PRESET_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session", autouse=True)
def text_cache_root(tmp_path_factory):
    """Text-state caches (model.text_frozen_layers > 0) go to a private folder, never to ~/.cache:
    cache/text_states.py reads $MNER_TEXT_CACHE."""
    folder = tmp_path_factory.mktemp("text-states")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MNER_TEXT_CACHE", str(folder))
        yield folder
