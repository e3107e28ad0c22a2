"""Model folders for the extraction tests that the presets do not cover."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection


def make_clip_folder(folder: Path, layers: int = 3, seed: int = 1) -> Path:
    """A seeded random CLIP-vision folder with a projection, as tiny-clip but `layers` encoder layers deep
    (tiny-clip's 2 cannot tell "the last 2 layers" from "the whole tower")."""
    config = CLIPVisionConfig(
        image_size=64,
        patch_size=16,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        projection_dim=24,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(config)
    model.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(
        folder
    )
    return folder
