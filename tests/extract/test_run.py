"""End-to-end extraction: images -> shards -> CacheReader, resuming, refusing foreign caches, torchrun."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import mner.extract.batches
import mner.extract.images
import mner.extract.run
from mner.cache.datasets import DataConfig
from mner.cache.lifecycle import lock_folder
from mner.cache.manifest import read_manifest
from mner.cache.reader import CacheReader
from mner.cache.verify import verify_cache
from mner.extract.clip import load_clip
from mner.extract.config import DETECTORS, NO_DETECTOR, ExtractConfig
from mner.extract.detector import build_detector
from mner.extract.resnet import load_resnet, materialise_tiny_resnet
from mner.extract.run import extract_features, summarize
from mner.runtime import LOCK_NAME
from tests.cache.factories import flip_token_byte
from tests.torchrun import tail, torchrun

# Used by the subprocess tests: extraction as a user runs it, configured by one JSON argument.
RUNNER = """
import json, sys
from mner.extract.config import DETECTORS, ExtractConfig
from mner.extract.run import extract_features
extract_features(ExtractConfig.from_dict(json.loads(sys.argv[1])))
"""
# Small shards so the subprocess data set spans many of them (kill mid-way, split across two ranks).
SHARED = dict(shard_size=3, batch_size=2, num_workers=0)


def assert_same_cache(got: Path, want: Path) -> None:
    """Every record value, status, size, error and the shard layout are identical."""
    a, b = CacheReader(got), CacheReader(want)
    assert (a.keys, a.fingerprint, a.spec) == (b.keys, b.fingerprint, b.spec)
    for key in a.keys:
        x, y = a.get(key), b.get(key)
        for name, value in vars(x).items():
            other = getattr(y, name)
            if isinstance(value, np.ndarray):
                assert value.dtype == other.dtype and np.array_equal(value, other), (key, name)
            else:
                assert value == other, (key, name)
    assert read_manifest(got)["images"] == read_manifest(want)["images"]


def run_subprocess(data_dir: Path, out: Path, **changes) -> subprocess.Popen:
    cfg = {"data_dir": str(data_dir), "out": str(out), **SHARED, **changes}
    # One thread: the same floating-point reduction order in every process we compare.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, json.dumps(cfg)], env=env, stderr=subprocess.PIPE, text=True
    )


def finish(process: subprocess.Popen) -> None:
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]


@pytest.fixture(scope="session")
def shared_data(image_dataset, tmp_path_factory):
    return image_dataset(tmp_path_factory.mktemp("shared"), n=40, missing=2, corrupt=2)


@pytest.fixture(scope="session")
def reference_cache(shared_data, preset_dir, tmp_path_factory):
    """The uninterrupted single-process extraction of `shared_data`."""
    out = tmp_path_factory.mktemp("reference") / "cache"
    finish(run_subprocess(shared_data.data_dir, out))
    return out


@pytest.mark.slow
def test_extract_end_to_end(image_dataset, tmp_path):
    ds = image_dataset(tmp_path, n=12, missing=1, corrupt=1)
    cfg = ExtractConfig(
        data=DataConfig(data_dir=str(ds.data_dir)),
        out=str(tmp_path / "cache"),
        shard_size=5,
        batch_size=3,
        num_workers=2,
    )
    out = extract_features(cfg)
    reader = CacheReader(out)
    assert reader.keys == ds.keys  # deduplicated across splits, sorted
    assert reader.spec.num_patches == 17 and reader.spec.max_regions == 20 and reader.spec.region_dim == 64
    assert reader.models["clip"]["untrained"] and reader.models["detector"]["untrained"]
    assert [shard["rows"] for shard in read_manifest(out)["shards"]] == [5, 5, 2]
    records = {key: reader.get(key) for key in ds.keys}
    for key, record in records.items():
        assert record.status == ds.status[key]
    missing = next(key for key in ds.keys if ds.status[key] == "missing")
    corrupt = next(key for key in ds.keys if ds.status[key] == "corrupt")
    assert records[missing].error == f"image not found: {ds.data_dir / 'images' / missing}.jpg"
    assert records[corrupt].error.startswith(
        f"cannot decode {ds.data_dir / 'images' / corrupt}.jpg: UnidentifiedImageError"
    )
    for key in (missing, corrupt):
        assert not records[key].patch_tokens.any() and records[key].num_regions == 0

    # Each image's tokens are its own: computed again, one image at a time, with independently loaded models.
    clip = load_clip("tiny-clip")
    detector = build_detector("tiny-frcnn", None, cfg)
    ok = [key for key in ds.keys if ds.status[key] == "ok"]
    for key in ok:
        record = records[key]
        image = Image.open(ds.data_dir / "images" / f"{key}.jpg").convert("RGB")
        assert (record.width, record.height) == image.size == (48, 40)
        patches, global_embed = clip.encode(clip.preprocess([image]))
        np.testing.assert_allclose(record.patch_tokens, patches[0].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(record.global_embed, global_embed[0].numpy(), rtol=2e-3, atol=2e-3)
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255  # (3, H, W)
        [regions] = detector.detect([detector.preprocess(pixels)], [(40, 48)])
        n = record.num_regions
        assert n == len(regions.scores) == 20
        np.testing.assert_allclose(record.region_boxes[:n], regions.boxes.numpy(), atol=1e-5)
        np.testing.assert_allclose(record.region_feats[:n], regions.feats.numpy(), rtol=2e-3, atol=2e-3)
        assert np.array_equal(record.region_labels[:n], regions.labels.numpy())
        assert record.region_boxes.min() >= 0 and record.region_boxes.max() <= 1

    # Same picture -> the same tokens (up to the last bits: batches of different sizes take other
    # kernels); different pictures -> clearly different tokens.
    # The random box head's features are small (|x| < 0.2), hence its lower bar for "different".
    different = {"patch_tokens": 0.05, "global_embed": 0.05, "region_feats": 0.01, "region_boxes": 0.01}
    for a in ok:
        for b in ok:
            for name, bar in different.items():
                gap = np.abs(getattr(records[a], name).astype(np.float32) - getattr(records[b], name)).max()
                assert (gap < 2e-3) if ds.colour[a] == ds.colour[b] else (gap > bar), (a, b, name, gap)

    # Decoding in the main process gives the same cache as decoding in workers.
    in_main = ExtractConfig.from_dict({**cfg.to_dict(), "out": str(tmp_path / "workers0"), "num_workers": 0})
    assert_same_cache(extract_features(in_main), out)
    assert summarize(out).startswith(f"12 images (ok 10, missing 1, corrupt 1) in {out}: ")


def test_clip_crop_regions_embed_the_crop(image_dataset, tmp_path):
    ds = image_dataset(tmp_path, n=3, missing=0, corrupt=0, solid=True)
    cfg = ExtractConfig(
        data=DataConfig(data_dir=str(ds.data_dir)),
        out=str(tmp_path / "cache"),
        region_features="clip-crop",
        topk=4,
        num_workers=0,
    )
    reader = CacheReader(extract_features(cfg))
    assert reader.spec.region_source == "clip_crop" and reader.spec.region_dim == reader.spec.global_dim == 32
    for key in reader.keys:
        record = reader.get(key)
        assert record.num_regions == 4
        # Any crop of a solid-colour picture is the same solid picture after CLIP's resize + centre crop,
        # so every region embedding equals the whole image's embedding.
        for feat in record.region_feats:
            np.testing.assert_allclose(feat, record.global_embed, rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_resume_after_crash_equals_uninterrupted_run(image_dataset, tmp_path, monkeypatch):
    ds = image_dataset(tmp_path, n=12)
    base = dict(data=DataConfig(data_dir=str(ds.data_dir)), shard_size=4, batch_size=2, num_workers=0)
    reference = extract_features(ExtractConfig(out=str(tmp_path / "reference"), **base))
    out = tmp_path / "crashed"
    cfg = ExtractConfig(out=str(out), **base)
    real_encode = mner.extract.run.encode_batch
    calls, crashed = [], []

    def crash_on_fourth_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4 and not crashed:
            crashed.append(1)
            raise RuntimeError("simulated crash")
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(mner.extract.run, "encode_batch", crash_on_fourth_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract_features(cfg)
    # Shard 1 aborted, its tmp removed; the lock file stays (its flock went with the run).
    assert sorted(path.name for path in out.iterdir()) == [LOCK_NAME, "shard-00000.h5"]
    (out / "shard-00001.h5.tmp").write_bytes(b"half a shard from a killed run")
    calls.clear()
    extract_features(cfg)
    assert len(calls) == 6 - 2  # 3 shards of 2 batches; shard 0 was skipped
    assert not list(out.glob("*.tmp"))
    assert_same_cache(out, reference)
    # Killed after the last shard but before the manifest: nothing is extracted again, and the
    # manifest's messages for the failed images are recovered by decoding just those again.
    (out / "manifest.json").unlink()
    calls.clear()
    extract_features(cfg)
    assert not calls
    assert_same_cache(out, reference)


@pytest.mark.slow
def test_kill_9_then_rerun_equals_uninterrupted_run(shared_data, reference_cache, tmp_path):
    out = tmp_path / "killed"
    process = run_subprocess(shared_data.data_dir, out)
    deadline = time.monotonic() + 120
    while not list(out.glob("shard-*.h5")):
        assert process.poll() is None, "extraction ended before its first shard appeared"
        assert time.monotonic() < deadline, "no shard after 120 s"
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    assert process.returncode == -signal.SIGKILL
    done = list(out.glob("shard-*.h5"))
    assert not (out / "manifest.json").exists() and len(done) < 14, (
        "the kill came too late to interrupt anything"
    )
    finish(run_subprocess(shared_data.data_dir, out))
    assert_same_cache(out, reference_cache)


@pytest.mark.slow
def test_kill_9_with_loader_workers_then_immediate_rerun_resumes(shared_data, reference_cache, tmp_path):
    """DataLoader workers forked while the folder is locked outlive a kill -9 of their parent for a
    while; they must not hold the lock, so the re-run at once resumes instead of being refused."""
    out = tmp_path / "killed"
    process = run_subprocess(shared_data.data_dir, out, num_workers=2)
    deadline = time.monotonic() + 120
    while not list(out.glob("shard-*.h5")):
        assert process.poll() is None, "extraction ended before its first shard appeared"
        assert time.monotonic() < deadline, "no shard after 120 s"
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    assert not (out / "manifest.json").exists()
    finish(run_subprocess(shared_data.data_dir, out, num_workers=2))
    assert_same_cache(out, reference_cache)


# RUNNER that, after its first batch, waits until the file argv[2] exists: the first extraction of
# the race is surely still running when the second one starts, however loaded the machine.
HELD_RUNNER = """
import json, sys, time
from pathlib import Path
import mner.extract.run as run
from mner.extract.config import ExtractConfig
real, calls = run.encode_batch, []
def held(*args, **kwargs):
    calls.append(1)
    while len(calls) > 1 and not Path(sys.argv[2]).exists():
        time.sleep(0.05)
    return real(*args, **kwargs)
