"""PNG figures of finished work, for `mner results ... --plot DIR` (matplotlib, the optional `plot` extra).

From tagging run folders (each one's metrics.jsonl and results.json):
    learning_curves.png   training loss and dev F1 per epoch, one line per run (a run still training:
                          the epochs it has finished)
    per_type_f1.png       per-type F1 on the split, one bar per finished run in each type's group
From ablation folders (their ablation.csv):
    ablation_<name>.png   per experiment, mean over seeds with a bar of ± one sample std: micro F1 of a
                          tagging ablation, accuracy and macro F1 of a classifier ablation

`plots.json` beside them records what was drawn (the folder's marker: a later --plot into the same
folder replaces our own figures; any other non-empty folder is refused). Nothing here trains or
evaluates: a figure shows what the folders already hold.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from mner.runtime import claim_folder, refuse_inputs_as_output, write_atomic
from mner.train.engine.run_files import is_run_folder, read_metrics, read_results, recorded_task, unfinished
from mner.train.engine.tasks import SENTENCE_CLASSIFICATION, TOKEN_TAGGING
from mner.train.report.ablation_tables import ABLATION_CSV, ABLATION_FILE

log = logging.getLogger(__name__)

PLOTS_FILE = "plots.json"
PLOTS_KEYS = ("inputs", "split", "figures")
INSTALL_HINT = "pip install 'mner-cache[plot]' (or: pip install matplotlib)"
_DPI = 120
# ablation.csv column -> its label, of the first kind of ablation whose columns the table has.
ABLATION_METRICS = ({"f1": "micro F1"}, {"accuracy": "accuracy", "macro_f1": "macro F1"})


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend; ValueError saying how to install it."""
    try:
        import matplotlib
    except ImportError as err:
        raise ValueError(f"--plot needs matplotlib, which is not installed: {INSTALL_HINT}") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(paths: Sequence, out_dir, split: str = "test") -> list[Path]:
    """Draw the figures of `paths` (tagging run folders and/or ablation folders) into `out_dir`.

    Returns the PNG paths written. A run still training is drawn as far as it got (its learning
    curves; it has no per-type scores yet) and named in a warning and in plots.json ("unfinished").
    Raises ValueError, before anything is created, when matplotlib is missing, when `out_dir` is a
    folder of other files or one of the inputs, or when a path is a classifier run (tagging runs
    only), an ablation without its ablation.csv yet, or neither a run nor an ablation folder.
    """
    plt = _pyplot()
    runs, ablations, still = [], [], {}
    for path in map(Path, paths):
        if (path / ABLATION_CSV).is_file():
            ablations.append(path)
        elif recorded_task(path) == SENTENCE_CLASSIFICATION.name:
            raise ValueError(
                f"{path} is a classifier run: --plot draws the learning curves and per-type F1 of tagging "
                f"runs only (and the {ABLATION_CSV} of an ablation of either task); see `mner results {path}`"
            )
        elif is_run_folder(path, TOKEN_TAGGING.name):
            runs.append(path)
            status = unfinished(path)
            if status is not None:
                still[path] = status
        elif (path / ABLATION_FILE).is_file():
            raise ValueError(
                f"{path} is an ablation that has not finished (no {ABLATION_CSV} yet); plot its finished "
                f"runs (<arm>/seed<k>), or wait for it to finish"
            )
        else:
            raise ValueError(
                f"{path} is neither a run folder (config.json) nor an ablation folder ({ABLATION_CSV}); "
                "there is nothing to plot"
            )
    finished = [run for run in runs if run not in still]
    # Everything is read before the folder is made, so a table that cannot be drawn leaves nothing.
    types = type_scores(finished, split) if finished else None
    arms = {folder: ablation_scores(folder) for folder in ablations}
    out = Path(out_dir)
    refuse_inputs_as_output(out, "--plot", folders=[("the input folder", p) for p in (*runs, *ablations)])
    claim = claim_folder(out, PLOTS_FILE, PLOTS_KEYS, resume=None, what="plot", flag="--plot")
    claim.create()
    for run, status in still.items():
        log.warning("%s is %s: its learning curves show the epochs so far; no per-type F1", run, status)
    written = []
    if runs:
        written.append(_learning_curves(plt, runs, out / "learning_curves.png"))
    if types is not None:
        written.append(_per_type_f1(plt, types, split, out / "per_type_f1.png"))
    for folder, table in arms.items():
        written.append(_ablation_arms(plt, folder, table, out / f"ablation_{folder.name}.png"))
    record = {
        "inputs": [str(p) for p in (*runs, *ablations)],
        "split": split,
        "figures": [p.name for p in written],
        "unfinished": {str(run): status for run, status in still.items()},
    }
    write_atomic(out / PLOTS_FILE, json.dumps(record, indent=2) + "\n")
    claim.unlock()
    return written


