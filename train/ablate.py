"""Ablations: named config diffs x seeds, each trained from one shared cache, summarised as mean ± std.

An experiment is a small TOML diff over configs/train/base.toml and the ablation's model (`model`,
`--model`; configs/models/<name>.toml): a registry name (the file configs/experiments/<name>.toml;
`full` is the empty diff), a path to a diff file of your own, or `model=NAME`, an arm that trains the
model NAME as it is (named NAME), so one table compares the model zoo.
Every run goes to <out>/<experiment>/seed<k>/ through `train_from_cache`; a run whose results.json
exists is skipped, so a killed ablation re-run picks up where it stopped. The cache is only read,
never re-extracted.

`--exp all` runs every registry experiment. `--grid section.key=v1,v2` (repeatable) runs the cartesian
sweep of the given values, crossed with the experiments (default: `full` alone); each arm is named by
its diff (`model.qfnet_layers=1,train.lr_fusion=0.001`, prefixed by the experiment unless it is
`full`) and stored and resumed like any experiment.

The ablation folder must be new, empty or ours (it holds our ablation.json, the record of the
settings); a folder of other files is refused untouched, and so is a seed folder that is not a run
of ours. A first run that fails before anything is trained leaves no folder behind. A re-run into an
ablation of ours continues it only when every arm resolves to the settings it recorded (RESOLVED).
The seed of run k is k (`seeds`): a seed set anywhere else is refused, and so are epochs set by an
experiment, `--set` or `--grid` beside `epochs`. Two arms that train the same thing (equal in what
the model reads, model.used_settings) are refused; `all` leaves such experiments out. An arm's folder
is `arm_folder(name)`, one path part. The classifier ablation (train/class_ablate.py) runs through
the same functions (the section "shared with the classifier ablation" below).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mner import configs
from mner.cache.datasets import DataConfig
from mner.runtime import LOCK_NAME, FolderClaim, claim_folder, write_atomic
from mner.train import significance
from mner.train.config import (
    RUNTIME_SETTINGS,
    ModelConfig,
    RunConfig,
    TrainConfig,
    check_model_name,
    load_run_config,
    parse_override,
)
from mner.train.loop import train_from_cache
from mner.train.model import used_settings
from mner.train.runs import RESULTS_FILE, differences, is_run_folder, read_results, write_json
from mner.train.scores import PERCENT

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
    "no_slot_type": "no_slot_type.toml",  # afner's type-presence loss off (--model afner)
    # MANGO's ablations: diffs over configs/models/mango.toml, not over the base alone
    "no_resampler": "no_resampler.toml",
    "no_preserve": "no_preserve.toml",
}
# An experiment `model=NAME` trains the model NAME as its file gives it.
MODEL_ARM = "model="


# The ablation folder's record; a folder holding it with these keys is ours (mner.runtime.claim_folder).
ABLATION_FILE = "ablation.json"
# The tables an ablation writes beside its runs (the plots and `mner results` read them).
ABLATION_CSV, ABLATION_MD = "ablation.csv", "ablation.md"
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
    # resamples of the paired bootstrap of every experiment against the first (ablation.md); 0: none
    bootstrap: int = significance.DEFAULT_RESAMPLES
    # "section.key=v1,v2,...": the sweep's axes; every combination is an arm (crossed with experiments)
    grid: list[str] = field(default_factory=list)
    model: str | None = None  # the model every experiment but `model=NAME` starts from; None: the config's

    def __post_init__(self):
        if not isinstance(self.data, DataConfig):
            raise ValueError(f"data must be a DataConfig, got {self.data!r}")
        if not self.experiments and not self.grid:
            raise ValueError(
                f"no experiments given; choose from {', '.join(ABLATIONS)}, all, or config-diff .toml files, "
                "or give a --grid"
            )
        if ALL in self.experiments:
            if len(self.experiments) > 1:
                raise ValueError(f"experiment {ALL!r} already names every experiment; give it alone")
            # every experiment that applies to this model and changes something (no_slot_type over
            # afdvqf does not; no_resampler is not even a valid config without the mango fusion)
            self.experiments = [
                name
                for name in ABLATIONS
                if name == "full" or _applies(experiment_file(name), self.overrides, self.model)
            ]
            left_out = [name for name in ABLATIONS if name not in self.experiments]
            if left_out:
                log.warning(
                    "--exp all: left out %s, which change nothing model %s uses (or do not apply to it)",
                    ", ".join(left_out),
                    self.model or ModelConfig.name,
                )
        if not self.experiments:
            self.experiments = ["full"]
        if self.model is not None:
            check_model_name(self.model)
        for experiment in self.experiments:
            if experiment.startswith(MODEL_ARM):
                check_model_name(experiment[len(MODEL_ARM) :])
            elif experiment not in ABLATIONS and not (
                experiment.endswith(".toml") and Path(experiment).is_file()
            ):
                raise ValueError(
                    f"unknown experiment {experiment!r}: use one of {', '.join(ABLATIONS)}, {ALL}, "
                    "model=NAME or the path of an existing config-diff .toml file"
                )
        self.grid = list(self.grid)
        refuse_repeated_arms([arm.name for arm in self.arms()])  # a malformed grid axis fails here too
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

        if isinstance(self.bootstrap, bool) or not isinstance(self.bootstrap, int) or self.bootstrap < 0:
            raise ValueError(f"bootstrap must be a number of resamples >= 0, got {self.bootstrap!r}")

    def seed_list(self) -> list[int]:
        """The seeds to run: 1..N for a count, else the list as given."""
        return list(range(1, self.seeds + 1)) if isinstance(self.seeds, int) else list(self.seeds)

    def arms(self) -> list[Arm]:
        """Every experiment crossed with every grid point, in order (the grid's last axis fastest)."""
        arms, points = [], grid_points(self.grid)
        for experiment in self.experiments:
            for point in points:
                name = experiment_name(experiment)
                if point:
                    diff = ",".join(point)
                    name = diff if experiment == "full" else f"{name},{diff}"
                arms.append(
                    Arm(name, experiment_file(experiment), point, experiment_model(experiment, self.model))
                )
        return arms


ALL = "all"  # --exp all: every registry experiment


@dataclass(frozen=True)
class Arm:
    """One line of the ablation table: an experiment's diff file plus a grid point's overrides."""

    name: str  # folder and table name
    diff: Path | None  # the experiment's config-diff TOML; None for `full`
    overrides: tuple[str, ...] = ()  # the grid point: "section.key=value" each
    model: str | None = None  # the model it starts from (configs/models/<model>.toml); None: the config's


def grid_points(grid: list[str]) -> list[tuple[str, ...]]:
    """The cartesian product of the axes "section.key=v1,v2,..." as override tuples; [()] for no grid.

    Raises ValueError for an axis that is not `section.key=values`, a key given twice, an empty or
    repeated value (also one written two ways: 1e-4 and 0.0001).
    """
    axes = []
    for text in grid:
        key, equals, values = (part.strip() for part in text.partition("="))
        if not equals or key.count(".") != 1 or not all(key.split(".")):
            raise ValueError(f"--grid {text!r} must be section.key=v1,v2,... (e.g. model.qfnet_layers=1,2)")
        if key in [axis[0] for axis in axes]:
            raise ValueError(f"--grid gives {key} twice; give all its values in one --grid {key}=v1,v2")
        options = [value.strip() for value in values.split(",")]
        if not all(options) or len(set(options)) != len(options):
            raise ValueError(f"--grid {text!r}: its values must be non-empty and distinct")
        parsed = [parse_override(f"{key}={value}")[2] for value in options]
        for i, j in itertools.combinations(range(len(options)), 2):
            if parsed[i] == parsed[j] and type(parsed[i]) is type(parsed[j]):
                raise ValueError(
                    f"--grid {text!r}: {options[i]} and {options[j]} are the same value; give it once"
                )
        axes.append((key, options))
    return [
        tuple(f"{key}={value}" for (key, _), value in zip(axes, combination))
        for combination in itertools.product(*(options for _, options in axes))
    ]


def list_experiments() -> str:
    """One line per registry experiment: its name, its one-line diff and what it tests (`--list`)."""
    rows = []
    for name, file in ABLATIONS.items():
        if file is None:
            rows.append((name, "(nothing: configs/train/base.toml as it is)", "the full model"))
            continue
        path = configs.path("experiments", file)
        table = configs.load_toml(path)
        diff = ", ".join(
            f"{section}.{key} = {_toml_value(value)}"
            for section, values in table.items()
            for key, value in values.items()
        )
        rows.append((name, diff, _description(path, name)))
    width = max(len(name) for name, _, _ in rows)
    diff_width = max(len(diff) for _, diff, _ in rows)
    return "\n".join(f"{name:<{width}}  {diff:<{diff_width}}  {what}" for name, diff, what in rows)


def _toml_value(value) -> str:
    """A diff value as TOML writes it (true, 0.0, "x")."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return f'"{value}"' if isinstance(value, str) else str(value)


def _description(path: Path, name: str) -> str:
    """The first comment line of an experiment file, less its "<name>: " prefix."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            text = line.lstrip("# ").strip()
            return text[len(name) + 1 :].strip() if text.startswith(f"{name}:") else text
    return ""


def experiment_name(experiment: str) -> str:
    """Folder and table name of an experiment: the registry name, the model of `model=NAME`, or the
    diff file's stem."""
    if experiment.startswith(MODEL_ARM):
        return experiment[len(MODEL_ARM) :]
    return experiment if experiment in ABLATIONS else Path(experiment).stem


def experiment_model(experiment: str, model: str | None) -> str | None:
    """The model an experiment trains: NAME for `model=NAME`, else the ablation's `model`."""
    return experiment[len(MODEL_ARM) :] if experiment.startswith(MODEL_ARM) else model


def experiment_file(experiment: str) -> Path | None:
    """The config-diff TOML of an experiment; None for `full` and `model=NAME` (no diff)."""
    if experiment.startswith(MODEL_ARM):
        return None
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
    # Checked for every experiment before the first run, not after hours of the earlier ones.
    for experiment in cfg.experiments:
        name, diff = experiment_name(experiment), experiment_file(experiment)
        _refuse_conflicting_overrides(name, diff, cfg.overrides)
        _refuse_noop_experiment(name, diff, cfg.overrides, experiment_model(experiment, cfg.model))
    _refuse_grid_conflicts(cfg)
    refuse_seed_and_epochs(_set_keys(cfg), "train.seed", "train.epochs", cfg.epochs)
    record = _record(cfg)
    resolved = record[RESOLVED]["arms"]
    refuse_identical_arms(
        {
            name: {"model": used_settings(ModelConfig.from_dict(arm["model"])), "train": arm["train"]}
            for name, arm in resolved.items()
        }
    )
    arms = {arm.name: arm for arm in cfg.arms()}
    claim = claim_ablation(out, record, ABLATION_KEYS, "ablation")
    main = int(os.environ.get("RANK", "0")) == 0
    try:
        rows = train_arms(
            claim,
            record,
            [(name, seed) for name in arms for seed in cfg.seed_list()],
            finished=lambda run_dir: is_run_folder(run_dir) and (run_dir / RESULTS_FILE).is_file(),
            train=lambda name, seed, run_dir: train_from_cache(_run_config(cfg, arms[name], seed, run_dir)),
            row=_table_row,
            main=main,
        )
        table = pd.DataFrame(rows)
        md_path = out / ABLATION_MD
        if main:
            write_atomic(out / ABLATION_CSV, table.to_csv(index=False))
            summary = summary_markdown(table)
            if cfg.bootstrap > 0 and table["experiment"].nunique() > 1:
                summary += "\n" + significance_markdown(table, cfg.bootstrap)
            write_atomic(md_path, summary)
        return md_path
    finally:
        claim.unlock()


def _record(cfg: AblationConfig) -> dict:
    """ablation.json: the settings of the ablation as given (its keys are ABLATION_KEYS, text_encoder,
    grid and model) and, under RESOLVED, as every arm resolves them (what a re-run must match; each
    run's config.json records its own resolved config, model.name included)."""
    record = {key: getattr(cfg, key) for key in ABLATION_KEYS if key != "data"}
    record.update(data=cfg.data.to_dict(), text_encoder=cfg.text_encoder, grid=cfg.grid, model=cfg.model)
    arms = {arm.name: _arm_settings(_run_config(cfg, arm, 0, "-")) for arm in cfg.arms()}
    record[RESOLVED] = resolved_record(cfg.seed_list(), cfg.cache_dir, cfg.data.to_dict(), arms)
    return record


def _arm_settings(run: RunConfig) -> dict:
    """An arm's resolved model and train settings, less the seed (each run has its own) and the
    settings that change how a run is carried out, not what it trains (device, amp, workers)."""
    train = {
        key: value
        for key, value in run.train.to_dict().items()
        if key != "seed" and f"train.{key}" not in RUNTIME_SETTINGS - {"train.epochs", "train.patience"}
    }
    return {"model": run.model.to_dict(), "train": train}


def _set_keys(cfg: AblationConfig) -> list[tuple[str, str]]:
    """(where, section.key) of every setting the ablation's --set, --grid and experiments give."""
    found = [(f"--set {text}", text.split("=", 1)[0].strip()) for text in cfg.overrides]
    found += [(f"--grid {text}", text.partition("=")[0].strip()) for text in cfg.grid]
    for experiment in cfg.experiments:
        diff = experiment_file(experiment)
        if diff is not None:
            where = f"experiment {experiment_name(experiment)} ({diff})"
            found += [(where, key) for key in sorted(_diff_keys(diff))]
    return found


# ------------------------------------------------------------------- shared with the classifier ablation

# The key of ablation.json holding the resolved settings a re-run into the folder must match.
RESOLVED = "resolved"


def resolved_record(seeds: list[int], cache_dir: str | None, data: dict, arms: dict[str, dict]) -> dict:
    """ablation.json's RESOLVED part: seeds, the cache (absolute), the data and each arm's settings."""
    cache = str(Path(cache_dir).resolve()) if cache_dir is not None else None
    return {"seeds": list(seeds), "cache_dir": cache, "data": data, "arms": arms}


def arm_folder(name: str) -> str:
    """The folder of the arm `name` in its ablation folder: one path part whatever the name holds (a
    grid value or a classifier diff may be a path, as text_encoder=../enc), so no arm writes outside."""
    folder = re.sub(r"[^A-Za-z0-9._=,+-]", "_", name)
    return "_" * len(folder) if set(folder) <= {"."} else folder


def refuse_repeated_arms(names: list[str]) -> None:
    """Runs are stored by arm name: refuse a name given twice, or two names that share a folder."""
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"experiments {repeated} are given more than once (runs are stored by name)")
    folders: dict[str, str] = {}
    for name in names:
        other = folders.setdefault(arm_folder(name), name)
        if other != name:
            raise ValueError(
                f"experiments {other!r} and {name!r} would share the folder {arm_folder(name)} "
                "(a character outside letters, digits and ._=,+- is written _); give one of them otherwise"
            )


