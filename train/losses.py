"""Auxiliary training losses, added to the head's loss with a weight each (registry.AUX_LOSSES).

    loss = head loss + sum over aux losses of weight_i * loss_i

Each loss's weight is its own ModelConfig field (AUX_LOSSES.weights); a weight of 0 turns that loss
off (it is not built, not computed, and reported as 0) and changes nothing else. A loss that
`needs_image` is off for a text-only model. A loss is an nn.Module built by (cfg, width), so one
that needs parameters (a type-presence classifier, a projection) owns them; it reads what the
model computed from `LossInputs` and returns a scalar.

- align (AFDVQF's alignment loss; CLIP's contrastive objective): symmetric InfoNCE between each
  post's mean word state and its mean visual token, over the posts that have an image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from mner.train.config import ModelConfig


@dataclass
class LossInputs:
    """What the model computed in one training forward, for the auxiliary losses to read."""

    words: torch.Tensor  # (B, T, D) word states before fusion
    word_mask: torch.Tensor  # (B, T)
    emissions: torch.Tensor  # (B, T, L)
    visual: torch.Tensor | None  # (B, V, D) visual tokens; None for a text-only model
    visual_mask: torch.Tensor | None  # (B, V); all False for a post whose image is masked


class AuxLoss(nn.Module):
    """Base of the auxiliary losses: forward(LossInputs) -> scalar."""

    needs_image = False  # off (never built) for a text-only model

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        raise NotImplementedError


class AlignmentLoss(AuxLoss):
    """Symmetric InfoNCE over the posts that have an image: post i's text should match image i."""

    needs_image = True

    def __init__(self, cfg: ModelConfig, width: int):
        super().__init__()
        self.temperature = cfg.alignment_temperature

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        words, visual, visual_mask = inputs.words, inputs.visual, inputs.visual_mask
        assert visual is not None and visual_mask is not None, "the alignment loss needs the visual tokens"
        has_image = visual_mask.any(dim=1)  # (B,)
        if int(has_image.sum()) < 2:
            # One pair has no negative to contrast with; the loss would be a constant 0.
            return words.new_zeros(())
        text = masked_mean(words, inputs.word_mask)[has_image]  # (N, D)
        image = masked_mean(visual, visual_mask)[has_image]  # (N, D)
        logits = F.normalize(text, dim=-1) @ F.normalize(image, dim=-1).T / self.temperature  # (N, N)
        target = torch.arange(logits.shape[0], device=logits.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, N, D) over positions where mask (B, N) is True -> (B, D); zero for an empty row."""
    weights = mask.to(x.dtype)[..., None]  # (B, N, 1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
