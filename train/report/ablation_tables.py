"""The tables of an ablation of either task (train/report/ablate.py): one ablation.csv row per run, the
ablation.md summary (mean ± sample std per experiment) and its paired bootstrap of every experiment
against the first (train/report/significance.py). Torch-free: they read the runs' results.json and
prediction files.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from mner.train.engine.run_files import read_results
from mner.train.engine.scores import PERCENT, read_pred_csv
from mner.train.report import significance

# Per-type scores in ablation.csv: results.json metric -> column prefix (column `<prefix>_<TYPE>`).
# The ablation folder's files: its record and the tables written beside its runs (`mner results`, the
# plots and `mner ablate` read them; torch-free, so the readers need not load the runner).
ABLATION_FILE = "ablation.json"
ABLATION_CSV, ABLATION_MD = "ablation.csv", "ablation.md"

_TYPE_METRICS = (("precision", "p"), ("recall", "r"), ("f1", "f1"))
# Column prefix -> ablation.md header suffix.
_TYPE_HEADERS = {"p": "P", "r": "R", "f1": "F1"}


def table_row(name: str, seed: int, run_dir: Path) -> dict:
    """One ablation.csv row: micro and per-type P/R/F1 (percent) on test, or valid without a test split."""
    results = read_results(run_dir)
    split = "test" if "test" in results else "valid"
    scores = results[split]
    row = {"experiment": name, "seed": seed, "split": split, "best_epoch": results["best_epoch"]}
    row["dev_f1"] = results["valid"]["micro"]["f1"] * PERCENT
    for metric in ("precision", "recall", "f1"):
        row[metric] = scores["micro"][metric] * PERCENT
    for entity_type, type_scores in sorted(scores["per_type"].items()):
        for metric, prefix in _TYPE_METRICS:
            row[f"{prefix}_{entity_type}"] = type_scores[metric] * PERCENT
    row["run_dir"] = str(run_dir)
    return row


def summary_markdown(table: pd.DataFrame) -> str:
    """Markdown table: per experiment (in the given order), mean ± sample std over seeds, percent.

    Args:
        table: ablation.csv rows: experiment, seed, split, precision, recall, f1, and per type
            p_<TYPE>, r_<TYPE>, f1_<TYPE>.
    Per-type columns come after the micro ones, type by type (sorted), as P, R, F1.
    """
    types = sorted(c[len("f1_") :] for c in table.columns if c.startswith("f1_"))
    metrics = ["precision", "recall", "f1"]
    headers = ["experiment", "seeds", "P", "R", "F1"]
    for entity_type in types:
        for _, prefix in _TYPE_METRICS:
            metrics.append(f"{prefix}_{entity_type}")
            headers.append(f"{entity_type} {_TYPE_HEADERS[prefix]}")
    splits = sorted(set(table["split"]))
    intro = f"Micro and per-type P/R/F1 on {'/'.join(splits)}, percent, mean ± sample std over seeds."
    return mean_std_markdown(table, intro, headers, metrics)


def mean_std_markdown(table: pd.DataFrame, intro: str, headers: list[str], metrics: list[str]) -> str:
    """`intro`, then a Markdown table: per experiment (in the table's order) its seed count and, per
    metric column of `table`, mean ± sample std over its seeds; `headers` names experiment, seeds, metrics."""
    lines = [
        intro,
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|",
    ]
    for experiment, runs in table.groupby("experiment", sort=False):
        cells = [str(experiment), str(len(runs))]
        for metric in metrics:
            values = runs[metric].dropna()
            cells.append(_mean_std(values.mean(), values.std(ddof=1), len(values)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def significance_markdown(table: pd.DataFrame, resamples: int, seed: int = 0) -> str:
    """Markdown table: every experiment against the first by the paired bootstrap over posts
    (train/report/significance.py), all seeds of a side averaged on each resample.

    Args:
        table: ablation.csv rows (experiment, seed, split, run_dir); each run's pred_<split>.conll is read.
    """
    return bootstrap_markdown(table, resamples, seed, _seed_predictions, "", "dF1", "tagged")


def bootstrap_markdown(table, resamples: int, seed: int, read, measure: str, delta: str, did: str) -> str:
    """Every experiment of `table` against the first, by significance.paired_bootstrap on what
    `read(runs, split)` gives: ((posts' key, gold tag sequences), one prediction list per seed).

    `measure` names what is compared in the intro ("" for entity F1, " of the accuracy"), `delta` its
    column ("dF1"), `did` what the runs did to the posts ("tagged"), for a row of other posts.
    """
    split = table["split"].iloc[0]
    groups = list(table.groupby("experiment", sort=False))
    base_name, base_runs = groups[0]
    posts, base_preds = read(base_runs, split)
    lines = [
        f"{significance.TEST_NAME}{measure} against {base_name} on {split}: {resamples} resamples "
        f"(seed {seed}), the seeds of each side averaged on every resample; {delta} and its 95% interval "
        "in percentage points, p two-sided.",
        "",
        f"| experiment | seeds | {delta} | 95% CI | p |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, runs in groups[1:]:
        other_posts, preds = read(runs, split)
        if other_posts != posts:
            lines.append(f"| {name} | {len(runs)} | - | {did} other posts than {base_name} | - |")
            continue
        result = significance.paired_bootstrap(posts[1], base_preds, preds, resamples=resamples, seed=seed)
        shown, interval, p = significance.format_comparison(result)
        lines.append(f"| {name} | {len(runs)} | {shown} | {interval} | {p} |")
    return "\n".join(lines) + "\n"


def _seed_predictions(runs: pd.DataFrame, split: str) -> tuple[tuple, list]:
    """((words, gold) of the posts, one prediction list per seed) of one experiment's runs."""
    keyed, preds = None, []
    for run_dir in runs["run_dir"]:
        words, gold, pred = significance.read_predictions(Path(run_dir) / f"pred_{split}.conll")
        if keyed is not None and (words, gold) != keyed:
            raise ValueError(
                f"{run_dir}: its pred_{split}.conll holds other posts than its experiment's first seed"
            )
        keyed = (words, gold)
        preds.append(pred)
    return keyed, preds


def _mean_std(mean: float, std: float, n: int) -> str:
    if n == 0:
        return "-"
    if n == 1 or math.isnan(std):
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"


def class_table_row(experiment: str, seed: int, run_dir: Path) -> dict:
    results = read_results(run_dir)
    split = "test" if "test" in results else "valid"
    scores = results[split]
    row = {"experiment": experiment, "seed": seed, "split": split, "best_epoch": results["best_epoch"]}
    row["valid_accuracy"] = results["valid"]["accuracy"] * PERCENT
    for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1"):
        row[key] = scores[key] * PERCENT
    for label, per in scores["per_class"].items():
        row[f"f1_{label}"] = per["f1"] * PERCENT
    row["run_dir"] = str(run_dir)
    return row


def class_summary_markdown(table: pd.DataFrame) -> str:
    """Per experiment, in the given order: accuracy, macro P/R/F1 and per-class F1, mean ± sample std."""
    labels = [c[len("f1_") :] for c in table.columns if c.startswith("f1_")]
    metrics = [
        "accuracy",
        "macro_precision",
        "macro_recall",
        "macro_f1",
        *(f"f1_{label}" for label in labels),
    ]
    headers = [
        "experiment",
        "seeds",
        "Acc",
        "macro P",
        "macro R",
        "macro F1",
        *(f"{label} F1" for label in labels),
    ]
    intro = (
        f"Accuracy, macro P/R/F1 and per-class F1 on {'/'.join(sorted(set(table['split'])))}, percent, "
        "mean ± sample std over seeds."
    )
    return mean_std_markdown(table, intro, headers, metrics)


def _seed_labels(runs: pd.DataFrame, split: str) -> tuple[tuple, list[list[list[str]]]]:
    """((guids, gold as one-word tag sequences), one prediction list per seed) from each run's
    pred_<split>.csv: the shape bootstrap_markdown reads."""
    gold, preds = None, []
    for run_dir in runs["run_dir"]:
        rows = read_pred_csv(Path(run_dir) / f"pred_{split}.csv")
        mine = ([guid for guid, _, _ in rows], [[f"B-{g}"] for _, g, _ in rows])
        if gold is not None and mine != gold:
            raise ValueError(
                f"{run_dir}: its pred_{split}.csv holds other posts than its experiment's first seed"
            )
        gold = mine
        preds.append([[f"B-{p}"] for _, _, p in rows])
    return gold, preds


def accuracy_significance_markdown(table: pd.DataFrame, resamples: int, seed: int = 0) -> str:
    """Every experiment against the first: dAcc, its 95% interval and p (paired bootstrap over posts)."""
    return bootstrap_markdown(table, resamples, seed, _seed_labels, " of the accuracy", "dAcc", "labelled")