def refuse_identical_arms(settings: dict[str, dict]) -> None:
    """Refuse two arms (name -> the settings its model and training read) that would train the same
    thing: a no-op arm (a weight of a loss the model does not have) or a value written twice."""
    seen: dict[str, str] = {}
    for name, used in settings.items():
        key = json.dumps(used, sort_keys=True)
        if key in seen:
            raise ValueError(
                f"experiments {seen[key]!r} and {name!r} would train the same model the same way (they "
                "differ only in settings the model does not use, or in how a value is written); drop one"
            )
        seen[key] = name


def refuse_seed_and_epochs(keys: list[tuple[str, str]], seed_key: str, epochs_key: str, epochs) -> None:
    """An ablation gives every run its seed (--seeds) and may give every run its epochs (--epochs);
    a setting of either key elsewhere (`keys`: where, section.key) would be overridden in silence."""
    for where, key in keys:
        if key == seed_key:
            raise ValueError(
                f"{where} sets {seed_key}, but the seed comes from --seeds (run k of every arm has "
                "seed k, and each would be overridden); drop it and choose the seeds with --seeds"
            )
        if key == epochs_key and epochs is not None:
            raise ValueError(f"{where} sets {epochs_key}, and so does --epochs {epochs}; drop one of them")


def claim_ablation(out: Path, record: dict, keys: tuple[str, ...], what: str) -> FolderClaim:
    """The ablation folder `out` (mner.runtime.claim_folder: new, empty or ours; nothing created yet).

    An ablation of ours is continued only with the settings it was started with (its ablation.json's
    RESOLVED part, or its given settings for a record without one): otherwise finished arms would be
    skipped and new ones trained under other settings, and the two compared in one table.
    """
    claim = claim_folder(out, ABLATION_FILE, keys, resume=None, what=what)
    if claim.state == "ours":
        old = json.loads((out / ABLATION_FILE).read_text(encoding="utf-8"))
        if RESOLVED in old:
            changed = differences(old[RESOLVED], record[RESOLVED])
        else:
            changed = differences({key: old.get(key) for key in keys}, {key: record.get(key) for key in keys})
        if changed:
            raise ValueError(
                f"the {what} in {out} was started with other settings: {'; '.join(changed)}; re-run it "
                f"with its own settings ({out / ABLATION_FILE}) to continue it, or choose another --out"
            )
    return claim


