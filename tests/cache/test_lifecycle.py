"""cache/lifecycle.py: reuse or refuse an existing cache folder, clear it, write shards in the background."""

import json
import re

import numpy as np
import pytest

from mner.cache.lifecycle import ShardSink, _differences, check_existing, clear_cache, shards_to_write
from mner.cache.reader import CacheReader
from mner.cache.shards import (
    ShardWriter,
    compute_fingerprint,
    empty_record,
    shard_path,
    write_manifest,
)
from tests.cache.factories import TINY_SPEC, assert_same_record, make_records, synthetic_models

PARTS = {
    "models": {"clip": {"sha256": {"model.safetensors": "a" * 64}, "untrained": False}},
    "spec": TINY_SPEC.to_dict(),
    "topk": 20,
    "versions": {"torch": "2.3.0", "h5py": "3.11.0"},
}


def extracted(folder, parts=PARTS, keys=("a", "b", "c", "d"), shard_size=2, manifest=True):
    """A cache as extraction leaves it: shards (and a manifest) recording `parts`; returns the fingerprint."""
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = compute_fingerprint(parts)
    config = {"out": str(folder), "fingerprint_parts": parts}
    records = make_records(list(keys), statuses={"b": "missing"})
    keys_of = {
        index: list(keys[start : start + shard_size])
        for index, start in enumerate(range(0, len(keys), shard_size))
    }
    sink = ShardSink(folder, TINY_SPEC, keys_of, {"fingerprint": fingerprint, "config_json": config})
    for index, shard_keys in keys_of.items():
        sink.put(index, [(row, records[keys.index(key)]) for row, key in enumerate(shard_keys)])
    sink.close()
    if manifest:
        files = [shard_path(folder, index) for index in keys_of]
        errors = {r.key: r.error for r in records if r.status != "ok"}
        write_manifest(folder, fingerprint, config, synthetic_models(), TINY_SPEC, files, errors)
    return fingerprint


def refusal(old: str, new: str, differs: str = "") -> str:
    """The ValueError message check_existing raises, as a regex."""
    text = (
        f"was made with a different configuration (fingerprint {old[:12]} != {new[:12]}); "
        "use --overwrite to replace it"
    )
    return re.escape(text + (f"; differs: {differs}" if differs else "")) + "$"


def test_a_matching_cache_is_reused_with_its_error_messages(tmp_path):
    assert check_existing(tmp_path / "absent", "f" * 64, PARTS, overwrite=False) == {}
    fingerprint = extracted(tmp_path / "cache")
    assert check_existing(tmp_path / "cache", fingerprint, PARTS, overwrite=False) == {
        "b": "missing: synthetic test image b"
    }


def test_another_configuration_is_refused_naming_what_differs(tmp_path):
    out = tmp_path / "cache"
    old = extracted(out)
    parts = {**PARTS, "topk": 10, "versions": {**PARTS["versions"], "torch": "2.4.0"}}
    new = compute_fingerprint(parts)
    differs = 'topk 20 -> 10, versions.torch "2.3.0" -> "2.4.0"'
    with pytest.raises(ValueError, match=refusal(old, new, differs)):
        check_existing(out, new, parts, overwrite=False)
    (out / "manifest.json").unlink()  # the shards' own attributes still tell
    with pytest.raises(ValueError, match=refusal(old, new, differs)):
        check_existing(out, new, parts, overwrite=False)
    assert check_existing(out, new, parts, overwrite=True) == {}


def test_unreadable_manifest_or_shard_is_refused(tmp_path):
    out = tmp_path / "cache"
    fingerprint = extracted(out)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=refusal("unreadable manifest", fingerprint)):
        check_existing(out, fingerprint, PARTS, overwrite=False)
    (out / "manifest.json").unlink()
    shard_path(out, 1).write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match=refusal("unreadable shard shard-00001.h5", fingerprint)):
        check_existing(out, fingerprint, PARTS, overwrite=False)


