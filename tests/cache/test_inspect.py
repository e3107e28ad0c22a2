"""cache/inspect.py: summary numbers against brute force from the records; show_record and its PNG."""

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mner.cache.inspect import format_inspection, inspect_cache, show_record
from tests.cache.factories import CATEGORIES, NO_REGION_SPEC, TINY_SPEC, make_cache, make_records

KEYS = [f"img{i:03d}" for i in range(14)]


@pytest.fixture
def cache_dir(tmp_path):
    return make_cache(tmp_path, keys=KEYS, seed=5, shard_size=6)


@pytest.fixture
def records():
    return make_records(KEYS, seed=5)


def test_inspect_numbers_match_the_records(cache_dir, records):
    info = inspect_cache(cache_dir)
    assert info["images"] == 14
    assert info["status"] == {s: sum(r.status == s for r in records) for s in ("ok", "missing", "corrupt")}
    assert info["shards"] == {"count": 3, "rows": 14, "rows_per_shard": [6, 6, 2]}
    assert info["tokens"]["patch_tokens"] == {"shape": [5, 8], "dtype": "float16"}
    assert info["tokens"]["region_boxes"] == {"shape": [4, 4], "dtype": "float32"}
    assert info["spec"] == TINY_SPEC.to_dict()
    assert info["models"] == {
        "clip": {"path": "tiny-clip", "untrained": True},
        "detector": {"name": "tiny-frcnn", "untrained": True},
    }
    ok = [r for r in records if r.status == "ok"]
    assert info["region_histogram"] == {n: sum(r.num_regions == n for r in ok) for n in range(5)}

    labels = Counter(int(label) for r in records for label in r.region_labels[: r.num_regions])
    top = info["top_labels"]
    assert len(top) == min(10, len(labels))
    assert [t["count"] for t in top] == sorted(labels.values(), reverse=True)[: len(top)]
    for entry in top:
        assert entry["count"] == labels[entry["label"]] and entry["name"] == CATEGORIES[entry["label"]]
    assert info["disk"]["bytes"] == sum(p.stat().st_size for p in cache_dir.iterdir())
    assert info["disk"]["per_image"] == pytest.approx(info["disk"]["bytes"] / 14)


def test_format_inspection_is_readable(cache_dir):
    info = inspect_cache(cache_dir)
    text = format_inspection(info)
    assert f"fingerprint  {info['fingerprint']}" in text
    assert "shards       3 with 14 rows (6, 6, 2)" in text
    assert "clip         tiny-clip  (UNTRAINED)" in text
    assert "patch_tokens   (5, 8)" in text
    top = info["top_labels"][0]
    assert f"{top['name']:<20} (id {top['label']:>3})" in text


def test_show_record_lists_the_regions(cache_dir, records):
    record = next(r for r in records if r.status == "ok" and r.num_regions >= 2)
    info = show_record(cache_dir, record.key)
    assert info["size"] == [record.width, record.height] and info["status"] == "ok"
    assert info["patch_tokens"] == [5, 8] and info["global_embed"] == [6] and info["region_feats"] == [4, 10]
    assert len(info["regions"]) == record.num_regions
    for i, region in enumerate(info["regions"]):
        assert region["label"] == record.region_labels[i]
        assert region["name"] == CATEGORIES[record.region_labels[i]]
        assert region["score"] == pytest.approx(float(record.region_scores[i]))
        assert np.array_equal(np.float32(region["box"]), record.region_boxes[i])
    assert "png" not in info


def test_show_record_png_on_grey_canvas(cache_dir, records, tmp_path):
    record = next(r for r in records if r.status == "ok" and r.num_regions >= 1)
    png = tmp_path / "out" / "record.png"
    info = show_record(cache_dir, record.key, png=png)
    assert info["background"] == "grey canvas"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (record.width, record.height)
        pixels = np.asarray(image.convert("RGB"))
    x1, y1, x2, y2 = record.region_boxes[0] * [record.width, record.height, record.width, record.height]
    # The left edge of the first box, halfway down, is drawn (not grey); PIL may floor or round x1.
    y_mid = min(int((y1 + y2) / 2), record.height - 1)
    edge = pixels[y_mid, max(int(x1) - 1, 0) : int(x1) + 2]  # (3, 3) RGB around x1
    assert (edge != 128).any()
    assert (pixels == 128).all(axis=2).mean() > 0.5  # the rest is the grey canvas


