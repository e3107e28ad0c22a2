"""Linear-chain CRF over word emissions with BIO-constrained Viterbi decoding.

The likelihood is torchcrf's (pytorch-crf). Decoding is our own Viterbi so that transitions BIO
forbids can be masked out: with `bio_constraints`, O -> I-X, B-X -> I-Y, I-X -> I-Y (Y != X) and
start -> I-X get -inf, so a decoded path is always a valid BIO sequence whatever the emissions.
The constraints apply at decode only; training sees the unconstrained CRF, whose learned
transitions already make illegal moves unlikely (as in AllenNLP's `allowed_transitions`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torchcrf
from torch import nn


def allowed_transitions(label_names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """BIO legality of tag moves.

    Returns:
        allowed (L, L) bool, allowed[i, j] = whether tag j may follow tag i;
        start (L,) bool, whether a post may begin with tag j.
    I-X may only follow B-X or I-X, and may not begin a post; every other move is legal.
    """
    L = len(label_names)
    allowed = torch.ones(L, L, dtype=torch.bool)
    start = torch.ones(L, dtype=torch.bool)
    for j, tag in enumerate(label_names):
        if not tag.startswith("I-"):
            continue
        start[j] = False
        for i, previous in enumerate(label_names):
            allowed[i, j] = previous[:2] in ("B-", "I-") and previous[2:] == tag[2:]
    return allowed, start


def register_bio_masks(module: nn.Module, label_names: Sequence[str], constrained: bool = True) -> None:
    """Give `module` the buffers `allowed` (L, L) and `allowed_start` (L,) of `allowed_transitions` (all
    True when not `constrained`), for `viterbi`; derived from the labels, so not saved in checkpoints."""
    allowed, start = allowed_transitions(label_names)
    if not constrained:
        allowed, start = torch.ones_like(allowed), torch.ones_like(start)
    module.register_buffer("allowed", allowed, persistent=False)
    module.register_buffer("allowed_start", start, persistent=False)


class CRF(nn.Module):
    """CRF over label ids; `nll` for training, `decode` (Viterbi) for prediction."""

    def __init__(self, label_names: Sequence[str], bio_constraints: bool = True):
        super().__init__()
        self.crf = torchcrf.CRF(len(label_names), batch_first=True)
        register_bio_masks(self, label_names, bio_constraints)

    def nll(self, emissions: torch.Tensor, tags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Negative log-likelihood of the gold tags, per post.

        Args:
            emissions: (B, T, L) scores; tags: (B, T) label ids (any valid id where mask is False);
            mask: (B, T) bool, a prefix of True per post with mask[:, 0] all True.
        Returns:
            (B,) -log p(tags | emissions).
        """
        return -self.crf(emissions, tags, mask=mask, reduction="none")

    @torch.no_grad()
    def decode(self, emissions: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
        """Viterbi (see `viterbi`) under the learned transitions, BIO-illegal moves forbidden when
        constrained: the best tag path of each post, as long as its True mask prefix."""
        crf = self.crf
        return viterbi(
            emissions, mask, crf.transitions, crf.start_transitions, crf.end_transitions, self.allowed,
            self.allowed_start,
        )  # fmt: skip


@torch.no_grad()
def viterbi(
    emissions: torch.Tensor,
    mask: torch.Tensor,
    transitions: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    allowed: torch.Tensor,
    allowed_start: torch.Tensor,
) -> list[list[int]]:
    """The best tag path of each post among those whose moves `allowed` and `allowed_start` permit
    (`register_bio_masks`): argmax of start[y_1] + sum_t emissions[t, y_t] + sum_t transitions[y_{t-1},
    y_t] + end[y_n].

    Args:
        emissions: (B, T, L); mask: (B, T) bool, a prefix of True per post (mask[:, 0] may be False
            for a post with no word; it decodes to []); transitions (L, L), [i, j] for i -> j;
            start (L,) and end (L,); allowed (L, L) and allowed_start (L,) bool.
    Returns:
        B lists of label ids, each as long as the post's True mask prefix.
    """
    B, T, L = emissions.shape
    forbid = torch.tensor(float("-inf"), dtype=emissions.dtype, device=emissions.device)
    transitions = torch.where(allowed, transitions, forbid)  # (L, L)
    score = torch.where(allowed_start, start, forbid) + emissions[:, 0]  # (B, L)
    backpointers = []
    for t in range(1, T):
        # candidates[b, i, j]: best path ending in i at t-1, then moving to j at t.
        candidates = score[:, :, None] + transitions[None] + emissions[:, t, None, :]  # (B, L, L)
        best, previous = candidates.max(dim=1)  # (B, L)
        score = torch.where(mask[:, t, None], best, score)
        backpointers.append(previous)
    score = score + end  # (B, L)
    lengths = mask.sum(dim=1).tolist()
    last = score.argmax(dim=1).tolist()
    # One transfer, then plain lists: backtracking is sequential and cheap on the CPU.
    history = (
        torch.stack(backpointers, dim=1).tolist() if backpointers else [[] for _ in range(B)]
    )  # (B, T-1, L)
    paths = []
    for b in range(B):
        path = [last[b]]
        for t in range(lengths[b] - 1, 0, -1):
            path.append(history[b][t - 1][path[-1]])
        paths.append(path[::-1][: lengths[b]])
    return paths
