"""The classification task's batches (the BertResNet seed), as train/engine/data.py is tagging's: the
examples of a split with their cached image features (`post_loader`), and the train split's statistics
of those features (`image_statistics`, for classifier.image_norm "standard"). The training is
train/engine/classify.py's.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from mner.cache.classification import ClassSplit
from mner.cache.reader import CacheReader
from mner.cache.spec import VISION_STATE
from mner.train.engine.classifier_config import ClassifierConfig
from mner.train.engine.data import stack_vision_states
from mner.train.zoo.classifier_model import reads_tokens


class Posts(torch.utils.data.Dataset):
    """The examples of one split with their image features (read lazily from the cache), and with
    `vision_state` each record's state before the trainable vision blocks."""

    def __init__(
        self,
        split: ClassSplit,
        reader: CacheReader | None,
        label_ids: dict,
        tokens: bool,
        patches: bool,
        vision_state: bool = False,
    ):
        self.examples = split.examples
        self.reader, self.label_ids, self.tokens, self.patches = reader, label_ids, tokens, patches
        assert not vision_state or reader.spec.has_vision_state  # trainable_vision_blocks refused it
        self.vision_state = vision_state

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        item = {"text": example.text, "label": self.label_ids.get(example.label, -100)}
        if self.reader is not None:
            record = self.reader.get(example.guid)
            if self.tokens:
                image = record.patch_tokens  # (P, Dp)
            elif self.patches:
                image = record.patch_tokens.astype(np.float32).mean(0)  # (Dp,)
            else:
                image = record.global_embed  # (Dg,)
            item.update(
                image=torch.from_numpy(np.asarray(image, dtype=np.float32)), has_image=record.status == "ok"
            )
            if self.vision_state:
                item[VISION_STATE] = record.vision_state  # (C3, H3, W3) | (P, Dp) float16
        return item


def collate_posts(tokenizer, max_length: int):
    """The classifier's collate: labels (B,), the tokenised texts (B, S), the image features."""

    def collate(items: list[dict]) -> dict:
        batch = {"labels": torch.tensor([item["label"] for item in items])}
        if tokenizer is not None:
            encoded = tokenizer(
                [item["text"] for item in items],
                truncation=True,
                max_length=max_length,
                padding=True,
                return_tensors="pt",
            )
            batch.update(input_ids=encoded["input_ids"], attention_mask=encoded["attention_mask"])  # (B, S)
        if "image" in items[0]:
            batch["image"] = torch.stack([item["image"] for item in items])  # (B, Di) or (B, P, Dp)
            batch["has_image"] = torch.tensor([item["has_image"] for item in items])  # (B,)
        if VISION_STATE in items[0]:
            batch[VISION_STATE] = stack_vision_states(items)  # (B, C3, H3, W3) | (B, P, Dp)
        return batch

    return collate


def post_loader(
    split, reader, labels: list[str], tokenizer, cfg: ClassifierConfig, shuffle: bool, seed: int, sampler=None
):
    """Batches of `split` for the classifier of `cfg` (label ids from the run's label list), shuffled
    by a generator seeded with `seed`, or drawn by `sampler` (a rank's DistributedSampler)."""
    label_ids = {label: i for i, label in enumerate(labels)}
    tokens = reads_tokens(cfg.head, cfg.mode)
    vision_state = reader is not None and cfg.trained_blocks > 0
    posts = Posts(split, reader, label_ids, tokens, cfg.image_feature == "patches", vision_state)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        posts,
        batch_size=cfg.batch_size,
        shuffle=shuffle,
        sampler=sampler,
        generator=generator,
        collate_fn=collate_posts(tokenizer, cfg.max_length),
    )


def image_statistics(
    train: ClassSplit, reader: CacheReader, c: ClassifierConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-dimension mean and (population) std (D,) of the image feature the head of `c` reads,
    over the train posts with a usable image (every patch token of each for xattn); (0, 1) when none has
    one. Accumulated in float64."""
    posts = Posts(train, reader, {}, reads_tokens(c.head, c.mode), c.image_feature == "patches")
    total = squares = None
    count = 0
    for item in posts:
        if not item["has_image"]:
            continue
        rows = item["image"].double().reshape(-1, item["image"].shape[-1])  # (1 or P, D)
        total = rows.sum(0) if total is None else total + rows.sum(0)
        squares = (rows**2).sum(0) if squares is None else squares + (rows**2).sum(0)
        count += rows.shape[0]
    if count == 0:
        dim = reader.spec.patch_dim if posts.tokens or posts.patches else reader.spec.global_dim
        return torch.zeros(dim), torch.ones(dim)
    mean = total / count
    std = (squares / count - mean**2).clamp_min(0).sqrt()
    return mean.float(), std.float()
