"""decode.py: long posts tagged by truncation or by overlapping windows (issue 10 A6), and their count."""

from __future__ import annotations

import dataclasses
import random

import pytest

from mner.cache.conll import Post, Split
from mner.cache.datasets import DataConfig
from mner.runtime import resolve_runtime
from mner.train.engine.config import RunConfig, TrainConfig
from mner.train.engine.data import Collate, PostDataset, subword_budget, subword_counts
from mner.train.engine.decode import (
    count_truncated,
    decode_split,
    long_post_summary,
    plan_windows,
    truncated_per_post,
)
from tests.train.factories import (
    LABELS,
    WORDS,
    make_posts,
    make_reader,
    random_tags,
    tiny_model,
    tiny_tokenizer,
)

# Short enough that a post of 12+ words overflows: [CLS] + 10 sub-words + [SEP].
MAX_LENGTH = 12


def brute_force_plan(counts: list[int], budget: int) -> tuple[list[tuple[int, int]], list[int]]:
    """The windows and owners from their definition, on the flat list of sub-words."""
    flat = [word for word, count in enumerate(counts) for _ in range(count)]  # word id of each sub-word
    first = {word: flat.index(word) for word in range(len(counts))}
    n, stride = len(counts), max(1, budget // 2)
    windows, start = [], 0
    while True:
        kept = flat[first[start] : first[start] + budget]  # what truncation keeps from this word on
        words = sorted({w for s, w in enumerate(kept, start=first[start]) if first[w] == s})
        windows.append((start, words[-1] + 1))
        if words[-1] + 1 == n:
            break
        later = [w for w in range(start + 1, words[-1] + 2) if first[w] - first[start] >= stride]
        start = later[0] if later else words[-1] + 1
    owner = []
    for word in range(n):
        margins = []
        for index, (a, b) in enumerate(windows):
            if not a <= word < b:
                continue
            window_subwords = len(flat[first[a] : first[a] + budget]) if b < n else len(flat) - first[a]
            left = first[word] - first[a] if a > 0 else float("inf")
            right = first[a] + window_subwords - 1 - first[word] if b < n else float("inf")
            margins.append((-min(left, right), index))  # largest margin first, then the earliest window
        owner.append(min(margins)[1])
    return windows, owner


def run_cfg(model_cfg, batch_size: int = 4) -> RunConfig:
    return RunConfig(
        model=model_cfg,
        train=TrainConfig(batch_size=batch_size, device="cpu"),
        cache_dir=None if model_cfg.text_only else "cache",
        data=DataConfig(data_dir="data"),
        out_dir="run",
    )


def split_of(posts) -> Split:
    return Split(name="test", path=None, fmt="imgid", posts=list(posts), orphan_i=0)


def long_post(n: int, seed: int = 1, key: str = "long") -> Post:
    rng = random.Random(seed)
    words = tuple(rng.choice(WORDS) for _ in range(n))
    return Post(key=key, words=words, tags=tuple(random_tags(n, rng)), line=1)


def test_plan_windows_matches_the_brute_force_definition():
    rng = random.Random(0)
    for _ in range(500):
        counts = [rng.choice([1, 1, 1, 2, 3, 7]) for _ in range(rng.randint(1, 40))]
        budget = rng.randint(1, 16)
        windows, owner = plan_windows(counts, budget)
        assert (windows, owner) == brute_force_plan(counts, budget), (counts, budget)
        # Every word is in its owner's window; windows start in order, touch or overlap, cover the post.
        assert windows[0][0] == 0 and windows[-1][1] == len(counts)
        assert all(a < c <= b for (a, b), (c, _) in zip(windows, windows[1:]))
        assert all(windows[w][0] <= i < windows[w][1] for i, w in enumerate(owner))


def test_a_post_that_fits_is_one_window():
    assert plan_windows([1, 2, 3], 6) == ([(0, 3)], [0, 0, 0])
    assert plan_windows([1, 2, 4], 4) == ([(0, 3)], [0, 0, 0])  # the last word's first sub-word fits


def test_windows_are_what_the_tokenizer_keeps():
    """Each window, encoded on its own, loses no word; one word more and truncation would cut it."""
    tokenizer = tiny_tokenizer()
    post = long_post(40)
    [counts] = subword_counts(tokenizer, [post.words])
    budget = subword_budget(tokenizer, MAX_LENGTH)
    assert budget == MAX_LENGTH - 2
    windows, _ = plan_windows(counts, budget)
    assert len(windows) > 2
    collate = Collate(tokenizer, LABELS, MAX_LENGTH, with_visual=False)
    for a, b in windows:
        piece = dataclasses.replace(post, words=post.words[a : b + 1], tags=post.tags[a : b + 1])
        assert collate([PostDataset([piece])[0]])["num_truncated"].tolist() == [0 if b == 40 else 1]
    # the first window is exactly the words truncation keeps
    assert windows[0][1] == 40 - count_truncated(split_of([post]), tokenizer, LABELS, MAX_LENGTH)


@pytest.mark.parametrize("text_only", [True, False])
def test_window_equals_truncate_exactly_on_posts_that_fit(text_only):
    posts = make_posts(9, seed=3, max_words=4)
    model = tiny_model(text_only=text_only, max_length=MAX_LENGTH)
    cfg = run_cfg(model.cfg)
    reader = None if text_only else make_reader(posts)
    runtime = resolve_runtime("cpu", "off")
    split = split_of(posts)
    assert count_truncated(split, tiny_tokenizer(), LABELS, MAX_LENGTH) == 0
    truncated = decode_split(model, split, reader, tiny_tokenizer(), LABELS, cfg, runtime, "truncate")
    window = decode_split(model, split, reader, tiny_tokenizer(), LABELS, cfg, runtime, "window")
    assert window == truncated


@pytest.mark.parametrize("text_only", [True, False])
def test_window_tags_every_word_of_a_long_post(text_only):
    tokenizer = tiny_tokenizer()
    post = long_post(40)
    posts = [post, *make_posts(3, seed=5)]
    model = tiny_model(text_only=text_only, max_length=MAX_LENGTH, seed=2)
    cfg = run_cfg(model.cfg, batch_size=1)  # one post per forward: no padding beside another post
    reader = None if text_only else make_reader(posts)
    runtime = resolve_runtime("cpu", "off")
    split = split_of(posts)
    truncated = decode_split(model, split, reader, tokenizer, LABELS, cfg, runtime, "truncate")
    window = decode_split(model, split, reader, tokenizer, LABELS, cfg, runtime, "window")
    assert [len(tags) for tags in window] == [len(p.words) for p in posts]
    assert window[1:] == truncated[1:]  # the short posts

    [counts] = subword_counts(tokenizer, [post.words])
    windows, owner = plan_windows(counts, subword_budget(tokenizer, MAX_LENGTH))
    seen = 40 - truncated_per_post(split, tokenizer, LABELS, MAX_LENGTH)[0]
    assert windows[0] == (0, seen) and truncated[0][seen:] == ["O"] * (40 - seen)
    # the first window's own words (its safe area) keep the truncate tags
    safe = [i for i, w in enumerate(owner) if w == 0]
    assert safe and [window[0][i] for i in safe] == [truncated[0][i] for i in safe]
    # every other word has the tag its window gives when decoded as a post of its own
    for index, (a, b) in enumerate(windows):
        piece = dataclasses.replace(post, words=post.words[a:b], tags=post.tags[a:b])
        [alone] = decode_split(model, split_of([piece]), reader, tokenizer, LABELS, cfg, runtime)
        assert [window[0][i] for i, w in enumerate(owner) if w == index] == [
            alone[i - a] for i, w in enumerate(owner) if w == index
        ]
    assert any(tag != "O" for tag in window[0][seen:])  # the words past the limit were really tagged


def test_unknown_long_posts_mode_is_refused():
    model = tiny_model(text_only=True)
    with pytest.raises(ValueError, match=r"^long_posts 'slide': expected one of truncate, window$"):
        decode_split(
            model, split_of(make_posts(1)), None, tiny_tokenizer(), LABELS, run_cfg(model.cfg),
            resolve_runtime("cpu", "off"), "slide",
        )  # fmt: skip


def test_long_post_summary_counts_posts_and_words():
    split = split_of([long_post(40), *make_posts(3, seed=5), long_post(20, key="mid")])
    cut = truncated_per_post(split, tiny_tokenizer(), LABELS, MAX_LENGTH)
    assert cut[1:4] == [0, 0, 0] and cut[0] > cut[4] > 0
    assert long_post_summary(cut, MAX_LENGTH, "window") == {
        "mode": "window", "max_length": MAX_LENGTH, "posts": 2, "words": cut[0] + cut[4]
    }  # fmt: skip
