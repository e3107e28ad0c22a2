"""Fusion of word states with visual tokens; registry.FUSIONS maps ModelConfig.fusion to a class here.

Every fusion maps word states (B, T, D) to fused word states (B, T, D) and obeys one rule: a post
with no usable visual token (image missing, corrupt or dropped) gets exactly the output the model
gives with no image. Attention over an all-masked key set would softmax over nothing (NaN), so
`masked_attention` lets such rows see one dummy key and then replaces their output by zeros.

- qgf (AFNER's and AFDVQF's query-guided fusion): query slots per entity type, typed by a prompt; in
  each layer the slots read the text, then the visual tokens, the words read the visual tokens, and a
  residual FFN runs on each branch (the words never read the slots, as in the originals). Then, when
  model.adaptive_gate, the adaptive fusion model.adaptive_fusion names: "weights", AFDVQF's own
  (AdaptiveFusionLayer in liguochun0304/AFDVQF@034b93f, model/query_guided_fusion.py: two learnable
  scalars, text_weight * fused + vision_weight * the mean visual token), or "gate", ours: a per-word,
  per-dimension sigmoid gate between the text and the fused states.
- concat (BertResNet): the pooled image vector concatenated to every word, projected back to D.
- gated (MANGO GatedConcatFusion alone): words attend to the visual tokens; a learned relevance and a
  sigmoid gate scale what is added back to the words. The full MANGO model (resampler, multimodal
  stack, this gate with rel_temp and alpha, its losses) is fusion "mango" in train/zoo/mango.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from mner.train.zoo.registry import FUSIONS

if TYPE_CHECKING:
    from mner.train.engine.config import ModelConfig


def masked_attention(attention: nn.MultiheadAttention, query, keys, key_mask) -> torch.Tensor:
    """Multi-head attention of query (B, Q, D) over keys (B, K, D) where key_mask (B, K) is True.

    Returns (B, Q, D); rows of a post with no True key are exactly zero (not NaN).
    """
    has_key = key_mask.any(dim=1)  # (B,)
    # Unmask key 0 where nothing is visible so softmax stays finite; that output is discarded below.
    safe = key_mask.clone()
    safe[:, 0] |= ~has_key
    out, _ = attention(query, keys, keys, key_padding_mask=~safe, need_weights=False)  # (B, Q, D)
    return torch.where(has_key[:, None, None], out, torch.zeros_like(out))


def feed_forward(width: int, dropout: float, activation: type[nn.Module] = nn.GELU) -> nn.Sequential:
    """The position-wise FFN of a QGF layer: Linear(D, 4D) -> GELU -> Dropout -> Linear(4D, D) -> Dropout
    (MANGO's CrossAttentionBlock has the same with ReLU)."""
    return nn.Sequential(
        nn.Linear(width, 4 * width),
        activation(),
        nn.Dropout(dropout),
        nn.Linear(4 * width, width),
        nn.Dropout(dropout),
    )


class QueryGuidedLayer(nn.Module):
    """One QGF layer of the originals (liguochun0304/AFDVQF@e0b3496, model/query_guided_fusion.py:96-106).

    queries <- LN_q(queries + attn(queries, text)); queries <- LN_q(queries + attn(queries, visual)), the
    same LayerNorm twice; text <- LN_t(text + attn(text, visual)); then a residual FFN on each branch.
    The words read the visual tokens directly; the queries never reach the words.
    """

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.q2t = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.q2v = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.t2v = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_q = nn.LayerNorm(width)
        self.norm_t = nn.LayerNorm(width)
        self.ffn_q = feed_forward(width, dropout)
        self.ffn_t = feed_forward(width, dropout)

    def forward(self, queries, text, text_mask, visual, visual_mask):
        """queries (B, Q, D), text (B, T, D), visual (B, V, D) -> (queries, text) updated."""
        read = masked_attention(self.q2t, queries, text, text_mask)  # (B, Q, D)
        queries = self.norm_q(queries + read)
        seen = masked_attention(self.q2v, queries, visual, visual_mask)  # (B, Q, D)
        queries = self.norm_q(queries + seen)
        told = masked_attention(self.t2v, text, visual, visual_mask)  # (B, T, D)
        text = self.norm_t(text + told)
        return queries + self.ffn_q(queries), text + self.ffn_t(text)


class AdaptiveWeights(nn.Module):
    """AFDVQF's adaptive fusion (AdaptiveFusionLayer): text_weight * fused + vision_weight * the post's
    mean visual token, both learnable scalars starting at 1.

    The original runs it only when the batch has images; here a post with no visible visual token
    keeps its fused states unchanged, the image-less output.
    """

    def __init__(self):
        super().__init__()
        self.text_weight = nn.Parameter(torch.ones(1))
        self.vision_weight = nn.Parameter(torch.ones(1))

    def forward(self, fused, visual, visual_mask) -> torch.Tensor:
        """fused (B, T, D), visual (B, V, D), visual_mask (B, V) -> (B, T, D)."""
        m = visual_mask.to(visual.dtype)[..., None]  # (B, V, 1)
        mean = (visual * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)  # (B, D)
        out = self.text_weight * fused + self.vision_weight * mean[:, None, :]  # (B, T, D)
        return torch.where(visual_mask.any(dim=1)[:, None, None], out, fused)


class QueryGuidedFusion(nn.Module):
    """The query-guided fusion of AFNER and AFDVQF: slots_per_type query slots per entity type,
    qfnet_layers QueryGuidedLayers, then the adaptive fusion cfg.adaptive_fusion names when
    cfg.adaptive_gate.

    Slot k of type i is type_queries[i] + slots[k] (the originals' MultiGrainedQuerySet), with
    type_queries (E, D) the encoder's "[MASK] is TYPE" states that MNERModel writes in
    (train/zoo/text.py type_prompt_states) when cfg.typed_queries, else the offsets alone.
    """

    uses_pooled = False  # reads no pooled image vector (VisualTokenBuilder builds none)
    # forward leaves its final slots (B, Q, D) in self.final_slots, for the slot_type loss
    exposes_slots = True
    # The originals drop out the encoder's states before the fusion (base_model.py:147 in
    # liguochun0304/AFDVQF@e0b3496) and feed the fused states to the emission layer undropped.
    drops_text = True
    drops_fused = False

    def __init__(self, cfg: ModelConfig, width: int, entity_types: Sequence[str]):
        super().__init__()
        self.final_slots: torch.Tensor | None = None
        self.slots_per_type = cfg.slots_per_type
        num_slots = len(entity_types) * cfg.slots_per_type
        assert num_slots > 0, "query-guided fusion needs at least one entity type"
        # Slots of type i are rows i * slots_per_type ... (i + 1) * slots_per_type - 1.
        self.slots = nn.Parameter(torch.randn(num_slots, width) * 0.02)  # (Q, D) per-slot offsets
        self.type_queries = (
            nn.Parameter(torch.zeros(len(entity_types), width)) if cfg.typed_queries else None
        )  # (E, D)
        self.layers = nn.ModuleList(
            QueryGuidedLayer(width, cfg.qfnet_heads, cfg.dropout) for _ in range(cfg.qfnet_layers)
        )
        # "weights" (AFDVQF's) or "gate" (ours); at most one of the two is built.
        weights = cfg.adaptive_gate and cfg.adaptive_fusion == "weights"
        self.adaptive_weights = AdaptiveWeights() if weights else None
        self.gate = nn.Linear(2 * width, width) if cfg.adaptive_gate and not weights else None

    def queries(self) -> torch.Tensor:
        """The query slots (Q, D), type-major."""
        if self.type_queries is None:
            return self.slots
        return self.slots + self.type_queries.repeat_interleave(self.slots_per_type, dim=0)  # (Q, D)

    def forward(self, text, text_mask, visual, visual_mask, pooled=None) -> torch.Tensor:
        """text (B, T, D), text_mask (B, T), visual (B, V, D), visual_mask (B, V) -> (B, T, D)."""
        slots = self.queries().expand(text.shape[0], -1, -1)  # (B, Q, D)
        fused = text
        for layer in self.layers:
            slots, fused = layer(slots, fused, text_mask, visual, visual_mask)
        self.final_slots = slots  # (B, Q, D)
        if self.adaptive_weights is not None:
            return self.adaptive_weights(fused, visual, visual_mask)  # (B, T, D)
        if self.gate is None:
            return fused
        # Adaptive fusion: each word chooses how much of the fused state to take over its own.
        g = torch.sigmoid(self.gate(torch.cat([text, fused], dim=-1)))  # (B, T, D)
        return g * fused + (1 - g) * text


class ConcatFusion(nn.Module):
    """BertResNet: [word; pooled image] -> Linear -> residual + LayerNorm."""

    uses_pooled = True  # VisualTokenBuilder builds the global-embedding projection for it

    def __init__(self, cfg: ModelConfig, width: int, entity_types: Sequence[str] = ()):
        super().__init__()
        self.proj = nn.Linear(2 * width, width)
        self.norm = nn.LayerNorm(width)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, text, text_mask, visual, visual_mask, pooled=None) -> torch.Tensor:
        """pooled (B, D) is the projected global embedding, zero for a masked image -> (B, T, D)."""
        assert pooled is not None, "concat fusion needs the pooled image vector"
        joined = torch.cat([text, pooled[:, None, :].expand_as(text)], dim=-1)  # (B, T, 2D)
        return self.norm(text + self.dropout(self.proj(joined)))


