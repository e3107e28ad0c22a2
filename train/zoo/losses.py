"""Auxiliary training losses, added to the head's loss with a weight each (registry.AUX_LOSSES).

    loss = head loss + sum over aux losses of weight_i * loss_i

Each loss's weight is its own ModelConfig field (AUX_LOSSES.weights); a weight of 0 turns that loss
off (it is not built, not computed, and reported as 0) and changes nothing else. A loss that
`needs_image` is off for a text-only model. A loss is an nn.Module built by (cfg, width), so one
that needs parameters (a type-presence classifier, a projection) owns them; it reads what the
model computed from `LossInputs` and returns a scalar.

- align (AFNER's and AFDVQF's alignment loss; CLIP's contrastive objective): symmetric InfoNCE between
  each post's text, the encoder's [CLS] state (model.alignment_pooling "cls", the originals' default)
  or its mean word state ("mean"), and its mean visual token, over the posts that have an image
  (contrastive_loss in liguochun0304/AFDVQF@034b93f, model/loss_functions.py). Under DDP
  (training, world size > 1) the negatives are every rank's posts, as CLIP trains: each rank gathers
  all ranks' embeddings (its own keep their gradient) and computes the loss of the union batch, so
  the loss, and after DDP's gradient averaging the update, are those of one process on the union.
- slot_type (ours; off in every model file): QGF's query slots of type i are rows
  i * slots_per_type ... (i + 1) * slots_per_type - 1; the mean of each type's final slots goes
  through one shared Linear(D, 1) to a logit of "this post holds an entity of type i", trained by
  binary cross-entropy against the gold tags (mean over posts and types). In the originals the slots
  never reach the words, so without this loss they do not change a prediction. It reads the fusion's
  final slots (a fusion with `exposes_slots`).
- mango_align, mango_preserve, mango_nce, mango_sparsity: MANGO's losses, in train/zoo/mango.py beside
  the fusion whose relevance they read (LossInputs.fusion_state); mango_nce shares `info_nce`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from mner.train.engine.config import ModelConfig


@dataclass
class LossInputs:
    """What the model computed in one training forward, for the auxiliary losses to read."""

    words: torch.Tensor  # (B, T, D) word states before fusion
    word_mask: torch.Tensor  # (B, T)
    emissions: torch.Tensor  # (B, T, L)
    visual: torch.Tensor | None  # (B, V, D) visual tokens; None for a text-only model
    visual_mask: torch.Tensor | None  # (B, V); all False for a post whose image is masked
    # final query slots of a fusion that has them (QGF, `exposes_slots`), else None
    slots: torch.Tensor | None = None  # (B, Q, D), Q = E * slots_per_type, type-major
    # gold: does post b hold an entity of type e (types sorted, as the slots); None unless a loss needs it
    type_presence: torch.Tensor | None = None  # (B, E) float 0/1
    # Optional, for the losses of one model (None where the model has none; train/zoo/mango.py reads them):
    pooled: torch.Tensor | None = None  # (B, D) projected global image embedding, 0 for a masked image
    text_cls: torch.Tensor | None = None  # (B, D) the encoder's [CLS] state (sub-word 0)
    entities: torch.Tensor | None = None  # (B, T) bool: the word's target tag is not O
    fusion_state: object | None = None  # what the fusion kept of its forward (MangoFusion.state)
    epoch: int | None = None  # the training epoch (1, 2, ...) for warm-ups; None outside training


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
        self.pooling = cfg.alignment_pooling

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        visual, visual_mask = inputs.visual, inputs.visual_mask
        assert visual is not None and visual_mask is not None, "the alignment loss needs the visual tokens"
        has_image = visual_mask.any(dim=1)  # (B,)
        if self.pooling == "cls":
            assert inputs.text_cls is not None, "alignment_pooling 'cls' needs the [CLS] state"
            pooled_text = inputs.text_cls  # (B, D)
        else:
            pooled_text = masked_mean(inputs.words, inputs.word_mask)  # (B, D)
        text = F.normalize(pooled_text[has_image], dim=-1)  # (N_r, D)
        image = F.normalize(masked_mean(visual, visual_mask)[has_image], dim=-1)  # (N_r, D)
        return info_nce(text, image, self.temperature, self.training)


def info_nce(
    text: torch.Tensor, image: torch.Tensor, temperature: float, training: bool, symmetric: bool = True
) -> torch.Tensor:
    """InfoNCE of matching rows of text (N, D) and image (N, D), both L2-normalised -> scalar: the mean of
    the text -> image and image -> text cross-entropies, or (symmetric false) the first alone.

    0 with fewer than two pairs. While training under DDP the negatives are every rank's rows.
    """
    world = dist.get_world_size() if training and dist.is_available() and dist.is_initialized() else 1
    if world > 1:
        # Every rank takes part in the gathers, even one whose batch has no image.
        text, image = gather_rows(text), gather_rows(image)  # (N, D) each, N over all ranks
    if text.shape[0] < 2:
        # One pair has no negative to contrast with; the loss would be a constant 0.
        return text.new_zeros(())
    logits = text @ image.T / temperature  # (N, N)
    target = torch.arange(logits.shape[0], device=logits.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = (loss + F.cross_entropy(logits.T, target)) / 2
    if world > 1:
        # Each rank back-propagates only through its own rows, and DDP divides the summed gradients
        # by the world size; scaling the gradient (not the value) by it gives the union's gradient.
        loss = loss + (world - 1) * (loss - loss.detach())
    return loss


class SlotTypeLoss(AuxLoss):
    """BCE of a per-type presence logit from the mean of each type's final query slots."""

    needs_image = True  # the slots exist only in a multimodal model's fusion
    needs_slots = True  # the model refuses a fusion without `exposes_slots`

    def __init__(self, cfg: ModelConfig, width: int):
        super().__init__()
        self.slots_per_type = cfg.slots_per_type
        self.classifier = nn.Linear(width, 1)  # shared by the types: the slots carry the type

    def logits(self, slots: torch.Tensor) -> torch.Tensor:
        """slots (B, E * slots_per_type, D) -> presence logits (B, E)."""
        B, Q, D = slots.shape
        assert Q % self.slots_per_type == 0, "slots must be whole groups of slots_per_type"
        pooled = slots.view(B, Q // self.slots_per_type, self.slots_per_type, D).mean(dim=2)  # (B, E, D)
        return self.classifier(pooled).squeeze(-1)  # (B, E)

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        assert inputs.slots is not None and inputs.type_presence is not None, "slot_type needs the slots"
        logits = self.logits(inputs.slots.float())  # (B, E)
        return F.binary_cross_entropy_with_logits(logits, inputs.type_presence.to(logits.dtype))


def type_presence(tags: torch.Tensor, mask: torch.Tensor, label_type: torch.Tensor, num_types: int):
    """(B, E) float: 1 where post b has a word under mask (B, T) whose tag (B, T) is of type e.

    label_type (L,) maps a label id to its type index, -1 for O.
    """
    types = label_type[tags].masked_fill(~mask, -1)  # (B, T) in [-1, E)
    hits = torch.zeros(tags.shape[0], num_types + 1, device=tags.device)  # column 0 collects O
    return hits.scatter_(1, types + 1, 1.0)[:, 1:]  # (B, E)


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """(N_r, D) rows of every rank -> (N, D) in rank order; this rank's rows keep their gradient, the
    others' are copies. Ranks may hold different numbers of rows (posts without an image are dropped)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    count = torch.tensor([x.shape[0]], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    padded = x.new_zeros((max(sizes), *x.shape[1:]))  # all_gather needs one shape on every rank
    padded[: x.shape[0]] = x.detach()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    rows = [part[:size] for part, size in zip(parts, sizes)]
    rows[rank] = x
    return torch.cat(rows)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, N, D) over positions where mask (B, N) is True -> (B, D); zero for an empty row."""
    weights = mask.to(x.dtype)[..., None]  # (B, N, 1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
