"""`mner results` (`results`): a table of the training-time scores of several runs of either task, each compared
with the first by a paired bootstrap over posts (train/report/significance.py).

Torch-free: it reads each run's results.json and prediction file (train/engine/run_files.py), never a model,
so its numbers are the run's, whatever was evaluated since.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mner.train.engine.run_files import read_results, recorded_task, unfinished
from mner.train.engine.scores import PERCENT, read_pred_csv
from mner.train.engine.tasks import SENTENCE_CLASSIFICATION, TOKEN_TAGGING
from mner.train.report import significance
from mner.train.report.ablation_tables import ABLATION_CSV, ABLATION_MD


def results(*, run_dirs, split, bootstrap, bootstrap_seed, plot) -> str:
    """`mner results`: the table of the runs among `run_dirs` (results_table), then the table of each
    ablation folder among them (its ablation.md), then, with `plot` a folder, the PNGs written there
    (train/report/plots.py, of runs and ablations alike); returns what the command prints."""
    runs = [path for path in run_dirs if not (Path(path) / ABLATION_CSV).is_file()]
    chunks = (
        [results_table(runs, split=split, bootstrap=bootstrap, bootstrap_seed=bootstrap_seed)] if runs else []
    )
    for path in run_dirs:
        if path not in runs and (Path(path) / ABLATION_MD).is_file():
            chunks.append(f"\n{path}:\n" + (Path(path) / ABLATION_MD).read_text(encoding="utf-8"))
    if plot is not None:
        from mner.train.report.plots import write_plots  # matplotlib: only for --plot

        chunks += [f"wrote {png}" for png in write_plots(list(run_dirs), plot, split=split)]
    return "\n".join(chunks)


def results_table(
    run_dirs: list,
    split: str = "test",
    bootstrap: int = significance.DEFAULT_RESAMPLES,
    bootstrap_seed: int = 0,
) -> str:
    """The scores (percent) of each run on `split`, from its training-time results.json.

    A tagging run shows micro P/R/F1; a classifier run (`mner train-classifier`) its macro P/R/F1 and an
    Acc column (accuracy): the run's task says which (tasks.headline). A run without them gets a row
    all the same, its status saying why: "unfinished (epoch k/N)", "no <split> results", "not a run
    folder", or the error reading a damaged file.

    With two or more runs and `bootstrap` > 0 every run is compared with the first one by a paired bootstrap over posts
    (train/report/significance.py; `bootstrap` resamples drawn with `bootstrap_seed`) on the predictions each run wrote
    (pred_<split>.conll, or a classifier's pred_<split>.csv, whose labels are one-word tag sequences, so the
    bootstrapped F1 is the accuracy): columns dF1 (percentage points; dAcc when the first run is a
    classifier), CI95 (its 95% interval) and p, and a last line naming the test. A run whose predictions
    are missing, or cover other posts, gets "-" there.
    """
    tasks = [recorded_task(run_dir) for run_dir in run_dirs]  # None: not a run of ours
    classifiers = [task == SENTENCE_CLASSIFICATION.name for task in tasks]
    if len(run_dirs) < 2:
        bootstrap = 0  # nothing to compare with
    delta = "dAcc" if classifiers and classifiers[0] else "dF1"
    rows = []
    base_preds = _predictions(Path(run_dirs[0]), split, tasks[0]) if bootstrap > 0 and run_dirs else None
    for index, run_dir in enumerate(run_dirs):
        row = {"run": str(run_dir), "P": "-", "R": "-", "F1": "-", "support": "-"}
        if any(classifiers):
            row["Acc"] = "-"
        try:
            micro, status = _run_scores(Path(run_dir), split, tasks[index])
        except ValueError as err:
            micro, status = None, str(err)
        if micro is not None:
            row.update(
                {
                    name: f"{micro[key] * PERCENT:.2f}"
                    for name, key in (("P", "precision"), ("R", "recall"), ("F1", "f1"), ("Acc", "accuracy"))
                    if key in micro
                }
            )
            row["support"] = str(micro["support"])
        if bootstrap > 0:
            cells, note = _bootstrap_cells(
                index, base_preds, Path(run_dir), split, tasks[index], bootstrap, bootstrap_seed, delta
            )
            row.update(cells)
            status = f"{status}; {note}" if note else status
        rows.append({**row, "status": status})
    table = pd.DataFrame(rows).to_string(index=False)
    if bootstrap > 0:
        table += (
            f"\n{delta} in percentage points against {run_dirs[0]}: {significance.TEST_NAME} on {split}, "
            f"{bootstrap} resamples, seed {bootstrap_seed}; p two-sided"
        )
    return table


def _predictions(run_dir: Path, split: str, task: str | None):
    """(post keys or words, gold, pred) of the predictions a run wrote for `split`, or None when it
    has not written them. A classifier's labels become one-word tag sequences ("B-<label>"), whose
    entity F1 is the accuracy."""
    if task == SENTENCE_CLASSIFICATION.name:
        path = run_dir / SENTENCE_CLASSIFICATION.prediction_file(split)
        if not path.is_file():
            return None
        rows = read_pred_csv(path)
        return (
            [guid for guid, _, _ in rows],
            [[f"B-{g}"] for _, g, _ in rows],
            [[f"B-{p}"] for _, _, p in rows],
        )
    path = run_dir / TOKEN_TAGGING.prediction_file(split)
    return significance.read_predictions(path) if path.is_file() else None


def _bootstrap_cells(
    index: int, base, run_dir: Path, split: str, task, resamples: int, seed: int, delta: str = "dF1"
):
    """(the delta / 95% CI / p cells of one results row, a note for its status or ""); run 0 is the base."""
    cells = {delta: "-", "CI95": "-", "p": "-"}
    mine = base if index == 0 else _predictions(run_dir, split, task)
    if mine is None:
        kind = SENTENCE_CLASSIFICATION if task == SENTENCE_CLASSIFICATION.name else TOKEN_TAGGING
        return cells, f"no {kind.prediction_file(split)} to compare"
    if index == 0:
        return {**cells, delta: "base"}, ""
    if base is None:
        return cells, ""
    if mine[:2] != base[:2]:
        did = "labelled" if task == SENTENCE_CLASSIFICATION.name else "tagged"
        return cells, f"{did} other posts than the base run: not compared"
    result = significance.paired_bootstrap(base[1], [base[2]], [mine[2]], resamples=resamples, seed=seed)
    shown, ci, p = significance.format_comparison(result)
    return {delta: shown, "CI95": ci, "p": p}, ""


def _run_scores(run_dir: Path, split: str, task: str | None) -> tuple[dict | None, str]:
    """(the task's headline scores or None, status) of one run; `task` None: not a run of ours."""
    if task is None:
        return None, "not a run folder (no config.json of ours)"
    status = unfinished(run_dir)
    if status is not None:
        return None, status
    results = read_results(run_dir)
    classifier = task == SENTENCE_CLASSIFICATION.name
    if split not in results:
        if classifier:
            return None, f"no {split} results (the split has no labels, or the folder has no {split} file)"
        return None, f"no {split} results; run `mner evaluate {run_dir} --split {split}`"
    if classifier:
        return SENTENCE_CLASSIFICATION.headline(
            results[split]
        ), "finished (classification: macro P/R/F1, accuracy)"
    return TOKEN_TAGGING.headline(results[split]), "finished"