def test_show_record_png_over_the_image(cache_dir, records, tmp_path):
    record = next(r for r in records if r.status == "ok")
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (record.width * 2, record.height * 2), (10, 200, 10)).save(photo)
    png = tmp_path / "record.png"
    info = show_record(cache_dir, record.key, png=png, image_path=photo)
    assert info["background"] == f"{photo} (resized from {record.width * 2}x{record.height * 2})"
    with Image.open(png) as image:
        assert image.size == (record.width, record.height)
        assert np.median(np.asarray(image.convert("RGB"))[..., 1]) > 150  # mostly the green photo

    unreadable = tmp_path / "broken.jpg"
    unreadable.write_text("not an image")
    info = show_record(cache_dir, record.key, png=png, image_path=unreadable)
    assert info["background"] == f"grey canvas ({unreadable} is not readable)"
    with Image.open(png) as image:
        assert image.size == (record.width, record.height)


def test_show_record_errors(cache_dir, records, tmp_path):
    missing = next(r for r in records if r.status == "missing")
    info = show_record(cache_dir, missing.key)
    assert info["status"] == "missing" and info["regions"] == [] and info["error"] == missing.error
    with pytest.raises(
        ValueError, match=rf"image '{missing.key}' has status missing \(.*\); there is nothing to draw"
    ):
        show_record(cache_dir, missing.key, png=tmp_path / "x.png")
    with pytest.raises(ValueError, match="image key 'nope' is not in the cache"):
        show_record(cache_dir, "nope")
    with pytest.raises(ValueError, match="is not a feature cache"):
        inspect_cache(tmp_path / "nowhere")


def test_show_record_refuses_a_png_that_is_one_of_its_inputs(cache_dir, records, tmp_path):
    """issue 10 A8: --png over the image drawn on (or a file of the cache) would destroy an input."""
    record = next(r for r in records if r.status == "ok")
    photo = tmp_path / "photo.jpg"
    Image.new("RGB", (record.width, record.height), (10, 200, 10)).save(photo)
    before = photo.read_bytes()
    with pytest.raises(ValueError, match=re.escape(f"--png {photo} is the image drawn on {photo}")):
        show_record(cache_dir, record.key, png=photo, image_path=photo)
    assert photo.read_bytes() == before
    manifest = Path(cache_dir) / "manifest.json"
    with pytest.raises(ValueError, match=re.escape(f"--png {manifest} is in the cache {cache_dir}")):
        show_record(cache_dir, record.key, png=manifest)


def test_show_record_refuses_a_png_over_a_file_of_the_data_folder_it_was_extracted_from(
    cache_dir, records, tmp_path
):
    import json

    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    for split in ("train", "valid", "test"):
        (data / f"{split}.txt").write_text("IMGID:img000\nword O\n\n")
    (data / "images" / "img001.jpg").write_bytes(b"another post's image")
    manifest = Path(cache_dir) / "manifest.json"
    recorded = json.loads(manifest.read_text())
    recorded["config"]["data_dir"] = str(data)
    manifest.write_text(json.dumps(recorded))
    key = next(r for r in records if r.status == "ok").key
    (tmp_path / "hard.png").hardlink_to(data / "train.txt")
    for png, message in (
        (data / "train.txt", f"--png {data / 'train.txt'} is in the data folder {data}"),
        (data / "images" / "img001.jpg", f"is in the image folder {data / 'images'}"),
        (tmp_path / "hard.png", f"--png {tmp_path / 'hard.png'} is a hard link to {data / 'train.txt'}"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            show_record(cache_dir, key, png=png)
    assert (data / "train.txt").read_text() == "IMGID:img000\nword O\n\n"


def test_inspect_and_show_a_no_region_cache(tmp_path):
    cache_dir = make_cache(tmp_path, keys=KEYS, seed=5, spec=NO_REGION_SPEC, shard_size=6)
    info = inspect_cache(cache_dir)
    assert info["tokens"]["region_feats"] == {"shape": [0, 0], "dtype": "float16"}
    ok = sum(r.status == "ok" for r in make_records(KEYS, NO_REGION_SPEC, seed=5))
    assert info["region_histogram"] == {0: ok} and info["top_labels"] == []
    text = format_inspection(info)
    assert "regions from none" in text and "(none)" in text
    shown = show_record(cache_dir, KEYS[0], png=tmp_path / "k.png")
    assert shown["num_regions"] == 0 and shown["regions"] == [] and shown["region_feats"] == [0, 0]
    assert (tmp_path / "k.png").is_file()