run.encode_batch = held
run.extract_features(ExtractConfig.from_dict(json.loads(sys.argv[1])))
"""


@pytest.mark.slow
def test_two_extractions_into_one_folder_one_refused(shared_data, reference_cache, tmp_path):
    out = tmp_path / "raced"
    cfg = {"data_dir": str(shared_data.data_dir), "out": str(out), **SHARED}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    release = tmp_path / "release"
    first = subprocess.Popen(
        [sys.executable, "-c", HELD_RUNNER, json.dumps(cfg), str(release)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("shard-*.h5*")):  # its first batch is in the writer: it holds the lock
            assert first.poll() is None and time.monotonic() < deadline, "the first run wrote no shard"
            time.sleep(0.01)
        second = run_subprocess(shared_data.data_dir, out)
        _, stderr = second.communicate(timeout=300)
        assert second.returncode == 1 and first.poll() is None, (
            "the second run did not refuse while the first ran"
        )
        assert (
            f"ValueError: {out} is being written by another `mner extract-features` (pid {first.pid})"
            in stderr
        )
    finally:
        release.touch()  # never leave the held run waiting
    finish(first)
    assert_same_cache(out, reference_cache)
    assert verify_cache(out).ok


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(shared_data, reference_cache, tmp_path):
    script = tmp_path / "run_extract.py"
    script.write_text(RUNNER)
    out = tmp_path / "two"
    cfg = {"data_dir": str(shared_data.data_dir), "out": str(out), **SHARED}
    result = torchrun(script, json.dumps(cfg))
    assert result.returncode == 0, tail(result)
    assert_same_cache(out, reference_cache)
    # Into the existing folder: rank 0 locks it at once, and rank 1 re-extracts its damaged shard.
    flip_token_byte(out / "shard-00001.h5")
    result = torchrun(script, json.dumps(cfg))
    assert result.returncode == 0, tail(result)
    assert "shard-00001.h5 has a sha256 other than manifest.json records" in result.stderr
    assert_same_cache(out, reference_cache)
    # A locked folder stops every rank with the refusal (none waits at a barrier).
    with lock_folder(out):
        result = torchrun(script, json.dumps(cfg), timeout=120)
    assert result.returncode != 0
    assert result.stderr.count(f"ValueError: {out} is being written by another `mner extract-features`") == 2


def test_different_configuration_is_refused_and_overwrite_replaces(image_dataset, tmp_path):
    ds = image_dataset(tmp_path, n=4, missing=0, corrupt=0)
    base = dict(
        data=DataConfig(data_dir=str(ds.data_dir)), out=str(tmp_path / "cache"), shard_size=2, num_workers=0
    )
    out = extract_features(ExtractConfig(**base))
    old = CacheReader(out).fingerprint
    refused = r"cache at .*cache was made with a different configuration \(fingerprint \w{12} != \w{12}\); use --overwrite to replace it; differs: "
    with pytest.raises(ValueError, match=refused + ".*topk 20 -> 5"):
        extract_features(ExtractConfig(**base, topk=5))
    # Without the manifest the shards' own attributes still tell.
    (out / "manifest.json").unlink()
    with pytest.raises(ValueError, match=refused + ".*topk 20 -> 5"):
        extract_features(ExtractConfig(**base, topk=5))
    extract_features(ExtractConfig(**base, topk=5, overwrite=True))
    reader = CacheReader(out)
    assert reader.spec.max_regions == 5 and reader.fingerprint != old
    assert sorted(path.name for path in out.glob("shard-*")) == ["shard-00000.h5", "shard-00001.h5"]


def small_run(ds, out, **changes) -> ExtractConfig:
    """Extraction of `ds` into `out` in shards of 2 (the default detector and encoder presets)."""
    return ExtractConfig(
        data=DataConfig(data_dir=str(ds.data_dir)), out=str(out), shard_size=2, num_workers=0, **changes
    )


@pytest.fixture
def counted_batches(monkeypatch):
    """The image keys of every batch extraction encodes, in order."""
    real, seen = mner.extract.run.encode_batch, []

    def counting(batch, *args, **kwargs):
        seen.append([meta["key"] for meta in batch["items"]])
        return real(batch, *args, **kwargs)

    monkeypatch.setattr(mner.extract.run, "encode_batch", counting)
    return seen


@pytest.mark.parametrize("manifest", [True, False], ids=["manifest", "no-manifest"])
def test_one_shard_of_another_cache_is_extracted_again_alone(
    image_dataset, tmp_path, counted_batches, caplog, manifest
):
    ds = image_dataset(tmp_path, n=4, missing=0, corrupt=0)
    reference = extract_features(small_run(ds, tmp_path / "reference"))
    other = extract_features(small_run(ds, tmp_path / "other", topk=5))
    out = tmp_path / "cache"
    shutil.copytree(reference, out)
    shutil.copy2(other / "shard-00001.h5", out / "shard-00001.h5")  # swapped in from another cache
    if not manifest:
        (out / "manifest.json").unlink()
    counted_batches.clear()
    with caplog.at_level(logging.WARNING, logger="mner.cache.lifecycle"):
        extract_features(small_run(ds, out))
    assert f"shard-00001.h5 of {out} hold(s) another configuration's tokens" in caplog.text
    keys = [
        image["key"] for image in read_manifest(reference)["images"] if image["shard"] == "shard-00001.h5"
    ]
    assert sorted(key for batch in counted_batches for key in batch) == sorted(keys)
    assert_same_cache(out, reference)


def test_a_folder_that_is_not_a_cache_is_refused_untouched(image_dataset, tmp_path):
    ds = image_dataset(tmp_path, n=3, missing=0, corrupt=0)
    mine = tmp_path / "results"
    (mine / "checkpoint").mkdir(parents=True)
    (mine / "checkpoint" / "state.pt").write_bytes(b"weights")
    (mine / "results.json").write_text("{}")
    before = {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()}
    for overwrite in (False, True):
        with pytest.raises(
            ValueError,
            match=f"^--out {mine} is not empty and is not one of our feature cache folders \\(no manifest.json",
        ):
            extract_features(small_run(ds, mine, overwrite=overwrite))
    (mine / "extract_config.json").write_text('{"lr": 0.1}')  # someone else's file of that name
    before[mine / "extract_config.json"] = b'{"lr": 0.1}'
    with pytest.raises(
        ValueError,
        match=f"^--out {mine} is not empty and is not one of our feature cache folders \\(its extract_config.json is not an mner",
    ):
        extract_features(small_run(ds, mine, overwrite=True))
    assert {p: p.read_bytes() for p in mine.rglob("*") if p.is_file()} == before


def test_a_folder_another_extraction_holds_is_refused_at_once(image_dataset, tmp_path, counted_batches):
    ds = image_dataset(tmp_path, n=3, missing=0, corrupt=0)
    out = tmp_path / "cache"
    out.mkdir()
    with lock_folder(out):
        with pytest.raises(ValueError) as refused:
            extract_features(small_run(ds, out))
    assert str(refused.value) == (
        f"{out} is being written by another `mner extract-features` (pid {os.getpid()}); "
        "wait for it to finish, or give another --out folder"
    )
    assert counted_batches == [] and sorted(p.name for p in out.iterdir()) == [LOCK_NAME]
    extract_features(small_run(ds, out))  # the lock went with its holder
    assert verify_cache(out).ok


def test_a_shard_whose_bytes_changed_is_extracted_again(image_dataset, tmp_path, counted_batches, caplog):
    ds = image_dataset(tmp_path, n=6, missing=0, corrupt=0)
    out = extract_features(small_run(ds, tmp_path / "cache"))
    intact = (out / "shard-00001.h5").read_bytes()
    flip_token_byte(out / "shard-00001.h5")
    counted_batches.clear()
    caplog.set_level(logging.INFO, logger="mner.extract.run")
    extract_features(small_run(ds, out))
    assert counted_batches == [ds.keys[2:4]]  # that shard only
    assert (
        "shard-00001.h5 has a sha256 other than manifest.json records (the file changed or is corrupt); "
        "extracting it again" in caplog.text
    )
    assert (out / "shard-00001.h5").read_bytes() == intact
    assert verify_cache(out).ok


def test_shards_whose_images_changed_are_extracted_again(image_dataset, tmp_path, counted_batches, caplog):
    ds = image_dataset(tmp_path, n=6, missing=1, corrupt=1)  # 1004 corrupt, 1005 missing
    out = extract_features(small_run(ds, tmp_path / "cache"))
    images = ds.data_dir / "images"
    recorded = {image["key"]: image for image in read_manifest(out)["images"]}
    assert recorded["1000"]["file_size"] == (images / "1000.jpg").stat().st_size
    assert recorded["1000"]["file_mtime_ns"] == (images / "1000.jpg").stat().st_mtime_ns
    assert recorded["1005"]["file_size"] is recorded["1005"]["file_mtime_ns"] is None

    caplog.set_level(logging.INFO, logger="mner.extract.run")
    extract_features(small_run(ds, out))  # nothing changed: nothing extracted, the failures not retried
    assert "2 image(s) recorded missing or corrupt in the reused shards are unchanged on disk" in caplog.text
    shutil.copy(images / "1001.jpg", images / "1000.jpg")  # another picture
    shutil.copy(images / "1002.jpg", images / "1005.jpg")  # the missing image now exists
    counted_batches.clear()
    caplog.clear()
    extract_features(small_run(ds, out))
    assert counted_batches == [["1000", "1001"], ["1004", "1005"]]
    size = (images / "1000.jpg").stat().st_size
    assert (
        "shard-00000.h5 holds 1 image(s) that changed on disk since: "
        f"1000 (size {recorded['1000']['file_size']} -> {size}); extracting it again" in caplog.text
    )
    assert "shard-00002.h5 holds 1 image(s) that changed on disk since: 1005 (appeared)" in caplog.text
    reader = CacheReader(out)
    assert reader.status("1005") == "ok" and reader.status("1004") == "corrupt"
    np.testing.assert_allclose(reader.get("1000").patch_tokens, reader.get("1001").patch_tokens, atol=2e-3)
    assert verify_cache(out, images=True).ok


def test_a_damaged_manifest_is_rebuilt_from_the_shards(image_dataset, tmp_path, counted_batches, caplog):
    ds = image_dataset(tmp_path, n=6, missing=1, corrupt=0)
    out = extract_features(small_run(ds, tmp_path / "cache"))
    manifest = read_manifest(out)
    caplog.set_level(logging.INFO, logger="mner.extract.run")
    for damage in ("{half a manifest", None):
        if damage is None:
            (out / "manifest.json").unlink()
        else:
            (out / "manifest.json").write_text(damage)
            with pytest.raises(ValueError, match="it keeps the intact shards and rebuilds manifest.json$"):
                verify_cache(out)  # the advice, followed below
        counted_batches.clear()
        caplog.clear()
        extract_features(small_run(ds, out))
        assert counted_batches == []  # nothing extracted again, no --overwrite asked for
        assert read_manifest(out) == manifest
        assert f"manifest.json in {out} was " in caplog.text
        assert "rebuilt it from the shards (3 reused, 0 extracted)" in caplog.text
        assert verify_cache(out).ok


def test_extract_errors(image_dataset, tmp_path):
    ds = image_dataset(tmp_path, n=3)
    with pytest.raises(
        ValueError, match="amp=fp16 needs a CUDA device, but extraction runs on cpu; use amp='off'"
    ):
        extract_features(
            ExtractConfig(
                data=DataConfig(data_dir=str(ds.data_dir)), out=str(tmp_path / "c"), device="cpu", amp="fp16"
            )
        )
    with pytest.raises(ValueError, match=f"no split file found in {ds.data_dir}: looked for .*dev.txt"):
        extract_features(
            ExtractConfig(
                data=DataConfig(data_dir=str(ds.data_dir)), out=str(tmp_path / "c"), splits=("dev",)
            )
        )


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(out=""), "out \\(the cache folder to write\\) is required"),
        (
            dict(detector="yolo"),
            "unknown detector 'yolo'; known: fasterrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn_v2, ",
        ),
        (dict(region_features="pixels"), "region_features must be one of frcnn, clip-crop, got 'pixels'"),
        (dict(topk=0), "topk must be >= 1, got 0"),
        (dict(score_thr=1.5), "score_thr must be in \\[0, 1\\], got 1.5"),
        (dict(nms_iou=0.0), "nms_iou must be in \\(0, 1\\], got 0.0"),
        (dict(batch_size=0), "batch_size must be >= 1, got 0"),
        (dict(num_workers=-1), "num_workers must be >= 0, got -1"),
        (dict(device="gpu"), "device must be 'auto', 'cpu', 'mps', 'cuda' or 'cuda:N', got 'gpu'"),
        (dict(amp="fp8"), "amp must be one of off, fp16, bf16, got 'fp8'"),
        (dict(shard_size=0), "shard_size must be >= 1, got 0"),
        (dict(splits=()), "splits must name at least one split"),
        (dict(clip=""), "clip must be 'tiny-clip' or a local CLIP model folder"),
        (dict(data={"data_dir": "d"}), "data must be a DataConfig, got {'data_dir': 'd'}"),
    ],
)
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        ExtractConfig(**{"data": DataConfig(data_dir="d"), "out": "o", **changes})


def test_config_requires_a_checkpoint_before_reading_anything():
    with pytest.raises(
        ValueError, match=r"^--detector-ckpt is required for fasterrcnn_resnet50_fpn: give a local"
    ):
        ExtractConfig(data=DataConfig(data_dir="does/not/exist"), out="o", detector="fasterrcnn_resnet50_fpn")


def test_config_thresholds_and_dict():
    D = DataConfig(data_dir="d")
    # The untrained preset defaults to 0.0 (else it returns no regions); an explicit value is kept.
    assert ExtractConfig(data=D, out="o", detector="tiny-frcnn").score_thr == 0.0
    assert ExtractConfig(data=D, out="o", detector="tiny-frcnn", score_thr=0.5).score_thr == 0.5
    real = ExtractConfig(
        data=DataConfig(data_dir=Path("d")), out="o", detector="fasterrcnn_resnet50_fpn", detector_ckpt="x.pt"
    )
    assert real.score_thr == 0.2
    # Paths are recorded absolute (predict, verify and show may run from another folder).
    assert real.data.data_dir == str(Path("d").absolute()) and real.detector_ckpt == str(
        Path("x.pt").absolute()
    )
    assert ExtractConfig(data=D, out="o", clip="models/clip").clip == str(Path("models/clip").absolute())
    assert ExtractConfig(data=D, out="o").clip == "tiny-clip"
    assert json.loads(json.dumps(real.to_dict()))["splits"] == ["train", "valid", "test"]


def test_config_dict_keeps_the_manifest_layout():
    # A named dataset takes the presets only by name (see test_real_dataset_requires_named_models).
    cfg = ExtractConfig(
        data=DataConfig(dataset="twitter2015", data_root="r"),
        out="o",
        topk=5,
        clip="tiny-clip",
        detector="tiny-frcnn",
    )
    record = cfg.to_dict()
    # The data fields sit flat at the top of the manifest's config, as every cache so far records them.
    assert list(record)[:7] == ["data_dir", "dataset", "data_root", "image_dir", "columns", "out", "clip"]
    assert (record["dataset"], record["data_root"]) == ("twitter2015", str(Path("r").absolute()))
    assert ExtractConfig.from_dict(json.loads(json.dumps(record))) == cfg
    with pytest.raises(
        ValueError, match=re.escape("manifest.json: unknown extraction config keys ['fingerprint_parts']")
    ):
        ExtractConfig.from_dict({**record, "fingerprint_parts": {}}, source="manifest.json")


# ------------------------------------------------------------------------- images preprocessing can't take

# Sizes (width, height) no model can take, both ways round: far beyond MAX_ASPECT_RATIO.
EXTREME = {"1000": (20000, 20), "1001": (20, 20000)}


def _picture_dataset(image_dataset, tmp_path, name, extreme: bool):
    """8 posts; keys 1000 and 1001 are EXTREME pictures (extreme=True) or absent files, 1002 is 1x1,
    1003 is a large 3000x2000 picture, the rest the dataset's ordinary JPEGs."""
    ds = image_dataset(tmp_path, n=8, missing=0, corrupt=0, name=name)
    images = ds.data_dir / "images"
    for key, size in EXTREME.items():
        (images / f"{key}.jpg").unlink()
        if extreme:
            Image.new("RGB", size, (200, 40, 40)).save(images / f"{key}.jpg")
    Image.new("RGB", (1, 1), (10, 200, 10)).save(images / "1002.jpg")
    big = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8).repeat(100, 0).repeat(100, 1)
    Image.fromarray(big).save(images / "1003.jpg")  # (2000, 3000, 3)
    return ds


