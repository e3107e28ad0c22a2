"""The classification task's data for the training loop: a split's posts with their image features
and frozen text states (`ClassPosts`), the collate, the loader, and the split as the text-state cache
sees it (`class_text_posts`); as train/engine/data.py is tagging's. The task's run is
train/engine/classify.py's.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from mner.cache.classification import ClassSplit
from mner.cache.reader import CacheReader
from mner.train.engine.classifier_config import ClassifierConfig
from mner.train.engine.data import collate_text_states
from mner.train.engine.text_states import TextPosts, texts_part
from mner.train.zoo.classifier_model import reads_tokens


class ClassPosts(torch.utils.data.Dataset):
    """The examples of one split with their image features (read lazily from the cache) and, with the
    split's text-state cache (classifier.text_frozen_layers > 0), their frozen text states."""

    def __init__(
        self,
        split: ClassSplit,
        reader: CacheReader | None,
        label_ids: dict,
        tokens: bool,
        patches: bool,
        text_states=None,
    ):
        self.examples = split.examples
        self.reader, self.label_ids, self.tokens, self.patches = reader, label_ids, tokens, patches
        self.text_states = text_states

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> dict:
        example = self.examples[index]
        item = {"key": example.guid, "text": example.text, "label": self.label_ids.get(example.label, -100)}
        if self.text_states is not None:
            item["text_ids"], item["text_states"] = self.text_states.get(index, example.guid)  # (S,), (S, D)
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
        return item


def collate_posts(tokenizer, max_length: int):
    """The classifier's collate: labels (B,), the tokenised texts (B, S), the image features, and the
    cached frozen text states (B, S, D) when the items carry them."""

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
            if "text_states" in items[0]:
                batch["text_states"] = collate_text_states(
                    items, encoded["input_ids"], encoded["attention_mask"]
                )  # (B, S, D)
        if "image" in items[0]:
            batch["image"] = torch.stack([item["image"] for item in items])  # (B, Di) or (B, P, Dp)
            batch["has_image"] = torch.tensor([item["has_image"] for item in items])  # (B,)
        return batch

    return collate


def post_loader(
    split,
    reader,
    labels: list[str],
    tokenizer,
    cfg: ClassifierConfig,
    shuffle: bool,
    seed: int,
    sampler=None,
    text_states=None,
):
    """Batches of `split` for the classifier of `cfg` (label ids from the run's label list), shuffled
    by a generator seeded with `seed`, or drawn by `sampler` (a rank's DistributedSampler); with the
    split's `text_states` the batches carry "text_states" (B, S, D)."""
    label_ids = {label: i for i, label in enumerate(labels)}
    tokens = reads_tokens(cfg.head, cfg.mode)
    posts = ClassPosts(split, reader, label_ids, tokens, cfg.image_feature == "patches", text_states)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        posts,
        batch_size=cfg.batch_size,
        shuffle=shuffle,
        sampler=sampler,
        generator=generator,
        collate_fn=collate_posts(tokenizer, cfg.max_length),
    )


def class_text_posts(split: ClassSplit, tokenizer, max_length: int) -> TextPosts:
    """A classification split as the text-state cache sees it: its texts tokenised by the training
    collate, identified by its guids and texts (`texts_part`)."""
    return TextPosts(
        name=split.name,
        path=split.path,
        keys=[e.guid for e in split.examples],
        data_file=texts_part(
            split.path, split.name, [e.guid for e in split.examples], [e.text for e in split.examples]
        ),
        items=ClassPosts(split, None, {}, False, False),
        collate=collate_posts(tokenizer, max_length),
        tokenizer=tokenizer,
        max_length=max_length,
    )
