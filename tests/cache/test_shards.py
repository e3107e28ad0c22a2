"""cache/shards.py: exact round trip, atomic shards, validation messages, manifest, fingerprint."""

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from mner.cache.fingerprint import compute_fingerprint, fingerprint_diff
from mner.cache.manifest import read_manifest, write_manifest
from mner.cache.reader import CacheReader
from mner.cache.rows import row_problems
from mner.cache.shards import ShardWriter, completed_shard, shard_path
from mner.cache.spec import RECORD_ARRAYS, SCHEMA_VERSION, STATUS_NAMES, Record, TokenSpec, empty_record
from tests.cache.factories import (
    CATEGORIES,
    NO_REGION_SPEC,
    TINY_SPEC,
    assert_same_record,
    make_cache,
    make_record,
    make_records,
    synthetic_models,
    write_cache,
)

ATTRS = {"fingerprint": "f" * 64, "config_json": {"a": 1}, "shard_index": 0}


def ok_record(key="img000", seed=1, spec=TINY_SPEC) -> Record:
    rng = np.random.default_rng(seed)
    while True:  # a record with at least one region, so region checks have something to check
        record = make_record(key, spec, rng)
        if 0 < record.num_regions < spec.max_regions:
            return record


def test_round_trip_is_exact(tmp_path):
    keys = [f"img{i:03d}" for i in range(12)] + ["naïve/ü.jpg"]
    records = make_records(keys, seed=3)
    assert {r.status for r in records} == {"ok", "missing", "corrupt"}
    cache_dir = write_cache(tmp_path / "c", records, shard_size=5)

    reader = CacheReader(cache_dir)
    assert reader.keys == keys and len(reader) == len(keys)
    for record in records:
        assert record.key in reader
        assert reader.status(record.key) == record.status
        assert_same_record(record, reader.get(record.key))

    manifest = read_manifest(cache_dir)
    assert [s["rows"] for s in manifest["shards"]] == [5, 5, 3]
    for record, image in zip(records, manifest["images"]):
        assert image["key"] == record.key
        assert (image["status"], image["width"], image["height"]) == (
            record.status,
            record.width,
            record.height,
        )
        assert image["num_regions"] == record.num_regions and image["error"] == record.error


def test_float32_input_is_stored_as_float16(tmp_path):
    record = ok_record()
    as32 = dataclasses.replace(
        record,
        patch_tokens=record.patch_tokens.astype(np.float32) + np.float32(1e-4),
        global_embed=record.global_embed.astype(np.float32),
    )
    with ShardWriter(tmp_path / "s.h5", TINY_SPEC, [record.key], ATTRS) as writer:
        writer.write(0, as32)
        writer.commit()
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert f["patch_tokens"].dtype == np.float16
        assert np.array_equal(f["patch_tokens"][0], as32.patch_tokens.astype(np.float16))
        assert np.array_equal(f["global_embed"][0], record.global_embed)


def test_shard_layout_matches_design(tmp_path):
    records = make_records(["a", "bb", "ccc"], statuses={"bb": "missing"})
    cache_dir = write_cache(tmp_path / "c", records)
    with h5py.File(shard_path(cache_dir, 0), "r") as f:
        K, P, Dp = TINY_SPEC.max_regions, TINY_SPEC.num_patches, TINY_SPEC.patch_dim
        expected = {
            "keys": ((3,), "|S3"),
            "status": ((3,), "uint8"),
            "image_size": ((3, 2), "int32"),
            "patch_tokens": ((3, P, Dp), "float16"),
            "global_embed": ((3, TINY_SPEC.global_dim), "float16"),
            "region_feats": ((3, K, TINY_SPEC.region_dim), "float16"),
            "region_labels": ((3, K), "int32"),
            "region_scores": ((3, K), "float32"),
            "region_boxes": ((3, K, 4), "float32"),
            "num_regions": ((3,), "int32"),
        }
        assert {name: (f[name].shape, str(f[name].dtype)) for name in f} == expected
        for name in ("patch_tokens", "global_embed", "region_feats"):
            assert f[name].chunks == (1, *f[name].shape[1:])
            assert f[name].compression is None
        assert list(f["status"][:]) == [0, 1, 0]
        assert list(f["image_size"][1]) == [0, 0]
        attrs = dict(f.attrs)
        assert attrs["schema_version"] == SCHEMA_VERSION and bool(attrs["complete"]) is True
        assert attrs["shard_index"] == 0 and attrs["fingerprint"] == read_manifest(cache_dir)["fingerprint"]
        assert TokenSpec.from_dict(json.loads(attrs["spec_json"])) == TINY_SPEC
        assert json.loads(attrs["config_json"]) == read_manifest(cache_dir)["config"]


