"""train/zoo/visual.py: a cache without region tokens (--detector none) feeds a patch-only model and
refuses one that asks for regions, naming the cache."""

import dataclasses
import json
import math
import re

import pytest
import torch

from mner.cache.reader import CacheReader
from mner.train.engine.config import ModelConfig
from mner.train.engine.loop import train_from_cache
from mner.train.engine.runs import build_model
from mner.train.zoo.visual import VisualTokenBuilder, check_regions
from tests.cache.factories import NO_REGION_SPEC
from tests.train.factories import LABELS, make_batch, make_posts, tiny_config, tiny_model, tiny_spec
from tests.train.run_factories import make_data, make_images, run_config, single_thread  # noqa: F401 (autouse fixture)


def no_region_record(cache_dir: str, **changes) -> dict:
    """The parts of a run's config.json that build_model reads, for a --detector none cache."""
    cache = {"dir": cache_dir, "models": {"detector": {"name": "none"}}, "spec": NO_REGION_SPEC.to_dict()}
    return {"model": tiny_config(**changes).to_dict(), "label_names": LABELS, "cache": cache}


def test_use_regions_on_a_cache_without_regions_is_refused_naming_it():
    message = (
        "the cache /caches/plain holds no region tokens (extracted with --detector none); "
        "set model.use_regions = false"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        build_model(no_region_record("/caches/plain"), "tiny-bert")
    with pytest.raises(ValueError, match="^the cache holds no region tokens"):
        tiny_model(NO_REGION_SPEC)  # the builder itself refuses too, without a folder to name


def test_two_towers_read_no_region_tokens_so_a_cache_without_them_is_not_refused():
    # IFAformer's towers run from the cache's stored vision state alone (model.used_settings has no
    # use_regions for them): demanding model.use_regions = false would change nothing it reads.
    cfg = tiny_config(fusion="two_tower", adaptive_gate=False)
    assert cfg.use_regions
    check_regions(cfg, NO_REGION_SPEC, "/caches/plain")
    with pytest.raises(ValueError, match="^the cache /caches/plain holds no region tokens"):
        check_regions(
            tiny_config(fusion="single_stream", adaptive_gate=False), NO_REGION_SPEC, "/caches/plain"
        )


def test_a_patch_only_model_takes_a_batch_without_regions():
    model = build_model(no_region_record("/caches/plain", use_regions=False), "tiny-bert")
    batch = make_batch(spec=NO_REGION_SPEC)
    assert batch["region_feats"].shape[1:] == (0, 0) and batch["region_mask"].shape[1] == 0  # (B, 0, 0)
    loss = model(batch)["loss"]
    assert torch.isfinite(loss)
    loss.backward()


def resnet_cache(tmp_path, detector: str):
    """Posts with images and a cache of them extracted with the tiny-resnet preset and `detector`."""
    from mner.cache.datasets import DataConfig
    from mner.extract.config import ExtractConfig
    from mner.extract.run import extract_features

    data_dir, posts = make_data(tmp_path, n_train=6, n_valid=3, n_test=None)
    make_images(data_dir / "images", [post.key for post in posts])
    cfg = ExtractConfig(
        data=DataConfig(data_dir=str(data_dir)),
        out=str(tmp_path / f"cache-{detector}"),
        vision="tiny-resnet",
        detector=detector,
        num_workers=0,
        device="cpu",
        topk=4,
    )
    return extract_features(cfg), data_dir


def test_ner_models_train_on_resnet_grid_caches(tmp_path):
    """The default model (patches + regions) on a tiny-resnet + tiny-frcnn cache, a patch-only one on a
    --detector none cache; the default one on the latter is refused by train_from_cache itself."""
    cache_dir, data_dir = resnet_cache(tmp_path, "tiny-frcnn")
    with CacheReader(cache_dir) as reader:
        assert (reader.spec.num_patches, reader.spec.patch_dim, reader.spec.max_regions) == (4, 64, 4)
    run_dir = train_from_cache(run_config(tmp_path / "full", cache_dir, data_dir, epochs=1))
    [line] = [json.loads(text) for text in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(line["train_loss"])

    plain, data_dir = resnet_cache(tmp_path / "plain", "none")
    message = f"the cache {plain.resolve()} holds no region tokens (extracted with --detector none); set model.use_regions = false"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        train_from_cache(run_config(tmp_path / "refused", plain, data_dir, epochs=1))
    assert not (tmp_path / "refused" / "config.json").exists()
    run_dir = train_from_cache(run_config(tmp_path / "patches", plain, data_dir, epochs=1, use_regions=False))
    [line] = [json.loads(text) for text in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(line["train_loss"])


def test_global_from_cls_needs_patches_and_a_cls_state():
    with pytest.raises(ValueError, match="model.global_from_cls = true projects the CLS state"):
        ModelConfig(fusion="mango", adaptive_gate=False, use_patches=False, global_from_cls=True)
    grid = dataclasses.replace(tiny_spec(), patch_source="resnet50.layer4 (7x7 grid)")
    cfg = tiny_config(fusion="mango", adaptive_gate=False, global_from_cls=True)
    with pytest.raises(
        ValueError, match=r"reads the CLIP CLS state, but the cache's patch tokens come from resnet50"
    ):
        VisualTokenBuilder(cfg, grid, 32)
    # a grid's first cell is a real token: patch_cls = false drops nothing there
    kept = VisualTokenBuilder(tiny_config(fusion="mango", adaptive_gate=False, patch_cls=False), grid, 32)
    assert not kept.drop_cls


def test_patch_resampler_gives_its_query_count_of_tokens_and_masks_an_image_less_post():
    model = tiny_model(patch_resampler_queries=3, use_regions=False).eval()
    batch = make_batch(make_posts(3), statuses={"img1": "missing"})
    with torch.no_grad():
        visual, mask = model.encode_visual(batch)
    assert visual.shape == (3, 3, 32)
    assert mask[[0, 2]].all() and not mask[1].any() and not visual[1].any()


def test_the_dual_builder_is_the_originals_token_sum_without_type_embedding():
    model = tiny_model(visual_builder="dual", patch_cls=False, use_patches=False).eval()
    assert not hasattr(model.visual, "type_embed") and model.visual.label_embed.num_embeddings == 92
    batch = make_batch(make_posts(2), statuses={})
    v = model.visual
    with torch.no_grad():
        visual, mask = model.encode_visual(batch)
        expected = v.region_norm(
            v.region_proj(batch["region_feats"])
            + v.label_embed(batch["region_labels"])
            + v.box_embed(batch["region_boxes"])
            + v.score_embed(batch["region_scores"][..., None])
        )
    torch.testing.assert_close(visual, expected * mask[..., None], rtol=0, atol=1e-6)


def test_visual_token_settings_are_checked():
    cases = {
        "model.patch_resampler_queries must be >= 0, got -1": dict(patch_resampler_queries=-1),
        "model.visual_builder must be one of 'shared', 'dual', got 'x'": dict(visual_builder="x"),
    }
    for message, changes in cases.items():
        with pytest.raises(ValueError, match=re.escape(message)):
            tiny_config(**changes)
    message = (
        "model.patch_resampler_queries > 0 resamples with 8 attention heads, which do not divide the text "
        "encoder's width 36; set model.patch_resampler_queries = 0"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        VisualTokenBuilder(tiny_config(patch_resampler_queries=2), tiny_spec(), 36)
