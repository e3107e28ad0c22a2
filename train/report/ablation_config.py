"""The tagging ablation's settings: which arms it trains, each resolved and checked before any run.

An experiment is a small TOML diff over configs/train/base.toml and the ablation's model (`model`,
`--model`; configs/models/<name>.toml): a registry name (ABLATIONS: the file
configs/experiments/<name>.toml; `full` is the empty diff), a path to a diff file of your own, or
`model=NAME`, an arm that trains the model NAME as it is (named NAME), so one table compares the model
zoo. `--exp all` runs every registry experiment that changes the model's config.

`--grid section.key=v1,v2` (repeatable) runs the cartesian sweep of the given values, crossed with the
experiments (default: `full` alone); each arm is named by its diff (`model.qfnet_layers=1,
train.lr_fusion=0.001`, prefixed by the experiment unless it is `full`).

The seed of run k is k (`seeds`): a seed set anywhere else is refused, and so are epochs set by an
experiment, `--set` or `--grid` beside `epochs`. Two arms that train the same thing (equal in what
the model reads, model.used_settings) are refused; `all` leaves such experiments out. Running the
arms is train/report/ablate.py's.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

from mner import configs
from mner.cache.datasets import DataConfig
from mner.runtime import SettingError
from mner.train.engine.config import RUNTIME_SETTINGS, ModelConfig, RunConfig, TrainConfig, check_model_name
from mner.train.engine.config_files import load_run_config, parse_override
from mner.train.engine.tasks import TOKEN_TAGGING
from mner.train.report import significance
from mner.train.report.ablation_rules import (
    RESOLVED,
    refuse_identical_arms,
    refuse_repeated_arms,
    refuse_seed_and_epochs,
    resolved_record,
)

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


# The ablation folder's record keys; a folder holding ABLATION_FILE with them is ours
# (mner.runtime.claim_folder).
ABLATION_KEYS = ("experiments", "seeds", "overrides", "epochs", "cache_dir", "data")


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

    task = TOKEN_TAGGING  # the task its arms train
    what = "ablation"  # how messages name it

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
            raise SettingError("{seeds} must be a count or a list of seeds, got {got!r}", got=self.seeds)
        if isinstance(self.seeds, int):
            if self.seeds < 1:
                raise SettingError("{seeds} must be at least 1, got {got}", got=self.seeds)
        elif (
            not self.seeds
            or len(set(self.seeds)) != len(self.seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in self.seeds)
        ):
            raise SettingError(
                "{seeds} must be a non-empty list of distinct non-negative integers, got {got!r}",
                got=self.seeds,
            )
        if self.epochs is not None and (
            isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1
        ):
            raise SettingError("{epochs} must be a positive integer or None, got {got!r}", got=self.epochs)

        if isinstance(self.bootstrap, bool) or not isinstance(self.bootstrap, int) or self.bootstrap < 0:
            raise SettingError(
                "{bootstrap} must be a number of resamples >= 0, got {got!r}", got=self.bootstrap
            )

    def seed_list(self) -> list[int]:
        """The seeds to run: 1..N for a count, else the list as given."""
        return list(range(1, self.seeds + 1)) if isinstance(self.seeds, int) else list(self.seeds)

    def keys(self) -> tuple[str, ...]:
        return ABLATION_KEYS

    def plan(self) -> dict:
        return _plan(self)

    def runs(self) -> list[tuple[str, int]]:
        """(arm name, seed) of every run, in order."""
        return [(arm.name, seed) for arm in self.arms() for seed in self.seed_list()]

    def train_arm(self, name: str, seed: int, run_dir: Path) -> None:
        _train_tagger(self, name, seed, run_dir)

    def check_arm(self, name: str) -> None:
        """Refuse, before the first arm trains, arm `name` on a cache without the vision state its model
        reads (mango's 2 blocks, IFAformer's tower), as its run would when its turn came."""
        from mner.train.engine.tagging import check_vision_state  # torch

        arm = next(arm for arm in self.arms() if arm.name == name)
        check_vision_state(_run_config(self, arm, 0, Path(self.out_dir)))

    def text_state_build(self, name: str, out: Path):
        """The text-state caches arm `name` reads (model.text_frozen_layers > 0; None otherwise), for
        run_ablation to build before the first arm (`out`: the ablation folder)."""
        from mner.train.engine.tagging import text_state_build  # torch

        arm = next(arm for arm in self.arms() if arm.name == name)
        return text_state_build(_run_config(self, arm, 0, out), out)

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


def _plan(cfg: AblationConfig) -> dict:
    """The tagging ablation's checks of every experiment before the first run; its ablation.json."""
    from mner.train.zoo.model import used_settings  # torch: the tables' readers never come here

    for experiment in cfg.experiments:
        name, diff = experiment_name(experiment), experiment_file(experiment)
        _refuse_conflicting_overrides(name, diff, cfg.overrides)
        _refuse_noop_experiment(name, diff, cfg.overrides, experiment_model(experiment, cfg.model))
    _refuse_grid_conflicts(cfg)
    refuse_seed_and_epochs(_set_keys(cfg), "train.seed", "train.epochs", cfg.epochs)
    record = _record(cfg)
    refuse_identical_arms(
        {
            name: {"model": used_settings(ModelConfig.from_dict(arm["model"])), "train": arm["train"]}
            for name, arm in record[RESOLVED]["arms"].items()
        }
    )
    return record


def _train_tagger(cfg: AblationConfig, name: str, seed: int, run_dir: Path) -> None:
    from mner.train.engine.loop import train_from_cache  # torch: the tables' readers never come here

    arm = next(arm for arm in cfg.arms() if arm.name == name)
    train_from_cache(_run_config(cfg, arm, seed, run_dir))


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
    from mner.train.zoo.model import used_settings

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
