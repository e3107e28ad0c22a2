"""cache/text_states.py (named apart from tests/train/engine/test_text_states.py: pytest needs unique basenames): round trip, checks before use, atomic and locked writes, inspection."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mner.cache.text_states import (
    MARKER_FILE,
    STATES_FILE,
    format_text_states,
    inspect_text_states,
    open_text_states,
    text_cache_root,
    text_state_folder,
    write_text_states,
)
from mner.runtime import lock_folder

PARTS = {
    "schema_version": 1,
    "encoder": {"name": "tiny-bert", "sha256": {"model.safetensors": "ab"}},
    "max_length": 32,
    "frozen_layers": 1,
    "data_file": {"name": "train.txt", "sha256": "cd", "posts": 3},
}


def make_rows(seed: int = 0, width: int = 4):
    rng = np.random.default_rng(seed)
    return [
        (
            f"k{i}",
            rng.integers(0, 100, n).astype(np.int32),
            rng.standard_normal((n, width)).astype(np.float32),
        )
        for i, n in enumerate((3, 5, 2))
    ]


def test_round_trip_is_exact_and_rows_are_checked_by_key(tmp_path):
    folder, fingerprint = text_state_folder(tmp_path, PARTS)
    rows = make_rows()
    write_text_states(folder, PARTS, rows, 4)
    states = open_text_states(folder, PARTS)
    assert states.fingerprint == fingerprint and folder.name == fingerprint[:16] and len(states) == 3
    for index, (key, ids, values) in enumerate(rows):
        got_ids, got = states.get(index, key)
        assert np.array_equal(got_ids, ids) and np.array_equal(got, values) and got.dtype == np.float32
    with pytest.raises(
        ValueError, match=re.escape(f"text-state cache {folder}: post 2 is 'k0' but the cache holds 'k1'")
    ):
        states.get(1, "k0")
    assert not (folder / (STATES_FILE + ".tmp")).exists()


def test_a_changed_file_is_refused_before_use(tmp_path):
    folder = write_text_states(tmp_path / "tc", PARTS, make_rows(), 4)
    with open(folder / STATES_FILE, "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x01" * 8)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"text-state cache file {folder / STATES_FILE} is missing or does not match its recorded sha256 "
            f"(changed or damaged since it was written); delete {folder} to rebuild it"
        ),
    ):
        open_text_states(folder, PARTS)


def test_stale_settings_are_named(tmp_path):
    folder = write_text_states(tmp_path / "tc", PARTS, make_rows(), 4)
    changed = {**PARTS, "frozen_layers": 2, "data_file": {**PARTS["data_file"], "sha256": "ef"}}
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"text-state cache {folder} was built for other settings (data_file.sha256: 'cd' -> 'ef'; "
            "frozen_layers: 1 -> 2); delete it to rebuild it, or give another --text-cache folder"
        ),
    ):
        open_text_states(folder, changed)


def test_a_folder_being_written_is_refused_and_a_failed_write_leaves_no_file(tmp_path):
    folder = tmp_path / "tc"
    folder.mkdir()
    with lock_folder(folder, command="mner train-from-cache"):
        with pytest.raises(ValueError, match="is being written by another `mner train-from-cache`"):
            write_text_states(folder, PARTS, make_rows(), 4)
    bad = [*make_rows()[:1], ("k1", np.zeros(2, np.int32), np.zeros((3, 4), np.float32))]
    with pytest.raises(
        ValueError, match=re.escape("text states of post 'k1' have shape (3, 4), expected (2, 4)")
    ):
        write_text_states(folder, PARTS, bad, 4)
    assert not (folder / STATES_FILE).exists() and not (folder / MARKER_FILE).exists()
    assert not (folder / (STATES_FILE + ".tmp")).exists()
    with pytest.raises(ValueError, match=re.escape(f"{folder} is not a text-state cache (no {MARKER_FILE})")):
        open_text_states(folder)


def test_default_root_is_the_environment_variable_else_the_users_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("MNER_TEXT_CACHE", str(tmp_path))
    assert text_cache_root() == tmp_path and text_cache_root("elsewhere").name == "elsewhere"
    monkeypatch.delenv("MNER_TEXT_CACHE")
    assert str(text_cache_root()).endswith(".cache/mner/text-states")


def test_inspection(tmp_path):
    folder = write_text_states(tmp_path / "tc", PARTS, make_rows(), 4)
    info = inspect_text_states(folder)
    assert (info["posts"], info["subwords"], info["width"], info["frozen_layers"]) == (3, 10, 4, 1)
    text = format_text_states(info)
    assert "states after the embeddings and 1 frozen layers of tiny-bert" in text
    assert "3 posts, 10 sub-words x 4 float32" in text
