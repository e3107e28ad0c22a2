"""MANGO (seed 003): visual resampler -> multimodal Transformer stack -> gated relevance fusion, + its losses.

Read top to bottom, as the seed's README describes the model ("多模态Transformer Stack", "门控相关性融合",
"多任务损失函数设计"); the knobs keep the seed's names (rel_temp, align_lambda, nce_tau, ...). Where the
README is silent the code decides: its parts and defaults from liguochun0304/AFDVQF@a20bc9e (model.py,
config.py, the README's commit), their wiring from the last model.py that used them, @d3b9439
(MultimodalNER.forward):

    visual tokens (B, V, D) (CLIP patches, CLS dropped) --VisualResampler--> (B, Q, D)  LN(attn(queries))
    words (B, T, D) --stack_layers x MangoBlock--> h (B, T, D): self-attn, cross-attn to the Q tokens, FFN
    words, h --GatedRelevanceFusion--> words + alpha * g * proj([LN(words); LN(h) * rel])
        rel = sigmoid(rel_head([LN(words); LN(h)]) / rel_temp)  (B, T, 1), rel_head a 2-layer MLP
    dropout on the words before all this and on the fused states after it; the model's classifier is
    LayerNorm + Linear (model.emission_norm), the softmax head's emissions divided by 2.5

Losses (registry.AUX_LOSSES, weights model.<name>_lambda; 0 is off):
    mango_align     sum_t w_t (1 - cos(words_t, fused_t) + 0.3 |fused_t - words_t|^2 / D) / (sum_t w_t + 1e-6),
                    w = word_mask * (rel + entity) (rel detached: a weight, not a target), times the
                    warm-up factor min(1, epoch / warmup) (compute_alignment_loss_v2)
    mango_preserve  sum_t mask_t (1 - rel_t) |fused_t - words_t|^2 / D / sum_t mask_t
    mango_nce       text -> image InfoNCE (tau = nce_tau) of the mean word state with the CLS state through
                    the patch projection (model.global_from_cls), over the posts that have an image
    mango_sparsity  mean relevance over the words of posts that have an image

The fusion keeps what its losses read in `MangoFusion.state` after each forward (MangoState: the word
states, the fused states and the relevance); the model hands it to the losses as
LossInputs.fusion_state. A post with no usable image gets no gated update and relevance 0: its output
is bitwise the one the model gives with no image.

Deviations from the original, each with its reason (README models table):
- forced by the cache: its optional dual-granularity vision encoder (--use_dual_granularity) reads the
  pixels. CLIP's last 2 blocks train at clip_lr 1e-5 (the README's "选择性解冻CLIP的最后2个block",
  model.vision_trainable_blocks = 2) on the state the cache stores before them.
- "视觉编码器预热" (the README's first epochs of text-only training) is not done: the original code has no
  such step.
- the original's align warm-up reads `current_epoch`, which its train.py never sets (always 0): its
  alignment loss is always 0, a bug; here the loop sets model.epoch, so the README's 5-epoch warm-up runs.
- sparsity is the mean over the words of posts with an image; the original's rel.mean() also averages
  the padding positions, so its size depends on how a batch is padded (a bug).
- image dropout drops each post's image (model.image_dropout); the original drops the whole batch's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mner.train.zoo.fusion import feed_forward, masked_attention
from mner.train.zoo.losses import AuxLoss, LossInputs, info_nce, masked_mean

if TYPE_CHECKING:
    from mner.train.engine.config import ModelConfig


class VisualResampler(nn.Module):
    """The original's VisualResampler (liguochun0304/AFDVQF@a20bc9e model.py:243-256): Q learned queries
    (standard normal) read the visual tokens, then LayerNorm; no residual, no FFN."""

    def __init__(self, width: int, heads: int, queries: int, dropout: float):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(queries, width))  # (Q, D)
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.ln = nn.LayerNorm(width)

    def forward(self, visual: torch.Tensor, visual_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """visual (B, V, D), visual_mask (B, V) -> tokens (B, Q, D), mask (B, Q).

        A post with no visible token gets an all-False mask (and zero tokens): a learned query that saw
        nothing is still a vector, and the stack must not read it.
        """
        has_image = visual_mask.any(dim=1)  # (B,)
        x = self.queries.expand(visual.shape[0], -1, -1)  # (B, Q, D)
        x = self.ln(masked_attention(self.attention, x, visual, visual_mask))  # (B, Q, D)
        mask = has_image[:, None].expand(-1, x.shape[1])  # (B, Q)
        return x.masked_fill(~mask[..., None], 0.0), mask


class MangoBlock(nn.Module):
    """One block of the multimodal stack: words self-attend, then read the visual tokens, then FFN."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.self_attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.cross_attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        # The original's CrossAttentionBlock FFN: D -> 4D -> ReLU -> D, dropout after each.
        self.ffn = feed_forward(width, dropout, nn.ReLU)
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
    """The seed's GatedConcatFusion (liguochun0304/AFDVQF@a20bc9e model.py:108-140): a per-word relevance
    (a 2-layer MLP, temperature rel_temp) scales the image context, a sigmoid gate (bias from -1.5) and a
    learned scale alpha (from 0.02) the update added to the words (model.gate_bias_init / gate_alpha_init)."""

    def __init__(self, width: int, rel_temp: float, alpha_init: float = 0.02, gate_bias: float = -1.5):
        super().__init__()
        self.rel_temp = rel_temp
        self.ln_t = nn.LayerNorm(width)
        self.ln_v = nn.LayerNorm(width)
        self.rel_head = nn.Sequential(nn.Linear(2 * width, width), nn.ReLU(), nn.Linear(width, 1))
        self.proj = nn.Linear(2 * width, width)
        self.gate = nn.Linear(2 * width, width)
        # The original's inits: the gate starts mostly closed and the update small, so training starts
        # from the text model's states.
        nn.init.constant_(self.gate.bias, gate_bias)
        self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))

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

    text: torch.Tensor  # (B, T, D) the word states before fusion (the original's txt)
    fused: torch.Tensor  # (B, T, D) the gated fusion's output
    relevance: torch.Tensor  # (B, T) in (0, 1); 0 for a post with no image