def test_a_foreign_cache_without_recorded_parts_is_refused_without_details(tmp_path):
    out = tmp_path / "cache"
    old = extracted(out)
    config = json.loads((out / "manifest.json").read_text())
    del config["config"]["fingerprint_parts"]
    (out / "manifest.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=refusal(old, "0" * 64)):
        check_existing(out, "0" * 64, PARTS, overwrite=False)


def test_differences_summary_shows_short_values_and_counts_the_rest():
    old = {f"k{i}": i for i in range(10)} | {"long": "x" * 40, "nested": {"a": [1, 2]}}
    new = {f"k{i}": i + 1 for i in range(10)} | {"long": "y" * 40, "nested": {"a": [1, 3]}}
    assert _differences(old, new) == (
        "k0 0 -> 1, k1 1 -> 2, k2 2 -> 3, k3 3 -> 4, k4 4 -> 5, k5 5 -> 6, k6 6 -> 7, k7 7 -> 8 (+4 more)"
    )
    assert _differences(
        {"long": "x" * 40, "nested": {"a": [1, 2]}}, {"long": "y" * 40, "nested": {"a": [1, 3]}}
    ) == ("long, nested.a [1, 2] -> [1, 3]")
    assert _differences(None, new) == ""
    assert _differences(old, old) == ""


def reference_differences(old, new) -> str:
    """extract/run.py's `_differences` before it moved here (commit 049bece), kept as the reference."""

    def flatten(tree, prefix=""):
        flat = {}
        for name, value in tree.items():
            if isinstance(value, dict):
                flat.update(flatten(value, f"{prefix}{name}."))
            else:
                flat[f"{prefix}{name}"] = value
        return flat

    if not isinstance(old, dict):
        return ""
    old_flat, new_flat = flatten(old), flatten(new)
    names = sorted(n for n in old_flat.keys() | new_flat.keys() if old_flat.get(n) != new_flat.get(n))
    shown = []
    for name in names[:8]:
        before, after = json.dumps(old_flat.get(name)), json.dumps(new_flat.get(name))
        shown.append(f"{name} {before} -> {after}" if len(before) + len(after) <= 60 else name)
    return ", ".join(shown) + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")


def changed_leaves(tree: dict, rng: np.random.Generator) -> dict:
    """A copy of `tree` with some leaves changed, dropped or added, its dict structure kept."""
    out = {}
    for name, value in tree.items():
        if isinstance(value, dict):
            out[name] = changed_leaves(value, rng)
            continue
        roll = rng.random()
        if roll < 0.15:
            continue  # dropped
        out[name] = value if roll < 0.6 else ["changed", int(rng.integers(100))] if roll < 0.8 else "z" * 50
    if rng.random() < 0.3:
        out[f"added{int(rng.integers(10))}"] = int(rng.integers(3))
    return out


@pytest.mark.parametrize("seed", range(30))
def test_differences_equal_the_old_extract_wording(seed):
    rng = np.random.default_rng(seed)
    old = {
        **PARTS,
        "dtype": {"compute": "float32", "stored": "float16"},
        "num_images": 40,
        "keys_sha256": "k" * 64,
    }
    new = changed_leaves(old, rng)
    assert _differences(old, new) == reference_differences(old, new)
    assert _differences(new, old) == reference_differences(new, old)


def test_differences_where_a_dict_is_on_one_side_only():
    # The old flattening listed each leaf under a dict that one side lacks; fingerprint_diff (shared
    # with evaluate and predict) names the dict's path once, as does this summary now.
    old, new = {"topk": 20}, {"topk": 20, "versions": {"torch": "2.3.0"}}
    assert reference_differences(old, new) == 'versions.torch null -> "2.3.0"'
    assert _differences(old, new) == 'versions null -> {"torch": "2.3.0"}'


def test_clear_cache_deletes_only_cache_files(tmp_path):
    out = tmp_path / "cache"
    extracted(out)
    (out / "shard-00005.h5.tmp").write_bytes(b"half")
    (out / "notes.txt").write_text("mine")
    clear_cache(out)
    assert sorted(path.name for path in out.iterdir()) == ["notes.txt"]


def test_shards_to_write_skips_complete_shards_and_drops_tmp_files(tmp_path):
    out = tmp_path / "cache"
    fingerprint = extracted(out, keys=("a", "b", "c", "d", "e", "f"), manifest=False)
    shard_path(out, 1).unlink()
    (out / "shard-00001.h5.tmp").write_bytes(b"half a shard from a killed run")
    assert shards_to_write(out, [0, 1, 2, 3], fingerprint) == [1, 3]
    assert not list(out.glob("*.tmp"))
    assert shards_to_write(out, [0, 2], "0" * 64) == [0, 2]  # another configuration's shards


def test_shard_sink_round_trip(tmp_path):
    keys = ("a", "b", "c", "d", "e")
    extracted(tmp_path / "cache", keys=keys, shard_size=3)
    reader = CacheReader(tmp_path / "cache")
    assert [shard.name for shard in sorted((tmp_path / "cache").glob("shard-*.h5"))] == [
        "shard-00000.h5",
        "shard-00001.h5",
    ]
    for record in make_records(list(keys), statuses={"b": "missing"}):
        assert_same_record(record, reader.get(record.key))


def test_shard_sink_hands_writer_errors_to_the_caller_and_leaves_no_shard(tmp_path):
    records = make_records(["a", "b"], statuses={})
    attrs = {"fingerprint": "f", "config_json": {}}
    sink = ShardSink(tmp_path, TINY_SPEC, {0: ["a", "b"]}, attrs)
    sink.put(0, [(0, records[1])])  # the wrong image for row 0
    with pytest.raises(ValueError, match="row 0 is image 'a', got record 'b'"):
        sink.close()
    assert list(tmp_path.iterdir()) == []

    sink = ShardSink(tmp_path, TINY_SPEC, {0: ["a", "b"]}, attrs)
    sink.put(0, [(0, records[0])])
    sink.abort()  # as extraction does when the model loop fails mid-shard
    assert list(tmp_path.iterdir()) == []


def test_shard_sink_writes_what_shard_writer_writes(tmp_path):
    records = [*make_records(["a"], statuses={}), empty_record("b", TINY_SPEC, "corrupt")]
    attrs = {"fingerprint": "f", "config_json": {"x": 1}}
    (tmp_path / "sink").mkdir()
    sink = ShardSink(tmp_path / "sink", TINY_SPEC, {0: ["a", "b"]}, attrs)
    sink.put(0, [(0, records[0])])
    sink.put(0, [(1, records[1])])
    sink.close()
    (tmp_path / "direct").mkdir()
    with ShardWriter(
        shard_path(tmp_path / "direct", 0), TINY_SPEC, ["a", "b"], {**attrs, "shard_index": 0}
    ) as writer:
        for row, record in enumerate(records):
            writer.write(row, record)
        writer.commit()
    assert shard_path(tmp_path / "sink", 0).read_bytes() == shard_path(tmp_path / "direct", 0).read_bytes()
