"""Heads: emissions -> training loss and decoded label ids, named by ModelConfig.head.

Every head has the same two methods, so the model never asks which one it holds:

    loss(emissions (B, T, L), tags (B, T), mask (B, T)) -> (B,) per-post loss
    decode(emissions (B, T, L), mask (B, T)) -> B lists of label ids, one per True mask position

- crf: a linear-chain CRF (train/crf.py); loss is its negative log-likelihood, decode its
  BIO-constrained Viterbi (model.bio_constraints).

A softmax head (token cross-entropy, argmax decode) and a bilstm-crf head (a BiLSTM over the
states before the emission layer, then the CRF) plug in as further entries of registry.HEADS
with a builder (cfg, label_names) -> Head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

import torch

from mner.train.crf import CRF

if TYPE_CHECKING:
    from mner.train.config import ModelConfig


class Head(Protocol):
    """What the model needs from a head (see the module docstring for shapes)."""

    def loss(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...

    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]: ...


class CRFHead(CRF):
    """The CRF as a head: loss = per-post negative log-likelihood, decode = Viterbi."""

    def __init__(self, cfg: ModelConfig, label_names: Sequence[str]):
        super().__init__(label_names, cfg.bio_constraints)

    def loss(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B,) -log p(tags | emissions); see CRF.nll."""
        return self.nll(emissions, tags, mask)
