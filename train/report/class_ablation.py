"""The classifier ablation's settings: arms that are diffs of the classifier config on one
classification folder (`--data-dir` of `mner train-classifier`).

An experiment is a diff over the base classifier config (`--config`, `--set classifier.KEY=VALUE`),
`KEY=VALUE[,KEY=VALUE...]` of ClassifierConfig fields (`mode=both,head=xattn`), or `base` (also `full`)
for none; its runs go through `train_classifier` (classifier.seed = k). Its ablation.csv has accuracy,
macro P/R/F1 and per-class F1 (percent) on test, or valid without a labelled test split; its ablation.md
compares the experiments by a paired bootstrap of the accuracy (significance.py on one-word "tag
sequences", for which micro F1 is exactly the accuracy); its ablation.json has task "classification".
Running the arms is train/report/ablate.py's, as for the tagging ablation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mner import configs
from mner.cache.classification import ClassDataConfig
from mner.runtime import SettingError
from mner.train.engine.classifier_config import ClassifierRunConfig, load_classifier_config
from mner.train.engine.config_files import parse_override
from mner.train.engine.tasks import SENTENCE_CLASSIFICATION
from mner.train.report import significance
from mner.train.report.ablation_config import ALL
from mner.train.report.ablation_rules import (
    RESOLVED,
    refuse_identical_arms,
    refuse_repeated_arms,
    refuse_seed_and_epochs,
    resolved_record,
)

BASE = "base"  # the experiment that changes nothing
FULL = "full"  # the tagging side's name of the same arm, accepted as BASE
CLASS_ABLATION_KEYS = ("task", "experiments", "seeds", "overrides", "cache_dir", "data")
CLASS_TASK = SENTENCE_CLASSIFICATION.name  # ablation.json "task" of a classifier ablation


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

    task = SENTENCE_CLASSIFICATION
    what = "classifier ablation"

    def __post_init__(self):
        if not self.experiments:
            raise ValueError(f"no experiments given; e.g. --exp mode=text --exp mode=both, or --exp {BASE}")
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise SettingError("{seeds} must be at least 1, got {got!r}", got=self.seeds)
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

    def keys(self) -> tuple[str, ...]:
        return CLASS_ABLATION_KEYS

    def plan(self) -> dict:
        record = self.record()
        refuse_identical_arms(record[RESOLVED]["arms"])
        return record

    def runs(self) -> list[tuple[str, int]]:
        return [(experiment, seed) for experiment in self.experiments for seed in range(1, self.seeds + 1)]

    def train_arm(self, experiment: str, seed: int, run_dir: Path) -> None:
        from mner.train.engine.classify import train_classifier  # torch

        c = self.arm_config(experiment, seed)  # a mode=text arm never opens cache_dir
        train_classifier(
            ClassifierRunConfig(data=self.data, out_dir=str(run_dir), classifier=c, cache_dir=self.cache_dir)
        )

    def check_arm(self, experiment: str) -> None:
        """Refuse, before the first arm trains, arm `experiment` on a cache without the layer3 map its
        trained layer4 starts from, as its run would when its turn came."""
        from mner.train.engine.classify import check_vision_state  # torch

        c = self.arm_config(experiment, seed=0)
        check_vision_state(
            ClassifierRunConfig(data=self.data, out_dir=self.out_dir, classifier=c, cache_dir=self.cache_dir)
        )

    def text_state_build(self, experiment: str, out: Path):
        """The text-state caches arm `experiment` reads (classifier.text_frozen_layers > 0 with a text
        encoder; None otherwise), for run_ablation to build before the first arm (`out`: the ablation
        folder)."""
        from mner.train.engine.classifier_data import text_state_build  # torch

        c = self.arm_config(experiment, seed=0)
        run = ClassifierRunConfig(data=self.data, out_dir=str(out), classifier=c, cache_dir=self.cache_dir)
        return text_state_build(run, out)

    def arm_config(self, experiment: str, seed: int):
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
        return {"task": CLASS_TASK, **given, "data": data, "epochs": self.epochs, RESOLVED: resolved}