@pytest.mark.parametrize("rule", ["aspect-rule", "preprocessing-error"])
def test_images_preprocessing_cannot_take_are_corrupt_and_the_rest_unchanged(
    image_dataset, tmp_path, monkeypatch, rule
):
    """A 20000x20 or 20x20000 picture in a batch is recorded corrupt with its reason, by the documented
    aspect-ratio rule or (with the rule lifted) by the preprocessing error itself, and every other image
    of its batch and shard gets exactly the tokens it gets when those two files do not exist."""
    if rule == "preprocessing-error":
        monkeypatch.setattr(mner.extract.images, "MAX_ASPECT_RATIO", 10**6)
    common = dict(shard_size=4, batch_size=4, num_workers=0, device="cpu")
    bad = _picture_dataset(image_dataset, tmp_path, "bad", extreme=True)
    without = _picture_dataset(image_dataset, tmp_path, "without", extreme=False)
    got = extract_features(
        ExtractConfig(data=DataConfig(data_dir=str(bad.data_dir)), out=str(tmp_path / "a"), **common)
    )
    want = extract_features(
        ExtractConfig(data=DataConfig(data_dir=str(without.data_dir)), out=str(tmp_path / "b"), **common)
    )
    a, b = CacheReader(got), CacheReader(want)
    for key, (width, height) in EXTREME.items():
        record = a.get(key)
        path = bad.data_dir / "images" / f"{key}.jpg"
        assert (record.status, record.num_regions, record.width, record.height) == ("corrupt", 0, 0, 0)
        assert not record.patch_tokens.any()
        if rule == "aspect-rule":
            assert record.error == (
                f"image {path} is {width}x{height}: its long side is more than 100 times its short side, "
                "which the models' resizing cannot handle; crop or pad it"
            )
        else:
            assert record.error.startswith(f"cannot preprocess {path} ({width}x{height}): RuntimeError: ")
    for key in a.keys:
        if key in EXTREME:
            continue
        x, y = a.get(key), b.get(key)
        assert x.status == "ok" and (x.width, x.height) == (y.width, y.height), key
        for name, value in vars(x).items():
            if isinstance(value, np.ndarray):
                assert np.array_equal(value, getattr(y, name)), (key, name)
    assert (a.get("1002").width, a.get("1003").width) == (1, 3000)


