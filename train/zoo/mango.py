"""MANGO (seed 003): visual resampler -> multimodal Transformer stack -> gated relevance fusion, + its losses.

Read top to bottom, as the seed's README describes the model ("多模态Transformer Stack", "门控相关性融合",
"多任务损失函数设计"); the knobs keep the seed's names (rel_temp, align_lambda, nce_tau, ...):

    visual tokens (B, V, D) (patches, + regions if use_regions) --VisualResampler--> (B, Q, D)
    words (B, T, D) --stack_layers x MangoBlock--> h (B, T, D): self-attn, cross-attn to the Q tokens, FFN
    stack output h --GatedRelevanceFusion--> h + alpha * g * proj([LN(h); LN(c) * rel])
        rel = sigmoid(rel_head([LN(h); LN(c)]) / rel_temp)  (B, T, 1), c = attention of h over the Q tokens

Losses (registry.AUX_LOSSES, weights model.<name>_lambda; 0 is off):
    mango_align     sum_t w_t (1 - cos(h_t, fused_t)) / sum_t w_t,  w = word_mask * (rel + entity)
                    (rel detached: a weight, not a target), times the warm-up factor min(1, epoch / warmup);
                    the seed names compute_alignment_loss_v2 without defining it, so 1 - cosine is ours
    mango_preserve  sum_t mask_t (1 - rel_t) |fused_t - h_t|^2 / D / sum_t mask_t
    mango_nce       symmetric InfoNCE (tau = nce_tau) of the mean encoder word state with the projected CLIP
                    global embedding, over the posts that have an image
    mango_sparsity  mean relevance over the words of posts that have an image (L1 on the sigmoid outputs)

The fusion keeps what its losses read in `MangoFusion.state` after each forward (MangoState: the stack
output h, the fused states and the relevance); the model hands it to the losses as
LossInputs.fusion_state. A post with no usable image gets resampled tokens that are all masked, zero
cross-attention (fusion.masked_attention), no gated update and relevance 0: its output is bitwise the
one the model gives with no image.

Left out from the seed: its dual-granularity trainable vision encoder (coarse Swin + delegate branch,
fine adaptive patch branch) and "选择性解冻CLIP": stage two reads frozen cached tokens, so nothing on the
image side before the cache can train; clip_lr therefore has no parameters to apply to. Also its
"视觉编码器预热" (first epochs train the text encoder only) and the softmax head's label smoothing /
emission temperature (the head is another registry entry).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mner.train.zoo.fusion import masked_attention
from mner.train.zoo.losses import AuxLoss, LossInputs, info_nce, masked_mean

if TYPE_CHECKING:
    from mner.train.engine.config import ModelConfig


def _ffn(width: int, dropout: float) -> nn.Sequential:
    """The Transformer feed-forward: D -> 4D -> D with GELU."""
    return nn.Sequential(
        nn.Linear(width, 4 * width), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * width, width)
    )


class VisualResampler(nn.Module):
    """Q learned queries read the visual tokens: cross-attention, then FFN, each residual + LayerNorm."""

    def __init__(self, width: int, heads: int, queries: int, dropout: float):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(queries, width) * 0.02)  # (Q, D)
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.ffn = _ffn(width, dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(2))
        self.dropout = nn.Dropout(dropout)

    def forward(self, visual: torch.Tensor, visual_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """visual (B, V, D), visual_mask (B, V) -> tokens (B, Q, D), mask (B, Q).

        A post with no visible token gets an all-False mask (and zero tokens): a learned query that saw
        nothing is still a vector, and the stack must not read it.
        """
        has_image = visual_mask.any(dim=1)  # (B,)
        x = self.queries.expand(visual.shape[0], -1, -1)  # (B, Q, D)
        x = self.norms[0](x + self.dropout(masked_attention(self.attention, x, visual, visual_mask)))
        x = self.norms[1](x + self.dropout(self.ffn(x)))  # (B, Q, D)
        mask = has_image[:, None].expand(-1, x.shape[1])  # (B, Q)
        return x.masked_fill(~mask[..., None], 0.0), mask


class MangoBlock(nn.Module):
    """One block of the multimodal stack: words self-attend, then read the visual tokens, then FFN."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.self_attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.cross_attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.ffn = _ffn(width, dropout)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(3))
        self.dropout = nn.Dropout(dropout)

    def forward(self, text, text_mask, visual, visual_mask) -> torch.Tensor:
        """text (B, T, D), text_mask (B, T), visual (B, N, D), visual_mask (B, N) -> (B, T, D)."""
        text = self.norms[0](
            text + self.dropout(masked_attention(self.self_attention, text, text, text_mask))
        )
        # Zero (not NaN) for a post whose visual tokens are all masked: its words keep their own states.
        seen = masked_attention(self.cross_attention, text, visual, visual_mask)  # (B, T, D)
        text = self.norms[1](text + self.dropout(seen))
        return self.norms[2](text + self.dropout(self.ffn(text)))


