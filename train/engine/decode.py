"""A model's tags for a split, and their scores: shared by training (dev/test after each epoch),
`mner evaluate` and `mner predict`. Under torchrun each rank decodes a share and every rank gets the
whole list back, in file order.

Long posts (more sub-words than the encoder's `max_length`) are tagged in one of two ways:

- `truncate` (the default, and what training uses): the words whose first sub-word does not fit are
  predicted O; they are counted (`truncated_per_post`) and still scored against gold.
- `window`: the post is cut into overlapping windows of whole words, each as long as fits in
  `max_length` (the first window is exactly what truncation keeps); each window is decoded as a post of
  its own (same image), and every word takes its tag from the window where its first sub-word lies
  farthest from a cut edge (the post's own start and end are not cuts), ties going to the earlier
  window. A window starts at the first word at least half a window (`budget // 2` sub-words) after the
  previous window's start, so consecutive windows overlap by about half and every word sits at least a
  quarter window from a cut in the window it is taken from (unless a single word is that long). A post
  that fits is one window, so its tags are exactly the truncate tags. Each window is decoded by the CRF
  on its own, so where two windows meet the stitched tags need not be a valid BIO path (an `I-` may
  follow another type); scoring treats such an `I-` as an entity start, as conlleval does.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from mner.cache.conll import Split
from mner.runtime import Runtime, to_device
from mner.train.engine.config import RunConfig
from mner.train.engine.data import Collate, PostDataset, make_loader, subword_budget, subword_counts
from mner.train.engine.run_files import LONG_POSTS
from mner.train.zoo.model import MNERModel

log = logging.getLogger(__name__)

# Posts per tokenizer call when counting truncated words.
_COUNT_CHUNK = 256


def decode_and_score(
    model: MNERModel,
    split: Split,
    reader,
    tokenizer,
    labels: list[str],
    cfg: RunConfig,
    runtime: Runtime,
    long_posts: str = "truncate",
    text_states=None,
) -> tuple[list[list[str]], dict]:
    """Predict tags for every post of a split and score them against its gold tags.

    Returns (predicted tags per post, the scores of the model's task: `entity_scores` for tagging). Under
    torchrun each rank decodes a share and every rank gets the whole list. `long_posts`, `text_states`:
    see decode_split.
    """
    predictions = decode_split(model, split, reader, tokenizer, labels, cfg, runtime, long_posts, text_states)
    gold = [list(post.tags) for post in split.posts]
    return predictions, model.task.score(gold, predictions)


def decode_split(
    model: MNERModel,
    split: Split,
    reader,
    tokenizer,
    labels: list[str],
    cfg: RunConfig,
    runtime: Runtime,
    long_posts: str = "truncate",
    text_states=None,
) -> list[list[str]]:
    """Predicted tag names for each post of `split`, in file order (one tag per word).

    long_posts: "truncate" (words past `max_length` are predicted O) or "window" (overlapping windows
    tag every word; see the module docstring). Raises ValueError for another value.
    text_states: the split's text-state cache (model.text_frozen_layers > 0), read in truncate mode;
    windows are other sub-word sequences, so their frozen states are computed on the fly.
    """
    if long_posts not in LONG_POSTS:
        raise ValueError(f"long_posts {long_posts!r}: expected one of {', '.join(LONG_POSTS)}")
    if long_posts == "truncate":
        return _decode(model, split, reader, tokenizer, labels, cfg, runtime, text_states)
    budget = subword_budget(tokenizer, cfg.model.max_length)
    pieces, plans = [], []  # plans: (index of the post's first piece, its windows, each word's window)
    for start in range(0, len(split.posts), _COUNT_CHUNK):
        posts = split.posts[start : start + _COUNT_CHUNK]
        for post, counts in zip(posts, subword_counts(tokenizer, [post.words for post in posts])):
            windows, owner = plan_windows(counts, budget)
            plans.append((len(pieces), windows, owner))
            pieces += [
                dataclasses.replace(post, words=post.words[a:b], tags=post.tags[a:b]) for a, b in windows
            ]
    decoded = _decode(
        model, dataclasses.replace(split, posts=pieces), reader, tokenizer, labels, cfg, runtime
    )
    return [
        [decoded[first + window][i - windows[window][0]] for i, window in enumerate(owner)]
        for first, windows, owner in plans
    ]


def plan_windows(counts: list[int], budget: int) -> tuple[list[tuple[int, int]], list[int]]:
    """The windows of a post and the window each word takes its tag from (module docstring).

    Args:
        counts: sub-words of each word (`data.subword_counts`), each >= 1.
        budget: sub-words that fit beside the special tokens (`data.subword_budget`), >= 1.
    Returns:
        (windows, owner): windows as word ranges [start, end), in order, the first starting at 0 and the
        last ending at len(counts); owner[i] is the index of word i's window. A word belongs to a window
        when its first sub-word fits in it, so a window is what truncation keeps of the post from its start.
    """
    assert budget >= 1 and all(c >= 1 for c in counts), (budget, counts)
    n = len(counts)
    offset = [0]  # offset[i]: sub-words before word i
    for c in counts:
        offset.append(offset[-1] + c)
    stride = max(1, budget // 2)
    windows, start = [], 0
    while True:
        end = start
        while end < n and offset[end] - offset[start] < budget:
            end += 1
        windows.append((start, end))
        if end == n:
            break
        # The next window starts half a window on, but never past this one's end (no word left out).
        nxt = start + 1
        while nxt < end and offset[nxt] - offset[start] < stride:
            nxt += 1
        start = nxt
    owner, best = [0] * n, [-1.0] * n
    for index, (a, b) in enumerate(windows):
        last = min(offset[b], offset[a] + budget) - 1  # the window's last sub-word
        for i in range(a, b):
            left = offset[i] - offset[a] if a > 0 else float("inf")
            right = last - offset[i] if b < n else float("inf")
            if min(left, right) > best[i]:
                owner[i], best[i] = index, min(left, right)
    return windows, owner


def _decode(
    model: MNERModel,
    split: Split,
    reader,
    tokenizer,
    labels: list[str],
    cfg: RunConfig,
    runtime: Runtime,
    text_states=None,
) -> list[list[str]]:
    """decode_split's truncate mode: one encoder pass per post."""
    sampler = None
    if runtime.world_size > 1:
        sampler = DistributedSampler(
            split.posts, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=False
        )
    loader = make_loader(
        split,
        reader,
        tokenizer,
        labels,
        cfg.model,
        cfg.train,
        shuffle=False,
        sampler=sampler,
        text_states=text_states,
    )
    model.eval()
    ids: list[list[int]] = []
    with torch.no_grad(), runtime.autocast():
        for batch in loader:
            ids.extend(model.decode(to_device(batch, runtime.device)))
    if sampler is not None:
        # DistributedSampler pads with repeats to an equal share per rank; the index keeps one of each.
        shares = [None] * runtime.world_size
        dist.all_gather_object(shares, (list(sampler), ids))
        by_index = {index: post_ids for indices, share in shares for index, post_ids in zip(indices, share)}
        ids = [by_index[i] for i in range(len(split.posts))]
    assert len(ids) == len(split.posts)
    return [[labels[i] for i in post_ids] for post_ids in ids]


def count_truncated(split: Split, tokenizer, labels: list[str], max_length: int) -> int:
    """Words of `split` whose first sub-word lies past the encoder's `max_length` (they are predicted O).

    Counted by the training collate itself, on text alone, so the number is the one the model sees.
    """
    return sum(truncated_per_post(split, tokenizer, labels, max_length))


def truncated_per_post(split: Split, tokenizer, labels: list[str], max_length: int) -> list[int]:
    """For each post of `split`, its words past the encoder's `max_length` (see count_truncated)."""
    collate = Collate(tokenizer, labels, max_length, with_visual=False)
    posts = PostDataset(split.posts, path=split.path)
    cut: list[int] = []
    for start in range(0, len(posts), _COUNT_CHUNK):
        chunk = [posts[i] for i in range(start, min(start + _COUNT_CHUNK, len(posts)))]
        cut += collate(chunk)["num_truncated"].tolist()
    return cut


def long_post_summary(cut: list[int], max_length: int, mode: str) -> dict:
    """What results files record about long posts: {"mode", "max_length", "posts", "words"}: how many
    posts had words past `max_length` sub-words, how many words, and how they were tagged (`mode`)."""
    return {"mode": mode, "max_length": max_length, "posts": sum(1 for n in cut if n), "words": sum(cut)}


def log_long_posts(what: str, long: dict) -> None:
    """One line on the posts longer than the encoder's limit, a warning when their words go untagged."""
    if not long["words"]:
        log.info("%s: no post is longer than the encoder's %d sub-words", what, long["max_length"])
        return
    how = (
        "tagged by overlapping windows"
        if long["mode"] == "window"
        else "predicted O, still scored; --long-posts window tags them"
    )
    log.log(
        logging.INFO if long["mode"] == "window" else logging.WARNING,
        "%s: %d words in %d posts lie past the encoder's %d sub-words (%s)",
        what,
        long["words"],
        long["posts"],
        long["max_length"],
        how,
    )
