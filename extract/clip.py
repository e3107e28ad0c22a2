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
from mner.configs.presets import materialise, preset_dir, save_model
from mner.extract.config import CLIP_PRESETS, DEMO_CLIP, TINY_CLIP
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

    @property
    def num_layers(self) -> int:
        """The encoder layers of the tower: the most --vision-trainable-blocks can be."""
        return self.vision.config.num_hidden_layers

    def check_blocks(self, blocks: int) -> None:
        """Refuse more trainable blocks than the tower has layers."""
        if blocks > self.num_layers:
            raise ValueError(
                f"--vision-trainable-blocks {blocks} is more than the {self.num_layers} encoder layers of "
                f"{self.info['name']}; give 0 to {self.num_layers} ({self.num_layers} stores the embedding "
                "output, so the whole tower trains)"
            )

    def state_spec(self, blocks: int) -> tuple[tuple[int, ...], str]:
        """(per-image shape, source) of the state before the last `blocks` layers: every token, CLS first."""
        if blocks == self.num_layers:
            source = f"vision_model.hidden_states[0] (the embedding output, input to all {blocks} encoder layers, CLS first)"
        else:
            source = f"vision_model.hidden_states[-{blocks + 1}] (input to the last {blocks} encoder layers, CLS first)"
        return (self.num_patches, self.patch_dim), source

    @torch.inference_mode()
    def encode_with_state(self, pixel_values: Tensor, blocks: int) -> tuple[Tensor, Tensor, Tensor]:
        """`encode`, plus the input of the last `blocks` encoder layers (B, P, Dp): hidden_states[-blocks-1],
        which is the pre-layernormed embedding output when `blocks` is the layer count."""
        out = self.vision(pixel_values=pixel_values, output_hidden_states=True)
        pooled = out.pooler_output  # (B, Dp) post-layernormed CLS
        global_embed = self.projection(pooled) if self.projection is not None else pooled  # (B, Dg)
        return out.last_hidden_state, global_embed, out.hidden_states[-blocks - 1]

    def block_weights(self, blocks: int) -> tuple[dict, dict[str, Tensor]]:
        """(config, tensors) of what turns the stored state into the cached tokens: the last `blocks`
        encoder layers (renumbered 0..blocks-1), post_layernorm (the pooled CLS) and the projection.

        last_hidden_state, the cached patch tokens, is the last layer's output itself (CLIP applies
        post_layernorm to the pooled CLS only); the global embedding is projection(post_layernorm(CLS)).
        """
        cfg = self.vision.config
        first = self.num_layers - blocks
        tensors = {
            f"layers.{i}.{name}": value
            for i, layer in enumerate(self.vision.encoder.layers[first:])
            for name, value in layer.state_dict().items()
        }
        tensors.update({f"post_layernorm.{n}": v for n, v in self.vision.post_layernorm.state_dict().items()})
        if self.projection is not None:
            tensors.update({f"projection.{n}": v for n, v in self.projection.state_dict().items()})
        config = {
            "kind": "clip",
            "blocks": blocks,
            "layers": self.num_layers,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "num_attention_heads": cfg.num_attention_heads,
            "hidden_act": cfg.hidden_act,
            "layer_norm_eps": cfg.layer_norm_eps,
            "attention_dropout": cfg.attention_dropout,
            "projection_dim": None if self.projection is None else self.projection.out_features,
        }
        return config, tensors

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
    folder = (
        materialise_clip_preset(name_or_path)
        if name_or_path in CLIP_PRESETS
        else Path(name_or_path).expanduser()
    )
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
        "name": name_or_path if name_or_path in CLIP_PRESETS else folder.resolve().name,
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


# The presets' encoders, seeded: (hidden size, MLP size, layers, heads, projection), all at 64 px with
# 16 px patches (17 tokens).
_PRESETS = {TINY_CLIP: (32, 64, 2, 2, 32), DEMO_CLIP: (384, 1536, 6, 12, 384)}


def materialise_clip_preset(name: str = TINY_CLIP, root: Path | None = None) -> Path:
    """Write the seeded random CLIP vision model + processor of preset `name` once and return its folder:
    tiny-clip (2 layers of 32), demo-clip (MiniLM's 6 layers of 384, 12 heads)."""
    hidden, mlp, layers, heads, projection = _PRESETS[name]

    def write(folder: Path) -> None:
        config = CLIPVisionConfig(
            image_size=64,
            patch_size=16,
            hidden_size=hidden,
            intermediate_size=mlp,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            projection_dim=projection,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = CLIPVisionModelWithProjection(config)
        save_model(model, folder)
        CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(
            folder
        )
        (folder / PRESET_MARKER).write_text(json.dumps({"preset": name, "untrained": True}))

    return materialise((root or preset_dir()) / f"{name}.v{PRESET_VERSION}", write, is_dir=True)
