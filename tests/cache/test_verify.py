"""cache/verify.py: a clean cache passes; each kind of corruption is caught and named."""

import json
import os
import shutil

import h5py
import numpy as np
import pytest

from mner.cache.datasets import resolve_data
from mner.cache.shards import image_stat
from mner.cache.verify import verify_cache
from tests.cache.factories import NO_REGION_SPEC, make_cache, make_records


@pytest.fixture
def cache_dir(tmp_path):
    return make_cache(tmp_path, n=12, shard_size=5)


def region_row(cache_dir, at_least=1, below_k=False):
    """(shard file, row, key, num_regions) of the first ok image with regions (and free padding)."""
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    K = manifest["spec"]["max_regions"]
    for image in manifest["images"]:
        n = image["num_regions"]
        if image["status"] == "ok" and n >= at_least and (n < K or not below_k):
            return image["shard"], image["row"], image["key"], n
    raise AssertionError("factory made no suitable image")


def edit(cache_dir, shard, dataset, index, value):
    with h5py.File(cache_dir / shard, "r+") as f:
        f[dataset][index] = value


def only(report, text):
    """The problems that contain text (asserting there is at least one)."""
    found = [p for p in report.problems if text in p]
    assert found, report.problems
    return found


def test_clean_cache_passes(cache_dir):
    report = verify_cache(cache_dir)
    assert report.ok and report.problems == []
    assert report.checked["shards"] == 3 and report.checked["rows"] == 12 and report.checked["images"] == 12
    assert report.checked["bytes_hashed"] == sum(p.stat().st_size for p in cache_dir.glob("shard-*.h5"))


def test_not_a_cache(tmp_path):
    with pytest.raises(ValueError, match="is not a feature cache: no manifest.json"):
        verify_cache(tmp_path)


def test_flipped_bytes_fail_the_checksum(cache_dir):
    path = cache_dir / "shard-00001.h5"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    path.write_bytes(bytes(data))
    report = verify_cache(cache_dir)
    assert not report.ok
    assert only(report, "sha256") == [
        "shard-00001.h5: sha256 differs from manifest.json (the file changed or is corrupt)"
    ]


def test_nan_written_directly_is_found(cache_dir):
    edit(cache_dir, "shard-00000.h5", "patch_tokens", (1, 2, 3), np.nan)
    edit(cache_dir, "shard-00001.h5", "global_embed", (3, 0), np.inf)
    report = verify_cache(cache_dir)
    assert not report.ok
    assert only(report, "NaN") == [
        "shard-00000.h5 row 1 (key 'img001'): patch_tokens contains NaN or inf",
        "shard-00001.h5 row 3 (key 'img008'): global_embed contains NaN or inf",
    ]
    only(report, "shard-00000.h5: sha256 differs")


def test_box_out_of_range_and_inverted(cache_dir):
    shard, row, key, _ = region_row(cache_dir)
    edit(cache_dir, shard, "region_boxes", (row, 0), [0.1, 0.2, 1.5, 0.4])
    report = verify_cache(cache_dir)
    assert only(report, "region_boxes") == [f"{shard} row {row} (key {key!r}): region_boxes outside [0, 1]"]
    edit(cache_dir, shard, "region_boxes", (row, 0), [0.6, 0.2, 0.5, 0.4])
    report = verify_cache(cache_dir)
    assert only(report, "region_boxes") == [
        f"{shard} row {row} (key {key!r}): region_boxes with x2 < x1 or y2 < y1"
    ]


def test_padding_counts_and_status(cache_dir):
    shard, row, key, n = region_row(cache_dir, below_k=True)
    edit(cache_dir, shard, "region_feats", (row, n), 1.0)
    edit(cache_dir, "shard-00002.h5", "status", 0, 7)
    edit(cache_dir, "shard-00000.h5", "num_regions", 4, 9)
    report = verify_cache(cache_dir)
    only(report, f"{shard} row {row} (key {key!r}): region_feats rows >= num_regions ({n}) are not zero")
    only(report, "shard-00002.h5 row 0 (key 'img010'): status code 7 is not one of 0..2")
    only(report, "shard-00002.h5 row 0 (key 'img010'): status is 7, manifest.json says 'missing'")
    only(report, "shard-00000.h5 row 4 (key 'img004'): num_regions 9 outside [0, 4]")
    only(report, "shard-00000.h5 row 4 (key 'img004'): num_regions is 9, manifest.json says 0")


def test_tokens_of_a_missing_image(cache_dir):
    edit(cache_dir, "shard-00000.h5", "patch_tokens", (4, 0, 0), 0.5)  # img004 is missing
    report = verify_cache(cache_dir)
    assert only(report, "not ok") == [
        "shard-00000.h5 row 4 (key 'img004'): status is not ok but its tokens are not zero"
    ]