DETECTOR_SIZES = [(100, 1), (1, 100), (1, 1), (3, 2), (20000, 20), (20, 20000), (2000, 1), (1, 2000)]


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=[] if n == "tiny-frcnn" else pytest.mark.slow)
        for n in DETECTORS
        if n != NO_DETECTOR  # no detector, nothing to feed
    ],
)
def test_every_detector_takes_what_the_rule_lets_through(tmp_path, monkeypatch, name):
    """For every detector the extractor offers and the CLIP preprocessing, with the aspect-ratio rule
    lifted: each extreme picture either preprocesses to inputs with no empty side, which detect() runs
    on, or becomes corrupt with the preprocessing error; and every picture the rule lets through
    (up to 100:1) preprocesses."""
    from mner.extract.detector import TORCHVISION_DETECTORS, RegionDetector

    cfg = ExtractConfig(data=DataConfig(data_dir="unused"), out="unused", detector="tiny-frcnn")
    if name == "tiny-frcnn":
        detector = build_detector(name, None, cfg)
    else:
        torch.manual_seed(0)
        model = TORCHVISION_DETECTORS[name](weights=None, weights_backbone=None, num_classes=91)
        detector = RegionDetector(model, 5, {})
    clip = load_clip("tiny-clip")
    monkeypatch.setattr(mner.extract.images, "MAX_ASPECT_RATIO", 10**6)
    items = []
    for width, height in DETECTOR_SIZES:
        path = tmp_path / f"{width}x{height}.png"
        Image.new("RGB", (width, height), (90, 120, 30)).save(path)
        items.append((path.stem, path))
    dataset = mner.extract.batches.Images(
        items, clip.image_preprocess, detector.transform, keep_original=False
    )
    for (width, height), item in zip(DETECTOR_SIZES, [dataset[i] for i in range(len(items))]):
        within = max(width, height) <= 100 * min(width, height)
        if item["status"] == "corrupt":
            assert not within, (width, height, item["error"])
            assert item["error"].startswith(f"cannot preprocess {tmp_path / f'{width}x{height}.png'} ")
            continue
        assert item["status"] == "ok"
        assert tuple(item["pixel_values"].shape) == (3, 64, 64)
        assert min(item["detector_input"].shape[-2:]) >= 1
        if within:
            [regions] = detector.detect([item["detector_input"]], [(height, width)])
            assert len(regions.scores) <= detector.topk


