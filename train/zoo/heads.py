"""Heads: emissions -> training loss and decoded label ids, named by ModelConfig.head.

Every head has the same two methods, so the model never asks which one it holds:

    loss(emissions (B, T, L), tags (B, T), mask (B, T)) -> () the batch's loss, reduced as the head's
                                                            seed reduces it
    decode(emissions (B, T, L), mask (B, T)) -> B lists of label ids, one per True mask position

- crf: a linear-chain CRF (train/zoo/crf.py); loss is its negative log-likelihood, a sum over the
  post's words, averaged over the posts (pytorch-crf's reduction "mean", which the CRF seeds use);
  decode its BIO-constrained Viterbi (model.bio_constraints).
- softmax: per-word cross-entropy of emissions / model.emission_temperature with
  model.label_smoothing, averaged over every word of the batch (MANGO's `(ce * mask).sum() /
  mask.sum()`: a token mean, so its scale does not grow with post length next to MANGO's auxiliary
  weights); decode is each word's argmax (MANGO's `emissions.argmax(dim=-1)`) or, with
  model.bio_constraints, the most probable BIO-legal path of the per-word distributions
  softmax(emissions / T) (Viterbi over their log-probabilities, no learned transitions). Any model may
  use it.

A BiLSTM before the emission layer is not a head but the model switch model.bilstm, so it
combines with either head (bert-bilstm-crf = text_only + bilstm + crf).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from mner.train.zoo.crf import CRF, register_bio_masks, viterbi

if TYPE_CHECKING:
    from mner.train.engine.config import ModelConfig


class Head(Protocol):
    """What the model needs from a head (see the module docstring for shapes)."""

    def loss(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...

    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]: ...


class CRFHead(CRF):
    """The CRF as a head: loss = negative log-likelihood averaged over the posts, decode = Viterbi."""

    def __init__(self, cfg: ModelConfig, label_names: Sequence[str]):
        super().__init__(label_names, cfg.bio_constraints)

    def loss(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """() mean over the posts of -log p(tags | emissions); see CRF.nll."""
        return self.nll(emissions, tags, mask).mean()


class SoftmaxHead(nn.Module):
    """Independent per-word classification: cross-entropy loss; argmax decode, or the most probable
    BIO-legal path with model.bio_constraints. No parameters."""

    def __init__(self, cfg: ModelConfig, label_names: Sequence[str]):
        super().__init__()
        self.label_smoothing = cfg.label_smoothing
        self.temperature = cfg.emission_temperature
        # The decode reads the masks only when constrained; they are BIO's either way, so that a loaded
        # model can be decoded constrained by setting this flag (bench_text_states does).
        self.constrained = cfg.bio_constraints
        register_bio_masks(self, label_names)

    def loss(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """() mean over the True mask positions of the batch of the word's smoothed cross-entropy.

        emissions (B, T, L), tags (B, T) label ids, mask (B, T) bool.
        """
        B, T, L = emissions.shape
        per_word = F.cross_entropy(
            (emissions / self.temperature).reshape(B * T, L),
            tags.reshape(B * T),
            label_smoothing=self.label_smoothing,
            reduction="none",
        ).view(B, T)  # (B, T)
        weights = mask.to(per_word.dtype)
        return (per_word * weights).sum() / weights.sum().clamp(min=1)  # ()

    @torch.no_grad()
    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """The label ids of every True mask position (mask must be a prefix per post): each word's best,
        or, constrained, the path of legal moves with the highest sum of log-probabilities."""
        if not self.constrained:
            best = emissions.argmax(dim=-1)  # (B, T)
            return [row[: int(n)].tolist() for row, n in zip(best, mask.sum(dim=1))]
        log_p = F.log_softmax(emissions.float() / self.temperature, dim=-1)  # (B, T, L)
        L = log_p.shape[-1]
        free = log_p.new_zeros(L)  # no start, move or end score: only the masks shape the path
        return viterbi(log_p, mask, log_p.new_zeros(L, L), free, free, self.allowed, self.allowed_start)