def test_sizes_that_the_writer_refuses(cache_dir):
    edit(cache_dir, "shard-00000.h5", "image_size", 0, [0, 7])  # img000 is ok
    edit(cache_dir, "shard-00000.h5", "image_size", 4, [3, 0])  # img004 is missing
    report = verify_cache(cache_dir)
    assert only(report, "status") == [
        "shard-00000.h5 row 0 (key 'img000'): status ok needs width and height >= 1, got 0x7",
        "shard-00000.h5 row 4 (key 'img004'): status is not ok but its size or num_regions is not zero",
    ]


def test_missing_stray_and_tmp_shards(cache_dir):
    (cache_dir / "shard-00001.h5").unlink()
    shutil.copy(cache_dir / "shard-00000.h5", cache_dir / "shard-00007.h5")
    (cache_dir / "shard-00003.h5.tmp").write_bytes(b"half written")
    report = verify_cache(cache_dir)
    assert sorted(report.problems) == [
        "shard-00001.h5: shard listed in manifest.json is missing",
        "shard-00003.h5.tmp: leftover temporary file of an interrupted extraction; delete it",
        "shard-00007.h5: stray shard, not listed in manifest.json",
    ]
    assert report.checked["shards"] == 2


def test_manifest_disagreeing_with_shards(cache_dir):
    path = cache_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["images"][1]["status"] = "corrupt"
    manifest["images"][2]["key"] = "renamed"
    manifest["shards"][2]["rows"] = 3
    path.write_text(json.dumps(manifest))
    report = verify_cache(cache_dir)
    assert sorted(report.problems) == [
        "shard-00000.h5 row 1 (key 'img001'): status is 'ok', manifest.json says 'corrupt'",
        "shard-00000.h5 row 2 (key 'img002'): manifest.json says key 'renamed'",
        "shard-00002.h5: holds 2 rows; manifest.json says 3 rows and lists 2 images",
    ]


def test_unreadable_shard_and_attrs(cache_dir):
    with h5py.File(cache_dir / "shard-00001.h5", "r+") as f:
        f.attrs["complete"] = False
    (cache_dir / "shard-00002.h5").write_bytes(b"\0" * 1000)
    report = verify_cache(cache_dir)
    only(report, "shard-00001.h5: attribute complete is not True (shard was never committed)")
    only(report, "shard-00002.h5: cannot be read by HDF5")


def test_repeated_problems_are_capped(tmp_path):
    cache_dir = make_cache(tmp_path, n=30, shard_size=30, statuses={})
    with h5py.File(cache_dir / "shard-00000.h5", "r+") as f:
        f["patch_tokens"][:, 0, 0] = np.nan
    report = verify_cache(cache_dir)
    nan_lines = only(report, "patch_tokens contains NaN")
    assert len(nan_lines) == 20
    assert "shard-00000.h5: ... and 10 more 'nan patch_tokens' problems" in report.problems
    # 30 NaN rows (20 listed, 10 summarised) + the changed sha256: the CLI says "31 problem(s) found".
    assert report.count == 31


def write_data(folder, splits: dict[str, list[str]]):
    folder.mkdir()
    for split, keys in splits.items():
        text = "".join(f"IMGID:{key}\nword\tO\nParis\tB-LOC\n\n" for key in keys)
        (folder / f"{split}.txt").write_text(text)
    return resolve_data(data_dir=folder)


def test_keys_checked_against_the_data_folder(tmp_path):
    keys = ["a", "b", "c", "e"]
    cache_dir = make_cache(tmp_path, keys=keys, statuses={}, shard_size=3)
    data = write_data(tmp_path / "tw", {"train": ["a", "b"], "valid": ["c"], "test": ["d"]})
    report = verify_cache(cache_dir, data)
    assert report.problems == [
        f"{tmp_path / 'tw' / 'test.txt'}:1: image key 'd' is not in the cache",
        f"shard-00001.h5 row 0 (key 'e'): in no split of {tmp_path / 'tw'}",
    ]
    assert report.checked["splits"] == {"train": 2, "valid": 1, "test": 1}


def test_without_data_the_recorded_data_folder_is_checked(tmp_path):
    cache_dir = make_cache(tmp_path, keys=["a", "b"], statuses={})
    assert verify_cache(cache_dir).checked["data"].startswith("data folder not given and the recorded one")
    write_data(tmp_path / "tw", {"train": ["a"], "test": ["d"]})
    manifest_file = cache_dir / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["config"]["data_dir"] = str(tmp_path / "tw")  # as extraction records it
    manifest_file.write_text(json.dumps(manifest))
    report = verify_cache(cache_dir)
    assert f"{tmp_path / 'tw' / 'test.txt'}:1: image key 'd' is not in the cache" in report.problems


def test_data_folder_that_matches(tmp_path):
    cache_dir = make_cache(tmp_path, keys=["a", "b", "c"], statuses={"b": "missing"})
    data = write_data(tmp_path / "tw", {"train": ["a", "c"], "test": ["b"]})
    report = verify_cache(cache_dir, data)
    assert report.ok, report.problems
    assert report.checked["splits"] == {"train": 2, "test": 1} and report.checked["data_keys"] == 3