@pytest.mark.parametrize(
    "given, unset",
    [
        ({}, "--clip and --detector"),
        ({"clip": "tiny-clip"}, "--detector"),
        ({"detector": "tiny-frcnn"}, "--clip"),
    ],
)
def test_real_dataset_requires_named_models(given, unset):
    with pytest.raises(ValueError) as caught:
        ExtractConfig(data=DataConfig(dataset="twitter2015", data_root="r"), out="o", **given)
    assert str(caught.value) == (
        f"--dataset twitter2015 is real data: give {unset} explicitly (e.g. --clip /models/clip-vit-base-patch32 "
        "--detector fasterrcnn_resnet50_fpn --detector-ckpt /models/frcnn_r50.pth); the defaults tiny-clip and "
        "tiny-frcnn are untrained random presets whose tokens carry no image content (name them to use them anyway)"
    )
    # A data folder (tests, the demo) still defaults to the presets.
    cfg = ExtractConfig(data=DataConfig(data_dir="d"), out="o")
    assert (cfg.clip, cfg.detector) == ("tiny-clip", "tiny-frcnn")


# ------------------------------------------------------------------------- --vision resnet, --detector none


def extract(ds, out: Path, **changes) -> Path:
    cfg = ExtractConfig(data=DataConfig(data_dir=str(ds.data_dir)), out=str(out), num_workers=0, **changes)
    return extract_features(cfg)