def train_arms(
    claim: FolderClaim,
    record: dict,
    runs: list[tuple[str, int]],
    finished: Callable[[Path], bool],
    train: Callable[[str, int, Path], object],
    row: Callable[[str, int, Path], dict],
    main: bool = True,
) -> list[dict]:
    """Train every (arm name, seed) of `runs` into <ablation>/<arm_folder(name)>/seed<k>/ unless it is
    `finished` (a killed ablation re-run picks up where it stopped); returns `row` of every run.

    The folder is created and `record` written first (by rank 0, `main`). When a run fails and the
    folder holds nothing but the record, the folder this ablation made is removed again.
    """
    out = claim.path
    if main:
        claim.create()
        write_json(out / ABLATION_FILE, record)
    try:
        rows = []
        for name, seed in runs:
            run_dir = out / arm_folder(name) / f"seed{seed}"
            if finished(run_dir):
                log.info("%s: finished earlier, skipped", run_dir)
            else:
                train(name, seed, run_dir)
            rows.append(row(name, seed, run_dir))
        return rows
    except BaseException:
        if main:
            _release_if_nothing_trained(claim)
        raise


def _release_if_nothing_trained(claim: FolderClaim) -> None:
    """Remove the folder this ablation made when nothing but its record is in it."""
    if claim.path.is_dir() and {p.name for p in claim.path.iterdir()} <= {ABLATION_FILE, LOCK_NAME}:
        claim.release()


