"""train/visual.py: a cache without region tokens (--detector none) feeds a patch-only model and
refuses one that asks for regions, naming the cache."""

import re

import pytest
import torch

from mner.train.runs import build_model
from tests.cache.factories import NO_REGION_SPEC
from tests.train.factories import LABELS, make_batch, tiny_config, tiny_model


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


def test_a_patch_only_model_takes_a_batch_without_regions():
    model = build_model(no_region_record("/caches/plain", use_regions=False), "tiny-bert")
    batch = make_batch(spec=NO_REGION_SPEC)
    assert batch["region_feats"].shape[1:] == (0, 0) and batch["region_mask"].shape[1] == 0  # (B, 0, 0)
    loss = model(batch)["loss"]
    assert torch.isfinite(loss)
    loss.backward()
