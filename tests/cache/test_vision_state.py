"""The vision state dataset and the vision blocks' weight file (extract-features --vision-trainable-blocks)."""

import dataclasses
import re

import numpy as np
import pytest

from mner.cache.reader import CacheReader
from mner.cache.shards import ShardWriter
from mner.cache.spec import TokenSpec, empty_record
from mner.cache.verify import verify_cache
from mner.cache.vision_blocks import BLOCKS_FILE, read_vision_blocks, write_vision_blocks
from tests.cache.factories import STATE_SPEC, TINY_SPEC, assert_same_record, make_cache, make_records

ATTRS = {"fingerprint": "f" * 64, "config_json": "{}", "shard_index": 0}


def test_spec_without_a_state_is_the_spec_it_always_was():
    assert "vision_state_shape" not in TINY_SPEC.to_dict() and "vision_state" not in TINY_SPEC.shapes()
    assert TokenSpec.from_dict(TINY_SPEC.to_dict()) == TINY_SPEC
    data = STATE_SPEC.to_dict()
    assert data["vision_state_shape"] == [5, 8]  # JSON: a list, read back as a tuple
    assert TokenSpec.from_dict(data) == STATE_SPEC and STATE_SPEC.has_vision_state
    assert STATE_SPEC.shapes()["vision_state"] == (5, 8)
    assert STATE_SPEC.token_datasets()[-1] == STATE_SPEC.record_arrays()[-1] == "vision_state"
    with pytest.raises(ValueError, match="are given together or not at all"):
        dataclasses.replace(TINY_SPEC, vision_state_shape=(5, 8))
    with pytest.raises(ValueError, match="vision_state_shape must hold positive integers, got \\(0, 8\\)"):
        dataclasses.replace(STATE_SPEC, vision_state_shape=(0, 8))


@pytest.mark.parametrize("in_memory", [False, True])
def test_state_round_trip(tmp_path, in_memory):
    cache = make_cache(tmp_path, n=7, spec=STATE_SPEC)
    records = make_records([f"img{i:03d}" for i in range(7)], STATE_SPEC)
    with CacheReader(cache, in_memory=in_memory) as reader:
        for record in records:
            found = reader.get(record.key)
            assert_same_record(record, found)
            assert found.vision_state.shape == (5, 8)
            if record.status != "ok":
                assert not found.vision_state.any()


def test_writer_refuses_a_state_the_spec_does_not_store_and_a_bad_one(tmp_path):
    record = make_records(["a"], STATE_SPEC, statuses={})[0]
    with ShardWriter(tmp_path / "s.h5", TINY_SPEC, ["a"], ATTRS) as writer:
        with pytest.raises(
            ValueError, match=re.escape("image 'a': vision_state is given, but the spec stores none")
        ):
            writer.write(0, record)
    with ShardWriter(tmp_path / "s.h5", STATE_SPEC, ["a"], ATTRS) as writer:
        record.vision_state[0, 0] = np.nan
        with pytest.raises(ValueError, match=re.escape("image 'a': vision_state contains NaN or inf")):
            writer.write(0, record)
        missing = empty_record("a", STATE_SPEC, "missing")
        missing.vision_state[1, 1] = 1.0
        with pytest.raises(
            ValueError, match="image 'a': status missing must have zero size, regions and tokens"
        ):
            writer.write(0, missing)


def test_verify_names_a_spec_and_manifest_that_disagree(tmp_path):
    cache = make_cache(tmp_path, n=3, spec=STATE_SPEC)  # the factory writes no weight file
    assert verify_cache(cache).problems == [
        "manifest.json lists no vision blocks' weight file but its spec stores a vision state"
    ]


def test_weight_file_round_trip_and_tamper(tmp_path):
    arrays = {"layers.0.w": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(7, np.int64)}
    entry = write_vision_blocks(tmp_path, arrays, {"kind": "clip", "blocks": 1})
    assert entry["file"] == BLOCKS_FILE and entry["bytes"] == (tmp_path / BLOCKS_FILE).stat().st_size
    found = read_vision_blocks(tmp_path, entry)
    assert set(found) == set(arrays)
    for name, value in arrays.items():
        assert found[name].shape == value.shape and np.array_equal(found[name], value)
    # The same arrays give the same bytes (a resumed extraction writes the file again).
    assert write_vision_blocks(tmp_path, arrays, {"kind": "clip", "blocks": 1}) == entry
    data = bytearray((tmp_path / BLOCKS_FILE).read_bytes())
    data[-1] ^= 1
    (tmp_path / BLOCKS_FILE).write_bytes(bytes(data))
    with pytest.raises(
        ValueError, match=re.escape(f"{tmp_path / BLOCKS_FILE}: sha256 differs from manifest.json")
    ):
        read_vision_blocks(tmp_path, entry)
    with pytest.raises(ValueError, match="vision blocks config kind must be one of clip, resnet"):
        write_vision_blocks(tmp_path, arrays, {"kind": "vgg", "blocks": 1})
