"""Paired bootstrap over posts: is run B's entity F1 really different from run A's?

Both runs must have tagged the same posts (same words, same gold). A resample draws n posts with
replacement, the same draw for both runs (the pairing), and recomputes each run's micro F1 from the
drawn posts' entity counts (correct, predicted, gold), as conlleval would on that sample. With several
seeds per side, each side's F1 on a resample is the mean over its seeds, so seed noise and post
noise are both in the spread.

    delta      = F1(B) - F1(A) on the posts as they are (means over seeds)
    delta*_r   = the same on resample r, r = 1..R
    95% CI     = the 2.5th and 97.5th percentiles of delta*
    p-value    = (1 + #{r : |delta*_r - delta| >= |delta|}) / (R + 1)

The p-value is two-sided and tests "no difference" by shifting the bootstrap distribution to the
null (Efron & Tibshirani 1993, section 16.4); the +1 counts the observed sample as one resample, so p
is never 0 and identical runs give delta = 0 and p = 1 exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mner.train.engine.metrics import entities

TEST_NAME = "paired bootstrap over posts"
DEFAULT_RESAMPLES = 1000
# |delta* - delta| >= |delta| is compared with this slack, so float rounding of equal sums counts as a tie.
_TIE = 1e-12


@dataclass(frozen=True)
class Comparison:
    """B against A; F1 values are fractions (0..1)."""

    f1_a: float  # mean over A's seeds, on all posts
    f1_b: float
    delta: float  # f1_b - f1_a
    ci_low: float  # 2.5th percentile of the resampled deltas
    ci_high: float  # 97.5th percentile
    p_value: float
    resamples: int
    posts: int
    seeds_a: int
    seeds_b: int
    test: str = TEST_NAME


def post_counts(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> np.ndarray:
    """(N, 3) int64: per post, [correct, predicted, gold] entity counts (conlleval chunking)."""
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} posts but pred has {len(pred)}")
    counts = np.zeros((len(gold), 3), dtype=np.int64)
    for i, (gold_tags, pred_tags) in enumerate(zip(gold, pred)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(f"post {i}: gold has {len(gold_tags)} tags but pred has {len(pred_tags)}")
        found, truth = entities(pred_tags), entities(gold_tags)
        counts[i] = (len(found & truth), len(found), len(truth))
    return counts


def micro_f1(summed: np.ndarray) -> np.ndarray:
    """F1 from summed counts (..., 3) [correct, predicted, gold] -> (...); 0 where nothing is predicted
    or gold (2c / (p + g) equals 2PR / (P + R), and is 0 when c is 0)."""
    correct, predicted, gold = summed[..., 0], summed[..., 1], summed[..., 2]
    denominator = predicted + gold
    return np.where(denominator > 0, 2 * correct / np.maximum(denominator, 1), 0.0)


def resample_indices(posts: int, resamples: int, seed: int) -> np.ndarray:
    """(R, N) post indices drawn with replacement, from numpy's PCG64 seeded by `seed`."""
    if resamples < 1:
        raise ValueError(f"the bootstrap needs at least 1 resample, got {resamples}")
    return np.random.default_rng(seed).integers(0, posts, size=(resamples, posts))


def paired_bootstrap(
    gold: Sequence[Sequence[str]],
    preds_a: Sequence[Sequence[Sequence[str]]],
    preds_b: Sequence[Sequence[Sequence[str]]],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    indices: np.ndarray | None = None,
) -> Comparison:
    """Compare B with A on the same posts.

    Args:
        gold: one tag sequence per post.
        preds_a, preds_b: one prediction list per seed of each side (each: one tag sequence per post).
        resamples, seed: how many resamples and the seed of their draw.
        indices: (R, N) resample indices to use instead of drawing them (tests enumerate all of them).
    """
    if not preds_a or not preds_b:
        raise ValueError("each side of the comparison needs the predictions of at least one run")
    posts = len(gold)
    if posts == 0:
        raise ValueError("there are no posts to compare on")
    # (S, N, 3) per seed and post
    counts_a = np.stack([post_counts(gold, pred) for pred in preds_a])
    counts_b = np.stack([post_counts(gold, pred) for pred in preds_b])
    f1_a = float(micro_f1(counts_a.sum(axis=1)).mean())
    f1_b = float(micro_f1(counts_b.sum(axis=1)).mean())
    delta = f1_b - f1_a
    if indices is None:
        indices = resample_indices(posts, resamples, seed)
    deltas = _resampled_f1(counts_b, indices) - _resampled_f1(counts_a, indices)  # (R,)
    extreme = int(np.sum(np.abs(deltas - delta) >= abs(delta) - _TIE))
    low, high = np.percentile(deltas, [2.5, 97.5])
    return Comparison(
        f1_a=f1_a,
        f1_b=f1_b,
        delta=delta,
        ci_low=float(low),
        ci_high=float(high),
        p_value=(1 + extreme) / (len(deltas) + 1),
        resamples=len(deltas),
        posts=posts,
        seeds_a=len(preds_a),
        seeds_b=len(preds_b),
    )


def _resampled_f1(counts: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """counts (S, N, 3), indices (R, N) -> (R,) each resample's F1, mean over the S seeds."""
    # Post multiplicities per resample make the sums one matrix product: (R, N) @ (N, 3) per seed.
    weights = np.zeros((indices.shape[0], counts.shape[1]), dtype=np.int64)  # (R, N)
    np.add.at(weights, (np.arange(indices.shape[0])[:, None], indices), 1)
    summed = np.einsum("rn,snc->src", weights, counts)  # (S, R, 3)
    return micro_f1(summed).mean(axis=0)


def read_predictions(path) -> tuple[list[list[str]], list[list[str]], list[list[str]]]:
    """(words, gold, pred) per post of a `token gold pred` file (metrics.write_conll's format).

    Raises ValueError naming the file and line for a line that is not three fields.
    """
    path = Path(path)
    words, gold, pred = [], [], []
    post: tuple[list, list, list] = ([], [], [])
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                if post[0]:
                    for target, values in zip((words, gold, pred), post):
                        target.append(values)
                    post = ([], [], [])
                continue
            if len(fields) != 3:
                raise ValueError(f"{path}:{number}: expected `token gold pred`, got {len(fields)} fields")
            for values, field in zip(post, fields):
                values.append(field)
    if post[0]:
        for target, values in zip((words, gold, pred), post):
            target.append(values)
    return words, gold, pred


def format_comparison(result: Comparison) -> tuple[str, str, str]:
    """(dF1, CI95, p) cells, dF1 and CI in percentage points, as the results tables print them."""
    return (
        f"{result.delta * 100:+.2f}",
        f"[{result.ci_low * 100:+.2f},{result.ci_high * 100:+.2f}]",  # no space: tables split on it
        f"{result.p_value:.3f}",
    )