def test_resnet_cache_without_regions(image_dataset, tmp_path):
    ds = image_dataset(tmp_path, n=5, missing=1, corrupt=0)
    out = extract(ds, tmp_path / "cache", vision="tiny-resnet", detector="none", batch_size=2)
    with CacheReader(out) as reader:
        spec = reader.spec
        assert (spec.num_patches, spec.patch_dim, spec.global_dim) == (4, 64, 64)  # 2x2 layer4 grid
        assert (spec.max_regions, spec.region_dim, spec.region_source) == (0, 0, "none")
        assert spec.patch_source == "tiny-resnet.layer4 (2x2 grid, row-major)"
        assert spec.global_source == "tiny-resnet.avgpool"
        assert set(reader.models) == {"vision", "detector"}
        assert reader.models["detector"] == {"name": "none", "untrained": False}
        assert reader.models["vision"]["untrained"] and reader.models["vision"]["arch"] == "tiny-resnet"
        records = {key: reader.get(key) for key in ds.keys}
    encoder = load_resnet("tiny-resnet", None)
    for key in ds.keys:
        record = records[key]
        assert record.region_feats.shape == (0, 0) and record.region_boxes.shape == (0, 4)
        assert record.num_regions == 0 and record.status == ds.status[key]
        if record.status != "ok":
            continue
        image = Image.open(ds.data_dir / "images" / f"{key}.jpg").convert("RGB")
        patches, global_embed = encoder.encode(encoder.preprocess([image]))  # (1, 4, 64), (1, 64)
        np.testing.assert_allclose(record.patch_tokens, patches[0].numpy(), rtol=2e-3, atol=2e-3)
        np.testing.assert_allclose(record.global_embed, global_embed[0].numpy(), rtol=2e-3, atol=2e-3)
        mean = record.patch_tokens.astype(np.float32).mean(axis=0)  # avgpool is the grid's mean
        np.testing.assert_allclose(record.global_embed, mean, rtol=5e-3, atol=5e-3)
    report = verify_cache(out, data=DataConfig(data_dir=str(ds.data_dir)).resolve())
    assert report.ok, report.problems
    from mner.cache.inspect import format_inspection, inspect_cache

    info = inspect_cache(out)
    assert info["models"]["vision"] == {"name": "tiny-resnet", "untrained": True}
    assert info["region_histogram"] == {0: 4}
    assert "vision       tiny-resnet  (UNTRAINED)" in format_inspection(info)
    assert "detector     none" in format_inspection(info)


