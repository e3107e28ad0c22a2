"""Classifier ablations: `mner ablate --data-dir <classification folder> --exp mode=text --exp mode=image
--exp mode=both --exp head=cnn ...`, each arm x seed trained from one cache, summarised as mean ± std.

An experiment is a diff over the base classifier config (`--config`, `--set classifier.KEY=VALUE`):
`KEY=VALUE[,KEY=VALUE...]` of ClassifierConfig fields (`mode=both,head=xattn`), or `base` (also
`full`, as on the tagging side) for none. Every run goes to <out>/<experiment>/seed<k>/ through
`train_classifier` (classifier.seed = k; the folder name is train.ablate.arm_folder's, so a diff naming
a path stays inside <out>); a run whose results.json exists is skipped, so a killed ablation re-run
picks up where it stopped. The folder, the resume rule (the same resolved settings), the seed and
epochs rules and the refusal of arms that train the same thing are the tagging ablation's
(train/ablate.py), shared.

Tables beside the runs: ablation.csv (one row per run: accuracy, macro P/R/F1 and per-class F1, in
percent, on test, or valid without a labelled test split) and ablation.md (mean ± sample std per
experiment; then each experiment against the first by a paired bootstrap over posts of the accuracy,
the seeds of a side averaged on every resample: train/significance.py run on one-word "tag sequences",
for which its micro F1 is exactly the accuracy).

The folder must be new, empty or ours (its ablation.json has task "classification").
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mner import configs
from mner.cache.classification import ClassDataConfig
from mner.runtime import write_atomic
from mner.train import significance
from mner.train.ablate import (
    ABLATION_CSV,
    ABLATION_MD,
    ALL,
    RESOLVED,
    bootstrap_markdown,
    claim_ablation,
    mean_std_markdown,
    refuse_identical_arms,
    refuse_repeated_arms,
    refuse_seed_and_epochs,
    resolved_record,
    train_arms,
)
from mner.train.classify import (
    TASK,
    ClassifierConfig,
    ClassifierRunConfig,
    is_classifier_run,
    load_classifier_config,
    train_classifier,
)
from mner.train.config import parse_override
from mner.train.runs import RESULTS_FILE, read_results
from mner.train.scores import PERCENT, read_pred_csv

BASE = "base"  # the experiment that changes nothing
FULL = "full"  # the tagging side's name of the same arm, accepted as BASE
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
    epochs: int | None = None  # epochs per run (--epochs); None keeps the config's

    def __post_init__(self):
        if not self.experiments:
            raise ValueError(f"no experiments given; e.g. --exp mode=text --exp mode=both, or --exp {BASE}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {self.seeds!r}")
        self.experiments = [BASE if name == FULL else name for name in self.experiments]
        for experiment in self.experiments:
            if experiment != BASE and "=" not in experiment:
                raise ValueError(
                    f"experiment {experiment!r} is not a classifier diff: a classification folder's arms are "
                    f"KEY=VALUE[,KEY=VALUE] diffs of the classifier config (--exp mode=text --exp head=cnn) "
                    f"or {BASE} (or {FULL}): the config as it is; {ALL} and the named experiments "
                    "(`mner ablate --list`) are the tagging ablation's"
                )
        refuse_repeated_arms(self.experiments)
        refuse_seed_and_epochs(self._set_keys(), "classifier.seed", "classifier.epochs", self.epochs)
        for experiment in self.experiments:
            self.arm_config(experiment, seed=1)  # a bad key or value fails here, before any run

    def _diff(self, experiment: str) -> list[str]:
        return [] if experiment == BASE else [f"classifier.{part}" for part in experiment.split(",")]

    def _set_keys(self) -> list[tuple[str, str]]:
        """(where, classifier.KEY) of every setting the file, --set and the arms give."""
        found = []
        if self.config_file is not None:
            table = configs.load_toml(Path(self.config_file)).get("classifier", {})
            found += [(str(self.config_file), f"classifier.{key}") for key in table]
        found += [(f"--set {text}", text.split("=", 1)[0].strip()) for text in self.overrides]
        for experiment in self.experiments:
            found += [
                (f"experiment {experiment!r}", text.split("=", 1)[0]) for text in self._diff(experiment)
            ]
        return found

    def arm_config(self, experiment: str, seed: int) -> ClassifierConfig:
        """The classifier config of one arm and seed: the file, the overrides, the arm's diff, the seed
        and --epochs."""
        diff = self._diff(experiment)
        for text in diff:
            section, key, _ = parse_override(text)
            if any(o.split("=", 1)[0].strip() == f"classifier.{key}" for o in self.overrides):
                raise ValueError(f"experiment {experiment!r} sets classifier.{key}, which --set also sets")
        try:
            return load_classifier_config(
                self.config_file, [*self.overrides, *diff], seed=seed, epochs=self.epochs
            )
        except ValueError as err:
            raise ValueError(f"experiment {experiment!r}: {err}") from None

    def record(self) -> dict:
        """ablation.json: the settings as given, and under RESOLVED as every arm resolves them (less
        the seed and the device) with the seeds, the cache and the data: what a re-run must match."""
        given = {key: getattr(self, key) for key in CLASS_ABLATION_KEYS if key not in ("task", "data")}
        arms = {}
        for experiment in self.experiments:
            settings = self.arm_config(experiment, seed=0).to_dict()
            arms[experiment] = {k: v for k, v in settings.items() if k not in ("seed", "device")}
        data = self.data.to_dict()
        resolved = resolved_record(list(range(1, self.seeds + 1)), self.cache_dir, data, arms)
        return {"task": TASK, **given, "data": data, "epochs": self.epochs, RESOLVED: resolved}


def run_class_ablation(cfg: ClassAblationConfig) -> Path:
    """Train every experiment x seed (skipping finished runs); returns the path of ablation.md."""
    out = Path(cfg.out_dir)
    record = cfg.record()
    refuse_identical_arms(record[RESOLVED]["arms"])
    claim = claim_ablation(out, record, CLASS_ABLATION_KEYS, "classifier ablation")

    def train(experiment: str, seed: int, run_dir: Path) -> None:
        c = cfg.arm_config(experiment, seed)  # a mode=text arm never opens cfg.cache_dir
        train_classifier(
            ClassifierRunConfig(data=cfg.data, out_dir=str(run_dir), classifier=c, cache_dir=cfg.cache_dir)
        )

    try:
        rows = train_arms(
            claim,
            record,
            [(experiment, seed) for experiment in cfg.experiments for seed in range(1, cfg.seeds + 1)],
            finished=lambda run_dir: is_classifier_run(run_dir) and (run_dir / RESULTS_FILE).is_file(),
            train=train,
            row=_row,
        )
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