def test_shard_appears_only_on_commit(tmp_path):
    final = shard_path(tmp_path, 0)
    records = make_records(["a", "b"], statuses={})
    writer = ShardWriter(final, TINY_SPEC, ["a", "b"], ATTRS)
    writer.write(0, records[0])
    writer.write(1, records[1])
    tmp = tmp_path / "shard-00000.h5.tmp"
    assert tmp.exists() and not final.exists()
    assert not completed_shard(final, ATTRS["fingerprint"])
    assert not completed_shard(tmp, ATTRS["fingerprint"])  # the tmp says complete=False
    assert writer.commit() == final
    assert final.exists() and not tmp.exists()
    assert completed_shard(final, ATTRS["fingerprint"])
    assert not completed_shard(final, "0" * 64)


def test_abort_and_failed_block_leave_no_shard(tmp_path):
    final = shard_path(tmp_path, 3)
    writer = ShardWriter(final, TINY_SPEC, ["a"], ATTRS)
    writer.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(final, TINY_SPEC, ["a"], ATTRS) as writer:
            writer.write(0, make_records(["a"], statuses={})[0])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_crashed_writer_leaves_only_an_incomplete_tmp(tmp_path):
    """A process killed before commit() leaves `.tmp`; neither name counts as a completed shard."""
    script = (
        "import os, sys\n"
        "from tests.cache.factories import make_records, TINY_SPEC\n"
        "from mner.cache.shards import ShardWriter\n"
        "w = ShardWriter(sys.argv[1], TINY_SPEC, ['a', 'b'], {'fingerprint': 'x', 'config_json': '{}', 'shard_index': 0})\n"
        "for row, r in enumerate(make_records(['a', 'b'], statuses={})):\n"
        "    w.write(row, r)\n"
        "w._file.flush()\n"
        "os._exit(1)\n"
    )
    final = shard_path(tmp_path, 0)
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-c", script, str(final)], cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 1, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.h5.tmp"]
    assert not completed_shard(final, "x")
    assert not completed_shard(tmp_path / "shard-00000.h5.tmp", "x")
    (tmp_path / "shard-00000.h5.tmp").rename(final)  # even renamed by hand it is not complete
    assert not completed_shard(final, "x")


def test_completed_shard_rejects_garbage(tmp_path):
    path = tmp_path / "shard-00000.h5"
    path.write_bytes(b"not hdf5 at all")
    assert not completed_shard(path, "x")
    assert not completed_shard(tmp_path / "absent.h5", "x")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "patch_tokens",
            70000.0,
            r"image 'img000': patch_tokens has \|value\| 70000 > 65504, which overflows float16",
        ),
        ("global_embed", -1e6, r"image 'img000': global_embed has \|value\| 1e\+06 > 65504"),
        ("region_feats", np.nan, r"image 'img000': region_feats contains NaN or inf"),
        ("patch_tokens", np.inf, r"image 'img000': patch_tokens contains NaN or inf"),
        ("region_scores", np.nan, r"image 'img000': region_scores contains NaN or inf"),
    ],
)
def test_bad_token_values_are_rejected_naming_key_and_tensor(tmp_path, field, value, message):
    record = ok_record()
    array = getattr(record, field).astype(np.float32)
    array.flat[0] = value
    with ShardWriter(tmp_path / "s.h5", TINY_SPEC, ["img000"], ATTRS) as writer:
        with pytest.raises(ValueError, match=message):
            writer.write(0, dataclasses.replace(record, **{field: array}))


def test_fp16_max_itself_is_accepted(tmp_path):
    record = ok_record()
    patch = record.patch_tokens.astype(np.float32)
    patch[0, 0] = -65504.0
    with ShardWriter(tmp_path / "s.h5", TINY_SPEC, ["img000"], ATTRS) as writer:
        writer.write(0, dataclasses.replace(record, patch_tokens=patch))
        writer.commit()
    with h5py.File(tmp_path / "s.h5", "r") as f:
        assert f["patch_tokens"][0, 0, 0] == -65504.0


