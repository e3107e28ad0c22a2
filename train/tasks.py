"""Tasks: what stage two predicts, named by ModelConfig.task (train/registry.py TASKS).

A task says four things: the label vocabulary it reads from the training data, the targets a
batch carries for the head, which heads can score them, and the metric that selects the best epoch.

- tagging: one BIO tag per word (MNER). Labels "O", "B-<type>", "I-<type>"; targets are the
  batch's per-word `labels` (B, T) under `word_mask`; heads score word emissions (B, T, L); the
  metric is entity-level P/R/F1 (train/metrics.py).

Sentence classification (one label per post, the BertResNet seed) will be a second entry: its
labels come from the post's tag column, its targets are (B,), its heads score (B, L).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mner.cache.datasets import Split, label_names
from mner.train.metrics import entity_scores


@dataclass(frozen=True)
class TokenTagging:
    """One BIO tag per word; the model's emissions are (B, T, L) over the label list."""

    heads: tuple[str, ...] = ("crf", "softmax")  # model.head names that fit per-word emissions

    def label_names(self, split: Split) -> list[str]:
        """The label list a run learns: "O", then B-/I- of every type in the training split."""
        return label_names(split)

    def check_labels(self, names: Sequence[str]) -> list[str]:
        """The entity types of a BIO label list, sorted; ValueError when it is not O + B-/I- labels."""
        if not names or names[0] != "O":
            raise ValueError(f"label names must start with 'O', got {list(names)[:3]}")
        bad = [name for name in names[1:] if name[:2] not in ("B-", "I-") or len(name) < 3]
        if bad:
            raise ValueError(f"label names must be 'O', 'B-<type>' or 'I-<type>'; got {bad}")
        if len(set(names)) != len(names):
            raise ValueError(f"label names repeat: {list(names)}")
        types = sorted({name[2:] for name in names[1:]})
        if not types:
            raise ValueError(
                "the label set has no entity type (only 'O'); the training split has no entities"
            )
        return types

    def targets(self, batch: dict, outside: int):
        """(tags (B, T), mask (B, T)): the gold label ids under word_mask, `outside` ("O") elsewhere.

        Padded positions carry -100; the CRF indexes with every tag, so they get a real (ignored) id.
        """
        mask = batch["word_mask"]  # (B, T)
        return batch["labels"].where(mask, outside), mask

    def score(self, gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict:
        """Entity-level micro and per-type P/R/F1 (train.metrics.entity_scores)."""
        return entity_scores(gold, predicted)


TOKEN_TAGGING = TokenTagging()