def test_fingerprint_records_the_vision_source(image_dataset, tmp_path):
    """clip vs resnet, and two ResNet checkpoints of the same architecture, make different caches; the
    refusal to mix them names the leaves that differ."""
    ds = image_dataset(tmp_path, n=3, missing=0, corrupt=0)
    clip = read_manifest(extract(ds, tmp_path / "clip", detector="none"))
    first = read_manifest(extract(ds, tmp_path / "r1", vision="tiny-resnet", detector="none"))
    other = tmp_path / "other.pt"
    state = torch.load(materialise_tiny_resnet(), weights_only=True)
    torch.save(
        {name: value + 0.01 if value.is_floating_point() else value for name, value in state.items()}, other
    )
    second = read_manifest(
        extract(ds, tmp_path / "r2", vision="tiny-resnet", vision_ckpt=str(other), detector="none")
    )
    assert len({clip["fingerprint"], first["fingerprint"], second["fingerprint"]}) == 3
    assert "clip" in clip["models"] and "vision" not in clip["models"]
    parts = clip["config"]["fingerprint_parts"], second["config"]["fingerprint_parts"]
    assert parts[1]["models"]["vision"]["preprocessing"]["crop"] == 64
    assert (
        parts[1]["models"]["vision"]["sha256"]
        != first["config"]["fingerprint_parts"]["models"]["vision"]["sha256"]
    )
    with pytest.raises(ValueError, match=r"models\.vision\.sha256") as refused:
        extract(ds, tmp_path / "r1", vision="tiny-resnet", vision_ckpt=str(other), detector="none")
    assert "models.vision.untrained" in str(refused.value)


