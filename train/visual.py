"""Cached image tokens -> visual tokens at the text width D.

Two token types, as in AFDVQF's dual-branch vision tokens:
- patch tokens: CLIP patch states, Linear + LayerNorm to D; the CLS state (token 0 of a CLIP cache)
  is one of them unless model.patch_cls is false (the originals drop it: last_hidden_state[:, 1:]);
- region tokens: detector region features, Linear + LayerNorm to D, plus (model.region_meta, AFDVQF)
  what the detector knows about the region: an embedding of its COCO label, a projection of its
  score and of its box (x1, y1, x2, y2, w, h, area in [0, 1]). AFNER uses the features alone.
A learned type embedding tells the two apart. A post whose image is masked (missing, corrupt or
dropped) has every visual token masked; the fusions then give it exactly zero visual contribution.
"""

from __future__ import annotations

import torch
from torch import nn

from mner.cache.spec import TokenSpec
from mner.train.config import ModelConfig
from mner.train.registry import FUSIONS

# Type ids of the visual tokens (rows of VisualTokenBuilder.type_embed).
PATCH, REGION = 0, 1
# How TokenSpec.patch_source marks a cache whose patch token 0 is the encoder's CLS state.
CLS_FIRST = "(CLS first)"


def check_regions(cfg: ModelConfig, spec: TokenSpec, cache_dir: str | None = None) -> None:
    """Refuse region tokens from a cache extracted with --detector none (K = 0: there are none to use)."""
    if cfg.use_regions and not spec.has_regions:
        where = f"the cache {cache_dir}" if cache_dir else "the cache"
        raise ValueError(
            f"{where} holds no region tokens (extracted with --detector none); set model.use_regions = false"
        )


class VisualTokenBuilder(nn.Module):
    """Projects a batch's cached tokens to (B, V, D) visual tokens with a (B, V) mask.

    V = P (if use_patches; P - 1 without the CLS state) + K (if use_regions), patches first.
    `encode_global` gives the pooled image vector (B, D): the projected global embedding, or with
    model.global_from_cls the patch projection of the CLS state; built only for a fusion that reads it
    (its `uses_pooled`, `builds_global`).
    """

    def __init__(self, cfg: ModelConfig, spec: TokenSpec, width: int, num_detector_classes: int = 91):
        super().__init__()
        check_regions(cfg, spec)
        self.use_patches = cfg.use_patches
        self.use_regions = cfg.use_regions
        self.num_detector_classes = num_detector_classes
        D = width
        has_cls = CLS_FIRST in spec.patch_source
        if cfg.global_from_cls and not has_cls:
            raise ValueError(
                f"model.global_from_cls = true reads the CLIP CLS state, but the cache's patch tokens come "
                f"from {spec.patch_source}, which has none; set model.global_from_cls = false"
            )
        # Only a CLS state is dropped: a grid encoder's token 0 is a real cell.
        self.drop_cls = not cfg.patch_cls and has_cls
        self.global_from_cls = cfg.global_from_cls
        if self.use_patches:
            self.patch_proj = nn.Sequential(nn.Linear(spec.patch_dim, D), nn.LayerNorm(D))
        self.region_meta = cfg.region_meta
        if self.use_regions:
            self.region_proj = nn.Sequential(nn.Linear(spec.region_dim, D), nn.LayerNorm(D))
        if self.use_regions and self.region_meta:
            self.label_embed = nn.Embedding(num_detector_classes, D)
            self.score_embed = nn.Linear(1, D)
            self.box_embed = nn.Linear(7, D)
        self.type_embed = nn.Embedding(2, D)
        self.norm = nn.LayerNorm(D)
        self.dropout = nn.Dropout(cfg.dropout)
        self.builds_global = FUSIONS.get(cfg.fusion).uses_pooled
        self.global_proj = (
            nn.Sequential(nn.Linear(spec.global_dim, D), nn.LayerNorm(D))
            if self.builds_global and not cfg.global_from_cls
            else None
        )

    def forward(self, batch: dict, image_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            batch: the batch dict (patch_tokens (B, P, Dp), patch_mask (B, P), region_feats (B, K, Dr),
                region_labels (B, K), region_scores (B, K), region_boxes (B, K, 4), region_mask (B, K)).
            image_mask: (B,) bool, False for posts whose image must be ignored.
        Returns:
            tokens (B, V, D), zero where masked; mask (B, V) bool, all False for a masked image.
        """
        tokens, masks = [], []
        if self.use_patches:
            start = 1 if self.drop_cls else 0
            patches = (
                self.patch_proj(batch["patch_tokens"][:, start:]) + self.type_embed.weight[PATCH]
            )  # (B, P, D)
            tokens.append(patches)
            masks.append(batch["patch_mask"][:, start:])
        if self.use_regions:
            tokens.append(self._regions(batch))
            masks.append(batch["region_mask"])
        mask = torch.cat(masks, dim=1) & image_mask[:, None]  # (B, V)
        visual = self.dropout(self.norm(torch.cat(tokens, dim=1)))  # (B, V, D)
        return visual.masked_fill(~mask[..., None], 0.0), mask

    def _regions(self, batch: dict) -> torch.Tensor:
        if not self.region_meta:
            return self.region_proj(batch["region_feats"]) + self.type_embed.weight[REGION]  # (B, K, D)
        labels = batch["region_labels"]  # (B, K)
        if bool((labels >= self.num_detector_classes).any()) or bool((labels < 0).any()):
            raise ValueError(
                f"region label ids must lie in [0, {self.num_detector_classes}) (the detector's classes); "
                f"the cache holds {int(labels.min())}..{int(labels.max())}"
            )
        boxes = batch["region_boxes"]  # (B, K, 4) xyxy in [0, 1]
        w = boxes[..., 2] - boxes[..., 0]  # (B, K)
        h = boxes[..., 3] - boxes[..., 1]  # (B, K)
        geometry = torch.cat([boxes, w[..., None], h[..., None], (w * h)[..., None]], dim=-1)  # (B, K, 7)
        return (
            self.region_proj(batch["region_feats"])
            + self.label_embed(labels)
            + self.score_embed(batch["region_scores"][..., None])
            + self.box_embed(geometry)
            + self.type_embed.weight[REGION]
        )  # (B, K, D)

    def encode_global(self, batch: dict, image_mask: torch.Tensor) -> torch.Tensor:
        """The pooled image vector (B, D); exactly zero where image_mask is False."""
        assert self.builds_global, "encode_global is built for a fusion that uses_pooled only"
        if self.global_from_cls:
            pooled = self.patch_proj(batch["patch_tokens"][:, 0])  # (B, D) MANGO's clip_proj(v_cls)
        else:
            pooled = self.global_proj(batch["global_embed"])  # (B, D)
        return pooled.masked_fill(~image_mask[:, None], 0.0)
