"""extract-features --vision-trainable-blocks K: the state before the last K vision blocks and their
weights in the cache, checked against the vision models run directly."""

import re
import time

import numpy as np
import pytest
import torch
from PIL import Image

import mner.extract.run
from mner.cache.datasets import DataConfig
from mner.cache.inspect import format_inspection, inspect_cache
from mner.cache.manifest import read_manifest
from mner.cache.reader import CacheReader
from mner.cache.verify import verify_cache
from mner.cache.vision_blocks import BLOCKS_FILE
from mner.extract.clip import load_clip
from mner.extract.config import ExtractConfig
from mner.extract.resnet import load_resnet
from mner.extract.run import extract_features
from tests.extract.factories import make_clip_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tests.extract.conftest import make_image_dataset

    return make_image_dataset(tmp_path_factory.mktemp("blocks"), n=5, missing=1, corrupt=1)


@pytest.fixture(scope="module")
def clip3(tmp_path_factory):
    return make_clip_folder(tmp_path_factory.mktemp("clip3") / "clip3", layers=3)


def extract(ds, out, **changes):
    base = dict(detector="none", shard_size=2, batch_size=2, num_workers=0)
    return extract_features(
        ExtractConfig(data=DataConfig(data_dir=str(ds.data_dir)), out=str(out), **{**base, **changes})
    )


def image(ds, key):
    return Image.open(ds.data_dir / "images" / f"{key}.jpg").convert("RGB")


def test_k0_records_exactly_what_a_cache_without_the_option_records(data, tmp_path):
    out = extract(data, tmp_path / "k0")
    manifest = read_manifest(out)
    assert "vision_trainable_blocks" not in manifest["config"]
    assert "vision_trainable_blocks" not in manifest["config"]["fingerprint_parts"]
    assert "vision_blocks" not in manifest and not (out / BLOCKS_FILE).exists()
    assert not {"vision_state_shape", "vision_state_source"} & set(manifest["spec"])
    with CacheReader(out) as reader:
        assert reader.trainable_blocks == 0
        assert all(reader.get(key).vision_state is None for key in reader.keys)
        with pytest.raises(ValueError, match=re.escape(f"cache {out} stores no vision state to train")):
            reader.vision_blocks()


@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_clip_state_is_the_input_of_the_last_k_layers(data, clip3, tmp_path, blocks):
    frozen = extract(data, tmp_path / "k0", clip=str(clip3))
    out = extract(data, tmp_path / "k", clip=str(clip3), vision_trainable_blocks=blocks)
    encoder = load_clip(str(clip3))
    with CacheReader(out) as reader, CacheReader(frozen) as before:
        assert reader.trainable_blocks == blocks
        assert reader.spec.vision_state_shape == (17, 32)
        source = reader.spec.vision_state_source
        assert source.startswith(f"vision_model.hidden_states[{0 if blocks == 3 else -blocks - 1}]")
        for key in reader.keys:
            record, old = reader.get(key), before.get(key)
            # The tokens are bitwise those of the cache without the state.
            assert np.array_equal(record.patch_tokens, old.patch_tokens)
            assert np.array_equal(record.global_embed, old.global_embed)
            assert record.vision_state.dtype == np.float16
            if record.status != "ok":
                assert not record.vision_state.any()
                continue
            with torch.inference_mode():
                hidden = encoder.vision(
                    pixel_values=encoder.preprocess([image(data, key)]), output_hidden_states=True
                )
            want = hidden.hidden_states[3 - blocks][0].numpy()  # (P, Dp): input of layer 3 - K of 3
            np.testing.assert_allclose(record.vision_state, want, rtol=1e-3, atol=1e-3)
    parts = read_manifest(out)["config"]["fingerprint_parts"]
    assert parts["vision_trainable_blocks"] == blocks
    config = read_manifest(out)["vision_blocks"]["config"]
    assert (config["kind"], config["blocks"], config["layers"], config["projection_dim"]) == (
        "clip",
        blocks,
        3,
        24,
    )
    # A cache with another K is another configuration.
    with pytest.raises(ValueError, match=f"differs: .*vision_trainable_blocks {blocks} -> null"):
        extract(data, out, clip=str(clip3))


