"""Classifier ablations: `mner ablate --data-dir <classification folder> --exp mode=text --exp mode=image
--exp mode=both --exp head=cnn ...`, each arm x seed trained from one cache, summarised as mean ± std.

An experiment is a diff over the base classifier config (`--config`, `--set classifier.KEY=VALUE`):
`KEY=VALUE[,KEY=VALUE...]` of ClassifierConfig fields (`mode=both,head=xattn`), or `base` for none.
Every run goes to <out>/<experiment>/seed<k>/ through `train_classifier` (classifier.seed = k); a run
whose results.json exists is skipped, so a killed ablation re-run picks up where it stopped.

Tables beside the runs: ablation.csv (one row per run: accuracy, macro P/R/F1 and per-class F1, in
percent, on test, or valid without a labelled test split) and ablation.md (mean ± sample std per
experiment; then each experiment against the first by a paired bootstrap over posts of the accuracy,
the seeds of a side averaged on every resample: train/significance.py run on one-word "tag sequences",
for which its micro F1 is exactly the accuracy).

The folder must be new, empty or ours (its ablation.json has task "classification").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mner.cache.classification import ClassDataConfig
from mner.runtime import claim_folder, write_atomic
from mner.train import significance
from mner.train.ablate import ABLATION_CSV, ABLATION_FILE, ABLATION_MD, bootstrap_markdown, mean_std_markdown
from mner.train.classify import (
    TASK,
    ClassifierConfig,
    ClassifierRunConfig,
    is_classifier_run,
    load_classifier_config,
    read_pred_csv,
    train_classifier,
)
from mner.train.config import _parse_override
from mner.train.evaluate import PERCENT
from mner.train.runs import RESULTS_FILE, read_results, write_json

log = logging.getLogger(__name__)

BASE = "base"  # the experiment that changes nothing
CLASS_ABLATION_KEYS = ("task", "experiments", "seeds", "overrides", "cache_dir", "data")


@dataclass
class ClassAblationConfig:
    """Classifier experiments x seeds on one classification folder and one cache."""

    data: ClassDataConfig
    cache_dir: str | None  # read only; None when every arm is mode=text
    experiments: list[str]  # "KEY=VALUE[,KEY=VALUE]" diffs of ClassifierConfig, or "base"
    out_dir: str
    seeds: int = 3  # seeds 1..N
    config_file: str | None = None  # a TOML [classifier] table under every run
    overrides: list[str] = field(default_factory=list)  # classifier.KEY=VALUE for every run
    bootstrap: int = significance.DEFAULT_RESAMPLES  # resamples of the accuracy test; 0: none

    def __post_init__(self):
        if not self.experiments:
            raise ValueError(f"no experiments given; e.g. --exp mode=text --exp mode=both, or --exp {BASE}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {self.seeds!r}")
        names = self.experiments
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"experiments {repeated} are given more than once (runs are stored by name)")
        for experiment in self.experiments:
            self.arm_config(experiment, seed=1)  # a bad key or value fails here, before any run

    def arm_config(self, experiment: str, seed: int) -> ClassifierConfig:
        """The classifier config of one arm and seed: the file, the overrides, the arm's diff, the seed."""
        diff = [] if experiment == BASE else [f"classifier.{part}" for part in experiment.split(",")]
        for text in diff:
            section, key, _ = _parse_override(text)
            if key == "seed":
                raise ValueError(f"experiment {experiment!r}: the seed comes from --seeds, not from an arm")
            if any(o.split("=", 1)[0].strip() == f"classifier.{key}" for o in self.overrides):
                raise ValueError(f"experiment {experiment!r} sets classifier.{key}, which --set also sets")
        try:
            return load_classifier_config(self.config_file, [*self.overrides, *diff], seed=seed)
        except ValueError as err:
            raise ValueError(f"experiment {experiment!r}: {err}") from None


def run_class_ablation(cfg: ClassAblationConfig) -> Path:
    """Train every experiment x seed (skipping finished runs); returns the path of ablation.md."""
    out = Path(cfg.out_dir)
    claim = claim_folder(out, ABLATION_FILE, CLASS_ABLATION_KEYS, resume=None, what="classifier ablation")
    claim.create()
    try:
        record = {key: getattr(cfg, key) for key in CLASS_ABLATION_KEYS if key not in ("task", "data")}
        write_json(out / ABLATION_FILE, {"task": TASK, **record, "data": cfg.data.to_dict()})
        rows = []
        for experiment in cfg.experiments:
            for seed in range(1, cfg.seeds + 1):
                run_dir = out / experiment / f"seed{seed}"
                if is_classifier_run(run_dir) and (run_dir / RESULTS_FILE).is_file():
                    log.info("%s: finished earlier, skipped", run_dir)
                else:
                    c = cfg.arm_config(experiment, seed)  # a mode=text arm never opens cfg.cache_dir
                    run = ClassifierRunConfig(
                        data=cfg.data, out_dir=str(run_dir), classifier=c, cache_dir=cfg.cache_dir
                    )
                    train_classifier(run)
                rows.append(_row(experiment, seed, run_dir))
        table = pd.DataFrame(rows)
        write_atomic(out / ABLATION_CSV, table.to_csv(index=False))
        summary = class_summary_markdown(table)
        if cfg.bootstrap > 0 and table["experiment"].nunique() > 1:
            summary += "\n" + accuracy_significance_markdown(table, cfg.bootstrap)
        return write_atomic(out / ABLATION_MD, summary)
    finally:
        claim.unlock()


def _row(experiment: str, seed: int, run_dir: Path) -> dict:
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
