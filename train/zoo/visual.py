"""Cached image tokens -> visual tokens at the text width D.

Two token types, as in AFDVQF's dual-branch vision tokens:
- patch tokens: CLIP patch states, Linear + LayerNorm to D; the CLS state (token 0 of a CLIP cache)
  is one of them unless model.patch_cls is false (the originals drop it: last_hidden_state[:, 1:]);
- region tokens: detector region features, Linear + LayerNorm to D, plus (model.region_meta, AFNER and AFDVQF)
  what the detector knows about the region: an embedding of its COCO label, a projection of its
  score and of its box (x1, y1, x2, y2, w, h, area in [0, 1]).
A learned type embedding tells the two apart, and one LayerNorm and dropout act on every token.

model.visual_builder = "dual" builds the tokens as the originals' DualVisionTokenExtractor does
(liguochun0304/AFDVQF@e0b3496, model/dual_vision_extractor.py:111-124 and 276-292): patch tokens
Linear + LayerNorm, region tokens LayerNorm(Linear + LayerNorm of the feature + label embedding (one
row per COCO id 0..91) + Linear + LayerNorm of the box (x1, y1, x2, y2) + Linear of the score), no type
embedding, no shared LayerNorm, no dropout. Either builder can resample the patch tokens
(model.patch_resampler_queries: LayerNorm(attention of learned queries over the projected patches), the
originals' patch resampler, 8 heads).

A post whose image is masked (missing, corrupt or dropped) has every visual token masked; the fusions
then give it exactly zero visual contribution.
"""

from __future__ import annotations

import torch
from torch import nn

from mner.cache.spec import TokenSpec
from mner.train.engine.config import ModelConfig
from mner.train.zoo.fusion import masked_attention
from mner.train.zoo.registry import FUSIONS

# Type ids of the visual tokens (rows of VisualTokenBuilder.type_embed).
PATCH, REGION = 0, 1
# How TokenSpec.patch_source marks a cache whose patch token 0 is the encoder's CLS state.
CLS_FIRST = "(CLS first)"
# Attention heads of the patch resampler (the originals' DualVisionTokenExtractor: num_heads=8).
RESAMPLER_HEADS = 8


def check_regions(cfg: ModelConfig, spec: TokenSpec, cache_dir: str | None = None) -> None:
    """Refuse region tokens from a cache extracted with --detector none (K = 0: there are none to use),
    for a model that reads them (`ModelConfig.reads_tokens`)."""
    if cfg.reads_tokens and cfg.use_regions and not spec.has_regions:
        where = f"the cache {cache_dir}" if cache_dir else "the cache"
        raise ValueError(
            f"{where} holds no region tokens (extracted with --detector none); set model.use_regions = false"
        )


