"""PNG figures of finished work, for `mner results ... --plot DIR` (matplotlib, the optional `plot` extra).

From run folders (each one's metrics.jsonl and results.json):
    learning_curves.png   training loss and dev F1 per epoch, one line per run
    per_type_f1.png       per-type F1 on the split, one bar per run in each type's group
From ablation folders (their ablation.csv):
    ablation_<name>.png   micro F1 per experiment, mean over seeds with a bar of ± one sample std

`plots.json` beside them records what was drawn (the folder's marker: a later --plot into the same
folder replaces our own figures; any other non-empty folder is refused). Nothing here trains or
evaluates: a figure shows what the folders already hold.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from mner.runtime import claim_folder, refuse_inputs_as_output, write_atomic
from mner.train.ablate import ABLATION_CSV
from mner.train.runs import RESULTS_FILE, is_run_folder, read_metrics, read_results

PLOTS_FILE = "plots.json"
PLOTS_KEYS = ("inputs", "split", "figures")
INSTALL_HINT = "pip install 'mner-cache[plot]' (or: pip install matplotlib)"
_DPI = 120


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
    """Draw the figures of `paths` (run folders and/or ablation folders) into `out_dir`.

    Returns the PNG paths written. Raises ValueError when matplotlib is missing, when `out_dir` is a
    folder of other files or one of the inputs, or when a path is neither a finished run nor an
    ablation folder with an ablation.csv.
    """
    plt = _pyplot()
    runs, ablations = [], []
    for path in map(Path, paths):
        if (path / ABLATION_CSV).is_file():
            ablations.append(path)
        elif is_run_folder(path) and (path / RESULTS_FILE).is_file():
            runs.append(path)
        else:
            raise ValueError(
                f"{path} is neither a finished run (config.json and results.json) nor an ablation folder "
                f"({ABLATION_CSV}); there is nothing to plot"
            )
    out = Path(out_dir)
    refuse_inputs_as_output(out, "--plot", folders=[("the input folder", p) for p in (*runs, *ablations)])
    claim = claim_folder(out, PLOTS_FILE, PLOTS_KEYS, resume=None, what="plot", flag="--plot")
    claim.create()
    written = []
    if runs:
        written.append(_learning_curves(plt, runs, out / "learning_curves.png"))
        written.append(_per_type_f1(plt, runs, split, out / "per_type_f1.png"))
    for folder in ablations:
        written.append(_ablation_arms(plt, folder, out / f"ablation_{folder.name}.png"))
    record = {"inputs": [str(p) for p in (*runs, *ablations)], "split": split, "figures": []}
    record["figures"] = [p.name for p in written]
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


def _per_type_f1(plt, runs: list[Path], split: str, png: Path) -> Path:
    table = type_scores(runs, split)
    figure, axis = plt.subplots(figsize=(max(5, 1.5 * len(table) * max(1, len(runs)) / 2), 4))
    table.plot.bar(ax=axis, rot=0)
    axis.set(title=f"per-type F1 on {split}", xlabel="entity type", ylabel="F1 (%)")
    axis.legend(fontsize="small")
    return _save(plt, figure, png)


def arm_scores(folder: Path) -> pd.DataFrame:
    """experiment, mean, std (sample; 0 for one seed), seeds: micro F1 per arm of an ablation.csv,
    in the file's order."""
    table = pd.read_csv(folder / ABLATION_CSV)
    grouped = table.groupby("experiment", sort=False)["f1"]
    summary = grouped.agg(["mean", "std", "count"]).reset_index()
    return pd.DataFrame(
        {
            "experiment": summary["experiment"],
            "mean": summary["mean"],
            "std": summary["std"].fillna(0.0),
            "seeds": summary["count"],
        }
    )


def _ablation_arms(plt, folder: Path, png: Path) -> Path:
    table = arm_scores(folder)
    figure, axis = plt.subplots(figsize=(max(5, 0.9 * len(table) + 2), 4))
    axis.bar(table["experiment"], table["mean"], yerr=table["std"], capsize=4)
    axis.set(title=f"{folder.name}: micro F1, mean ± std over seeds", ylabel="F1 (%)")
    axis.tick_params(axis="x", rotation=30)
    return _save(plt, figure, png)


def _save(plt, figure, png: Path) -> Path:
    figure.tight_layout()
    figure.savefig(png, dpi=_DPI, format="png")
    plt.close(figure)
    return png