class MangoFusion(nn.Module):
    """registry.FUSIONS "mango": resampler (unless model.resampler is false) -> stack -> gated fusion."""

    # VisualTokenBuilder builds the projection of the cached CLIP global embedding: mango_nce contrasts
    # the text with it (the seed's clip_proj(v_cls)); the fusion itself does not read it.
    uses_pooled = True
    # The original drops out the encoder's states before the fusion and the losses, `txt =
    # self.dropout(txt)`, and the fused states again before the classifier, `fused = self.dropout(fused)`
    # (liguochun0304/AFDVQF@d3b9439 model.py:355, :429): a post without an image passes both.
    drops_text = True
    drops_fused = True

    def __init__(self, cfg: ModelConfig, width: int, entity_types: Sequence[str] = ()):
        super().__init__()
        heads = cfg.qfnet_heads
        self.resampler = (
            VisualResampler(width, heads, cfg.resampler_queries, cfg.dropout) if cfg.resampler else None
        )
        self.blocks = nn.ModuleList(MangoBlock(width, heads, cfg.dropout) for _ in range(cfg.stack_layers))
        self.gated = GatedRelevanceFusion(width, cfg.rel_temp, cfg.gate_alpha_init, cfg.gate_bias_init)
        self.state: MangoState | None = None

    def forward(self, text, text_mask, visual, visual_mask, pooled=None) -> torch.Tensor:
        """text (B, T, D), text_mask (B, T), visual (B, V, D), visual_mask (B, V) -> (B, T, D)."""
        if self.resampler is not None:
            visual, visual_mask = self.resampler(visual, visual_mask)  # (B, Q, D), (B, Q)
        h = text
        for block in self.blocks:
            h = block(h, text_mask, visual, visual_mask)  # (B, T, D)
        # The original fuses the encoder's words with their image-attended states: fusion(txt, txt_ctx),
        # txt_ctx = cross_attn(txt, img_tokens) (liguochun0304/AFDVQF@d3b9439 model.py, MultimodalNER).
        fused, relevance = self.gated(text, h, visual_mask.any(dim=1))  # (B, T, D), (B, T)
        self.state = MangoState(text, fused, relevance)
        return fused


# ------------------------------------------------------------------------------------------ losses


# compute_alignment_loss_v2's beta: the weight of the MSE next to 1 - cosine.
ALIGN_BETA = 0.3


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
        # compute_alignment_loss_v2 (liguochun0304/AFDVQF@a20bc9e model.py:276-291): 1 - cosine plus
        # 0.3 x the MSE, "to hold the fusion's direction and lightly penalise a shift in magnitude".
        cosine = (F.normalize(state.text, dim=-1) * F.normalize(state.fused, dim=-1)).sum(dim=-1)  # (B, T)
        mse = F.mse_loss(state.fused, state.text, reduction="none").mean(dim=-1)  # (B, T)
        loss = ((1 - cosine + ALIGN_BETA * mse) * weight).sum() / (weight.sum() + 1e-6)
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
    """Text-to-image InfoNCE of each post's mean word state with its projected CLIP global embedding."""

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
        # The original's info_nce is one-directional: text -> image only (model.py:294-298).
        return info_nce(text, image, self.tau, self.training, symmetric=False)


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