class GatedRelevanceFusion(nn.Module):
    """The seed's GatedConcatFusion: a per-word relevance (temperature rel_temp) scales the image context,
    a sigmoid gate and a learned scale alpha (initially 1) the update added to the words."""

    def __init__(self, width: int, rel_temp: float):
        super().__init__()
        self.rel_temp = rel_temp
        self.ln_t = nn.LayerNorm(width)
        self.ln_v = nn.LayerNorm(width)
        self.rel_head = nn.Linear(2 * width, 1)
        self.proj = nn.Linear(2 * width, width)
        self.gate = nn.Linear(2 * width, width)
        self.alpha = nn.Parameter(torch.ones(()))

    def forward(self, text, context, has_image) -> tuple[torch.Tensor, torch.Tensor]:
        """text (B, T, D), context (B, T, D), has_image (B,) -> fused (B, T, D), relevance (B, T).

        Posts without an image get fused == text and relevance 0 (LayerNorm of a zero context is its
        bias, not zero, so the update is cut, not merely computed from zeros).
        """
        t, v = self.ln_t(text), self.ln_v(context)  # (B, T, D) each
        rel = torch.sigmoid(self.rel_head(torch.cat([t, v], dim=-1)) / self.rel_temp)  # (B, T, 1)
        joined = torch.cat([t, v * rel], dim=-1)  # (B, T, 2D)
        update = self.alpha * torch.sigmoid(self.gate(joined)) * self.proj(joined)  # (B, T, D)
        keep = has_image[:, None, None]  # (B, 1, 1)
        fused = torch.where(keep, text + update, text)  # (B, T, D)
        return fused, torch.where(keep, rel, torch.zeros_like(rel))[..., 0]


@dataclass
class MangoState:
    """What MangoFusion computed in its last forward, for the MANGO losses."""

    text: torch.Tensor  # (B, T, D) the stack's output, the gated fusion's input
    fused: torch.Tensor  # (B, T, D) the gated fusion's output
    relevance: torch.Tensor  # (B, T) in (0, 1); 0 for a post with no image


class MangoFusion(nn.Module):
    """registry.FUSIONS "mango": resampler (unless model.resampler is false) -> stack -> gated fusion."""

    # VisualTokenBuilder builds the projection of the cached CLIP global embedding: mango_nce contrasts
    # the text with it (the seed's clip_proj(v_cls)); the fusion itself does not read it.
    uses_pooled = True

    def __init__(self, cfg: ModelConfig, width: int, entity_types: Sequence[str] = ()):
        super().__init__()
        heads = cfg.qfnet_heads
        self.resampler = (
            VisualResampler(width, heads, cfg.resampler_queries, cfg.dropout) if cfg.resampler else None
        )
        self.blocks = nn.ModuleList(MangoBlock(width, heads, cfg.dropout) for _ in range(cfg.stack_layers))
        self.context = nn.MultiheadAttention(width, heads, dropout=cfg.dropout, batch_first=True)
        self.gated = GatedRelevanceFusion(width, cfg.rel_temp)
        self.state: MangoState | None = None

    def forward(self, text, text_mask, visual, visual_mask, pooled=None) -> torch.Tensor:
        """text (B, T, D), text_mask (B, T), visual (B, V, D), visual_mask (B, V) -> (B, T, D)."""
        if self.resampler is not None:
            visual, visual_mask = self.resampler(visual, visual_mask)  # (B, Q, D), (B, Q)
        h = text
        for block in self.blocks:
            h = block(h, text_mask, visual, visual_mask)  # (B, T, D)
        context = masked_attention(self.context, h, visual, visual_mask)  # (B, T, D)
        fused, relevance = self.gated(h, context, visual_mask.any(dim=1))  # (B, T, D), (B, T)
        self.state = MangoState(h, fused, relevance)
        return fused


