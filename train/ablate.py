"""Ablations: named config diffs x seeds, each trained from one shared cache, summarised as mean ± std.

An experiment is a small TOML diff over configs/train/base.toml: a registry name (the file
configs/experiments/<name>.toml; `full` is the empty diff) or a path to a diff file of your own.
Every run goes to <out>/<experiment>/seed<k>/ through `train_from_cache`; a run whose results.json
exists is skipped, so a killed ablation re-run picks up where it stopped. The cache is only read,
never re-extracted.

The ablation folder must be new, empty or ours (it holds our ablation.json, the record of the
settings); a folder of other files is refused untouched, and so is a seed folder that is not a run
of ours. A first run that fails before anything is trained leaves no folder behind.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mner import configs
from mner.cache.datasets import DataConfig
from mner.runtime import FolderClaim, claim_folder, write_atomic
from mner.train.config import RunConfig, load_run_config
from mner.train.evaluate import PERCENT
from mner.train.loop import train_from_cache
from mner.train.runs import RESULTS_FILE, is_run_folder, read_results, write_json

log = logging.getLogger(__name__)

# Registry name -> diff file under configs/experiments/ (None: the base as it is).
ABLATIONS: dict[str, str | None] = {
    "full": None,
    "no_align": "no_align.toml",
    "no_adapt": "no_adapt.toml",
    "no_region": "no_region.toml",
    "no_patch": "no_patch.toml",
    "text_only": "text_only.toml",
    "qfnet1": "qfnet1.toml",
    # MANGO's ablations: diffs over configs/models/mango.toml, not over the base alone
    "no_resampler": "no_resampler.toml",
    "no_preserve": "no_preserve.toml",
}


# The ablation folder's record; a folder holding it with these keys is ours (mner.runtime.claim_folder).
ABLATION_FILE = "ablation.json"
ABLATION_KEYS = ("experiments", "seeds", "overrides", "epochs", "cache_dir", "data")

# Per-type scores in ablation.csv: results.json metric -> column prefix (column `<prefix>_<TYPE>`).
_TYPE_METRICS = (("precision", "p"), ("recall", "r"), ("f1", "f1"))
# Column prefix -> ablation.md header suffix.
_TYPE_HEADERS = {"p": "P", "r": "R", "f1": "F1"}


@dataclass
class AblationConfig:
    """What to run: experiments x seeds on one cache and one data set."""

    cache_dir: str | None  # the shared feature cache (read only); None only if every run is text-only
    data: DataConfig  # the posts every run trains on: data folder, or dataset + data_root; image folder
    text_encoder: str | None  # encoder name or folder for every run; None keeps the config's
    experiments: list[str]  # registry names (see ABLATIONS) or paths to config-diff .toml files
    out_dir: str  # ablation folder: <out>/<experiment>/seed<k>/, ablation.csv, ablation.md
    seeds: int | list[int] = 3  # N -> seeds 1..N; or an explicit list of seeds
    overrides: list[str] = field(
        default_factory=list
    )  # "section.key=value" for every run; not a key an experiment sets
    epochs: int | None = None  # epochs per run; None keeps the config's

    def __post_init__(self):
        if not isinstance(self.data, DataConfig):
            raise ValueError(f"data must be a DataConfig, got {self.data!r}")
        if not self.experiments:
            raise ValueError(
                f"no experiments given; choose from {', '.join(ABLATIONS)} or config-diff .toml files"
            )
        for experiment in self.experiments:
            if experiment not in ABLATIONS and not (
                experiment.endswith(".toml") and Path(experiment).is_file()
            ):
                raise ValueError(
                    f"unknown experiment {experiment!r}: use one of {', '.join(ABLATIONS)} "
                    "or the path of an existing config-diff .toml file"
                )
        names = [experiment_name(experiment) for experiment in self.experiments]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"experiments {repeated} are given more than once (runs are stored by name)")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, (int, list, tuple)):
            raise ValueError(f"seeds must be a count or a list of seeds, got {self.seeds!r}")
        if isinstance(self.seeds, int):
            if self.seeds < 1:
                raise ValueError(f"seeds must be at least 1, got {self.seeds}")
        elif (
            not self.seeds
            or len(set(self.seeds)) != len(self.seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds)
        ):
            raise ValueError(
                f"seeds must be a non-empty list of distinct non-negative integers, got {self.seeds!r}"
            )
        if self.epochs is not None and (
            isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1
        ):
            raise ValueError(f"epochs must be a positive integer or None, got {self.epochs!r}")

    def seed_list(self) -> list[int]:
        """The seeds to run: 1..N for a count, else the list as given."""
        return list(range(1, self.seeds + 1)) if isinstance(self.seeds, int) else list(self.seeds)


def experiment_name(experiment: str) -> str:
    """Folder and table name of an experiment: the registry name, or the diff file's stem."""
    return experiment if experiment in ABLATIONS else Path(experiment).stem


