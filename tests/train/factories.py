"""Small, seeded inputs for stage-two tests: specs, posts, records, caches, batches, models.

spec = tiny_spec()
posts = make_posts(6)
batch = make_batch(posts, spec)                 # through PostDataset + the real collate
model = tiny_model(spec)                        # tiny-bert, LABELS
cache_dir = make_cache(tmp_path, posts, spec)   # a real HDF5 cache (tests.cache.factories.write_cache)
"""

from __future__ import annotations

import dataclasses
import functools
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from mner.cache.conll import Post
from mner.cache.spec import Record, TokenSpec
from mner.train.engine.config import ModelConfig
from mner.train.engine.data import Collate, PostDataset
from mner.train.zoo.model import MNERModel
from mner.train.zoo.text import load_tokenizer
from tests.cache.factories import CATEGORIES, TINY_SPEC, make_records, write_cache

# The label set of every factory post: what cache.datasets.label_names gives for LOC and PER.
LABELS = ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
TYPES = ("LOC", "PER")
# Words short enough that tiny-bert's WordPiece keeps most whole, plus a few it splits.
WORDS = (
    "the", "a", "in", "at", "today", "game", "rain", "city", "paris", "london", "obama", "george",
    "zimmerman", "florida", "visited", "met", "kaggle", "tokenization", "nyc", "#rt", "@user", "!",
)  # fmt: skip
# torchvision's Faster R-CNN has 91 COCO category ids (0 = background), as the cache factories use.
NUM_DETECTOR_CLASSES = len(CATEGORIES)


def tiny_spec(**changes) -> TokenSpec:
    """tests.cache.factories.TINY_SPEC (P=5, Dp=8, Dg=6, K=4, Dr=10), with `changes` applied."""
    return dataclasses.replace(TINY_SPEC, **changes)


# IFAformer's vision tower (model.fusion "two_tower") pairs with tiny-bert layer for layer: a CLIP
# encoder config of its shape (2 layers, width 32, 2 heads), as a K = all cache records it, and the spec
# of a cache whose vision_state is that tower's embedding output (P = 5 tokens of width 32).
TOWER_BLOCKS = {
    "kind": "clip", "blocks": 2, "layers": 2, "hidden_size": 32, "intermediate_size": 64,
    "num_attention_heads": 2, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0,
    "projection_dim": None,
}  # fmt: skip
TOWER_SPEC = dataclasses.replace(
    TINY_SPEC, vision_state_shape=(5, 32), vision_state_source="vision_model.hidden_states[0] (synthetic)"
)


def tiny_config(**changes) -> ModelConfig:
    """ModelConfig for tests: tiny-bert (width 32), 2 heads, 2 slots per type, short max_length."""
    fields = dict(text_encoder="tiny-bert", qfnet_heads=2, slots_per_type=2, max_length=32)
    return ModelConfig(**{**fields, **changes})


@functools.cache
def tiny_tokenizer():
    """tiny-bert's tokenizer (MiniLM's uncased WordPiece), loaded once per test session."""
    return load_tokenizer("tiny-bert")


def random_tags(n: int, rng: random.Random, orphans: bool = False) -> list[str]:
    """A random BIO sequence of length n; with orphans, I- tags may also follow O or another type."""
    tags, previous = [], "O"
    for _ in range(n):
        roll = rng.random()
        kind = rng.choice(TYPES)
        if roll < 0.45:
            tag = "O"
        elif roll < 0.7:
            tag = f"B-{kind}"
        elif previous != "O":
            tag = f"I-{previous[2:]}" if not orphans or rng.random() < 0.5 else f"I-{kind}"
        else:
            tag = f"I-{kind}" if orphans else "O"
        tags.append(tag)
        previous = tag
    return tags