def _replace(record: Record, **changes) -> Record:
    values = {}
    for name, change in changes.items():
        if callable(change):
            array = getattr(record, name).copy()
            change(array)
            values[name] = array
        else:
            values[name] = change
    return dataclasses.replace(record, **values)


def _set(index, value):
    def change(array):
        array[index] = value

    return change


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"patch_tokens": np.zeros((5, 9), np.float16)},
            r"image 'img000': patch_tokens has shape \(5, 9\), the spec needs \(5, 8\)",
        ),
        ({"region_boxes": np.zeros((4, 5), np.float32)}, r"image 'img000': region_boxes has shape \(4, 5\)"),
        ({"status": "lost"}, r"image 'img000': unknown status 'lost'"),
        ({"num_regions": 5}, r"image 'img000': num_regions 5 outside \[0, 4\]"),
        (
            {"region_feats": _set(3, 1.0)},
            r"image 'img000': region_feats rows >= num_regions \(\d\) must be zero padding",
        ),
        ({"region_labels": _set(3, 7)}, r"image 'img000': region_labels rows >= num_regions"),
        ({"region_boxes": _set((0, 2), 1.5)}, r"image 'img000': region_boxes must lie in \[0, 1\]"),
        ({"region_boxes": _set((0, 0), 0.99)}, r"image 'img000': region_boxes must be xyxy with x2 >= x1"),
        ({"width": 0}, r"image 'img000': status ok needs width and height >= 1, got 0x"),
        ({"status": "missing"}, r"image 'img000': status missing must have zero size, regions and tokens"),
    ],
)
def test_invalid_records_are_rejected(tmp_path, changes, message):
    record = _replace(ok_record(), **changes)
    with ShardWriter(tmp_path / "s.h5", TINY_SPEC, ["img000"], ATTRS) as writer:
        with pytest.raises(ValueError, match=message):
            writer.write(0, record)


def stacked(records: list[Record]) -> dict[str, np.ndarray]:
    """The block row_problems takes, as verify reads it from a shard: (B, ...) arrays."""
    block = {name: np.stack([getattr(r, name) for r in records]) for name in RECORD_ARRAYS}
    block["status"] = np.array([STATUS_NAMES.index(r.status) for r in records], np.uint8)
    block["image_size"] = np.array([(r.width, r.height) for r in records], np.int32)
    block["num_regions"] = np.array([r.num_regions for r in records], np.int32)
    return block


def test_row_problems_states_each_rule_for_the_writer_and_for_verify():
    records = make_records(
        [f"img{i:03d}" for i in range(6)], statuses={"img004": "missing", "img005": "corrupt"}
    )
    assert row_problems(stacked(records), TINY_SPEC) == []
    no_size = _replace(ok_record(), width=0)
    rows = [
        _replace(ok_record(), region_boxes=_set((0, 2), 1.5)),
        records[1],
        no_size,
        records[3],
        dataclasses.replace(records[4], width=3),
        _replace(records[5], patch_tokens=_set((0, 0), 1.0)),
    ]
    block = stacked(rows)
    block["status"][3] = 9  # what verify may find on disk; the writer only takes status names
    block["global_embed"][3, 1] = np.inf
    found = [
        (p.check, list(p.rows), p.rule(p.rows[0]), p.found(p.rows[0])) for p in row_problems(block, TINY_SPEC)
    ]
    not_empty = "must have zero size, regions and tokens (use empty_record)"
    assert found == [
        ("status", [3], "status code 9 is not one of 0..2", "status code 9 is not one of 0..2"),
        ("nan global_embed", [3], "global_embed contains NaN or inf", "global_embed contains NaN or inf"),
        (
            "boxes",
            [0],
            "region_boxes must lie in [0, 1] (normalised by image width/height)",
            "region_boxes outside [0, 1]",
        ),
        (
            "ok size",
            [2],
            f"status ok needs width and height >= 1, got 0x{no_size.height}",
            f"status ok needs width and height >= 1, got 0x{no_size.height}",
        ),
        ("not ok tokens", [3, 5], f"status 9 {not_empty}", "status is not ok but its tokens are not zero"),
        (
            "not ok size",
            [3, 4],
            f"status 9 {not_empty}",
            "status is not ok but its size or num_regions is not zero",
        ),
    ]


