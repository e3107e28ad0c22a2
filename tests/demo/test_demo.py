"""Tests for demo/build.py: determinism, reuse, and that only the image tells an entity's type."""

import json
import logging
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mner.cache.conll import label_names, read_split
from mner.cache.datasets import resolve_data
from mner.demo import DemoConfig, build_demo
from mner.demo.build import NAMES, TYPES


def small(out_dir: Path, **changes) -> DemoConfig:
    """A demo small enough for a unit test, with every type in every split."""
    return DemoConfig(
        out_dir=str(out_dir), **{"n_train": 24, "n_valid": 8, "n_test": 8, "image_size": 48, **changes}
    )


def all_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def mentions(post) -> list[tuple[str, str]]:
    """(name, type) of each entity mention in a post, from its BIO tags."""
    spans = []
    for word, tag in zip(post.words, post.tags):
        if tag.startswith("B-"):
            spans.append(([word], tag[2:]))
        elif tag.startswith("I-"):
            spans[-1][0].append(word)
    return [(" ".join(words), t) for words, t in spans]


def test_two_builds_are_byte_identical(tmp_path):
    first = all_bytes(build_demo(small(tmp_path / "a")))
    second = all_bytes(build_demo(small(tmp_path / "b")))
    assert first == second
    assert len([k for k in first if k.startswith("images/")]) == 40 - 1  # one post has no image file
    other_seed = all_bytes(build_demo(small(tmp_path / "c", seed=14)))
    assert other_seed["train.txt"] != first["train.txt"]


def test_reuse_and_rebuild(tmp_path, caplog):
    out = tmp_path / "demo"
    caplog.set_level(logging.INFO, logger="mner.demo.build")
    assert build_demo(small(out)) == out
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    (out / "notes.txt").write_text("not the demo's")  # a file the demo does not own survives rebuilds

    caplog.clear()
    assert build_demo(small(out)) == out
    assert f"reusing demo data at {out}" in caplog.text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != "notes.txt"} == stamps

    caplog.clear()
    build_demo(small(out, seed=99))
    assert "reusing" not in caplog.text and f"built demo data at {out}" in caplog.text
    assert json.loads((out / "demo.json").read_text())["config"]["seed"] == 99
    assert all_bytes(out) == {
        **all_bytes(build_demo(small(tmp_path / "fresh", seed=99))),
        "notes.txt": b"not the demo's",
    }
    assert not list(tmp_path.glob(".*building"))  # no staging folder left behind


def test_demo_json_records_config_splits_and_failures(tmp_path):
    out = build_demo(small(tmp_path / "demo"))
    meta = json.loads((out / "demo.json").read_text())
    assert meta["config"] == {"seed": 13, "n_train": 24, "n_valid": 8, "n_test": 8, "image_size": 48}
    assert [len(meta["splits"][s]) for s in ("train", "valid", "test")] == [24, 8, 8]
    keys = [k for s in ("train", "valid", "test") for k in meta["splits"][s]]
    assert keys == [f"demo_{i:05d}" for i in range(40)]
    assert len(meta["missing"]) == 1 and len(meta["corrupt"]) == 1  # max(1, round(0.03 * 40))
    for key in meta["missing"]:
        assert not (out / "images" / f"{key}.jpg").exists()
    assert (out / "images" / f"{meta['corrupt'][0]}.jpg").stat().st_size == 0
    ok = [k for k in keys if k not in meta["missing"] + meta["corrupt"]]
    digests = set()
    for key in ok:
        with Image.open(out / "images" / f"{key}.jpg") as image:
            assert image.format == "JPEG" and max(image.size) == 48 and min(image.size) >= 36
            digests.add(image.convert("RGB").tobytes())
    assert len(digests) == len(ok)  # no two images are identical


def test_missing_fraction_at_default_size(tmp_path):
    meta = json.loads(
        (build_demo(DemoConfig(out_dir=str(tmp_path / "d"), image_size=32)) / "demo.json").read_text()
    )
    assert len(meta["missing"]) == round(0.03 * 400) == 12


def test_demo_parses_with_the_dataset_reader(tmp_path):
    source = resolve_data(data_dir=build_demo(small(tmp_path / "demo", n_train=40)))
    assert (source.fmt, source.image_dir) == ("imgid", tmp_path / "demo" / "images")
    train = source.read("train")
    assert label_names(train) == [
        "O",
        "B-LOC",
        "I-LOC",
        "B-ORG",
        "I-ORG",
        "B-OTHER",
        "I-OTHER",
        "B-PER",
        "I-PER",
    ]
    assert train.orphan_i == 0
    for split in ("train", "valid", "test"):
        for post in source.read(split).posts:
            assert re.fullmatch(r"demo_\d{5}", post.key)
            found = mentions(post)
            assert 1 <= len(found) <= 2
            assert len({t for _, t in found}) == 1  # every mention in a post shares its type
            assert all(name in NAMES for name, _ in found)
    lengths = {len(name.split()) for post in train.posts for name, _ in mentions(post)}
    assert {1, 2} <= lengths


def test_names_are_ambiguous_and_types_balanced(tmp_path):
    train = read_split(build_demo(small(tmp_path / "demo", n_train=80)) / "train.txt")
    types_of = defaultdict(set)
    for post in train.posts:
        for name, entity_type in mentions(post):
            types_of[name].add(entity_type)
    assert max(len(types) for types in types_of.values()) >= 2
    assert sum(len(types) >= 2 for types in types_of.values()) >= 10  # ambiguity is the rule, not a fluke
    per_type = defaultdict(int)
    for post in train.posts:
        per_type[mentions(post)[0][1]] += 1
    assert dict(per_type) == {t: 20 for t in TYPES}


def test_images_tell_the_type_by_mean_colour(tmp_path):
    """Nearest class mean of the train images' mean colour classifies every valid/test image."""
    source = resolve_data(data_dir=build_demo(small(tmp_path / "demo", n_valid=20, n_test=20)))

    def colours(split):
        rows = []
        for post in source.read(split).posts:
            path = source.image_path(post.key)
            if path.is_file() and path.stat().st_size:
                rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)  # (H, W, 3)
                rows.append((rgb.reshape(-1, 3).mean(axis=0), mentions(post)[0][1]))
        return rows

    train = colours("train")
    centroids = {t: np.mean([c for c, tt in train if tt == t], axis=0) for t in TYPES}  # type -> (3,)
    held_out = colours("valid") + colours("test")
    assert len(held_out) >= 38
    predicted = [min(TYPES, key=lambda t: np.linalg.norm(c - centroids[t])) for c, _ in held_out]
    assert predicted == [t for _, t in held_out]


def test_refuses_a_folder_it_did_not_build(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.txt").write_text("IMGID:1\nx\tO\n")
    with pytest.raises(
        ValueError, match=r"already holds train\.txt but no demo\.json, so it is not a demo folder"
    ):
        build_demo(small(tmp_path / "data"))
    assert (tmp_path / "data" / "train.txt").read_text() == "IMGID:1\nx\tO\n"
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match=r"demo out_dir .*file is a file; give a folder"):
        build_demo(small(tmp_path / "file"))


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"out_dir": ""}, "out_dir must name a folder"),
        ({"n_train": 3}, "n_train must be >= 4 so that every type is in train, got 3"),
        ({"n_valid": 0}, "n_valid must be >= 1, got 0"),
        ({"n_test": -1}, "n_test must be >= 1, got -1"),
        ({"image_size": 16}, "image_size must be >= 32 pixels, got 16"),
    ],
)
def test_config_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        DemoConfig(**{"out_dir": "demo", **changes})
