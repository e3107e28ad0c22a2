"""The paired bootstrap (train/report/significance.py) against brute force: every resample enumerated, each
scored by metrics.entity_scores on the resampled posts (a second implementation of the F1)."""

import itertools

import numpy as np
import pytest

from mner.cache.conll import Post
from mner.train.engine.metrics import entity_scores, write_conll
from mner.train.report import significance

# Four posts; A and B differ on posts 1 and 3 (B fixes a LOC, breaks a PER, and changes a type).
GOLD = [["B-PER", "I-PER", "O"], ["B-LOC", "O"], ["O", "B-ORG"], ["B-PER", "O", "B-LOC"]]
PRED_A = [["B-PER", "I-PER", "O"], ["O", "O"], ["O", "B-ORG"], ["B-PER", "O", "B-ORG"]]
PRED_B = [["B-PER", "I-PER", "O"], ["B-LOC", "O"], ["O", "B-ORG"], ["O", "O", "B-LOC"]]
PRED_B2 = [["B-PER", "O", "O"], ["B-LOC", "O"], ["O", "B-ORG"], ["B-PER", "O", "B-LOC"]]


def brute_force(gold, preds_a, preds_b):
    """(observed delta, every resample's delta) with F1s from entity_scores, all n^n resamples."""

    def f1(preds, rows):
        return np.mean(
            [entity_scores([gold[i] for i in rows], [pred[i] for i in rows])["micro"]["f1"] for pred in preds]
        )

    n = len(gold)
    resamples = list(itertools.product(range(n), repeat=n))
    deltas = np.array([f1(preds_b, rows) - f1(preds_a, rows) for rows in resamples])
    return f1(preds_b, range(n)) - f1(preds_a, range(n)), deltas, np.array(resamples)


@pytest.mark.parametrize("preds_b", [[PRED_B], [PRED_B, PRED_B2]], ids=["one seed", "two seeds"])
def test_every_resample_matches_brute_force(preds_b):
    delta, deltas, indices = brute_force(GOLD, [PRED_A], preds_b)
    result = significance.paired_bootstrap(GOLD, [PRED_A], preds_b, indices=indices)
    assert result.delta == pytest.approx(delta, abs=1e-12)
    assert result.resamples == len(deltas) == 4**4
    extreme = np.sum(np.abs(deltas - delta) >= abs(delta) - 1e-12)
    assert result.p_value == pytest.approx((1 + extreme) / (len(deltas) + 1))
    low, high = np.percentile(deltas, [2.5, 97.5])
    assert (result.ci_low, result.ci_high) == pytest.approx((low, high), abs=1e-12)
    assert result.seeds_b == len(preds_b) and result.posts == 4


def test_identical_runs_differ_by_nothing():
    result = significance.paired_bootstrap(GOLD, [PRED_A], [PRED_A], resamples=200, seed=3)
    assert result.delta == 0.0
    assert result.p_value == 1.0
    assert result.ci_low == result.ci_high == 0.0


def test_drawn_resamples_approach_the_exact_p_value():
    delta, deltas, _ = brute_force(GOLD, [PRED_A], [PRED_B])
    exact = np.mean(np.abs(deltas - delta) >= abs(delta) - 1e-12)
    drawn = significance.paired_bootstrap(GOLD, [PRED_A], [PRED_B], resamples=20000, seed=1)
    assert drawn.p_value == pytest.approx(exact, abs=0.02)


def test_a_clear_win_is_significant_and_the_draw_is_seeded():
    rng = np.random.default_rng(0)
    gold = [["B-PER", "O"]] * 200
    # B finds every entity, A misses a random 40% of them.
    pred_a = [["B-PER", "O"] if rng.random() > 0.4 else ["O", "O"] for _ in gold]
    pred_b = [list(tags) for tags in gold]
    result = significance.paired_bootstrap(gold, [pred_a], [pred_b], resamples=500, seed=7)
    assert result.delta > 0.2 and result.ci_low > 0
    assert result.p_value == pytest.approx(1 / 501)
    again = significance.paired_bootstrap(gold, [pred_a], [pred_b], resamples=500, seed=7)
    assert again == result
    other = significance.paired_bootstrap(gold, [pred_a], [pred_b], resamples=500, seed=8)
    assert (other.ci_low, other.ci_high) != (result.ci_low, result.ci_high)


def test_bad_comparisons_are_refused():
    with pytest.raises(ValueError, match="at least one run"):
        significance.paired_bootstrap(GOLD, [], [PRED_B])
    with pytest.raises(ValueError, match="post 1: gold has 2 tags but pred has 1"):
        significance.paired_bootstrap(GOLD, [PRED_A], [[*PRED_B[:1], ["O"], *PRED_B[2:]]])
    with pytest.raises(ValueError, match="at least 1 resample, got 0"):
        significance.paired_bootstrap(GOLD, [PRED_A], [PRED_B], resamples=0)


def test_read_predictions_reads_what_write_conll_wrote(tmp_path):
    posts = [
        Post(key=str(i), words=tuple(f"w{i}{j}" for j in range(len(tags))), tags=tuple(tags), line=1)
        for i, tags in enumerate(GOLD)
    ]
    path = write_conll(tmp_path / "pred_test.conll", posts, PRED_B)
    words, gold, pred = significance.read_predictions(path)
    assert words == [list(post.words) for post in posts] and gold == GOLD and pred == PRED_B
    path.write_text("a O O\nb O\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{path}:2: expected `token gold pred`, got 2 fields$"):
        significance.read_predictions(path)
