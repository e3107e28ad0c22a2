"""Entity scores against seqeval's default (conlleval) mode, and the CoNLL writer."""

import random

import pytest
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score

from mner.cache.conll import Post
from mner.train.engine.metrics import entities, entity_scores, write_conll
from tests.train.factories import random_tags


def test_conlleval_chunking_by_hand():
    tags = ["I-PER", "I-PER", "O", "B-LOC", "I-ORG", "I-ORG", "B-LOC", "B-LOC", "I-LOC", "I-PER"]
    assert entities(tags) == {
        ("PER", 0, 2),  # an orphan I- starts an entity
        ("LOC", 3, 4),
        ("ORG", 4, 6),  # a change of type ends one entity and starts another
        ("LOC", 6, 7),  # B- ends the previous entity
        ("LOC", 7, 9),
        ("PER", 9, 10),
    }


def test_counts_by_hand():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG"]]
    pred = [["B-PER", "I-PER", "O", "B-PER"], ["O"]]
    scores = entity_scores(gold, pred)
    assert scores["micro"] == {
        "precision": 0.5,
        "recall": 1 / 3,
        "f1": 0.4,
        "support": 3,
        "predicted": 2,
        "correct": 1,
    }
    assert scores["per_type"]["PER"] == {
        "precision": 0.5, "recall": 1.0, "f1": 2 / 3, "support": 1, "predicted": 2, "correct": 1,
    }  # fmt: skip
    assert scores["per_type"]["ORG"]["recall"] == 0.0 and scores["per_type"]["ORG"]["predicted"] == 0


def test_no_entities_scores_zero():
    scores = entity_scores([["O", "O"]], [["O", "O"]])
    assert scores["micro"]["f1"] == 0.0 and scores["per_type"] == {}


@pytest.mark.parametrize("seed", range(20))
def test_matches_seqeval_default_mode_with_orphan_i_tags(seed):
    rng = random.Random(seed)
    gold, pred = [], []
    for _ in range(rng.randint(1, 30)):
        n = rng.randint(1, 12)
        gold.append(random_tags(n, rng, orphans=True))
        # Predictions: mostly the gold tags with random corruption, so some entities match.
        pred.append(
            [t if rng.random() < 0.6 else tag for t, tag in zip(gold[-1], random_tags(n, rng, orphans=True))]
        )
    scores = entity_scores(gold, pred)
    micro = scores["micro"]
    assert micro["precision"] == pytest.approx(precision_score(gold, pred, zero_division=0))
    assert micro["recall"] == pytest.approx(recall_score(gold, pred, zero_division=0))
    assert micro["f1"] == pytest.approx(f1_score(gold, pred, zero_division=0))
    report = classification_report(gold, pred, output_dict=True, zero_division=0)
    types = {name for name in report if name not in ("micro avg", "macro avg", "weighted avg")}
    assert set(scores["per_type"]) == types
    for kind in types:
        for key in ("precision", "recall", "f1-score", "support"):
            ours = scores["per_type"][kind]["f1" if key == "f1-score" else key]
            assert ours == pytest.approx(report[kind][key]), (kind, key)


def test_length_mismatches_are_errors():
    with pytest.raises(ValueError, match=r"gold has 1 posts but pred has 2"):
        entity_scores([["O"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match=r"post 0: gold has 2 tags but pred has 1"):
        entity_scores([["O", "O"]], [["O"]])


def test_write_conll(tmp_path):
    posts = [
        Post(key="1", words=("George", "Zimmerman"), tags=("B-PER", "I-PER"), line=1),
        Post(key="2", words=("\u00a0", "in a", "NYC"), tags=("O", "O", "B-LOC"), line=5),
    ]
    path = write_conll(tmp_path / "pred.conll", posts, [["B-PER", "O"], ["O", "O", "B-LOC"]])
    assert path.read_text(encoding="utf-8") == (
        "George B-PER B-PER\nZimmerman I-PER O\n\n_ O O\nin_a O O\nNYC B-LOC B-LOC\n\n"
    )
    for line in path.read_text(encoding="utf-8").splitlines():
        assert line == "" or len(line.split()) == 3


def test_write_conll_errors(tmp_path):
    posts = [Post(key="1015799", words=("a", "b"), tags=("O", "O"), line=7)]
    with pytest.raises(ValueError, match=r"post '1015799' \(line 7\): 2 words but 1 predicted tags"):
        write_conll(tmp_path / "x", posts, [["O"]])
    with pytest.raises(ValueError, match=r"1 posts but 0 prediction sequences"):
        write_conll(tmp_path / "x", posts, [])