def experiment_file(experiment: str) -> Path | None:
    """The config-diff TOML of an experiment; None for `full` (the base as it is)."""
    if experiment in ABLATIONS:
        name = ABLATIONS[experiment]
        return None if name is None else configs.path("experiments", name)
    return Path(experiment)


def run_ablation(cfg: AblationConfig) -> Path:
    """Train every experiment x seed (skipping finished runs) and write the summary tables.

    Returns the path of ablation.md (ablation.csv beside it has one row per run). Under torchrun
    every rank trains; rank 0 writes the tables.
    """
    out = Path(cfg.out_dir)
    claim = claim_folder(out, ABLATION_FILE, ABLATION_KEYS, resume=None, what="ablation")
    # Checked for every experiment before the first run, not after hours of the earlier ones.
    for experiment in cfg.experiments:
        _refuse_conflicting_overrides(experiment_name(experiment), experiment_file(experiment), cfg.overrides)
        _refuse_noop_experiment(experiment_name(experiment), experiment_file(experiment), cfg.overrides)
    main = int(os.environ.get("RANK", "0")) == 0
    if main:
        claim.create()
        write_json(out / ABLATION_FILE, _record(cfg))
    try:
        return _run_all(cfg, out, main)
    except BaseException:
        if main:
            _release_if_nothing_trained(claim)
        raise


def _record(cfg: AblationConfig) -> dict:
    """ablation.json: the settings of the ablation (its keys are ABLATION_KEYS and text_encoder)."""
    record = {key: getattr(cfg, key) for key in ABLATION_KEYS if key != "data"}
    record.update(data=cfg.data.to_dict(), text_encoder=cfg.text_encoder)
    return record


def _release_if_nothing_trained(claim: FolderClaim) -> None:
    """Remove the folder this ablation made when nothing but its record is in it."""
    if claim.path.is_dir() and [p.name for p in claim.path.iterdir()] == [ABLATION_FILE]:
        claim.release()


def _run_all(cfg: AblationConfig, out: Path, main: bool) -> Path:
    rows = []
    for experiment in cfg.experiments:
        name, diff = experiment_name(experiment), experiment_file(experiment)
        for seed in cfg.seed_list():
            run_dir = out / name / f"seed{seed}"
            if is_run_folder(run_dir) and (run_dir / RESULTS_FILE).is_file():
                log.info("%s: finished earlier, skipped", run_dir)
            else:
                train_from_cache(_run_config(cfg, diff, seed, run_dir))
            rows.append(_table_row(name, seed, run_dir))
    table = pd.DataFrame(rows)
    md_path = out / "ablation.md"
    if main:
        write_atomic(out / "ablation.csv", table.to_csv(index=False))
        write_atomic(md_path, summary_markdown(table))
    return md_path


def _run_config(cfg: AblationConfig, diff: Path | None, seed: int, run_dir: Path) -> RunConfig:
    model_cfg, train_cfg = load_run_config(config_file=diff, overrides=list(cfg.overrides))
    if cfg.text_encoder is not None:
        model_cfg = dataclasses.replace(model_cfg, text_encoder=cfg.text_encoder)
    train_cfg = dataclasses.replace(train_cfg, seed=seed)
    if cfg.epochs is not None:
        train_cfg = dataclasses.replace(train_cfg, epochs=cfg.epochs)
    # resume=True: a run killed mid-way continues from its last epoch instead of starting again.
    return RunConfig(
        model=model_cfg,
        train=train_cfg,
        cache_dir=cfg.cache_dir,
        data=cfg.data,
        out_dir=str(run_dir),
        resume=True,
    )


def _refuse_conflicting_overrides(name: str, diff: Path | None, overrides: list[str]) -> None:
    """An override of a key the experiment sets would silently undo the experiment."""
    if diff is None:
        return
    table = configs.load_toml(diff)
    diff_keys = {
        f"{section}.{key}" for section, values in table.items() if isinstance(values, dict) for key in values
    }
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if key in diff_keys:
            raise ValueError(
                f"override {override!r} sets {key}, which experiment {name} ({diff}) changes; "
                "drop the override or write a new experiment file"
            )


def _refuse_noop_experiment(name: str, diff: Path | None, overrides: list[str]) -> None:
    """An experiment whose diff resolves to the base config would train `full` again under its name.

    (Configs refuse a switch that does nothing, such as adaptive_gate on a fusion without a gate, so
    an unchanged config is the one way an ablation could be a silent no-op.)
    """
    if diff is None:
        return
    if load_run_config(config_file=diff, overrides=list(overrides)) == load_run_config(
        overrides=list(overrides)
    ):
        raise ValueError(
            f"experiment {name} ({diff}) changes nothing: the base config with these overrides already "
            "holds every value it sets; drop the experiment or change the base"
        )


def _table_row(name: str, seed: int, run_dir: Path) -> dict:
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
    lines = [
        f"Micro and per-type P/R/F1 on {'/'.join(splits)}, percent, mean ± sample std over seeds.",
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


def _mean_std(mean: float, std: float, n: int) -> str:
    if n == 0:
        return "-"
    if n == 1 or math.isnan(std):
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {std:.2f}"
