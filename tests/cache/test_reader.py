"""cache/reader.py: lazy and fork-safe opening, DataLoader workers, in_memory == lazy, errors."""

import json
import os
import pickle
import shutil

import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import mner.cache.checksums
from mner.cache.manifest import read_manifest
from mner.cache.reader import CacheReader
from tests.cache.factories import (
    TINY_SPEC,
    assert_same_record,
    flip_token_byte,
    make_cache,
    make_records,
    reseal,
    synthetic_models,
    write_cache,
)


def open_shard_fds(cache_dir) -> list[str]:
    """Names of the shard files this process has open (from /proc/self/fd)."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(cache_dir)) and ".h5" in target:
            names.append(os.path.basename(target))
    return sorted(names)


def open_hdf5_files() -> int:
    return h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE)


@pytest.fixture
def cache_dir(tmp_path):
    return make_cache(tmp_path, n=12, shard_size=5)


@pytest.fixture
def records():
    return make_records([f"img{i:03d}" for i in range(12)])


def test_unreadable_shard_is_a_value_error_naming_it(cache_dir, records):
    shard = cache_dir / "shard-00000.h5"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated, e.g. a disk that filled up
    with pytest.raises(ValueError, match=f"^{shard}: sha256 differs from manifest.json"):
        CacheReader(cache_dir).get(records[0].key)
    reseal(cache_dir)  # a truncated file the manifest vouches for is still named, not a bare OSError
    with pytest.raises(
        ValueError, match=f"^{shard}: unreadable shard .*; run `mner cache verify` on its folder"
    ):
        CacheReader(cache_dir).get(records[0].key)


def test_a_shard_whose_bytes_differ_from_the_manifest_is_refused(cache_dir, records):
    intact = shutil.copytree(cache_dir, cache_dir.parent / "intact")
    shard = cache_dir / "shard-00001.h5"
    flip_token_byte(shard)
    refusal = (
        f"{shard}: sha256 differs from manifest.json (the shard changed or is corrupt); run "
        f"`mner cache verify {cache_dir}` to see what is wrong, then re-run the `mner extract-features` "
        "command that made the cache to extract that shard again"
    )
    for in_memory in (False, True):  # refused when the cache is opened, before any record is read
        with pytest.raises(ValueError) as refused:
            CacheReader(cache_dir, in_memory=in_memory)
        assert str(refused.value) == refusal
    # A shard that changes under an open reader is checked again when it is first read.
    reader = CacheReader(intact)
    flip_token_byte(intact / "shard-00002.h5")
    assert_same_record(records[0], reader.get("img000"))
    with pytest.raises(ValueError, match="shard-00002.h5: sha256 differs from manifest.json"):
        reader.get("img010")


def test_reader_opens_nothing_before_get(cache_dir):
    before = open_hdf5_files()
    reader = CacheReader(cache_dir)
    assert open_hdf5_files() == before and open_shard_fds(cache_dir) == []
    # Metadata needs no shard.
    assert reader.status("img004") == "missing" and "img000" in reader and len(reader) == 12
    assert open_shard_fds(cache_dir) == []
    reader.get("img006")  # row 1 of shard 1: only that shard is opened
    assert open_shard_fds(cache_dir) == ["shard-00001.h5"]
    reader.close()
    assert open_shard_fds(cache_dir) == [] and open_hdf5_files() == before


def test_reader_attributes(cache_dir):
    reader = CacheReader(cache_dir)
    manifest = read_manifest(cache_dir)
    assert reader.spec == TINY_SPEC
    assert reader.fingerprint == manifest["fingerprint"]
    assert reader.config == manifest["config"]
    assert reader.models == synthetic_models()
    assert reader.keys == [f"img{i:03d}" for i in range(12)]


def test_unknown_key_is_a_value_error_naming_it(cache_dir):
    reader = CacheReader(cache_dir)
    with pytest.raises(ValueError, match=r"image key 'nope' is not in the cache .*cache"):
        reader.get("nope")
    with pytest.raises(ValueError, match=r"image key 'nope' is not in the cache"):
        reader.status("nope")
    assert "nope" not in reader


def test_records_are_private_writable_copies(cache_dir, records):
    for in_memory in (False, True):
        reader = CacheReader(cache_dir, in_memory=in_memory)
        first = reader.get("img001")
        assert first.patch_tokens.flags.writeable and first.region_boxes.flags.writeable
        first.patch_tokens[:] = 7
        first.region_boxes[:] = 7
        assert_same_record(records[1], reader.get("img001"))


def test_in_memory_equals_lazy_and_needs_no_file(cache_dir, records):
    lazy = CacheReader(cache_dir)
    ram = CacheReader(cache_dir, in_memory=True)
    assert open_shard_fds(cache_dir) == []  # loaded in __init__, then closed
    for path in cache_dir.glob("shard-*.h5"):
        path.rename(path.with_suffix(".moved"))
    for record in records:
        assert_same_record(record, ram.get(record.key))
    for path in cache_dir.glob("shard-*.moved"):
        path.rename(path.with_suffix(".h5"))
    for record in records:
        assert_same_record(ram.get(record.key), lazy.get(record.key))


def test_uncompressed_shards_use_raw_chunk_reads(tmp_path):
    records = make_records(["a", "b", "c"])
    plain = CacheReader(write_cache(tmp_path / "plain", records))
    # ShardWriter writes no filters; a shard repacked with gzip afterwards must still read the same.
    with h5py.File(write_cache(tmp_path / "gzip", records) / "shard-00000.h5", "r+") as f:
        for name in ("patch_tokens", "global_embed", "region_feats"):
            values = f[name][:]
            del f[name]
            f.create_dataset(name, data=values, chunks=(1, *values.shape[1:]), compression="gzip")
    packed = CacheReader(reseal(tmp_path / "gzip"))  # repacking changes the bytes the manifest records
    for key in "abc":
        assert_same_record(plain.get(key), packed.get(key))
    assert all(tokens.raw for tokens in plain._shards[0].tokens.values())
    assert not any(tokens.raw for tokens in packed._shards[0].tokens.values())


def test_reader_reopens_after_fork(cache_dir, records):
    reader = CacheReader(cache_dir)
    assert_same_record(records[0], reader.get("img000"))  # the parent holds an open handle now
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: must open its own handles, and read correctly
        os.close(read_end)
        try:
            inherited = reader._shards[0]
            got = [reader.get(key) for key in ("img000", "img007", "img011")]
            reopened = reader._shards[0] is not inherited and reader._pid == os.getpid()
            payload = {
                "reopened": reopened,
                "patch": [r.patch_tokens.astype(float).tolist() for r in got],
                "boxes": [r.region_boxes.tolist() for r in got],
            }
            os.write(write_end, json.dumps(payload).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert status == 0
    payload = json.loads(text)
    assert payload["reopened"]
    for record, patch, boxes in zip(
        [records[0], records[7], records[11]], payload["patch"], payload["boxes"]
    ):
        assert np.array_equal(np.array(patch, np.float16), record.patch_tokens)
        assert np.array_equal(np.array(boxes, np.float32), record.region_boxes)
    assert_same_record(records[5], reader.get("img005"))  # the parent still works


class _Tokens(Dataset):
    def __init__(self, reader, keys):
        self.reader, self.keys = reader, keys

    def __len__(self):
        return len(self.keys)

    def __getitem__(self, i):
        record = self.reader.get(self.keys[i])
        return torch.from_numpy(record.patch_tokens), torch.from_numpy(record.region_boxes), os.getpid()


@pytest.mark.parametrize("in_memory", [False, True])
def test_reader_in_dataloader_workers(cache_dir, records, in_memory):
    reader = CacheReader(cache_dir, in_memory=in_memory)
    reader.get("img003")  # handles opened before the workers fork
    keys = [r.key for r in records]
    loader = DataLoader(_Tokens(reader, keys), batch_size=3, num_workers=2, multiprocessing_context="fork")
    patches, boxes, pids = zip(*[(p, b, pid) for p, b, pid in loader])
    assert set(torch.cat(pids).tolist()).isdisjoint({os.getpid()})
    assert torch.equal(torch.cat(patches), torch.from_numpy(np.stack([r.patch_tokens for r in records])))
    assert torch.equal(torch.cat(boxes), torch.from_numpy(np.stack([r.region_boxes for r in records])))


@pytest.mark.parametrize("in_memory", [False, True])
def test_reader_pickles_without_handles(cache_dir, records, in_memory):
    reader = CacheReader(cache_dir, in_memory=in_memory)
    reader.get("img002")
    copy = pickle.loads(pickle.dumps(reader))
    assert copy.in_memory == in_memory and copy.keys == reader.keys
    for record in records:
        assert_same_record(record, copy.get(record.key))


def test_shard_problems_at_open(cache_dir):
    with h5py.File(cache_dir / "shard-00001.h5", "r+") as f:
        f.attrs["fingerprint"] = "other"
    reseal(cache_dir)  # the checks behind the checksum, for a folder whose manifest vouches for it
    reader = CacheReader(cache_dir)
    with pytest.raises(
        ValueError, match=r"shard-00001.h5: shard fingerprint other differs from the manifest's"
    ):
        reader.get("img005")
    (cache_dir / "shard-00002.h5").unlink()
    with pytest.raises(ValueError, match=r"shard-00002.h5: shard listed in manifest.json is missing"):
        reader.get("img010")
    with h5py.File(cache_dir / "shard-00000.h5", "r+") as f:
        f["keys"][0] = b"imgXXX"
    reseal(cache_dir)
    with pytest.raises(ValueError, match=r"shard-00000.h5: image keys differ from manifest.json"):
        CacheReader(cache_dir, in_memory=True)


def test_manifest_problems_at_init(cache_dir):
    path = cache_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["images"][3]["row"] = 9
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest.json: image 'img003' has row 9 out of order"):
        CacheReader(cache_dir)
    manifest["images"][3]["row"] = 3
    manifest["images"][3]["shard"] = "shard-00042.h5"
    path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest.json: image 'img003' names unknown shard shard-00042.h5"):
        CacheReader(cache_dir)


def test_repeated_opens_check_the_shards_without_reading_them_again(cache_dir, records, monkeypatch):
    reads = []
    real = mner.cache.checksums.file_sha256
    monkeypatch.setattr(mner.cache.checksums, "file_sha256", lambda path: reads.append(path) or real(path))
    monkeypatch.setattr(mner.cache.checksums, "_RACY_NS", -(10**18))  # the shards count as settled
    CacheReader(cache_dir)
    assert len(reads) == 3  # the first open reads each shard once
    reads.clear()
    reader = CacheReader(cache_dir)
    copy = pickle.loads(pickle.dumps(reader))  # what a DataLoader worker receives
    for key in ("img000", "img005", "img010"):
        assert_same_record(records[int(key[3:])], copy.get(key))
    CacheReader(cache_dir, in_memory=True)
    assert reads == []
