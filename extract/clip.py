"""The CLIP vision encoder: patch tokens (CLS first) and the projected global embedding, loaded from a
local folder; `tiny-clip` is a seeded random CLIP written to disk first and loaded the same way.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import (
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)

from mner.cache.checksums import file_sha256
from mner.configs.presets import materialise, preset_dir
from mner.extract.config import (
    TINY_CLIP,
)
from mner.extract.weights import (
    PRESET_MARKER,
    PRESET_VERSION,
    one_thread,
    read_marker,
    weight_files,
    weight_names,
)


@dataclass
class ClipEncoder:
    """A CLIP vision tower with the image processor saved beside it (so normalisation always matches)."""

    vision: CLIPVisionModel  # embeddings -> transformer -> post_layernorm(CLS)
    projection: nn.Linear | None  # visual_projection (hidden -> projection_dim) when the checkpoint has one
    processor: CLIPImageProcessor  # loaded from the same folder as `vision`
    info: dict  # identity, weight sha256s, processor settings, untrained flag (manifest "models.clip")
    num_patches: int  # P = 1 + (image_size / patch_size) ** 2, CLS first
    patch_dim: int  # Dp = hidden_size
    global_dim: int  # Dg = projection_dim, or hidden_size without a projection
    patch_source: str  # what the stored patch tokens are (TokenSpec.patch_source)
    global_source: str  # what the stored global embedding is (TokenSpec.global_source)

    def preprocess(self, images: list) -> Tensor:
        """PIL images or (3, H, W) uint8 tensors -> pixel_values (B, 3, S, S) float32."""
        return preprocess_for_clip(self.processor, images)

    @property
    def image_preprocess(self) -> Callable[[list], Tensor]:
        """`preprocess` without the model, for DataLoader workers: images -> (B, 3, S, S)."""
        return functools.partial(preprocess_for_clip, self.processor)

    @torch.inference_mode()
    def encode(self, pixel_values: Tensor) -> tuple[Tensor, Tensor]:
        """pixel_values (B, 3, S, S) -> patch tokens (B, P, Dp) and global embeddings (B, Dg)."""
        out = self.vision(pixel_values=pixel_values)
        pooled = out.pooler_output  # (B, Dp) post-layernormed CLS
        global_embed = self.projection(pooled) if self.projection is not None else pooled  # (B, Dg)
        return out.last_hidden_state, global_embed

    def to(self, device: torch.device) -> ClipEncoder:
        self.vision.to(device)
        if self.projection is not None:
            self.projection.to(device)
        return self


def preprocess_for_clip(processor: CLIPImageProcessor, images: list) -> Tensor:
    """PIL images or (3, H, W) uint8 tensors -> pixel_values (B, 3, S, S), as the encoder's processor makes them."""
    with one_thread():
        return processor(images=images, return_tensors="pt")["pixel_values"]


def load_clip(name_or_path: str, device: str | torch.device = "cpu") -> ClipEncoder:
    """Load "tiny-clip" or a local Hugging Face CLIP / CLIP-vision folder, in eval mode on `device`.

    A full CLIPModel folder contributes its vision tower and visual_projection; a CLIP-vision folder is
    read as CLIPVisionModelWithProjection when its weights hold a visual_projection, else CLIPVisionModel.
    """
    folder = materialise_tiny_clip() if name_or_path == TINY_CLIP else Path(name_or_path).expanduser()
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"CLIP model folder not found or has no config.json: {folder} "
            f"(give a local Hugging Face CLIP folder or '{TINY_CLIP}')"
        )
    if not (folder / "preprocessor_config.json").is_file():
        raise ValueError(
            f"CLIP folder {folder} has no preprocessor_config.json; the image processor must come from "
            "the same folder as the encoder so the normalisation matches"
        )
    model_type = json.loads(config_file.read_text()).get("model_type")
    load = {"local_files_only": True, "dtype": torch.float32}
    try:
        vision, projection, class_name = _load_clip_tower(folder, config_file, model_type, load)
        processor = CLIPImageProcessor.from_pretrained(folder, local_files_only=True)
    except OSError as err:  # transformers' word for missing/unreadable weight or processor files
        raise ValueError(f"CLIP folder {folder} cannot be loaded: {err}") from err
    vision_cfg = vision.config
    crop = processor.crop_size or {}
    if processor.do_center_crop and (crop.get("height"), crop.get("width")) != (vision_cfg.image_size,) * 2:
        raise ValueError(
            f"CLIP folder {folder}: processor crop_size {crop} does not match the encoder's image_size "
            f"{vision_cfg.image_size}"
        )
    return _finish_clip(name_or_path, folder, vision, projection, class_name, processor, device)


