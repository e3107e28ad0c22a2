"""Tasks: what stage two predicts, named by a run (train/registry.py TASKS).

A task says what the shared training loop (train/loop.py `fit`) cannot know: the label vocabulary
it reads from the training data, the targets a batch carries for the head, which heads can score
them, how a split is scored, which score selects the best epoch, how an epoch's scores are written
to metrics.jsonl and the log, and the prediction files a run writes.

- tagging: one BIO tag per word (MNER). Labels "O", "B-<type>", "I-<type>"; targets are the
  batch's per-word `labels` (B, T) under `word_mask`; heads score word emissions (B, T, L); the
  metric is entity-level P/R/F1 (train/metrics.py), dev micro F1 selects; pred_<split>.conll.
- classification: one label per post (the BertResNet seed). Labels are the train split's tags;
  targets are (B,); heads score (B, L) (train/classifier_model.py); the metric is accuracy and
  macro P/R/F1, `classifier.select` (macro_f1 or accuracy) selects; pred_<split>.csv.

Torch-free: the tables of `mner results` and the ablation read a run's task through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from mner.cache.datasets import Split, label_names
from mner.train.metrics import classification_scores, entity_scores
from mner.train.scores import format_class_scores, format_entity_scores, write_pred_csv


@dataclass(frozen=True)
class TokenTagging:
    """One BIO tag per word; the model's emissions are (B, T, L) over the label list."""

    name: str = "tagging"
    heads: tuple[str, ...] = ("crf", "softmax")  # model.head names that fit per-word emissions
    selects: tuple[str, ...] = ("f1",)  # the score that picks the best epoch: dev micro F1
    # config.json keys a resume must find unchanged (besides the cache fingerprint)
    resume_keys: tuple[str, ...] = ("model", "train", "label_names", "data_source", "data_files")
    settings: str = "train"  # the record's table of epochs, seed and the training settings

    def label_names(self, split: Split) -> list[str]:
        """The label list a run learns: "O", then B-/I- of every type in the training split."""
        return label_names(split)

    def check_labels(self, names: Sequence[str]) -> list[str]:
        """The entity types of a BIO label list, sorted; ValueError when it is not O + B-/I- labels."""
        if not names or names[0] != "O":
            raise ValueError(f"label names must start with 'O', got {list(names)[:3]}")
        bad = [name for name in names[1:] if name[:2] not in ("B-", "I-") or len(name) < 3]
        if bad:
            raise ValueError(f"label names must be 'O', 'B-<type>' or 'I-<type>'; got {bad}")
        if len(set(names)) != len(names):
            raise ValueError(f"label names repeat: {list(names)}")
        types = sorted({name[2:] for name in names[1:]})
        if not types:
            raise ValueError(
                "the label set has no entity type (only 'O'); the training split has no entities"
            )
        return types

    def targets(self, batch: dict, outside: int):
        """(tags (B, T), mask (B, T)): the gold label ids under word_mask, `outside` ("O") elsewhere.

        Padded positions carry -100; the CRF indexes with every tag, so they get a real (ignored) id.
        """
        mask = batch["word_mask"]  # (B, T)
        return batch["labels"].where(mask, outside), mask

    def score(self, gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> dict:
        """Entity-level micro and per-type P/R/F1 (train.metrics.entity_scores)."""
        return entity_scores(gold, predicted)

    def selected(self, scores: dict, select: str = "f1") -> float:
        """The dev score that picks the best epoch: micro F1."""
        return scores["micro"][select]

    def metric_name(self, select: str = "f1") -> str:
        return "dev F1"

    def epoch_line(self, scores: dict) -> dict:
        """An epoch's dev scores as metrics.jsonl keys."""
        micro = scores["micro"]
        return {"dev_precision": micro["precision"], "dev_recall": micro["recall"], "dev_f1": micro["f1"]}

    def postfix(self, scores: dict) -> dict:
        """The dev scores shown beside the progress bar."""
        return {"dev_f1": f"{scores['micro']['f1']:.4f}"}

    def describe(self, scores: dict) -> str:
        """The dev scores in the epoch's log line."""
        return f"dev F1 {scores['micro']['f1']:.4f}"

    def prediction_file(self, split: str) -> str:
        return f"pred_{split}.conll"

    def write_predictions(self, run_dir: Path, split: Split, name: str, predictions) -> Path:
        """pred_<name>.conll: `token gold pred` per word (train.metrics.write_conll)."""
        from mner.train.metrics import write_conll

        path = Path(run_dir) / self.prediction_file(name)
        write_conll(path, split.posts, predictions)
        return path

    def headline(self, scores: dict) -> dict:
        """The scores a results table shows: micro P/R/F1 and support."""
        return dict(scores["micro"])

    def format_scores(self, scores: dict) -> str:
        return format_entity_scores(scores)


@dataclass(frozen=True)
class SentenceClassification:
    """One label per post; the model's logits are (B, L) over the label list."""

    name: str = "classification"
    heads: tuple[str, ...] = ("mlp", "cnn", "attention", "xattn")  # classifier.head names
    selects: tuple[str, ...] = ("macro_f1", "accuracy")  # classifier.select
    resume_keys: tuple[str, ...] = ("classifier", "label_names", "data", "data_files")
    settings: str = "classifier"

    def label_names(self, labels: Sequence[str]) -> list[str]:
        """The label list a run learns: the train split's labels, as the data reader sorted them."""
        return list(labels)

    def targets(self, batch: dict, outside: int = -100):
        """(labels (B,), None): one label id per post."""
        return batch["labels"], None

    def score(self, gold: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> dict:
        """Accuracy, macro and per-class P/R/F1, confusion (train.metrics.classification_scores)."""
        return classification_scores(gold, predicted, labels)

    def selected(self, scores: dict, select: str = "macro_f1") -> float:
        return scores[select]

    def metric_name(self, select: str = "macro_f1") -> str:
        return f"valid {select}"

    def epoch_line(self, scores: dict) -> dict:
        return {"valid_accuracy": scores["accuracy"], "valid_macro_f1": scores["macro_f1"]}

    def postfix(self, scores: dict) -> dict:
        return {"valid_acc": f"{scores['accuracy']:.4f}", "valid_f1": f"{scores['macro_f1']:.4f}"}

    def describe(self, scores: dict) -> str:
        return f"valid accuracy {scores['accuracy']:.4f}, macro-F1 {scores['macro_f1']:.4f}"

    def prediction_file(self, split: str) -> str:
        return f"pred_{split}.csv"

    def write_predictions(self, run_dir: Path, split, name: str, predictions) -> Path:
        """pred_<name>.csv: guid,gold,pred per post, in file order."""
        return write_pred_csv(Path(run_dir) / self.prediction_file(name), split, predictions)

    def headline(self, scores: dict) -> dict:
        """Macro P/R/F1 as precision/recall/f1, accuracy and support."""
        return {
            "precision": scores["macro_precision"],
            "recall": scores["macro_recall"],
            "f1": scores["macro_f1"],
            "accuracy": scores["accuracy"],
            "support": scores["support"],
        }

    def format_scores(self, scores: dict) -> str:
        return format_class_scores(scores)


TOKEN_TAGGING = TokenTagging()
SENTENCE_CLASSIFICATION = SentenceClassification()
