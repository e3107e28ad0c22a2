"""A model's tags for a split, and their scores: shared by training (dev/test after each epoch),
`mner evaluate` and `mner predict`. Under torchrun each rank decodes a share and every rank gets the
whole list back, in file order.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from mner.cache.datasets import Split
from mner.runtime import Runtime, to_device
from mner.train.config import RunConfig
from mner.train.data import Collate, PostDataset, make_loader
from mner.train.model import MNERModel

# Posts per tokenizer call when counting truncated words.
_COUNT_CHUNK = 256


def decode_and_score(
    model: MNERModel, split: Split, reader, tokenizer, labels: list[str], cfg: RunConfig, runtime: Runtime
) -> tuple[list[list[str]], dict]:
    """Predict tags for every post of a split and score them against its gold tags.

    Returns (predicted tags per post, the scores of the model's task: `entity_scores` for tagging). Under torchrun each rank decodes a
    share and every rank gets the whole list.
    """
    predictions = decode_split(model, split, reader, tokenizer, labels, cfg, runtime)
    gold = [list(post.tags) for post in split.posts]
    return predictions, model.task.score(gold, predictions)


def decode_split(
    model: MNERModel, split: Split, reader, tokenizer, labels: list[str], cfg: RunConfig, runtime: Runtime
) -> list[list[str]]:
    """Predicted tag names for each post of `split`, in file order (one tag per word)."""
    sampler = None
    if runtime.world_size > 1:
        sampler = DistributedSampler(
            split.posts, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=False
        )
    loader = make_loader(
        split, reader, tokenizer, labels, cfg.model, cfg.train, shuffle=False, sampler=sampler
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
    collate = Collate(tokenizer, labels, max_length, with_visual=False)
    posts = PostDataset(split.posts)
    cut = 0
    for start in range(0, len(posts), _COUNT_CHUNK):
        chunk = [posts[i] for i in range(start, min(start + _COUNT_CHUNK, len(posts)))]
        cut += int(collate(chunk)["num_truncated"].sum())
    return cut
