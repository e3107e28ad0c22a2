"""Entity-level precision, recall and F1 with conlleval semantics, and a CoNLL prediction writer.

Chunking follows conlleval (and seqeval's default mode): an entity starts at B-X, or at an I-X that
follows O or a tag of another type (an "orphan" I- starts a new entity rather than being dropped);
it ends before O, before B-, or before a change of type. An entity counts as correct only when both
its span and its type match a gold entity.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from mner.cache.conll import Post


def entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """The entities of one tag sequence as (type, start, end) with `end` exclusive."""
    found = set()
    kind, start = None, 0
    for i, tag in enumerate([*tags, "O"]):
        prefix, tag_type = (tag[:2], tag[2:]) if tag[:2] in ("B-", "I-") else ("O", None)
        continues = prefix == "I-" and tag_type == kind
        if kind is not None and not continues:
            found.add((kind, start, i))
            kind = None
        if prefix != "O" and not continues:
            kind, start = tag_type, i
    return found


def _prf(correct: int, predicted: int, support: int) -> dict:
    precision = correct / predicted if predicted else 0.0
    recall = correct / support if support else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "support": support,
        "predicted": predicted,
        "correct": correct,
    }


def entity_scores(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """Micro and per-type entity scores.

    Args:
        gold, pred: one tag sequence per post; pred[i] must be as long as gold[i].
    Returns:
        {"micro": {"precision", "recall", "f1", "support", "predicted", "correct"},
         "per_type": {TYPE: {same keys}}} for every type in gold or pred, types sorted.
    """
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} posts but pred has {len(pred)}")
    support, predicted, correct = Counter(), Counter(), Counter()
    for i, (gold_tags, pred_tags) in enumerate(zip(gold, pred)):
        if len(gold_tags) != len(pred_tags):
            raise ValueError(f"post {i}: gold has {len(gold_tags)} tags but pred has {len(pred_tags)}")
        gold_entities, pred_entities = entities(gold_tags), entities(pred_tags)
        support.update(kind for kind, _, _ in gold_entities)
        predicted.update(kind for kind, _, _ in pred_entities)
        correct.update(kind for kind, _, _ in gold_entities & pred_entities)
    per_type = {
        kind: _prf(correct[kind], predicted[kind], support[kind]) for kind in sorted(support | predicted)
    }
    micro = _prf(sum(correct.values()), sum(predicted.values()), sum(support.values()))
    return {"micro": micro, "per_type": per_type}


def write_conll(path: str | Path, posts: Sequence[Post], pred_tags: Sequence[Sequence[str]]) -> Path:
    """Write `token gold pred` lines, a blank line after each post (conlleval's input format).

    Whitespace inside a token (Twitter has lone U+00A0 tokens) is written as "_" so that every line
    splits into exactly three fields. Raises ValueError when a post and its predictions differ in length.
    """
    if len(posts) != len(pred_tags):
        raise ValueError(f"{len(posts)} posts but {len(pred_tags)} prediction sequences")
    lines = []
    for post, tags in zip(posts, pred_tags):
        if len(tags) != len(post.words):
            raise ValueError(
                f"post {post.key!r} (line {post.line}): {len(post.words)} words but {len(tags)} predicted tags"
            )
        for word, gold, pred in zip(post.words, post.tags, tags):
            token = "_".join(word.split()) or "_"
            lines.append(f"{token} {gold} {pred}\n")
        lines.append("\n")
    path = Path(path)
    path.write_text("".join(lines), encoding="utf-8")
    return path


def classification_scores(gold: Sequence[str], pred: Sequence[str], labels: Sequence[str]) -> dict:
    """Sentence-level scores: accuracy, macro P/R/F1, per-class P/R/F1 and the confusion matrix.

    Args:
        gold, pred: one label per post, equally long.
        labels: the run's label list (per_class and the confusion matrix follow its order).
    Returns:
        {"accuracy", "macro_precision", "macro_recall", "macro_f1", "support" (posts),
         "per_class": {label: {"precision", "recall", "f1", "support", "predicted", "correct"}},
         "confusion": {"labels": labels, "matrix": rows gold, columns predicted}}. The macro averages
        run over the labels that occur in gold or pred (scikit-learn's default), so a label absent
        from a split and never predicted does not pull them to 0.
    Raises ValueError for unequal lengths or a label outside `labels`.
    """
    if len(gold) != len(pred):
        raise ValueError(f"gold has {len(gold)} posts but pred has {len(pred)}")
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for i, (g, p) in enumerate(zip(gold, pred)):
        for what, label in (("gold", g), ("predicted", p)):
            if label not in index:
                raise ValueError(f"post {i}: {what} label {label!r} is not one of {list(labels)}")
        matrix[index[g]][index[p]] += 1
    per_class = {
        label: _prf(matrix[i][i], sum(row[i] for row in matrix), sum(matrix[i]))
        for i, label in enumerate(labels)
    }
    seen = [s for s in per_class.values() if s["support"] or s["predicted"]]
    macro = {
        f"macro_{key}": sum(s[key] for s in seen) / len(seen) if seen else 0.0
        for key in ("precision", "recall", "f1")
    }
    correct = sum(matrix[i][i] for i in range(len(labels)))
    return {
        "accuracy": correct / len(gold) if gold else 0.0,
        **macro,
        "support": len(gold),
        "per_class": per_class,
        "confusion": {"labels": list(labels), "matrix": matrix},
    }