def test_data_folder_problems_are_reported(tmp_path):
    cache_dir = make_cache(tmp_path, keys=["a"], statuses={})
    data = write_data(tmp_path / "tw", {"train": ["a"]})
    (tmp_path / "tw" / "valid.txt").write_text("word\tO\n")
    report = verify_cache(cache_dir, data)
    assert report.problems == [
        f"valid.txt: cannot be read ({tmp_path / 'tw' / 'valid.txt'}:1: token line outside a post: "
        "expected a 'IMGID:' line before it)"
    ]
    (tmp_path / "tw" / "train.txt").unlink()
    (tmp_path / "tw" / "valid.txt").unlink()
    report = verify_cache(cache_dir, data)
    assert report.problems == [f"{tmp_path / 'tw'}: no readable train/valid/test.txt to check against"]


def test_factory_records_are_what_verify_sees(tmp_path):
    """The factory's default mix is ok/missing/corrupt; verify finds it consistent."""
    cache_dir = make_cache(tmp_path, n=18)
    statuses = [r.status for r in make_records([f"img{i:03d}" for i in range(18)])]
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert [i["status"] for i in manifest["images"]] == statuses
    assert statuses.count("missing") == 3 and statuses.count("corrupt") == 3
    assert verify_cache(cache_dir).ok


def test_layout_attrs_and_manifest_entries(cache_dir):
    with h5py.File(cache_dir / "shard-00000.h5", "r+") as f:
        del f["region_scores"]
        f.attrs["fingerprint"] = "other"
        f.attrs["schema_version"] = 0
    with h5py.File(cache_dir / "shard-00001.h5", "r+") as f:
        del f["global_embed"]
        f["global_embed"] = np.zeros((5, 6), np.float32)
    path = cache_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["images"].append(dict(manifest["images"][0]))
    manifest["images"].append({**manifest["images"][1], "key": "extra", "shard": "shard-00099.h5"})
    path.write_text(json.dumps(manifest))
    report = verify_cache(cache_dir)
    only(report, "shard-00000.h5: dataset region_scores is missing")
    only(report, "shard-00000.h5: fingerprint other differs from manifest.json")
    only(report, "shard-00000.h5: schema_version 0 is not 1")
    only(report, "shard-00001.h5: dataset global_embed is (5, 6) float32, expected (5, 6) float16")
    only(report, "manifest.json: image key 'img000' is listed twice")
    only(report, "manifest.json: image 'extra' names unlisted shard shard-00099.h5")


def test_images_checked_against_their_recorded_size_and_mtime(tmp_path):
    keys = ["a", "b", "c", "d"]
    write_data(tmp_path / "tw", {"train": keys})
    images = tmp_path / "tw" / "images"
    images.mkdir()
    for key in "abc":  # d is missing
        (images / f"{key}.jpg").write_bytes(b"x" * 10)
    data = resolve_data(data_dir=tmp_path / "tw")
    stats = {key: image_stat(data.image_path(key)) for key in keys}
    cache_dir = make_cache(tmp_path, keys=keys, statuses={"d": "missing"}, shard_size=2, image_stats=stats)
    report = verify_cache(cache_dir, data, images=True)
    assert report.ok and report.checked["image_files"] == 4, report.problems

    (images / "a.jpg").write_bytes(b"x" * 12)
    os.utime(images / "b.jpg", ns=(10**18, 10**18))
    (images / "c.jpg").unlink()
    (images / "d.jpg").write_bytes(b"now here")
    assert verify_cache(cache_dir, data).ok  # only --images looks at the files
    report = verify_cache(cache_dir, data, images=True)
    rerun = "re-run `mner extract-features` to extract its shard again"
    assert report.problems == [
        f"{images / 'a.jpg'}: image 'a' changed since extraction (size 10 -> 12; shard-00000.h5 row 0); {rerun}",
        f"{images / 'b.jpg'}: image 'b' changed since extraction (modified; shard-00000.h5 row 1); {rerun}",
        f"{images / 'c.jpg'}: image 'c' changed since extraction (gone; shard-00001.h5 row 0); {rerun}",
        f"{images / 'd.jpg'}: image 'd' changed since extraction (appeared; shard-00001.h5 row 1); {rerun}",
    ]


def test_images_of_a_cache_that_recorded_none(tmp_path):
    write_data(tmp_path / "tw", {"train": ["a", "b"]})
    cache_dir = make_cache(tmp_path, keys=["a", "b"], statuses={})
    report = verify_cache(cache_dir, resolve_data(data_dir=tmp_path / "tw"), images=True)
    assert report.problems == [
        "manifest.json records no file size or mtime for 2 image(s) (made by an older mner); "
        "run `mner extract-features ... --overwrite` to record them"
    ]
    assert verify_cache(make_cache(tmp_path / "x", keys=["a"], statuses={}), images=True).problems == [
        "cannot check the image files: the recorded data folder is gone; give --data-dir"
    ]


def test_a_no_region_cache_verifies_clean(tmp_path):
    cache_dir = make_cache(tmp_path, n=7, spec=NO_REGION_SPEC, shard_size=3)
    report = verify_cache(cache_dir)
    assert report.ok, report.problems
