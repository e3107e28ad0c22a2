"""Score a finished run on a split, and tabulate the results of several runs.

The model is rebuilt from the run folder alone (config.json + model.safetensors). A multimodal run
only accepts a cache with the fingerprint it was trained on: the same images through different
models or settings give different tokens, and the scores would be meaningless.

`evaluate_run` never overwrites what training wrote (results.json, pred_<split>.conll): each call
writes its own eval/<split>-<UTC time>/ folder. `results_table` reads the training-time
results.json only, so its numbers are the run's, whatever was evaluated since.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from mner.cache.datasets import SPLITS, resolve_data
from mner.runtime import resolve_runtime
from mner.train import significance
from mner.train.decode import decode_and_score, log_long_posts, long_post_summary, truncated_per_post
from mner.train.metrics import write_conll
from mner.train.runs import (
    RESULTS_FILE,
    check_cache_keys,
    check_data_files,
    check_fingerprint,
    encoder_dir_of,
    inference_amp,
    is_recorded_folder,
    is_run_folder,
    load_run_model,
    new_eval_folder,
    open_cache,
    read_metrics,
    read_record,
    read_results,
    recorded_task,
    run_config,
    unfinished,
    warn_if_unfinished,
    write_json,
)
from mner.train.scores import PERCENT, format_entity_scores, read_pred_csv
from mner.train.tasks import SENTENCE_CLASSIFICATION, TOKEN_TAGGING
from mner.train.text_states import find_text_states

log = logging.getLogger(__name__)


def evaluate_run(
    run_dir,
    split: str = "test",
    cache_dir=None,
    data_dir=None,
    amp: str | None = None,
    long_posts: str = "truncate",
    text_cache=None,
) -> dict:
    """Score a run's best model on one split; writes eval/<split>-<UTC time>/results.json and pred.conll.

    Args:
        run_dir: a run folder written by `train_from_cache`.
        split: "train", "valid" or "test" (the file <data>/<split>.txt).
        cache_dir: feature cache to read (default: the one the run was trained on); ignored for a
            text-only run.
        data_dir: data folder (default: the run's, as resolved when it was trained).
        amp: autocast mode on a GPU (auto | off | fp16 | bf16); None: the precision the run was
            trained in (runs.inference_amp).
        long_posts: "truncate" (words past the encoder's limit are predicted O) or "window" (overlapping
            windows tag them; train/decode.py). The eval results.json records it and the count under
            "long_posts" (`decode.long_post_summary`).
        text_cache: with model.text_frozen_layers > 0, the root of the text-state caches (default: the
            run's); the split's cache is read when one was built for exactly this file, encoder and
            settings, else the frozen layers run here.
    Returns:
        `entity_scores` dict: {"micro": {"precision", "recall", "f1", "support"}, "per_type": {...}}.
    Raises:
        ValueError if the cache's fingerprint differs from the run's (the message lists what
        differs), the split file does not exist, or a post's image key is not in the cache.
    Runs on a GPU when there is one, else on the CPU, whatever the run was trained on. The
    training-time results.json and pred_<split>.conll are left as they are.
    """
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    warn_if_unfinished(run_dir)
    cfg = run_config(record)
    reader = None
    if not cfg.model.text_only:
        reader = open_cache(
            cache_dir or record["cache"]["dir"], text_only=False, in_memory=cfg.train.cache_in_memory
        )
        check_fingerprint(reader, record, run_dir)
    # Default: the folder the run resolved (absolute), so evaluation works from any working directory.
    source = resolve_data(
        data_dir=data_dir if data_dir is not None else record["data_source"]["data_dir"],
        columns=cfg.data.columns,
    )
    if is_recorded_folder(record["data_source"]["data_dir"], data_dir):
        check_data_files(record, [source.split_path(name) for name in SPLITS], run_dir)
    if not source.split_path(split).is_file():
        raise ValueError(
            f"{source.split_path(split)}: there is no {split} split to evaluate in {source.data_dir}"
        )
    data = source.read(split)
    if reader is not None:
        check_cache_keys([data], reader)
    runtime = resolve_runtime("auto", inference_amp(record, amp))
    model, tokenizer = load_run_model(run_dir, record, runtime)
    cut = truncated_per_post(data, tokenizer, record["label_names"], cfg.model.max_length)
    long = long_post_summary(cut, cfg.model.max_length, long_posts)
    log_long_posts(split, long)
    text_states = None
    if cfg.model.text_frozen_layers and long_posts == "truncate":
        text_states = find_text_states(
            encoder_dir_of(record),
            tokenizer,
            cfg.model.max_length,
            cfg.model.text_frozen_layers,
            data,
            text_cache if text_cache is not None else cfg.text_cache,
        )
        log.info(
            "%s: frozen text states %s",
            split,
            f"read from {text_states.folder}"
            if text_states is not None
            else "computed here (no text-state cache)",
        )
    predictions, scores = decode_and_score(
        model, data, reader, tokenizer, record["label_names"], cfg, runtime, long_posts, text_states
    )
    out = new_eval_folder(run_dir, split)
    write_conll(out / "pred.conll", data.posts, predictions)
    write_json(out / "results.json", {**scores, "long_posts": long})
    log.info("evaluation of %s on %s written to %s", run_dir, split, out)
    return scores


def format_scores(scores: dict) -> str:
    """Micro and per-type P/R/F1 (percent) and support, one line each (train.scores)."""
    return format_entity_scores(scores)


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
    (train/significance.py; `bootstrap` resamples drawn with `bootstrap_seed`) on the predictions each run wrote
    (pred_<split>.conll, or a classifier's pred_<split>.csv, whose labels are one-word tag sequences, so the
    bootstrapped F1 is the accuracy): columns dF1 (percentage points; dAcc when the first run is a
    classifier), CI95 (its 95% interval) and p, and a last line naming the test. A run whose predictions
    are missing, or cover other posts, gets "-" there.
    """
    tasks = [recorded_task(run_dir) for run_dir in run_dirs]
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
    """(the task's headline scores or None, status) of one run."""
    if task == SENTENCE_CLASSIFICATION.name:
        return _class_scores(run_dir, split)
    return _split_scores(run_dir, split)


def _class_scores(run_dir: Path, split: str) -> tuple[dict | None, str]:
    """(macro P/R/F1 as precision/recall/f1, accuracy, support; or None, status) of a classifier run."""
    if not (run_dir / RESULTS_FILE).is_file():
        return None, f"unfinished (epoch {len(read_metrics(run_dir))})"
    results = read_results(run_dir)
    if split not in results:
        return None, f"no {split} results (the split has no labels, or the folder has no {split} file)"
    return SENTENCE_CLASSIFICATION.headline(
        results[split]
    ), "finished (classification: macro P/R/F1, accuracy)"


def _split_scores(run_dir: Path, split: str) -> tuple[dict | None, str]:
    """(micro scores or None, status) of one run."""
    if not is_run_folder(run_dir):
        return None, "not a run folder (no config.json of ours)"
    status = unfinished(run_dir)
    if status is not None:
        return None, status
    results = read_results(run_dir)
    if split not in results:
        return None, f"no {split} results; run `mner evaluate {run_dir} --split {split}`"
    return results[split]["micro"], "finished"
