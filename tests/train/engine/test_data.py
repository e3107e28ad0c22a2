"""PostDataset + collate: the batch contract, masked images, truncation accounting, text-only mode."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import SequentialSampler

from mner.cache.conll import Post, Split
from mner.cache.reader import CacheReader
from mner.train.engine.config import TrainConfig
from mner.train.engine.data import IGNORE_INDEX, Collate, PostDataset, make_loader
from tests.train.factories import (
    LABELS,
    make_batch,
    make_cache,
    make_posts,
    make_reader,
    tiny_config,
    tiny_spec,
    tiny_tokenizer,
)

VISUAL_KEYS = {
    "patch_tokens", "patch_mask", "global_embed", "region_feats", "region_labels", "region_scores",
    "region_boxes", "region_mask", "image_mask",
}  # fmt: skip
TEXT_KEYS = {"input_ids", "attention_mask", "first_subword", "word_mask", "labels", "num_words"}


def split_of(posts) -> Split:
    return Split(name="train", path=None, fmt="imgid", posts=list(posts), orphan_i=0)


class PoisonReader:
    """A reader that fails on any use: proves text-only mode never touches the cache."""

    def __getattr__(self, name):
        raise AssertionError(f"the cache was touched ({name})")


def test_batch_matches_the_contract():
    posts = make_posts(5, seed=1)
    batch = make_batch(posts)
    assert set(batch) == TEXT_KEYS | VISUAL_KEYS | {"num_truncated"}
    B, T = 5, max(len(p.words) for p in posts)
    spec = tiny_spec()
    P, K = spec.num_patches, spec.max_regions
    shapes = {
        "first_subword": (B, T), "word_mask": (B, T), "labels": (B, T), "num_words": (B,),
        "patch_tokens": (B, P, spec.patch_dim), "patch_mask": (B, P), "global_embed": (B, spec.global_dim),
        "region_feats": (B, K, spec.region_dim), "region_labels": (B, K), "region_scores": (B, K),
        "region_boxes": (B, K, 4), "region_mask": (B, K), "image_mask": (B,), "num_truncated": (B,),
    }  # fmt: skip
    for key, shape in shapes.items():
        assert tuple(batch[key].shape) == shape, key
    for key in ("word_mask", "patch_mask", "region_mask", "image_mask"):
        assert batch[key].dtype == torch.bool, key
    for key in (
        "input_ids",
        "attention_mask",
        "first_subword",
        "labels",
        "num_words",
        "region_labels",
    ):
        assert batch[key].dtype == torch.long, key
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    assert batch["num_words"].tolist() == [len(p.words) for p in posts]


def test_words_and_labels_use_the_first_sub_word():
    posts = [
        Post(
            key="a", words=("obama", "tokenization", "kaggle", "!"), tags=("B-PER", "O", "B-LOC", "O"), line=1
        )
    ]
    batch = make_batch(posts, with_visual=False)
    word_ids = tiny_tokenizer()(list(posts[0].words), is_split_into_words=True).word_ids()
    # [CLS] obama token ##ization ka ##ggle ! [SEP]
    assert word_ids == [None, 0, 1, 1, 2, 2, 3, None]
    assert batch["first_subword"][0].tolist() == [1, 2, 4, 6]
    assert batch["labels"][0].tolist() == [LABELS.index(t) for t in posts[0].tags]
    assert batch["word_mask"][0].all() and batch["num_truncated"].tolist() == [0]


def test_padding():
    posts = [
        Post(key="a", words=("paris",), tags=("B-LOC",), line=1),
        Post(key="b", words=("a", "tokenization", "game"), tags=("O", "O", "O"), line=4),
    ]
    batch = make_batch(posts, with_visual=False)
    assert batch["labels"][0].tolist() == [LABELS.index("B-LOC"), IGNORE_INDEX, IGNORE_INDEX]
    assert batch["word_mask"][0].tolist() == [True, False, False]
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0]


def test_truncated_words_are_masked_counted_and_keep_their_labels():
    words = ("obama",) + ("tokenization",) * 10  # 1 + 2 * 10 sub-words
    tags = ("B-PER",) + ("O",) * 9 + ("B-LOC",)
    posts = [
        Post(key="long", words=words, tags=tags, line=1),
        Post(key="short", words=("rain",), tags=("O",), line=9),
    ]
    batch = make_batch(posts, max_length=8, with_visual=False)
    # 8 = [CLS] + 6 sub-words + [SEP]: obama, 2 x (token ##ization), and the next word's "token".
    assert batch["input_ids"].shape[1] == 8
    assert batch["word_mask"][0].tolist() == [True] * 4 + [False] * 7
    assert batch["num_truncated"].tolist() == [7, 0]
    assert batch["labels"][0].tolist() == [LABELS.index(t) for t in tags]  # still scored
    assert batch["first_subword"][0, 4:].tolist() == [0] * 7


def test_words_without_sub_words_become_unknown_not_truncated():
    words = ("paris", "\u00a0", "\u200b", "rain", "\x85")
    batch = make_batch(
        [Post(key="a", words=words, tags=("B-LOC", "O", "O", "O", "O"), line=1)], with_visual=False
    )
    assert batch["word_mask"][0].all() and batch["num_truncated"].tolist() == [0]
    ids = batch["input_ids"][0, batch["first_subword"][0]].tolist()
    unk = tiny_tokenizer().unk_token_id
    assert [i == unk for i in ids] == [False, True, True, False, True]


def test_unknown_tag_names_the_post_and_the_tag_line():
    # issue 10 A7: the line is the tag's own (header at 42, "a" at 43, "b" at 44), not the header's.
    posts = [Post(key="1015799", words=("a", "b"), tags=("O", "B-MISC"), line=42)]
    with pytest.raises(
        ValueError, match=r"^line 44: post '1015799': tag 'B-MISC' is not one of the model's labels"
    ):
        make_batch(posts, with_visual=False)
    # read from a file, the post is named by file and line (the file is what evaluate --data-dir changes)
    collate = Collate(tiny_tokenizer(), ["O"], 32, with_visual=False)
    with pytest.raises(
        ValueError,
        match=re.escape(
            "data/test.txt:44: post '1015799': tag 'B-MISC' is not one of the model's labels (O)"
        ),
    ):
        collate([PostDataset(posts, path=Path("data/test.txt"))[0]])
    # a post not read from a file has no line: the word is named by its position
    posts = [Post(key="k", words=("a", "b"), tags=("O", "B-MISC"), line=0)]
    with pytest.raises(ValueError, match=r"^post 'k' \(word 2\): tag 'B-MISC' is not one of"):
        make_batch(posts, with_visual=False)


def test_items_carry_the_cached_record():
    posts = make_posts(3)
    reader = make_reader(posts)
    item = PostDataset(posts, reader)[1]
    record = reader.get(posts[1].key)
    assert item["words"] == list(posts[1].words) and item["tags"] == list(posts[1].tags)
    assert item["image_ok"] is True and item["num_regions"] == record.num_regions
    for name in (
        "patch_tokens",
        "global_embed",
        "region_feats",
        "region_labels",
        "region_scores",
        "region_boxes",
    ):
        assert np.array_equal(item[name], getattr(record, name)), name
    batch = make_batch(posts)
    assert torch.equal(batch["patch_tokens"][1], torch.from_numpy(record.patch_tokens).float())
    assert batch["region_mask"][1].tolist() == [
        k < record.num_regions for k in range(tiny_spec().max_regions)
    ]


def test_missing_corrupt_and_absent_images_are_masked_not_substituted():
    posts = make_posts(4)
    statuses = {"img1": "missing", "img2": "corrupt"}
    batch = make_batch(posts, statuses=statuses, absent=("img3",))
    assert batch["image_mask"].tolist() == [True, False, False, False]
    assert batch["patch_mask"][0].all() and not batch["patch_mask"][1:].any()
    assert not batch["region_mask"][1:].any()
    for key in ("patch_tokens", "global_embed", "region_feats", "region_scores", "region_boxes"):
        assert not batch[key][1:].any(), key


def test_real_cache_reader_gives_the_same_batch(tmp_path):
    posts = make_posts(5)
    statuses = {"img2": "corrupt"}
    cache_dir = make_cache(tmp_path, posts, statuses=statuses, absent=("img4",))
    collate = Collate(tiny_tokenizer(), LABELS, 32, with_visual=True)
    with CacheReader(cache_dir) as reader:
        dataset = PostDataset(posts, reader, spec=tiny_spec())
        from_cache = collate([dataset[i] for i in range(len(dataset))])
    expected = make_batch(posts, statuses=statuses, absent=("img4",))
    assert set(from_cache) == set(expected)
    for key in expected:
        assert torch.equal(from_cache[key], expected[key]), key
    assert from_cache["image_mask"].tolist() == [True, True, False, True, False]


def test_loader_with_worker_processes_reads_the_cache(tmp_path):
    posts = make_posts(6)
    cache_dir = make_cache(tmp_path, posts)
    with CacheReader(cache_dir) as reader:
        train_cfg = TrainConfig(batch_size=4, num_workers=1)
        loader = make_loader(
            split_of(posts), reader, tiny_tokenizer(), LABELS, tiny_config(), train_cfg, shuffle=False
        )
        batches = list(loader)
    assert [b["num_words"].shape[0] for b in batches] == [4, 2]
    assert torch.equal(batches[0]["patch_tokens"], make_batch(posts[:4])["patch_tokens"])


def test_spec_mismatch_is_an_error():
    reader = make_reader(make_posts(2))
    with pytest.raises(ValueError, match=r"cache memory holds tokens .* but the model was built for"):
        PostDataset([], reader, spec=tiny_spec(max_regions=7))


def test_text_only_never_touches_the_cache():
    posts = make_posts(3)
    cfg = tiny_config(text_only=True)
    loader = make_loader(
        split_of(posts), PoisonReader(), tiny_tokenizer(), LABELS, cfg, TrainConfig(), shuffle=False
    )
    (batch,) = list(loader)
    assert set(batch) == TEXT_KEYS | {"num_truncated"}
    assert "image_ok" not in PostDataset(posts, None)[0]


def test_loader_errors():
    split, tok, cfg = split_of(make_posts(2)), tiny_tokenizer(), tiny_config()
    with pytest.raises(ValueError, match=r"model.text_only is false, so the loader needs the feature cache"):
        make_loader(split, None, tok, LABELS, cfg, TrainConfig(), shuffle=False)
    reader = make_reader(split.posts)
    with pytest.raises(ValueError, match=r"give shuffle=True or a sampler, not both"):
        make_loader(
            split,
            reader,
            tok,
            LABELS,
            cfg,
            TrainConfig(),
            shuffle=True,
            sampler=SequentialSampler(split.posts),
        )
    collate = Collate(tok, LABELS, 32, with_visual=True)
    with pytest.raises(
        ValueError, match=r"the collate function wants visual tokens, but the dataset has no cache reader"
    ):
        collate([PostDataset(split.posts, None)[0]])


def test_shuffle_is_seeded():
    posts = make_posts(12)
    reader, tok, cfg = make_reader(posts), tiny_tokenizer(), tiny_config()

    def order(seed):
        loader = make_loader(
            split_of(posts), reader, tok, LABELS, cfg, TrainConfig(batch_size=12, seed=seed), shuffle=True
        )
        return next(iter(loader))["input_ids"].tolist()

    assert order(3) == order(3)
    assert order(3) != order(4)
