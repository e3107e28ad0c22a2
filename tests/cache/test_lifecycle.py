"""cache/lifecycle.py: reuse or refuse an existing cache folder, clear it, write shards in the background."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys

import h5py
import numpy as np
import pytest

from mner.cache.fingerprint import compute_fingerprint
from mner.cache.lifecycle import (
    LOCK_NAME,
    ShardSink,
    check_existing,
    check_folder,
    clear_cache,
    lock_folder,
    manifest_problem,
    plan_shards,
)
from mner.cache.manifest import write_manifest
from mner.cache.reader import CacheReader
from mner.cache.shards import ShardWriter, image_stat, shard_path
from mner.cache.spec import empty_record
from tests.cache.factories import (
    TINY_SPEC,
    assert_same_record,
    flip_token_byte,
    make_records,
    synthetic_models,
)

PARTS = {
    "models": {"clip": {"sha256": {"model.safetensors": "a" * 64}, "untrained": False}},
    "spec": TINY_SPEC.to_dict(),
    "topk": 20,
    "versions": {"torch": "2.3.0", "h5py": "3.11.0"},
}


def extracted(folder, parts=PARTS, keys=("a", "b", "c", "d"), shard_size=2, manifest=True, stats=None):
    """A cache as extraction leaves it: shards (and a manifest) recording `parts` (and the image file
    `stats`, {key: [size, mtime_ns] or None}); returns the fingerprint."""
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = compute_fingerprint(parts)
    config = {"out": str(folder), "fingerprint_parts": parts}
    records = make_records(list(keys), statuses={"b": "missing"})
    keys_of = {
        index: list(keys[start : start + shard_size])
        for index, start in enumerate(range(0, len(keys), shard_size))
    }
    sink = ShardSink(folder, TINY_SPEC, keys_of, {"fingerprint": fingerprint, "config_json": config}, stats)
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


def test_a_damaged_manifest_or_an_unreadable_shard_is_no_refusal(tmp_path):
    # The shards' own attributes say whose cache this is; the run repairs the rest (plan_shards).
    out = tmp_path / "cache"
    fingerprint = extracted(out)
    assert manifest_problem(out) == ""
    (out / "manifest.json").write_text("{not json")
    assert check_existing(out, fingerprint, PARTS, overwrite=False) == {}
    assert manifest_problem(out).startswith(f"unusable ({out}/manifest.json: not valid JSON (")
    (out / "manifest.json").unlink()
    assert manifest_problem(out) == "missing"
    shard_path(out, 1).write_bytes(b"not hdf5")
    assert check_existing(out, fingerprint, PARTS, overwrite=False) == {}
    # Another configuration's readable shard is still refused, its fingerprint whole or cut at 12 hex
    # digits, never a word cut short.
    other = compute_fingerprint({**PARTS, "topk": 10})
    with pytest.raises(ValueError, match=refusal(fingerprint, other, "topk 20 -> 10")):
        check_existing(out, other, {**PARTS, "topk": 10}, overwrite=False)


def test_a_foreign_cache_without_recorded_parts_is_refused_without_details(tmp_path):
    out = tmp_path / "cache"
    old = extracted(out)
    config = json.loads((out / "manifest.json").read_text())
    del config["config"]["fingerprint_parts"]
    (out / "manifest.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=refusal(old, "0" * 64)):
        check_existing(out, "0" * 64, PARTS, overwrite=False)


def test_clear_cache_deletes_only_cache_files(tmp_path):
    out = tmp_path / "cache"
    extracted(out)
    (out / "shard-00005.h5.tmp").write_bytes(b"half")
    (out / "notes.txt").write_text("mine")
    (out / "checksums.json").write_text("{}")
    with lock_folder(out):
        clear_cache(out)
    assert sorted(path.name for path in out.iterdir()) == [LOCK_NAME, "notes.txt"]


def planned(out, fingerprint, keys=("a", "b", "c", "d", "e", "f"), stats=None):
    shard_keys = {index: list(keys[2 * index : 2 * index + 2]) for index in range(len(keys) // 2)}
    return plan_shards(out, shard_keys, fingerprint, TINY_SPEC, stats or {})


def test_plan_skips_complete_shards_and_drops_tmp_files(tmp_path):
    out = tmp_path / "cache"
    fingerprint = extracted(out, keys=("a", "b", "c", "d", "e", "f"), manifest=False)
    shard_path(out, 1).unlink()
    (out / "shard-00001.h5.tmp").write_bytes(b"half a shard from a killed run")
    plan = planned(out, fingerprint, keys=("a", "b", "c", "d", "e", "f", "g", "h"))
    assert (plan.todo, plan.redo) == ([1, 3], {})
    assert not list(out.glob("*.tmp"))
    # b is missing in a reused shard and its (unrecorded) file is unchanged: not retried, and counted.
    assert (plan.not_retried, plan.unknown_stats) == (1, 2)


def test_plan_repairs_every_state_a_crash_or_a_race_leaves(tmp_path):
    out = tmp_path / "cache"
    keys = ("a", "b", "c", "d", "e", "f", "g", "h", "i", "j")
    fingerprint = extracted(out, keys=keys, manifest=False)
    # Shard 0: marked complete but holding no keys (two writers sharing one tmp file).
    with h5py.File(shard_path(out, 0), "r+") as f:
        del f["keys"]
        f.create_dataset("keys", data=np.array([], dtype="S1"))
    # Shard 1: complete, but another shard's keys (renamed over by a racing writer).
    shutil.copy(shard_path(out, 2), shard_path(out, 1))
    # Shard 3: never marked complete; shard 4: not HDF5 at all.
    with h5py.File(shard_path(out, 3), "r+") as f:
        f.attrs["complete"] = False
    shard_path(out, 4).write_bytes(b"\0" * 100)
    plan = planned(out, fingerprint, keys=keys)
    assert plan.todo == [0, 1, 3, 4]
    assert plan.redo[0] == "shard-00000.h5 holds no image keys (it should hold 2)"
    assert plan.redo[1] == "shard-00001.h5 holds the image keys ['e', 'f'], not ['c', 'd']"
    assert plan.redo[3] == "shard-00003.h5 was never marked complete"
    assert plan.redo[4].startswith("shard-00004.h5 cannot be read by HDF5 (OSError: ")


def test_plan_redoes_a_shard_whose_bytes_differ_from_the_manifest(tmp_path):
    out = tmp_path / "cache"
    fingerprint = extracted(out, keys=("a", "b", "c", "d", "e", "f"))
    flip_token_byte(shard_path(out, 1))
    plan = planned(out, fingerprint)
    assert plan.todo == [1]
    assert plan.redo == {
        1: "shard-00001.h5 has a sha256 other than manifest.json records (the file changed or is corrupt)"
    }
    # Without a manifest no checksum is recorded; the shard is whole in its structure, so it is reused.
    (out / "manifest.json").unlink()
    assert planned(out, fingerprint).todo == []


def test_plan_redoes_the_shards_whose_images_changed(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    keys = ("a", "b", "c", "d", "e", "f")
    for key in keys:
        if key != "b":  # b is missing
            (images / f"{key}.jpg").write_bytes(b"x" * 10)
    stats = {key: image_stat(images / f"{key}.jpg") for key in keys}
    out = tmp_path / "cache"
    fingerprint = extracted(out, keys=keys, stats=stats)
    assert planned(out, fingerprint, stats=stats).todo == []
    (images / "b.jpg").write_bytes(b"now here")  # the missing image was added: retried
    (images / "c.jpg").write_bytes(b"y" * 12)
    os.utime(images / "e.jpg", ns=(10**18, 10**18))
    (images / "f.jpg").unlink()
    now = {key: image_stat(images / f"{key}.jpg") for key in keys}
    plan = planned(out, fingerprint, stats=now)
    assert plan.todo == [0, 1, 2]
    assert plan.redo == {
        0: "shard-00000.h5 holds 1 image(s) that changed on disk since: b (appeared)",
        1: "shard-00001.h5 holds 1 image(s) that changed on disk since: c (size 10 -> 12)",
        2: "shard-00002.h5 holds 2 image(s) that changed on disk since: e (modified), f (gone)",
    }


def test_check_folder_accepts_only_new_empty_or_cache_folders(tmp_path):
    check_folder(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    check_folder(tmp_path / "empty")
    extracted(tmp_path / "cache")
    check_folder(tmp_path / "cache")
    extracted(tmp_path / "killed", manifest=False)  # only shards: a run killed before its manifest
    check_folder(tmp_path / "killed")

    mine = tmp_path / "mine"
    (mine / "checkpoint").mkdir(parents=True)
    for name in ("results.json", "notes.txt", "a", "b", "c"):
        (mine / name).write_text("user data")
    with pytest.raises(ValueError) as refused:
        check_folder(mine)
    assert str(refused.value) == (
        f"--out {mine} is not empty and is not one of our feature cache folders (no manifest.json, "
        "extract_config.json or shard files; it holds a, b, c, checkpoint/, notes.txt (+1 more)); nothing "
        "in it was touched — choose a new or empty folder"
    )
    for text, problem in [
        ('{"lr": 1, "clip": "x"}', "no detector, fingerprint_parts"),
        ("[1, 2]", "a JSON list, not an object"),
        ("{broken", "unreadable: JSONDecodeError"),
    ]:
        (mine / "extract_config.json").write_text(text)
        with pytest.raises(ValueError) as refused:
            check_folder(mine)
        assert str(refused.value) == (
            f"--out {mine} is not empty and is not one of our feature cache folders (its extract_config.json "
            f"is not an mner extraction record: {problem}); nothing in it was touched — choose a new or "
            "empty folder"
        )
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        check_folder(tmp_path / "file")


HOLD_LOCK = """
import sys, time
from pathlib import Path
from mner.cache.lifecycle import lock_folder
lock = lock_folder(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(60)
"""


def test_lock_refuses_a_second_extraction_and_dies_with_its_holder(tmp_path):
    with lock_folder(tmp_path):
        with pytest.raises(ValueError) as refused:
            lock_folder(tmp_path)
    assert str(refused.value) == (
        f"{tmp_path} is being written by another `mner extract-features` (pid {os.getpid()}); "
        "wait for it to finish, or give another --out folder"
    )
    lock_folder(tmp_path).release()  # released on leaving the block
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        with pytest.raises(ValueError, match=f"pid {holder.pid}"):
            lock_folder(tmp_path)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    lock_folder(tmp_path).release()  # a killed holder's lock is gone with it
    assert (tmp_path / LOCK_NAME).is_file()


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


def test_shard_sink_never_commits_a_shard_with_a_row_unwritten(tmp_path):
    # Row 0 twice: as many rows arrived as the shard holds, but row 1 is missing.
    records = make_records(["a", "b"], statuses={})
    sink = ShardSink(tmp_path, TINY_SPEC, {0: ["a", "b"]}, {"fingerprint": "f", "config_json": {}})
    sink.put(0, [(0, records[0]), (0, records[0])])
    with pytest.raises(ValueError, match=r"1 rows were never written \(first keys: \['b'\]\)"):
        sink.close()
    assert list(tmp_path.iterdir()) == []


def test_a_disk_error_in_the_writer_thread_names_the_shard_and_leaves_no_file(tmp_path, monkeypatch):
    import mner.cache.shards as shards

    def disk_full(self, row, record):
        raise OSError(28, "Driver write request failed")  # h5py's error names no file

    monkeypatch.setattr(shards.ShardWriter, "write", disk_full)
    sink = ShardSink(tmp_path, TINY_SPEC, {3: ["a", "b"]}, {"fingerprint": "f", "config_json": {}})
    sink.put(3, [(0, make_records(["a"], statuses={})[0])])
    with pytest.raises(OSError) as raised:
        sink.close()
    assert (raised.value.errno, raised.value.filename) == (28, str(tmp_path / "shard-00003.h5"))
    assert list(tmp_path.iterdir()) == []