def test_resnet_state_is_the_layer3_map(data, tmp_path):
    out = extract(data, tmp_path / "r", vision="tiny-resnet", vision_trainable_blocks=1)
    encoder = load_resnet("tiny-resnet", None)
    with CacheReader(out) as reader:
        assert reader.spec.vision_state_shape == (32, 4, 4)
        assert reader.spec.vision_state_source == "tiny-resnet.layer3 (4x4 map, channels first)"
        config, arrays = reader.vision_blocks()
        key = next(key for key in reader.keys if reader.status(key) == "ok")
        state = reader.get(key).vision_state
    m = encoder.model
    with torch.inference_mode():
        x = encoder.preprocess([image(data, key)])
        want = m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x)))))))[0]
    np.testing.assert_allclose(state, want.numpy(), rtol=1e-3, atol=1e-3)
    assert config == {
        "kind": "resnet",
        "blocks": 1,
        "block": "BasicBlock",
        "inplanes": 32,
        "planes": 64,
        "depth": 1,
        "stride": 2,
    }
    layer4 = m.layer4.state_dict()
    assert set(arrays) == {f"layer4.{name}" for name in layer4}
    for name, value in layer4.items():
        assert np.array_equal(arrays[f"layer4.{name}"], value.numpy()), name


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            dict(vision_trainable_blocks=3),
            "--vision-trainable-blocks 3 is more than the 2 encoder layers of tiny-clip; give 0 to 2 "
            "(2 stores the embedding output, so the whole tower trains)",
        ),
        (dict(vision_trainable_blocks=-1), "vision_trainable_blocks must be an integer >= 0, got -1"),
        (
            dict(vision="tiny-resnet", vision_trainable_blocks=2),
            "--vision-trainable-blocks 2 is not possible with --vision tiny-resnet: a ResNet stores the "
            "layer3 map so that its layer4 trains (1), or nothing (0); its stages differ in width and "
            "stride, so there is no stack of equal blocks to cut deeper",
        ),
    ],
)
def test_refused_block_counts(data, tmp_path, changes, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        extract(data, tmp_path / "refused", **changes)
    assert not (tmp_path / "refused" / "manifest.json").exists()


def test_verify_checks_the_weights_and_inspect_shows_k(data, tmp_path):
    out = extract(data, tmp_path / "c", vision_trainable_blocks=1)
    assert verify_cache(out).ok and verify_cache(out).checked["vision_blocks"] == 1
    info = inspect_cache(out)
    blocks = info["vision_blocks"]
    assert (blocks["blocks"], blocks["kind"], blocks["state"]["shape"]) == (1, "clip", [17, 32])
    assert blocks["state_bytes"] == 5 * 17 * 32 * 2
    assert blocks["weights_bytes"] == (out / BLOCKS_FILE).stat().st_size
    text = format_inspection(info)
    assert (
        "vision blocks 1 trainable (clip): state (17, 32) float16 from vision_model.hidden_states[-2]" in text
    )
    assert f"  extra bytes: 5,440 of states in the shards, {blocks['weights_bytes']:,} of weights" in text
    # One flipped byte in the weights is named by verify and refused by the reader.
    weights = bytearray((out / BLOCKS_FILE).read_bytes())
    weights[-3] ^= 0x40
    (out / BLOCKS_FILE).write_bytes(bytes(weights))
    report = verify_cache(out)
    assert report.problems == [
        f"{BLOCKS_FILE}: sha256 differs from manifest.json (the file changed or is corrupt)"
    ]
    with pytest.raises(
        ValueError, match=re.escape(f"{out / BLOCKS_FILE}: sha256 differs from manifest.json")
    ):
        CacheReader(out).vision_blocks()
    (out / BLOCKS_FILE).unlink()
    assert verify_cache(out).problems == [
        f"{BLOCKS_FILE}: the vision blocks' weight file listed in manifest.json is missing"
    ]
    # Re-running the command keeps the shards and writes the file again.
    extract(data, out, vision_trainable_blocks=1)
    assert verify_cache(out).ok


def test_crash_then_rerun_equals_uninterrupted_run(data, tmp_path, monkeypatch):
    reference = extract(data, tmp_path / "reference", vision_trainable_blocks=2)
    real, calls, crashed = mner.extract.run.encode_batch, [], []

    out = tmp_path / "crashed"

    def crash_on_second_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2 and not crashed:
            # The background writer finishes shard 0 on its own thread: crash once it has, so the test
            # does not depend on how fast that thread runs.
            deadline = time.monotonic() + 60
            while not (out / "shard-00000.h5").is_file() and time.monotonic() < deadline:
                time.sleep(0.05)
            crashed.append(1)
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(mner.extract.run, "encode_batch", crash_on_second_batch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(data, out, vision_trainable_blocks=2)
    assert (out / "shard-00000.h5").is_file() and not (out / "manifest.json").exists()
    calls.clear()
    extract(data, out, vision_trainable_blocks=2)
    assert len(calls) == 2  # shards 1 and 2; shard 0 was kept
    with CacheReader(out) as got, CacheReader(reference) as want:
        assert got.fingerprint == want.fingerprint
        for key in want.keys:
            a, b = got.get(key), want.get(key)
            for name in ("patch_tokens", "global_embed", "vision_state"):
                assert np.array_equal(getattr(a, name), getattr(b, name)), (key, name)
    assert (out / BLOCKS_FILE).read_bytes() == (reference / BLOCKS_FILE).read_bytes()
    assert read_manifest(out)["vision_blocks"] == read_manifest(reference)["vision_blocks"]


def test_the_cli_names_the_flag_of_a_negative_block_count(tmp_path):
    from click.testing import CliRunner

    from mner.cli import main

    args = ["extract-features", "--data-dir", str(tmp_path), "--vision-trainable-blocks", "-1"]
    result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "c")])
    assert result.exit_code == 1
    assert "Error: --vision-trainable-blocks must be an integer >= 0, got -1" in result.output
    assert not (tmp_path / "c").exists()