# ------------------------------------------------------------------------------------------ losses


def warmup_factor(epoch: int | None, warmup_epochs: int) -> float:
    """Linear warm-up of the alignment loss: min(1, epoch / warmup_epochs) for epoch 1, 2, ...

    epoch None (outside the training loop) and warmup_epochs 0 give the full weight.
    """
    if epoch is None or warmup_epochs == 0:
        return 1.0
    return min(1.0, epoch / warmup_epochs)


def _state(inputs: LossInputs) -> MangoState:
    assert isinstance(inputs.fusion_state, MangoState), "the MANGO losses need model.fusion = 'mango'"
    return inputs.fusion_state


class MangoAlignLoss(AuxLoss):
    """Alignment of the stack output and the fused states, weighted by relevance + entity words, warmed up."""

    needs_image = True

    def __init__(self, cfg: ModelConfig, width: int):
        super().__init__()
        self.warmup_epochs = cfg.align_warmup_epochs

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        state = _state(inputs)
        assert inputs.entities is not None, "the MANGO alignment loss needs the entity words"
        # The seed's align_w = attention_mask * (rel_w + entity_mask); the relevance weighs, it is not
        # pushed by this loss (else it would learn to sit where the states already agree).
        weight = inputs.word_mask * (state.relevance.detach() + inputs.entities)  # (B, T)
        distance = 1 - F.cosine_similarity(state.text, state.fused, dim=-1)  # (B, T)
        loss = (distance * weight).sum() / weight.sum().clamp(min=1e-6)
        return warmup_factor(inputs.epoch, self.warmup_epochs) * loss


class MangoPreserveLoss(AuxLoss):
    """MSE between fused and stack states where the image is not relevant (weight 1 - relevance)."""

    needs_image = True

    def __init__(self, cfg: ModelConfig, width: int):
        super().__init__()

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        state = _state(inputs)
        mask = inputs.word_mask.to(state.fused.dtype)  # (B, T)
        per_word = F.mse_loss(state.fused, state.text, reduction="none").mean(dim=-1)  # (B, T)
        return (per_word * mask * (1 - state.relevance)).sum() / mask.sum().clamp(min=1.0)


class MangoNCELoss(AuxLoss):
    """Symmetric InfoNCE of each post's mean word state with its projected CLIP global embedding."""

    needs_image = True

    def __init__(self, cfg: ModelConfig, width: int):
        super().__init__()
        self.tau = cfg.nce_tau

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        assert inputs.pooled is not None and inputs.visual_mask is not None, (
            "mango_nce needs the global embedding"
        )
        has_image = inputs.visual_mask.any(dim=1)  # (B,)
        text = F.normalize(masked_mean(inputs.words, inputs.word_mask)[has_image], dim=-1)  # (N, D)
        image = F.normalize(inputs.pooled[has_image], dim=-1)  # (N, D)
        return info_nce(text, image, self.tau, self.training)


class MangoSparsityLoss(AuxLoss):
    """Mean relevance over the words of posts that have an image: few words should lean on the image."""

    needs_image = True

    def __init__(self, cfg: ModelConfig, width: int):
        super().__init__()

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        state = _state(inputs)
        assert inputs.visual_mask is not None
        mask = inputs.word_mask & inputs.visual_mask.any(dim=1)[:, None]  # (B, T)
        weights = mask.to(state.relevance.dtype)
        return (state.relevance * weights).sum() / weights.sum().clamp(min=1.0)
