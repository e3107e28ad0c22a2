"""Tests for demo/classification.py: determinism, that the reader takes the folder as it is, and that
the label is in every image but in the text of only some posts."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from mner.cache.classification import ClassDataConfig, read_classification
from mner.demo.classification import CUES, LABELS, make_mvsa_demo


def all_bytes(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = all_bytes(make_mvsa_demo(tmp_path / "a", seed=3, n=24))
    b = all_bytes(make_mvsa_demo(tmp_path / "b", seed=3, n=24))
    assert a == b and len(a) == 2 * 24 + 4  # text + image per post, 3 split files, demo.json
    c = all_bytes(make_mvsa_demo(tmp_path / "c", seed=4, n=24))
    assert c != a
    # a rebuild over an earlier build is the same as a fresh one
    make_mvsa_demo(tmp_path / "a", seed=4, n=24)
    assert all_bytes(tmp_path / "a") == c


def test_reader_takes_the_demo_and_counts_its_cp1252_texts(tmp_path):
    folder = make_mvsa_demo(tmp_path / "demo", seed=1, n=60, cp1252_fraction=0.3)
    meta = json.loads((folder / "demo.json").read_text(encoding="utf-8"))
    data = read_classification(ClassDataConfig(str(folder)))
    assert list(data.splits) == ["train", "valid", "test", "test_without_label"]
    assert data.labels == LABELS and data.report.split_made["valid"] == 8  # round(0.2 * 42)
    unlabelled = data.splits["test_without_label"]
    assert [e.guid for e in unlabelled.examples] == meta["splits"]["test_without_label"]
    assert all(e.label is None for e in unlabelled.examples)
    for name in ("train", "valid", "test"):
        assert all(meta["truth"][e.guid] == e.label for e in data.splits[name].examples)
    # only the cp1252 files holding a byte that is not UTF-8 fall back, and every one of them does
    non_utf8 = [g for g in meta["cp1252"] if any(ord(c) > 127 for c in data_text(data, g))]
    assert data.report.fallbacks == ({"cp1252": len(non_utf8)} if non_utf8 else {})
    assert 0 < len(non_utf8) <= len(meta["cp1252"])


def data_text(data, guid):
    return next(e.text for split in data.splits.values() for e in split.examples if e.guid == guid)


def test_label_is_in_every_image_and_in_some_texts(tmp_path):
    folder = make_mvsa_demo(tmp_path / "demo", seed=2, n=90, text_fraction=0.4)
    meta = json.loads((folder / "demo.json").read_text(encoding="utf-8"))
    truth = meta["truth"]
    means = {
        g: np.asarray(Image.open(folder / "data" / f"{g}.jpg"), dtype=float).mean(axis=(0, 1)) for g in truth
    }
    # nearest centroid on mean colour, fitted on train, is right on every other post
    train = meta["splits"]["train"]
    centroids = {lab: np.mean([means[g] for g in train if truth[g] == lab], axis=0) for lab in LABELS}
    others = [g for name in ("test", "test_without_label") for g in meta["splits"][name]]
    predicted = {g: min(LABELS, key=lambda lab: np.linalg.norm(means[g] - centroids[lab])) for g in others}
    assert all(predicted[g] == truth[g] for g in others)
    # a text tells its label only through a cue phrase, and only the text_cue posts carry one
    cue_of = {phrase: lab for lab, phrases in CUES.items() for phrase in phrases}
    texts = {g: (folder / "data" / f"{g}.txt").read_bytes().decode("cp1252") for g in truth}
    for guid, text in texts.items():
        found = [lab for phrase, lab in cue_of.items() if re.search(rf"\b{phrase}\b", text)]
        assert found == ([truth[guid]] if guid in meta["text_cue"] else []), (guid, text)
    assert 0.25 < len(meta["text_cue"]) / len(truth) < 0.55


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n": 11}, "n must be >= 12"),
        ({"text_fraction": 1.5}, "text_fraction must be between 0 and 1, got 1.5"),
        ({"image_size": 8}, "image_size must be >= 16 pixels, got 8"),
    ],
)
def test_argument_errors(tmp_path, changes, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make_mvsa_demo(tmp_path / "d", **changes)


def test_refuses_a_folder_it_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match=r"is not empty and is not one of our demo folders \(no demo.json\)"):
        make_mvsa_demo(tmp_path / "mine")
    folder = make_mvsa_demo(tmp_path / "demo", n=12)
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(
        ValueError, match=r"is not one of our demo folders \(it holds files no demo wrote: notes.txt\)"
    ):
        make_mvsa_demo(folder, n=12)
    assert (folder / "notes.txt").read_text() == "keep me"