def test_resnet_and_no_detector_config_errors(tmp_path):
    D = DataConfig(data_dir="d")
    errors = [
        (
            dict(vision="vgg16"),
            "unknown vision 'vgg16'; known: clip, resnet50, resnet101, resnet152, tiny-resnet",
        ),
        (
            dict(vision="resnet50"),
            "--vision-ckpt is required for resnet50: give a local torchvision state-dict",
        ),
        (
            dict(vision="resnet50", vision_ckpt="r.pth", clip="tiny-clip"),
            "--clip is for --vision clip; --vision resnet50 reads no CLIP model",
        ),
        (
            dict(vision_ckpt="r.pth"),
            "--vision-ckpt is for a ResNet --vision; --vision clip reads the --clip folder",
        ),
        (
            dict(vision="tiny-resnet", region_features="clip-crop"),
            "--region-features clip-crop embeds crops with CLIP; --vision tiny-resnet has no CLIP",
        ),
        (
            dict(detector="none", detector_ckpt="f.pth"),
            "--detector-ckpt is given, but --detector none runs no detector; drop one",
        ),
        (
            dict(detector="none", region_features="clip-crop"),
            "--region-features clip-crop embeds the detector's boxes, but --detector none finds none",
        ),
    ]
    for changes, message in errors:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            ExtractConfig(data=D, out="o", **changes)
    cfg = ExtractConfig(data=D, out="o", vision="resnet50", vision_ckpt="r.pth", detector="none")
    assert cfg.clip is None and cfg.vision_ckpt == str(Path("r.pth").absolute())
    assert ExtractConfig.from_dict(cfg.to_dict()) == cfg
    # A named dataset needs no --clip with a ResNet, but still its detector named.
    real = DataConfig(dataset="twitter2015", data_root="r")
    ExtractConfig(data=real, out="o", vision="tiny-resnet", detector="none")
    with pytest.raises(ValueError, match="^--dataset twitter2015 is real data: give --detector explicitly"):
        ExtractConfig(data=real, out="o", vision="tiny-resnet")
    ds_dir = tmp_path / "data"
    ds_dir.mkdir()
    (ds_dir / "train.txt").write_text("IMGID:1\nParis\tB-LOC\n")
    missing = tmp_path / "r50.pth"
    cfg = ExtractConfig(
        data=DataConfig(data_dir=str(ds_dir)), out="o", vision="resnet50", vision_ckpt=str(missing)
    )
    with pytest.raises(ValueError, match=f"^vision checkpoint not found: {missing}$"):
        cfg.check_inputs()