def run_labels(runs: list[Path]) -> list[str]:
    """A legend label per run: its folder name, or as many trailing path parts as make them distinct
    (ablation runs are all called seed<k>: "no_region/seed1")."""
    for depth in range(1, max(len(run.parts) for run in runs) + 1):
        labels = ["/".join(run.parts[-depth:]) for run in runs]
        if len(set(labels)) == len(labels):
            return labels
    return [str(run) for run in runs]


def curves(run_dir: Path) -> pd.DataFrame:
    """epoch, train_loss, dev_f1 (percent) per epoch of one run, from its metrics.jsonl."""
    rows = read_metrics(run_dir)
    return pd.DataFrame(
        {
            "epoch": [row["epoch"] for row in rows],
            "train_loss": [row["train_loss"] for row in rows],
            "dev_f1": [100 * row["dev_f1"] for row in rows],
        }
    )


def _learning_curves(plt, runs: list[Path], png: Path) -> Path:
    figure, (loss_axis, f1_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for run, label in zip(runs, run_labels(runs)):
        table = curves(run)
        loss_axis.plot(table["epoch"], table["train_loss"], marker="o", label=label)
        f1_axis.plot(table["epoch"], table["dev_f1"], marker="o", label=label)
    loss_axis.set(title="training loss", xlabel="epoch", ylabel="loss")
    f1_axis.set(title="dev micro F1", xlabel="epoch", ylabel="F1 (%)")
    f1_axis.legend(fontsize="small")
    return _save(plt, figure, png)


def type_scores(runs: list[Path], split: str) -> pd.DataFrame:
    """Per-type F1 (percent) on `split`: one row per type (sorted), one column per run (run_labels)."""
    columns = {}
    for run, label in zip(runs, run_labels(runs)):
        results = read_results(run)
        if split not in results:
            raise ValueError(f"{run} has no {split} results; run `mner evaluate {run} --split {split}`")
        columns[label] = {kind: 100 * s["f1"] for kind, s in results[split]["per_type"].items()}
    return pd.DataFrame(columns).sort_index().fillna(0.0)


def _per_type_f1(plt, table: pd.DataFrame, split: str, png: Path) -> Path:
    runs = table.columns
    figure, axis = plt.subplots(figsize=(max(5, 1.5 * len(table) * max(1, len(runs)) / 2), 4))
    table.plot.bar(ax=axis, rot=0)
    axis.set(title=f"per-type F1 on {split}", xlabel="entity type", ylabel="F1 (%)")
    axis.legend(fontsize="small")
    return _save(plt, figure, png)


def ablation_scores(folder: Path) -> dict[str, pd.DataFrame]:
    """Label -> arm_scores of each metric an ablation.csv is drawn by (ABLATION_METRICS: micro F1 of a
    tagging ablation; accuracy and macro F1 of a classifier one); ValueError for another table."""
    columns = set(pd.read_csv(folder / ABLATION_CSV, nrows=0).columns)
    for metrics in ABLATION_METRICS:
        if {"experiment", *metrics} <= columns:
            return {label: arm_scores(folder, metric) for metric, label in metrics.items()}
    raise ValueError(
        f"{folder / ABLATION_CSV} has none of the columns an ablation is drawn by (experiment and f1, or "
        "accuracy and macro_f1); it was not written by `mner ablate`, or was changed since"
    )


def arm_scores(folder: Path, metric: str = "f1") -> pd.DataFrame:
    """experiment, mean, std (sample; 0 for one seed), seeds: `metric` (percent) per arm of an
    ablation.csv, in the file's order."""
    table = pd.read_csv(folder / ABLATION_CSV)
    grouped = table.groupby("experiment", sort=False)[metric]
    summary = grouped.agg(["mean", "std", "count"]).reset_index()
    return pd.DataFrame(
        {
            "experiment": summary["experiment"],
            "mean": summary["mean"],
            "std": summary["std"].fillna(0.0),
            "seeds": summary["count"],
        }
    )


def _ablation_arms(plt, folder: Path, scores: dict[str, pd.DataFrame], png: Path) -> Path:
    arms = len(next(iter(scores.values())))
    figure, axis = plt.subplots(figsize=(max(5, 0.9 * arms * len(scores) + 2), 4))
    width = 0.8 / len(scores)
    for i, (label, table) in enumerate(scores.items()):
        where = [x + (i - (len(scores) - 1) / 2) * width for x in range(arms)]
        axis.bar(where, table["mean"], width, yerr=table["std"], capsize=4, label=label)
    axis.set_xticks(range(arms), next(iter(scores.values()))["experiment"])
    names = " and ".join(scores)
    axis.set(title=f"{folder.name}: {names}, mean ± std over seeds", ylabel="%")
    if len(scores) > 1:
        axis.legend(fontsize="small")
    axis.tick_params(axis="x", rotation=30)
    return _save(plt, figure, png)


def _save(plt, figure, png: Path) -> Path:
    figure.tight_layout()
    figure.savefig(png, dpi=_DPI, format="png")
    plt.close(figure)
    return png
