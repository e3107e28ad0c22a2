"""Posts + cached image tokens -> the batch dict of docs/design.md ("Stage two batches").

`PostDataset` pairs each post with its cached record (read through `cache.reader.CacheReader`,
which opens its HDF5 files lazily in whichever process calls it, so DataLoader workers are safe).
A post whose image is not in the cache, or whose status is not "ok", gets zero tokens and
`image_mask` False: the model then ignores its image entirely. Nothing is ever substituted for a
missing image (AFNER's `no_images.jpg` fallback would teach the model a fake picture).

`Collate` tokenises the pre-split words, keeps each word's FIRST sub-word (labels live on
words, not sub-words) and records what truncation cut: words whose first sub-word does not fit in
`max_length` get `word_mask` False, are predicted O and still count against recall when scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from mner.cache.conll import Post, Split, tag_line
from mner.cache.reader import CacheReader
from mner.cache.spec import VISION_STATE, Record, TokenSpec, empty_record
from mner.train.engine.config import ModelConfig, TrainConfig

# Label id of positions that are not words (padding); ignored by every loss.
IGNORE_INDEX = -100
# Record arrays copied into a dataset item, and the dtype each becomes in the batch.
_VISUAL_ARRAYS = {
    "patch_tokens": torch.float32,
    "global_embed": torch.float32,
    "region_feats": torch.float32,
    "region_labels": torch.long,
    "region_scores": torch.float32,
    "region_boxes": torch.float32,
}


class PostDataset(Dataset):
    """Posts with (optionally) their cached image tokens.

    Each item is a dict: "key", "path", "line", "words" (list[str]), "tags" (list[str]) and, when a reader is
    given, "image_ok" (bool), "num_regions" (int) and the record arrays "patch_tokens" (P, Dp),
    "global_embed" (Dg,), "region_feats" (K, Dr), "region_labels" (K,), "region_scores" (K,),
    "region_boxes" (K, 4) as numpy arrays (float16 tokens stay float16 until collation); with
    `vision_state`, also "vision_state" (the record's, (P, Dp) or (C3, H3, W3)).
    """

    def __init__(
        self,
        posts: Sequence[Post],
        reader: CacheReader | None = None,
        spec: TokenSpec | None = None,
        path: Path | None = None,
        text_states=None,
        vision_state: bool = False,
    ):
        """
        Args:
            posts: the posts, in the order items are returned.
            vision_state: add each record's vision_state (for a model that reads_vision_state only:
                the other models never pay for collating it).
            text_states: the split's text-state cache (cache.text_states.TextStates, rows in the order
                of `posts`); its sub-words and states join each item as "text_ids" and "text_states".
            path: the file they were read from (named in a tag error); None for posts built in code.
            reader: the feature cache; None for a text-only model (no cache is touched).
            spec: the token shapes the model was built for; defaults to the reader's. A reader whose
                spec differs raises ValueError (a cache made with other encoders).
        """
        self.posts = list(posts)
        self.reader = reader
        self.path = path
        if reader is not None and spec is not None and reader.spec != spec:
            raise ValueError(
                f"cache {reader.cache_dir} holds tokens {reader.spec}, but the model was built for {spec}; "
                "use the cache the model was trained with"
            )
        self.spec = spec if spec is not None else getattr(reader, "spec", None)
        self.text_states = text_states
        if vision_state and not (self.spec is not None and self.spec.has_vision_state):
            raise ValueError(
                f"cache {getattr(reader, 'cache_dir', None)} stores no vision state (extracted without "
                "--vision-trainable-blocks), so there is none to add to the items"
            )
        self.vision_state = vision_state

    def __len__(self) -> int:
        return len(self.posts)

    def __getitem__(self, index: int) -> dict:
        post = self.posts[index]
        item = {
            "key": post.key,
            "path": self.path,
            "line": post.line,
            "words": list(post.words),
            "tags": list(post.tags),
        }
        if self.reader is not None:
            item.update(self._image(post.key))
        if self.text_states is not None:
            item["text_ids"], item["text_states"] = self.text_states.get(index, post.key)  # (S,), (S, D)
        return item

    def _image(self, key: str) -> dict:
        if key in self.reader:
            record: Record = self.reader.get(key)
        else:
            record = empty_record(key, self.spec, "missing")
        # Non-ok records are already zero (cache.shards.empty_record); image_ok is what masks them.
        arrays = {name: getattr(record, name) for name in _VISUAL_ARRAYS}
        if self.vision_state:
            arrays[VISION_STATE] = record.vision_state  # (P, Dp) | (C3, H3, W3) float16
        return {"image_ok": record.status == "ok", "num_regions": record.num_regions, **arrays}


class Collate:
    """Callable that turns a list of `PostDataset` items into the batch dict of docs/design.md.

    Besides the contract keys it adds "num_truncated" (B,): words of each post whose first sub-word
    did not fit in max_length. It travels with the batch, so the count is right with worker processes.
    """

    def __init__(self, tokenizer, label_names: Sequence[str], max_length: int, with_visual: bool):
        """
        Args:
            tokenizer: a fast tokenizer (train.text.load_tokenizer).
            label_names: the model's labels; a post tag outside them raises ValueError naming the post.
            max_length: sub-words per post, special tokens included.
            with_visual: add the visual keys (False for a text-only model).
        """
        self.tokenizer = tokenizer
        self.label_names = list(label_names)
        self.label_ids = {name: i for i, name in enumerate(self.label_names)}
        self.max_length = max_length
        self.with_visual = with_visual

    def __call__(self, items: list[dict]) -> dict:
        words = encodable_words(self.tokenizer, [item["words"] for item in items])
        encoded = self.tokenizer(
            words,
            is_split_into_words=True,
            truncation=True,
            max_length=self.max_length,
            padding=True,
            return_tensors="pt",
        )
        B = encoded["input_ids"].shape[0]
        T = max(len(post) for post in words)
        first_subword = torch.zeros((B, T), dtype=torch.long)
        word_mask = torch.zeros((B, T), dtype=torch.bool)
        labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        for b, item in enumerate(items):
            previous = None
            for s, word in enumerate(encoded.word_ids(b)):
                if word is not None and word != previous:
                    first_subword[b, word] = s
                    word_mask[b, word] = True
                previous = word
            labels[b, : len(item["tags"])] = torch.tensor(self._label_ids(item))
        num_words = torch.tensor([len(post) for post in words], dtype=torch.long)
        seen = word_mask.sum(1)  # (B,)
        # Truncation drops a suffix of words: the seen words must be exactly the first `seen`.
        assert torch.equal(word_mask, torch.arange(T)[None, :] < seen[:, None])
        batch = {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "first_subword": first_subword,
            "word_mask": word_mask,
            "labels": labels,
            "num_words": num_words,
            "num_truncated": num_words - seen,
        }
        if self.with_visual:
            batch.update(_collate_visual(items))
        if "text_states" in items[0]:
            batch["text_states"] = collate_text_states(items, encoded["input_ids"], encoded["attention_mask"])
        return batch

    def _label_ids(self, item: dict) -> list[int]:
        for index, tag in enumerate(item["tags"]):
            if tag not in self.label_ids:
                # The tag's own line; a post built in code has neither file nor line, so its position.
                line = tag_line(item["line"], index)
                who = f"post {item['key']!r}" + ("" if line else f" (word {index + 1})")
                raise unknown_label(item.get("path"), line, who, tag, self.label_names)
        return [self.label_ids[tag] for tag in item["tags"]]


def unknown_label(path, line: int, who: str, label: str, labels: Sequence[str]) -> ValueError:
    """The one message, both tasks, for a gold label the model cannot predict (the label set comes
    from the run's training file): `<file>:<line>: <who>: tag 'X' is not one of the model's labels
    (...)`; `line N: ` without a file, nothing for a post not read from a file."""
    place = f"{path}:{line}: " if path is not None and line else (f"line {line}: " if line else "")
    return ValueError(
        f"{place}{who}: tag {label!r} is not one of the model's labels ({', '.join(labels)}); the label "
        "set comes from the run's training file, so score data whose labels it has"
    )


def encodable_words(tokenizer, posts: Sequence[Sequence[str]]) -> list[list[str]]:
    """Each post's words, with those the tokenizer maps to no sub-word at all replaced by its unknown
    token.

    Such words exist in real data (Twitter-2015 valid has a lone U+00A0 token; zero-width and
    control characters also vanish) and would otherwise look like words cut by truncation.
    """
    flat = [word for words in posts for word in words]
    pieces = tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    empty = {word for word, ids in zip(flat, pieces) if not ids}
    if not empty:
        return [list(words) for words in posts]
    unk = tokenizer.unk_token
    assert unk is not None, "tokenizer has no unknown token to stand in for empty words"
    return [[unk if word in empty else word for word in words] for words in posts]


def subword_counts(tokenizer, posts: Sequence[Sequence[str]]) -> list[list[int]]:
    """Sub-words of each word of each post, as `Collate` encodes them (special tokens aside, nothing
    truncated): what a post's length against `max_length` is measured in."""
    words = encodable_words(tokenizer, posts)
    encoded = tokenizer(words, is_split_into_words=True, add_special_tokens=False, truncation=False)
    counts = []
    for b, post in enumerate(words):
        per_word = [0] * len(post)
        for word in encoded.word_ids(b):
            per_word[word] += 1
        counts.append(per_word)
    return counts


def subword_budget(tokenizer, max_length: int) -> int:
    """Sub-words of the post itself that fit in `max_length` beside the special tokens ([CLS], [SEP])."""
    return max_length - tokenizer.num_special_tokens_to_add(pair=False)


def collate_text_states(
    items: list[dict], input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """The cached frozen states (B, S, D) at each post's real sub-words, zero on padding (the top layers
    mask padding as keys and read no word there). Raises ValueError for a post whose cached sub-words
    are not the ones tokenised here."""
    real = attention_mask.bool()  # (B, S)
    states = torch.zeros((*input_ids.shape, items[0]["text_states"].shape[1]), dtype=torch.float32)
    for b, item in enumerate(items):
        if not torch.equal(torch.from_numpy(item["text_ids"]).long(), input_ids[b][real[b]]):
            raise ValueError(
                f"post {item['key']!r}: the text-state cache holds other sub-words than the tokenizer gives "
                "now; it was built with another tokenizer or max_length"
            )
        states[b, real[b]] = torch.from_numpy(item["text_states"])
    return states  # (B, S, D)


def _collate_visual(items: list[dict]) -> dict:
    """Stack the cached arrays of a batch and build the patch/region/image masks."""
    if "image_ok" not in items[0]:
        raise ValueError("the collate function wants visual tokens, but the dataset has no cache reader")
    batch = {
        name: torch.from_numpy(np.stack([item[name] for item in items])).to(dtype)
        for name, dtype in _VISUAL_ARRAYS.items()
    }
    image_ok = torch.tensor([item["image_ok"] for item in items], dtype=torch.bool)  # (B,)
    num_regions = torch.tensor([item["num_regions"] for item in items], dtype=torch.long)  # (B,)
    P, K = batch["patch_tokens"].shape[1], batch["region_feats"].shape[1]
    batch["patch_mask"] = image_ok[:, None].expand(-1, P).clone()  # (B, P)
    batch["region_mask"] = (torch.arange(K)[None, :] < num_regions[:, None]) & image_ok[:, None]  # (B, K)
    batch["image_mask"] = image_ok
    if VISION_STATE in items[0]:
        batch[VISION_STATE] = stack_vision_states(items)
    return batch


def stack_vision_states(items: list[dict]) -> torch.Tensor:
    """The items' "vision_state" arrays (each the record's, float16) as one float32 batch (B, P, Dp) |
    (B, C3, H3, W3): the batch key of both tasks' models with trainable vision blocks."""
    return torch.from_numpy(np.stack([item[VISION_STATE] for item in items])).float()


def make_loader(
    split: Split,
    reader: CacheReader | None,
    tokenizer,
    label_names: Sequence[str],
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    shuffle: bool,
    sampler=None,
    text_states=None,
) -> DataLoader:
    """A DataLoader over a split's posts, batched as the model expects.

    A text-only model never reads the cache, even when a reader is given. With `text_states` (the
    split's text-state cache) the batches carry "text_states" (B, S, D), the frozen bottom's output. Shuffling draws from a
    generator seeded with train_cfg.seed, so the order of a run is reproducible. With
    model.reads_vision_state they carry "vision_state" (B, P, Dp) | (B, C3, H3, W3) float32.
    """
    with_visual = not model_cfg.text_only
    if with_visual and reader is None:
        raise ValueError("model.text_only is false, so the loader needs the feature cache (a CacheReader)")
    if shuffle and sampler is not None:
        raise ValueError("give shuffle=True or a sampler, not both (the sampler decides the order)")
    dataset = PostDataset(
        split.posts,
        reader if with_visual else None,
        path=split.path,
        text_states=text_states,
        vision_state=model_cfg.reads_vision_state,
    )
    generator = torch.Generator().manual_seed(train_cfg.seed) if shuffle else None
    return DataLoader(
        dataset,
        batch_size=train_cfg.batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=train_cfg.num_workers,
        collate_fn=Collate(tokenizer, label_names, model_cfg.max_length, with_visual),
        generator=generator,
        persistent_workers=train_cfg.num_workers > 0,
    )
