"""VisionBlocks: the last vision blocks rebuilt from a cache reproduce its tokens from its stored state,
and train."""

import re

import numpy as np
import pytest
import torch

from mner.cache.datasets import DataConfig
from mner.cache.reader import CacheReader
from mner.extract.config import ExtractConfig
from mner.extract.run import extract_features
from mner.train.zoo.vision_blocks import VisionBlocks
from tests.extract.factories import make_clip_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from tests.extract.conftest import make_image_dataset

    return make_image_dataset(tmp_path_factory.mktemp("vb"), n=6, missing=1, corrupt=0)


@pytest.fixture(scope="module")
def caches(data, tmp_path_factory):
    """name -> cache folder, extracted once: a 3-layer CLIP at K = 1, 2, 3 (all), tiny-clip at K = 2
    (all of its 2 layers), tiny-resnet at K = 1 (layer4)."""
    root = tmp_path_factory.mktemp("vb-caches")
    clip3 = str(make_clip_folder(root / "clip3", layers=3))
    made = {}
    for name, changes in {
        "clip3-k1": dict(clip=clip3, vision_trainable_blocks=1),
        "clip3-k2": dict(clip=clip3, vision_trainable_blocks=2),
        "clip3-k3": dict(clip=clip3, vision_trainable_blocks=3),
        "tiny-clip-k2": dict(vision_trainable_blocks=2),
        "tiny-resnet-k1": dict(vision="tiny-resnet", vision_trainable_blocks=1),
    }.items():
        cfg = ExtractConfig(
            data=DataConfig(data_dir=str(data.data_dir)),
            out=str(root / name),
            detector="none",
            batch_size=2,
            num_workers=0,
            **changes,
        )
        made[name] = extract_features(cfg)
    return made


def cached(cache_dir):
    """(vision_state (B, ...), patch_tokens (B, P, Dp), global_embed (B, Dg)) of the ok images, float32."""
    with CacheReader(cache_dir) as reader:
        records = [reader.get(key) for key in reader.keys if reader.status(key) == "ok"]
    return tuple(
        torch.from_numpy(np.stack([getattr(r, name) for r in records]).astype(np.float32))
        for name in ("vision_state", "patch_tokens", "global_embed")
    )


@pytest.mark.parametrize("name", ["clip3-k1", "clip3-k2", "clip3-k3", "tiny-clip-k2", "tiny-resnet-k1"])
def test_frozen_blocks_reproduce_the_cached_tokens(caches, name):
    """The proof that the stored state and the stored weights are the right ones: run on the state, the
    blocks give the cached tokens to float16 tolerance (the state and the tokens are both rounded to
    float16, about 5e-4 relative each). A state one block off would miss by far more (checked below)."""
    reader = CacheReader(caches[name])
    blocks = VisionBlocks.from_cache(reader).eval()
    assert blocks.blocks == reader.trainable_blocks
    state, patches, global_embed = cached(caches[name])
    with torch.no_grad():
        got_patches, got_global = blocks(state)
    torch.testing.assert_close(got_patches, patches, rtol=4e-3, atol=4e-3)
    torch.testing.assert_close(got_global, global_embed, rtol=4e-3, atol=4e-3)
    if name.startswith("clip"):
        # The control: the same blocks run once more on their own output are far from the cache.
        with torch.no_grad():
            again, _ = blocks(got_patches)
        assert (again - patches).abs().max() > 0.1


@pytest.mark.parametrize("name", ["clip3-k2", "tiny-resnet-k1"])
def test_trainable_blocks_get_a_gradient(caches, name):
    blocks = VisionBlocks.from_cache(CacheReader(caches[name])).train()
    state, _, _ = cached(caches[name])
    patches, global_embed = blocks(state)
    (patches.square().mean() + global_embed.square().mean()).backward()
    trained = [(n, p) for n, p in blocks.named_parameters() if p.requires_grad]
    assert trained
    for parameter_name, parameter in trained:
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, parameter_name


def test_fewer_blocks_run_the_earlier_ones_frozen(caches):
    """k < K: the K - k blocks before the trained ones run under no_grad, with the same output."""
    reader = CacheReader(caches["clip3-k3"])
    every, last = VisionBlocks.from_cache(reader).eval(), VisionBlocks.from_cache(reader, blocks=1).eval()
    state, _, _ = cached(caches["clip3-k3"])
    with torch.no_grad():
        want = every(state)
    got = last(state)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert len(last.frozen) == 2 and len(last.layers) == 1
    assert all(not p.requires_grad for p in last.frozen.parameters())
    (got[0].sum() + got[1].sum()).backward()
    assert all(p.grad is None for p in last.frozen.parameters())
    assert all(p.grad is not None for p in last.layers.parameters())
    names = {n for n, p in last.named_parameters() if p.requires_grad}
    assert names and all(not n.startswith("frozen.") for n in names)


def test_refusals(caches, tmp_path):
    reader = CacheReader(caches["clip3-k2"])
    for blocks in (0, 3):
        with pytest.raises(
            ValueError,
            match=re.escape(
                f"vision blocks to train must be between 1 and the 2 whose input the cache stores, got {blocks}"
            ),
        ):
            VisionBlocks.from_cache(reader, blocks=blocks)
    from tests.cache.factories import make_cache

    plain = make_cache(tmp_path, n=2)
    with pytest.raises(
        ValueError, match=re.escape(f"cache {plain} stores no vision state to train vision blocks on")
    ):
        VisionBlocks.from_cache(CacheReader(plain))