def make_posts(
    n: int = 6, seed: int = 0, min_words: int = 2, max_words: int = 8, key_prefix: str = "img"
) -> list[Post]:
    """n posts with random words and valid BIO tags; keys f"{key_prefix}{i}", lines 1, 10, 19, ..."""
    rng = random.Random(seed)
    posts = []
    for i in range(n):
        length = rng.randint(min_words, max_words)
        words = tuple(rng.choice(WORDS) for _ in range(length))
        posts.append(
            Post(key=f"{key_prefix}{i}", words=words, tags=tuple(random_tags(length, rng)), line=1 + 9 * i)
        )
    return posts


class MemoryReader:
    """The part of cache.reader.CacheReader that stage two uses, over records held in a dict."""

    def __init__(self, records: Iterable[Record], spec: TokenSpec):
        self.records = {record.key: record for record in records}
        self.spec = spec
        self.cache_dir = Path("memory")
        self.keys = sorted(self.records)

    def __contains__(self, key) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key: str) -> Record:
        return self.records[key]

    def status(self, key: str) -> str:
        return self.records[key].status


def make_reader(
    posts: Sequence[Post],
    spec: TokenSpec | None = None,
    seed: int = 0,
    statuses: dict | None = None,
    absent=(),
) -> MemoryReader:
    """A MemoryReader holding what `make_cache(tmp_path, posts, ...)` would write: a record per post key
    except those in `absent`; statuses maps key -> "missing"/"corrupt" (default: all ok)."""
    spec = spec or tiny_spec()
    keys = sorted({post.key for post in posts} - set(absent))
    return MemoryReader(make_records(keys, spec, seed, statuses or {}), spec)


def make_cache(
    tmp_path: Path,
    posts: Sequence[Post],
    spec: TokenSpec | None = None,
    seed: int = 0,
    statuses=None,
    absent=(),
) -> Path:
    """A real cache folder (tmp_path/"cache") with the records of `make_reader(posts, ...)`."""
    reader = make_reader(posts, spec, seed, statuses, absent)
    return write_cache(Path(tmp_path) / "cache", list(reader.records.values()), reader.spec)


def make_batch(
    posts: Sequence[Post] | None = None,
    spec: TokenSpec | None = None,
    seed: int = 0,
    statuses: dict | None = None,
    absent=(),
    max_length: int = 32,
    with_visual: bool = True,
    labels: Sequence[str] = LABELS,
    vision_state: bool = False,
) -> dict:
    """The batch dict of `posts` (default make_posts(4, seed)) through PostDataset and the real collate.

    With with_visual, records come from make_reader(posts, spec, seed, statuses, absent); with
    vision_state (a spec that has one), the batch carries it.
    """
    posts = make_posts(4, seed) if posts is None else posts
    reader = make_reader(posts, spec, seed, statuses, absent) if with_visual else None
    dataset = PostDataset(posts, reader, vision_state=vision_state)
    collate = Collate(tiny_tokenizer(), labels, max_length, with_visual)
    return collate([dataset[i] for i in range(len(dataset))])


def tiny_model(spec: TokenSpec | None = None, seed: int = 0, **changes) -> MNERModel:
    """MNERModel on tiny-bert with LABELS, initialised from `seed` (text-only when changes say so)."""
    cfg = tiny_config(**changes)
    torch.manual_seed(seed)
    return model_of(cfg, spec)


def spec_of(cfg: ModelConfig) -> TokenSpec | None:
    """The factory spec a model of `cfg` reads: None text-only, TOWER_SPEC for two towers, else tiny_spec()."""
    if cfg.text_only:
        return None
    return TOWER_SPEC if cfg.fusion == "two_tower" else tiny_spec()


def model_of(cfg: ModelConfig, spec: TokenSpec | None = None) -> MNERModel:
    """MNERModel of `cfg` with LABELS over the factory spec (spec_of), unseeded; a two-tower model gets
    TOWER_BLOCKS, freshly initialised."""
    spec = spec or spec_of(cfg)
    blocks = TOWER_BLOCKS if cfg.reads_vision_state else None
    return MNERModel(cfg, LABELS, spec, cfg.text_encoder, NUM_DETECTOR_CLASSES, vision_blocks=blocks)