def test_writer_usage_errors(tmp_path):
    path = tmp_path / "shard-00000.h5"
    record = ok_record("a")
    with pytest.raises(ValueError, match=r"duplicate image keys \['a'\]"):
        ShardWriter(path, TINY_SPEC, ["a", "b", "a"], ATTRS)
    with pytest.raises(ValueError, match="no keys to write"):
        ShardWriter(path, TINY_SPEC, [], ATTRS)
    with pytest.raises(ValueError, match="image keys must be non-empty strings without NUL, got ''"):
        ShardWriter(path, TINY_SPEC, ["a", ""], ATTRS)
    with pytest.raises(ValueError, match=r"image keys must be non-empty strings without NUL, got 'a\\x00'"):
        ShardWriter(path, TINY_SPEC, ["a\0"], ATTRS)
    with pytest.raises(ValueError, match=r"attrs is missing \['config_json', 'shard_index'\]"):
        ShardWriter(path, TINY_SPEC, ["a"], {"fingerprint": "x"})
    with pytest.raises(ValueError, match="attr 'complete' is set by ShardWriter"):
        ShardWriter(path, TINY_SPEC, ["a"], {**ATTRS, "complete": True})
    with pytest.raises(ValueError, match="spec must be a TokenSpec, got dict"):
        ShardWriter(path, TINY_SPEC.to_dict(), ["a"], ATTRS)
    assert list(tmp_path.iterdir()) == []

    writer = ShardWriter(path, TINY_SPEC, ["a", "b"], ATTRS)
    with pytest.raises(ValueError, match="row 2 out of range"):
        writer.write(2, record)
    with pytest.raises(ValueError, match="row 1 is image 'b', got record 'a'"):
        writer.write(1, record)
    writer.write(0, record)
    with pytest.raises(ValueError, match=r"1 rows were never written \(first keys: \['b'\]\)"):
        writer.commit()
    writer.write(1, empty_record("b", TINY_SPEC, "missing"))
    writer.commit()
    with pytest.raises(ValueError, match=r"write\(\) after commit\(\) or abort\(\)"):
        writer.write(0, record)
    with pytest.raises(ValueError, match=r"commit\(\) after commit\(\) or abort\(\)"):
        writer.commit()


def test_token_spec_validation():
    values = TINY_SPEC.to_dict()
    with pytest.raises(ValueError, match="TokenSpec.num_patches must be a positive integer, got 0"):
        TokenSpec(**{**values, "num_patches": 0})
    with pytest.raises(ValueError, match=r"TokenSpec.region_dim must be a positive integer, got 2.5"):
        TokenSpec(**{**values, "region_dim": 2.5})
    with pytest.raises(ValueError, match="TokenSpec.region_source must be a non-empty string, got ''"):
        TokenSpec(**{**values, "region_source": ""})
    with pytest.raises(ValueError, match=r"unknown fields \['extra'\] and missing fields \['patch_dim'\]"):
        TokenSpec.from_dict({**{k: v for k, v in values.items() if k != "patch_dim"}, "extra": 1})
    assert TokenSpec.from_dict(json.loads(json.dumps(values))) == TINY_SPEC


def test_empty_record():
    record = empty_record("k", TINY_SPEC, "corrupt", error="cannot decode")
    assert (record.status, record.width, record.height, record.num_regions, record.error) == (
        "corrupt",
        0,
        0,
        0,
        "cannot decode",
    )
    assert record.patch_tokens.shape == (5, 8) and record.patch_tokens.dtype == np.float16
    assert record.region_boxes.shape == (4, 4) and record.region_boxes.dtype == np.float32
    assert record.region_labels.dtype == np.int32
    assert not any(np.any(getattr(record, name)) for name in ("patch_tokens", "global_embed", "region_feats"))
    with pytest.raises(ValueError, match="image 'k': unknown status 'gone'"):
        empty_record("k", TINY_SPEC, "gone")


