"""Scores as people read them, torch-free: percent, the score tables of `mner evaluate`, and the
classifier's pred_<split>.csv (what `mner results`, the ablation and the plots read back).

Results files hold fractions; every table prints percent with 2 decimals.
"""

from __future__ import annotations

from pathlib import Path

from mner.cache.classification import csv_text, read_csv_rows
from mner.runtime import write_atomic

PERCENT = 100.0


def format_entity_scores(scores: dict) -> str:
    """Entity scores (train.metrics.entity_scores): micro and per-type P/R/F1 and support, one line each."""
    import pandas as pd

    rows = {"micro": scores["micro"], **dict(sorted(scores["per_type"].items()))}
    table = pd.DataFrame(
        {
            "P": [row["precision"] * PERCENT for row in rows.values()],
            "R": [row["recall"] * PERCENT for row in rows.values()],
            "F1": [row["f1"] * PERCENT for row in rows.values()],
            "support": [row["support"] for row in rows.values()],
        },
        index=list(rows),
    )
    return table.to_string(float_format=lambda x: f"{x:.2f}")


def format_class_scores(scores: dict) -> str:
    """classification_scores as text: accuracy and macro P/R/F1, a per-class table, the confusion
    matrix (rows gold, columns predicted)."""
    import pandas as pd

    lines = [
        f"accuracy {scores['accuracy'] * PERCENT:.2f}  macro P {scores['macro_precision'] * PERCENT:.2f}  "
        f"R {scores['macro_recall'] * PERCENT:.2f}  F1 {scores['macro_f1'] * PERCENT:.2f}  "
        f"({scores['support']} posts)"
    ]
    per_class = pd.DataFrame(
        {
            "P": [s["precision"] * PERCENT for s in scores["per_class"].values()],
            "R": [s["recall"] * PERCENT for s in scores["per_class"].values()],
            "F1": [s["f1"] * PERCENT for s in scores["per_class"].values()],
            "support": [s["support"] for s in scores["per_class"].values()],
        },
        index=list(scores["per_class"]),
    )
    lines.append(per_class.to_string(float_format=lambda x: f"{x:.2f}"))
    labels = scores["confusion"]["labels"]
    matrix = pd.DataFrame(scores["confusion"]["matrix"], index=labels, columns=labels)
    matrix.index.name = "gold \\ pred"
    lines.append(matrix.to_string())
    return "\n".join(lines)


def write_pred_csv(path: Path, split, predicted: list[str]) -> Path:
    """A classifier's pred_<split>.csv: guid,gold,pred per example of `split`, in file order."""
    rows = [["guid", "gold", "pred"], *([e.guid, e.label, p] for e, p in zip(split.examples, predicted))]
    return write_atomic(path, csv_text(rows))


def read_pred_csv(path: Path) -> list[list[str]]:
    """The [guid, gold, pred] rows of a pred_<split>.csv, in file order; a guid holding a comma, a
    quote or a newline reads back as itself (both sides go through the csv module)."""
    return read_csv_rows(path)[1:]