def _run_config(cfg: AblationConfig, arm: Arm, seed: int, run_dir: Path) -> RunConfig:
    model_cfg, train_cfg = load_run_config(
        config_file=arm.diff, overrides=[*cfg.overrides, *arm.overrides], model=arm.model
    )
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
    diff_keys = _diff_keys(diff)
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if key in diff_keys:
            raise ValueError(
                f"override {override!r} sets {key}, which experiment {name} ({diff}) changes; "
                "drop the override or write a new experiment file"
            )


def _diff_keys(diff: Path) -> set[str]:
    """The section.key names a config-diff file sets."""
    table = configs.load_toml(diff)
    return {
        f"{section}.{key}" for section, values in table.items() if isinstance(values, dict) for key in values
    }


def _refuse_grid_conflicts(cfg: AblationConfig) -> None:
    """A grid axis may not be a key that --set or an experiment's diff also sets, and every grid
    point must be a valid config (a bad value fails now, not after the first arms trained)."""
    keys = [axis.partition("=")[0].strip() for axis in cfg.grid]
    for override in cfg.overrides:
        if override.split("=", 1)[0].strip() in keys:
            raise ValueError(f"--set {override!r} sets a key the --grid sweeps; drop one of them")
    for arm in cfg.arms():
        if arm.overrides:
            _refuse_conflicting_overrides(arm.name, arm.diff, list(arm.overrides))
            load_run_config(config_file=arm.diff, overrides=[*cfg.overrides, *arm.overrides], model=arm.model)


