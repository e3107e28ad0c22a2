"""Ablations: experiments x seeds, each trained from one shared cache, summarised as mean ± std.

One runner, `run_ablation`, serves both tasks; each task's config says what its arms train
(ablation_config.py: tagging experiments and grids; class_ablation.py: classifier diffs) and the
tables are train/report/ablation_tables.py's. `ablate` is `mner ablate`'s entry: it picks the task by the
data folder, runs, and returns the table.

Every run goes to <out>/<arm_folder(arm)>/seed<k>/; a run whose results.json exists is skipped, so a
killed ablation re-run picks up where it stopped. The cache is only read, never re-extracted.

The ablation folder must be new, empty or ours (it holds our ablation.json, the record of the
settings); a folder of other files is refused untouched, and so is a seed folder that is not a run
of ours. A first run that fails before anything is trained leaves no folder behind. A re-run into an
ablation of ours continues it only when every arm resolves to the settings it recorded (RESOLVED).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from mner.cache.datasets import DataConfig
from mner.runtime import LOCK_NAME, FolderClaim, SettingError, claim_folder, write_atomic
from mner.train.engine.run_files import RESULTS_FILE, differences, is_run_folder, write_json
from mner.train.engine.tasks import SENTENCE_CLASSIFICATION, TOKEN_TAGGING
from mner.train.report.ablation_config import AblationConfig
from mner.train.report.ablation_rules import RESOLVED, arm_folder
from mner.train.report.ablation_tables import (
    ABLATION_CSV,
    ABLATION_FILE,
    ABLATION_MD,
    accuracy_significance_markdown,
    class_summary_markdown,
    class_table_row,
    significance_markdown,
    summary_markdown,
    table_row,
)
from mner.train.report.class_ablation import ClassAblationConfig

log = logging.getLogger(__name__)

# Each task's tables: a run's row, the summary of the rows, the paired test of the arms.
TABLES = {
    TOKEN_TAGGING.name: (table_row, summary_markdown, significance_markdown),
    SENTENCE_CLASSIFICATION.name: (class_table_row, class_summary_markdown, accuracy_significance_markdown),
}


def ablate(
    *,
    out_dir,
    experiments,
    cache_dir,
    data_dir,
    dataset,
    data_root,
    image_dir,
    columns,
    grid,
    model,
    seeds,
    text_encoder,
    epochs,
    overrides,
    bootstrap,
) -> str:
    """`mner ablate`: the ablation of the data folder's task, run; returns ablation.md's text.

    A classification folder (`data_dir` of `mner train-classifier`) gets a ClassAblationConfig, whose
    experiments are classifier diffs; anything else a tagging AblationConfig, its data folder checked
    before the configs load the model code.
    """
    from mner.cache.classification import ClassDataConfig, is_classification_folder

    if data_dir is not None and is_classification_folder(data_dir):
        if grid or model or dataset or image_dir or columns:
            raise SettingError(
                "a classification folder's ablation takes {experiments} KEY=VALUE diffs of the classifier "
                "({experiments} mode=text {experiments} head=cnn); {grid}, {model}, {dataset}, {image_dir} "
                "and {columns} apply to tagging runs"
            )
        extra = [f"classifier.text_encoder={text_encoder}"] if text_encoder is not None else []
        cfg = ClassAblationConfig(
            data=ClassDataConfig(data_dir),
            cache_dir=cache_dir,
            experiments=list(experiments),
            out_dir=out_dir,
            seeds=seeds,
            overrides=[*overrides, *extra],
            bootstrap=bootstrap,
            epochs=epochs,
        )
    else:
        data = DataConfig(
            data_dir=data_dir, dataset=dataset, data_root=data_root, image_dir=image_dir, columns=columns
        )
        data.resolve()  # the data folder exists: checked before an experiment loads the model code
        cfg = AblationConfig(
            cache_dir=cache_dir,
            data=data,
            text_encoder=text_encoder,
            experiments=list(experiments),
            grid=list(grid),
            seeds=seeds,
            out_dir=out_dir,
            overrides=list(overrides),
            epochs=epochs,
            bootstrap=bootstrap,
            model=model,
        )
    path, summary = _run(cfg)
    return summary if summary is not None else f"ablation written to {path}"


def run_ablation(cfg: AblationConfig | ClassAblationConfig) -> Path:
    """Train every experiment x seed of either task (skipping finished runs) and write the tables.

    Returns the path of ablation.md (ablation.csv beside it has one row per run). Every setting is
    checked before the first run; under torchrun every rank trains and rank 0 writes the tables.
    """
    return _run(cfg)[0]


def _run(cfg: AblationConfig | ClassAblationConfig) -> tuple[Path, str | None]:
    """run_ablation's work: (the path of ablation.md, its text; None on a rank that does not write it)."""
    out = Path(cfg.out_dir)
    row, summarize, compare = TABLES[cfg.task.name]
    record = cfg.plan()
    claim = claim_ablation(out, record, cfg.keys(), cfg.what)
    main = int(os.environ.get("RANK", "0")) == 0

    def finished(run_dir: Path) -> bool:
        return is_run_folder(run_dir, cfg.task.name) and (run_dir / RESULTS_FILE).is_file()

    try:
        pending = [name for name, seed in cfg.runs() if not finished(out / arm_folder(name) / f"seed{seed}")]
        # A cache an arm cannot train on fails now, not after the arms before it; on every rank (read-only),
        # so that none goes on into a first arm the others never start.
        for name in dict.fromkeys(pending):
            cfg.check_arm(name)
        if main:
            build_text_states_first(cfg, out, pending)
        rows = train_arms(claim, record, cfg.runs(), finished, cfg.train_arm, row, main)
        table = pd.DataFrame(rows)
        md_path, summary = out / ABLATION_MD, None
        if main:
            write_atomic(out / ABLATION_CSV, table.to_csv(index=False))
            summary = summarize(table)
            if cfg.bootstrap > 0 and table["experiment"].nunique() > 1:
                summary += "\n" + compare(table, cfg.bootstrap)
            write_atomic(md_path, summary)
        return md_path, summary
    finally:
        claim.unlock()


def build_text_states_first(cfg: AblationConfig | ClassAblationConfig, out: Path, arms: list[str]) -> None:
    """Build the text-state caches that the `arms` (names, with repeats) read, each once, before the
    first arm trains (model.text_frozen_layers or classifier.text_frozen_layers > 0), and log each with
    the seconds it took; arms that freeze nothing build nothing. Every arm and seed then reads them.

    Rank 0 alone builds (under torchrun the other ranks wait for it in their first run's start).
    """
    builds = [build for name in dict.fromkeys(arms) if (build := cfg.text_state_build(name, out)) is not None]
    if not builds:
        return
    from mner.train.engine.text_states import build_text_states  # torch

    for folder, seconds in build_text_states(builds):
        if seconds is None:
            log.info("text-state cache %s: built earlier, read by the arms", folder)
        else:
            log.info("text-state cache built before the first arm in %.1f s: %s", seconds, folder)


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