class GatedLayer(nn.Module):
    """MANGO gated relevance fusion: words attend to visual tokens; relevance and gate scale the update."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.norm_text = nn.LayerNorm(width)
        self.norm_visual = nn.LayerNorm(width)
        self.relevance = nn.Linear(2 * width, 1)
        self.proj = nn.Linear(2 * width, width)
        self.gate = nn.Linear(2 * width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, text, visual, visual_mask) -> torch.Tensor:
        """text (B, T, D), visual (B, V, D), visual_mask (B, V) -> (B, T, D)."""
        context = masked_attention(self.attention, text, visual, visual_mask)  # (B, T, D)
        t, v = self.norm_text(text), self.norm_visual(context)
        relevance = torch.sigmoid(self.relevance(torch.cat([t, v], dim=-1)))  # (B, T, 1)
        joined = torch.cat([t, v * relevance], dim=-1)  # (B, T, 2D)
        update = torch.sigmoid(self.gate(joined)) * self.proj(joined)  # (B, T, D)
        # LayerNorm of a zero context is its bias, not zero: cut the whole update for image-less posts.
        has_visual = visual_mask.any(dim=1)  # (B,)
        update = torch.where(has_visual[:, None, None], update, torch.zeros_like(update))
        return text + self.dropout(update)


class GatedFusion(nn.Module):
    """qfnet_layers stacked GatedLayers."""

    uses_pooled = False

    def __init__(self, cfg: ModelConfig, width: int, entity_types: Sequence[str] = ()):
        super().__init__()
        self.layers = nn.ModuleList(
            GatedLayer(width, cfg.qfnet_heads, cfg.dropout) for _ in range(cfg.qfnet_layers)
        )

    def forward(self, text, text_mask, visual, visual_mask, pooled=None) -> torch.Tensor:
        """text (B, T, D), visual (B, V, D), visual_mask (B, V) -> (B, T, D)."""
        for layer in self.layers:
            text = layer(text, visual, visual_mask)
        return text


def build_fusion(cfg: ModelConfig, width: int, entity_types: Sequence[str]) -> nn.Module:
    """The fusion module registry.FUSIONS names as cfg.fusion, at text width `width`.

    Its forward is (text (B, T, D), text_mask (B, T), visual (B, V, D), visual_mask (B, V),
    pooled (B, D) or None) -> (B, T, D).
    """
    return FUSIONS.get(cfg.fusion)(cfg, width, entity_types)
