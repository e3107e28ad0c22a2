"""The classification task's data for the training loop (the BertResNet seed), as train/engine/data.py is
tagging's: a split's posts with their cached image features, the state before the trainable vision blocks
and frozen text states (`ClassPosts`), the collate, the loader (`post_loader`), the split as the
text-state cache sees it (`class_text_posts`) and the train split's statistics of the image features
(`image_statistics`, for classifier.image_norm "standard"), and a run's text-state caches
(`text_states_of`, `text_state_build`). The task's run is train/engine/classify.py's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from mner.cache.classification import ClassData, ClassSplit, read_classification
from mner.cache.reader import CacheReader
from mner.cache.spec import VISION_STATE
from mner.train.engine.classifier_config import ClassifierConfig, ClassifierRunConfig
from mner.train.engine.data import collate_text_states, stack_vision_states
from mner.train.engine.text_states import (
    TextPosts,
    TextStateBuild,
    check_text_cache_root,
    prepare_text_states,
    texts_part,
)
from mner.train.zoo.classifier_model import reads_tokens
from mner.train.zoo.text import load_tokenizer, resolve_text_encoder


class ClassPosts(torch.utils.data.Dataset):
    """The examples of one split with their image features (read lazily from the cache), with
    `vision_state` each record's state before the trainable vision blocks and, with the split's
    text-state cache (classifier.text_frozen_layers > 0), their frozen text states."""

    def __init__(
        self,
        split: ClassSplit,
        reader: CacheReader | None,
        label_ids: dict,
        tokens: bool,
        patches: bool,
        text_states=None,
        vision_state: bool = False,
    ):
        self.examples = split.examples
        self.reader, self.label_ids, self.tokens, self.patches = reader, label_ids, tokens, patches
        self.text_states = text_states
        assert not vision_state or reader.spec.has_vision_state  # trainable_vision_blocks refused it
        self.vision_state = vision_state

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
            if self.vision_state:
                item[VISION_STATE] = record.vision_state  # (C3, H3, W3) | (P, Dp) float16
        return item


def collate_posts(tokenizer, max_length: int):
    """The classifier's collate: labels (B,), the tokenised texts (B, S), the image features, the state
    before the trainable vision blocks and the cached frozen text states (B, S, D) when the items carry them."""

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
        if VISION_STATE in items[0]:
            batch[VISION_STATE] = stack_vision_states(items)  # (B, C3, H3, W3) | (B, P, Dp)
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
    split's `text_states` the batches carry "text_states" (B, S, D), with trained vision blocks
    "vision_state"."""
    label_ids = {label: i for i, label in enumerate(labels)}
    tokens = reads_tokens(cfg.head, cfg.mode)
    vision_state = reader is not None and cfg.trained_blocks > 0
    posts = ClassPosts(
        split, reader, label_ids, tokens, cfg.image_feature == "patches", text_states, vision_state
    )
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


def image_statistics(
    train: ClassSplit, reader: CacheReader, c: ClassifierConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-dimension mean and (population) std (D,) of the image feature the head of `c` reads,
    over the train posts with a usable image (every patch token of each for xattn); (0, 1) when none has
    one. Accumulated in float64."""
    posts = ClassPosts(train, reader, {}, reads_tokens(c.head, c.mode), c.image_feature == "patches")
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


def text_states_of(cfg: ClassifierRunConfig, model, data: ClassData, tokenizer, encoder_dir, runtime) -> dict:
    """{split: its text-state cache} with classifier.text_frozen_layers > 0 and a text encoder (built
    once, then reused by every run of the same encoder, tokenizer, max_length, N and texts); {} otherwise."""
    if not model.frozen_layers:
        return {}
    root = text_cache_root_of(cfg)
    return {
        name: prepare_text_states(
            model.encoder,
            model.frozen_layers,
            class_text_posts(split, tokenizer, cfg.classifier.max_length),
            encoder_dir,
            root,
            runtime,
        )
        for name, split in data.splits.items()
    }


def text_cache_root_of(cfg: ClassifierRunConfig, out_dir=None) -> Path:
    """The run's text-state root, refused inside one of its input or output folders (`out_dir`: the
    folder that holds the run, the run folder itself by default)."""
    return check_text_cache_root(
        cfg.text_cache,
        [
            ("the feature cache", cfg.cache_dir),
            ("the data folder", cfg.data.data_dir),
            ("the run folder", cfg.out_dir if out_dir is None else out_dir),
        ],
    )


def text_state_build(cfg: ClassifierRunConfig, out_dir) -> TextStateBuild | None:
    """The text-state caches a classifier run of `cfg` reads (None with classifier.text_frozen_layers = 0
    or in mode image), for an ablation to build before its first arm; `out_dir` is the ablation folder."""
    c = cfg.classifier
    if not c.text_frozen_layers or c.mode == "image":
        return None
    encoder_dir = resolve_text_encoder(c.text_encoder)
    tokenizer = load_tokenizer(encoder_dir)
    data = read_classification(cfg.data)
    posts = [class_text_posts(split, tokenizer, c.max_length) for split in data.splits.values()]
    return TextStateBuild(
        encoder_dir, c.text_frozen_layers, posts, text_cache_root_of(cfg, out_dir), c.device
    )