def test_fingerprint_is_sha256_of_canonical_json():
    parts = {"b": [1, 2, {"y": 1.5, "x": None}], "a": "ü", "c": True}
    reference = hashlib.sha256(
        json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    ).hexdigest()
    assert compute_fingerprint(parts) == reference
    reordered = {"c": True, "a": "ü", "b": [1, 2, {"x": None, "y": 1.5}]}
    assert compute_fingerprint(reordered) == reference
    assert compute_fingerprint({**parts, "c": False}) != reference
    assert compute_fingerprint({"p": Path("/x/y"), "t": (1, 2)}) == compute_fingerprint(
        {"p": "/x/y", "t": [1, 2]}
    )
    with pytest.raises(ValueError, match="cannot fingerprint/serialise config: .*object"):
        compute_fingerprint({"model": object()})
    with pytest.raises(ValueError, match="compute_fingerprint expects a dict, got list"):
        compute_fingerprint([1])


def test_fingerprint_diff_names_each_differing_leaf():
    old = {"topk": 20, "models": {"clip": {"sha256": "x", "untrained": False}}, "gone": 1, "same": [1, 2]}
    new = {
        "topk": 10,
        "models": {"clip": {"sha256": "y", "untrained": False}},
        "new": {"a": 1},
        "same": [1, 2],
    }
    assert fingerprint_diff(old, new) == {
        "gone": (1, None),
        "models.clip.sha256": ("x", "y"),
        "new": (None, {"a": 1}),
        "topk": (20, 10),
    }
    assert list(fingerprint_diff(old, new)) == ["gone", "models.clip.sha256", "new", "topk"]
    assert fingerprint_diff(old, new, ignore=("topk", "new")) == {
        "gone": (1, None),
        "models.clip.sha256": ("x", "y"),
    }
    assert fingerprint_diff(old, old) == {}
    assert fingerprint_diff({"a": {}}, {}) == {"a": ({}, None)}  # their fingerprints differ as well
    # Paths sort as strings, not level by level ("-" sorts before ".").
    assert list(fingerprint_diff({"a": {"z": 1}, "a-b": 1}, {"a": {"z": 2}, "a-b": 2})) == ["a-b", "a.z"]
    with pytest.raises(ValueError, match="fingerprint_diff compares two dicts, got NoneType and dict"):
        fingerprint_diff(None, new)


def test_shard_path():
    assert shard_path("/c", 0) == Path("/c/shard-00000.h5")
    assert shard_path(Path("/c"), 123) == Path("/c/shard-00123.h5")
    with pytest.raises(ValueError, match="shard index must be a non-negative integer, got -1"):
        shard_path("/c", -1)


def test_manifest_contents(tmp_path):
    cache_dir = make_cache(tmp_path, n=7, shard_size=4)
    manifest = read_manifest(cache_dir)
    assert manifest["schema_version"] == SCHEMA_VERSION
    assert manifest["spec"] == TINY_SPEC.to_dict()
    assert manifest["models"] == synthetic_models()
    assert manifest["models"]["detector"]["categories"] == CATEGORIES
    for shard in manifest["shards"]:
        data = (cache_dir / shard["file"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest()
    assert [(s["file"], s["rows"]) for s in manifest["shards"]] == [
        ("shard-00000.h5", 4),
        ("shard-00001.h5", 3),
    ]
    assert [(i["shard"], i["row"]) for i in manifest["images"]] == [
        ("shard-00000.h5", r) for r in range(4)
    ] + [("shard-00001.h5", r) for r in range(3)]
    assert json.loads((cache_dir / "extract_config.json").read_text()) == manifest["config"]
    assert sorted(p.name for p in cache_dir.iterdir()) == [
        "extract_config.json",
        "manifest.json",
        "shard-00000.h5",
        "shard-00001.h5",
    ]


def test_write_manifest_refuses_bad_shards(tmp_path):
    records = make_records(["a", "b"], statuses={})
    spec = TINY_SPEC
    for index, key in enumerate(["a", "a"]):
        with ShardWriter(shard_path(tmp_path, index), spec, [key], {**ATTRS, "shard_index": index}) as writer:
            writer.write(0, records[0])
            writer.commit()
    with pytest.raises(ValueError, match="image key 'a' is in both shard-00000.h5 and shard-00001.h5"):
        write_manifest(
            tmp_path,
            ATTRS["fingerprint"],
            {},
            {},
            spec,
            [shard_path(tmp_path, 0), shard_path(tmp_path, 1)],
            {},
        )
    with pytest.raises(ValueError, match="shard-00000.h5 is not a complete shard with fingerprint 0000"):
        write_manifest(tmp_path, "0000", {}, {}, spec, [shard_path(tmp_path, 0)], {})
    assert not (tmp_path / "manifest.json").exists()


def test_read_manifest_errors(tmp_path):
    with pytest.raises(
        ValueError, match=r"is not a feature cache: no manifest.json; run `mner extract-features` first"
    ):
        read_manifest(tmp_path)
    cache_dir = make_cache(tmp_path, n=2)
    path = cache_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "schema_version": 99}))
    with pytest.raises(ValueError, match=r"schema_version 99 is not supported \(this code reads 1\)"):
        read_manifest(cache_dir)
    path.write_text(json.dumps({k: v for k, v in manifest.items() if k != "images"}))
    with pytest.raises(ValueError, match=r"missing fields \['images'\]"):
        read_manifest(cache_dir)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json: not valid JSON"):
        read_manifest(cache_dir)