class VisualTokenBuilder(nn.Module):
    """Projects a batch's cached tokens to (B, V, D) visual tokens with a (B, V) mask.

    V = P (if use_patches; P - 1 without the CLS state, or the resampler's query count) + K (if
    use_regions), patches first.
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
        self.resampler = None
        if self.use_patches and cfg.patch_resampler_queries:
            if D % RESAMPLER_HEADS:
                raise ValueError(
                    f"model.patch_resampler_queries > 0 resamples with {RESAMPLER_HEADS} attention heads, "
                    f"which do not divide the text encoder's width {D}; set model.patch_resampler_queries = 0"
                )
            self.resampler_queries = nn.Parameter(torch.randn(cfg.patch_resampler_queries, D) * 0.02)
            self.resampler = nn.MultiheadAttention(D, RESAMPLER_HEADS, batch_first=True)
            self.resampler_norm = nn.LayerNorm(D)
        self.region_meta = cfg.region_meta
        self.dual = cfg.visual_builder == "dual"
        if self.use_regions:
            self.region_proj = nn.Sequential(nn.Linear(spec.region_dim, D), nn.LayerNorm(D))
        if self.use_regions and self.region_meta:
            # The originals clamp a label id into 0..91 and embed 92 rows.
            self.label_embed = nn.Embedding(num_detector_classes + self.dual, D)
            self.score_embed = nn.Linear(1, D)
            if self.dual:
                self.box_embed = nn.Sequential(nn.Linear(4, D), nn.LayerNorm(D))
            else:
                self.box_embed = nn.Linear(7, D)
        if self.dual:
            self.region_norm = nn.LayerNorm(D) if self.use_regions and self.region_meta else None
        else:
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
            patches, patch_mask = self._patches(batch)  # (B, P, D), (B, P)
            tokens.append(patches if self.dual else patches + self.type_embed.weight[PATCH])
            masks.append(patch_mask)
        if self.use_regions:
            regions = self._regions(batch)  # (B, K, D)
            tokens.append(regions if self.dual else regions + self.type_embed.weight[REGION])
            masks.append(batch["region_mask"])
        mask = torch.cat(masks, dim=1) & image_mask[:, None]  # (B, V)
        visual = torch.cat(tokens, dim=1)  # (B, V, D)
        if not self.dual:
            visual = self.dropout(self.norm(visual))
        return visual.masked_fill(~mask[..., None], 0.0), mask

    def _patches(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Projected patch tokens (B, P, D) and their mask (B, P); P = the resampler's queries if any."""
        start = 1 if self.drop_cls else 0
        patches = self.patch_proj(batch["patch_tokens"][:, start:])  # (B, P, D)
        mask = batch["patch_mask"][:, start:]  # (B, P)
        if self.resampler is None:
            return patches, mask
        queries = self.resampler_queries.expand(patches.shape[0], -1, -1)  # (B, N, D)
        resampled = self.resampler_norm(masked_attention(self.resampler, queries, patches, mask))  # (B, N, D)
        has_patch = mask.any(dim=1, keepdim=True)  # (B, 1)
        return resampled, has_patch.expand(-1, queries.shape[1])  # (B, N, D), (B, N)

    def _regions(self, batch: dict) -> torch.Tensor:
        """Region tokens (B, K, D), before the type embedding."""
        if not self.region_meta:
            return self.region_proj(batch["region_feats"])  # (B, K, D)
        labels = batch["region_labels"]  # (B, K)
        if bool((labels >= self.num_detector_classes).any()) or bool((labels < 0).any()):
            raise ValueError(
                f"region label ids must lie in [0, {self.num_detector_classes}) (the detector's classes); "
                f"the cache holds {int(labels.min())}..{int(labels.max())}"
            )
        boxes = batch["region_boxes"]  # (B, K, 4) xyxy in [0, 1]
        if self.dual:
            meta = (
                self.region_proj(batch["region_feats"])
                + self.label_embed(labels)
                + self.box_embed(boxes)
                + self.score_embed(batch["region_scores"][..., None])
            )  # (B, K, D)
            return self.region_norm(meta)
        w = boxes[..., 2] - boxes[..., 0]  # (B, K)
        h = boxes[..., 3] - boxes[..., 1]  # (B, K)
        geometry = torch.cat([boxes, w[..., None], h[..., None], (w * h)[..., None]], dim=-1)  # (B, K, 7)
        return (
            self.region_proj(batch["region_feats"])
            + self.label_embed(labels)
            + self.score_embed(batch["region_scores"][..., None])
            + self.box_embed(geometry)
        )  # (B, K, D)

    def encode_global(self, batch: dict, image_mask: torch.Tensor) -> torch.Tensor:
        """The pooled image vector (B, D); exactly zero where image_mask is False."""
        assert self.builds_global, "encode_global is built for a fusion that uses_pooled only"
        if self.global_from_cls:
            pooled = self.patch_proj(batch["patch_tokens"][:, 0])  # (B, D) MANGO's clip_proj(v_cls)
        else:
            pooled = self.global_proj(batch["global_embed"])  # (B, D)
        return pooled.masked_fill(~image_mask[:, None], 0.0)