def _load_clip_tower(folder, config_file, model_type, load):
    """(vision tower, visual projection or None, class name) from a CLIP or CLIP-vision folder."""
    if model_type == "clip":
        full = CLIPModel.from_pretrained(folder, **load)
        vision, projection, class_name = full.vision_model, full.visual_projection, "CLIPModel"
    elif model_type == "clip_vision_model":
        if "visual_projection.weight" in weight_names(folder):
            with_proj = CLIPVisionModelWithProjection.from_pretrained(folder, **load)
            vision, projection = with_proj.vision_model, with_proj.visual_projection
            class_name = "CLIPVisionModelWithProjection"
        else:
            vision, projection = CLIPVisionModel.from_pretrained(folder, **load), None
            class_name = "CLIPVisionModel"
    else:
        raise ValueError(
            f"{config_file} has model_type {model_type!r}; expected 'clip' or 'clip_vision_model'"
        )
    return vision, projection, class_name


def _finish_clip(name_or_path, folder, vision, projection, class_name, processor, device) -> ClipEncoder:
    """Wrap a loaded vision tower + processor as a frozen ClipEncoder with its manifest info."""
    vision_cfg = vision.config
    vision.eval()
    if projection is not None:
        projection.eval()
    marker = read_marker(folder)
    patch_source = "vision_model.last_hidden_state (CLS first)"
    global_source = "image_embeds (visual_projection)" if projection is not None else "pooler_output"
    info = {
        "name": TINY_CLIP if name_or_path == TINY_CLIP else folder.resolve().name,
        "path": str(folder.resolve()),
        "class": class_name,
        "sha256": {p.name: file_sha256(p) for p in weight_files(folder)},
        "untrained": bool(marker.get("untrained", False)),
        "processor": json.loads(processor.to_json_string()),
        "image_size": vision_cfg.image_size,
        "patch_size": vision_cfg.patch_size,
        "patch_source": patch_source,
        "global_source": global_source,
    }
    hidden = vision_cfg.hidden_size
    encoder = ClipEncoder(
        vision=vision,
        projection=projection,
        processor=processor,
        info=info,
        num_patches=1 + (vision_cfg.image_size // vision_cfg.patch_size) ** 2,
        patch_dim=hidden,
        global_dim=projection.out_features if projection is not None else hidden,
        patch_source=patch_source,
        global_source=global_source,
    )
    return encoder.to(torch.device(device))


def materialise_tiny_clip(root: Path | None = None) -> Path:
    """Write the seeded random tiny CLIP vision model + processor (64 px, 16 px patches -> 17 tokens)."""

    def write(folder: Path) -> None:
        config = CLIPVisionConfig(
            image_size=64,
            patch_size=16,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            projection_dim=32,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = CLIPVisionModelWithProjection(config)
        model.save_pretrained(folder)
        CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(
            folder
        )
        (folder / PRESET_MARKER).write_text(json.dumps({"preset": TINY_CLIP, "untrained": True}))

    return materialise((root or preset_dir()) / f"{TINY_CLIP}.v{PRESET_VERSION}", write, is_dir=True)