def test_read_manifest_advises_the_rerun_that_rebuilds_it(tmp_path):
    # The advice leads out of a damaged manifest (extraction rebuilds it from the shards), not into
    # a refusal that asks for --overwrite.
    cache_dir = make_cache(tmp_path, n=2)
    rebuild = (
        "re-run the `mner extract-features` command that made this cache: it keeps the intact shards "
        "and rebuilds manifest.json"
    )
    (cache_dir / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError) as refused:
        read_manifest(cache_dir)
    assert str(refused.value).endswith(f"); {rebuild}")
    (cache_dir / "manifest.json").unlink()
    with pytest.raises(ValueError) as refused:
        read_manifest(cache_dir)
    assert str(refused.value) == (
        f"{cache_dir} holds shards but no manifest.json (an extraction stopped early); {rebuild}"
    )


def test_no_region_cache_round_trips_with_empty_region_datasets(tmp_path):
    # --detector none: every region dataset is present with K = 0 rows, so readers need no special case.
    records = make_records(["a", "b", "c"], NO_REGION_SPEC, statuses={"b": "missing"})
    cache_dir = write_cache(tmp_path / "cache", records, NO_REGION_SPEC, shard_size=2)
    with h5py.File(shard_path(cache_dir, 0), "r") as f:
        assert f["region_feats"].shape == (2, 0, 0) and f["region_boxes"].shape == (2, 0, 4)
        assert f["region_labels"].shape == (2, 0) and f["patch_tokens"].chunks == (1, 5, 8)
    assert not NO_REGION_SPEC.has_regions and TINY_SPEC.has_regions
    with CacheReader(cache_dir) as reader:
        for record in records:
            assert_same_record(record, reader.get(record.key))
    with pytest.raises(ValueError, match="TokenSpec.max_regions must be a positive integer, got 0"):
        TokenSpec(**{**TINY_SPEC.to_dict(), "max_regions": 0})
    with pytest.raises(
        ValueError, match="region_source 'none' needs max_regions = region_dim = 0, got 4 and 10"
    ):
        TokenSpec(**{**TINY_SPEC.to_dict(), "region_source": "none"})


def test_a_shard_the_disk_has_no_room_for_is_refused_before_hdf5_writes(tmp_path, monkeypatch):
    import shutil

    import mner.cache.shards as shards

    payload = sum(int(np.prod(shape)) * shards.DTYPES[name].itemsize for name, shape in TINY_SPEC.shapes().items() if name in shards.DTYPES)  # fmt: skip
    room = 3 * payload + shards._SHARD_OVERHEAD  # exactly what three rows need
    monkeypatch.setattr(shards.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(room, 0, room))
    ShardWriter(tmp_path / "fits.h5", TINY_SPEC, ["a", "b", "c"], ATTRS).abort()
    with pytest.raises(OSError, match=r"No space left on device \(shard needs about") as raised:
        ShardWriter(tmp_path / "s.h5", TINY_SPEC, ["a", "b", "c", "d"], ATTRS)
    assert (raised.value.errno, raised.value.filename) == (28, str(tmp_path / "s.h5.tmp"))
    assert list(tmp_path.iterdir()) == []