def _applies(diff: Path | None, overrides: list[str], model: str | None) -> bool:
    """Whether a diff file gives a valid config of `model` that differs from the model's own."""
    try:
        return _changes_config(diff, overrides, model)
    except ValueError:
        return False


def _changes_config(diff: Path | None, overrides: list[str], model: str | None) -> bool:
    """Whether a diff file changes what the model of `model` reads of its config (used_settings) or
    its training, with these overrides."""
    return diff is not None and _used(
        load_run_config(config_file=diff, overrides=list(overrides), model=model)
    ) != _used(load_run_config(overrides=list(overrides), model=model))


def _used(pair: tuple[ModelConfig, TrainConfig]) -> dict:
    model_cfg, train_cfg = pair
    return {"model": used_settings(model_cfg), "train": train_cfg.to_dict()}


def _refuse_noop_experiment(name: str, diff: Path | None, overrides: list[str], model: str | None) -> None:
    """An experiment whose diff resolves to its model's config, as far as the model reads it, would
    train `full` again under its name (no_slot_type over afdvqf, whose slot_type loss is off already, and
    no_align over bert-crf, which has no image to align, are refused).

    (Configs refuse a switch that does nothing, such as adaptive_gate on a fusion without a gate, so
    an unchanged config is the one way an ablation could be a silent no-op.)
    """
    if diff is None:
        return
    if not _changes_config(diff, overrides, model):
        raise ValueError(
            f"experiment {name} ({diff}) changes nothing the model uses: the base config with these "
            "overrides already holds every value it sets, or the model ignores it (a text-only model has "
            "no visual part); drop the experiment or change the base"
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
    (train/significance.py), all seeds of a side averaged on each resample.

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
