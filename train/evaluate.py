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
import time
from pathlib import Path

import pandas as pd

from mner.cache.datasets import SPLITS, resolve_data
from mner.runtime import resolve_runtime
from mner.train import significance
from mner.train.classify import is_classifier_run
from mner.train.decode import decode_and_score, log_long_posts, long_post_summary, truncated_per_post
from mner.train.metrics import write_conll
from mner.train.runs import (
    EVAL_DIR,
    RESULTS_FILE,
    check_cache_keys,
    check_data_files,
    check_fingerprint,
    encoder_dir_of,
    inference_amp,
    is_recorded_folder,
    is_run_folder,
    load_run_model,
    open_cache,
    read_metrics,
    read_record,
    read_results,
    run_config,
    unfinished,
    warn_if_unfinished,
    write_json,
)
from mner.train.text_states import find_text_states

log = logging.getLogger(__name__)

# Scores are fractions in results files; tables print percent.
PERCENT = 100.0


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
    out = _eval_folder(run_dir, split)
    write_conll(out / "pred.conll", data.posts, predictions)
    write_json(out / "results.json", {**scores, "long_posts": long})
    log.info("evaluation of %s on %s written to %s", run_dir, split, out)
    return scores


def _eval_folder(run_dir: Path, split: str) -> Path:
    """A new run_dir/eval/<split>-<UTC time>[-k]/ (k counts evaluations within the same second)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    parent = run_dir / EVAL_DIR
    parent.mkdir(exist_ok=True)
    for k in range(1, 1000):
        out = parent / (f"{split}-{stamp}" if k == 1 else f"{split}-{stamp}-{k}")
        try:
            out.mkdir()
        except FileExistsError:
            continue
        return out
    raise ValueError(f"{parent}: too many evaluations of {split} within one second")


def format_scores(scores: dict) -> str:
    """Micro and per-type P/R/F1 (percent) and support, one line each."""
    rows = {"micro": scores["micro"], **dict(sorted(scores["per_type"].items()))}
    table = pd.DataFrame(
        {
            "P": [row["precision"] * PERCENT for row in rows.values()],
            "R": [row["recall"] * PERCENT for row in rows.values()],
            "F1": [row["f1"] * PERCENT for row in rows.values()],
            "support": [row["support"] for row in rows.values()],
        },
        index=list(rows),
    )
    return table.to_string(float_format=lambda x: f"{x:.2f}")


def results_table(
    run_dirs: list,
    split: str = "test",
    bootstrap: int = significance.DEFAULT_RESAMPLES,
    bootstrap_seed: int = 0,
) -> str:
    """Micro P/R/F1 (percent) of each run on `split`, from its training-time results.json.

    A classifier run (`mner train-classifier`) gets its macro P/R/F1 and an Acc column (accuracy); it is
    never bootstrapped. A run without them gets a row all the same, its status saying why: "unfinished (epoch k/N)",
    "no <split> results", "not a run folder", or the error reading a damaged file.

    With two or more runs and `bootstrap` > 0 every run is compared with the first one by a paired bootstrap over posts
    (train/significance.py; `bootstrap` resamples drawn with `bootstrap_seed`) on the predictions each run wrote
    (pred_<split>.conll): columns dF1 (percentage points), CI95 (its 95% interval) and p, and a last line
    naming the test. A run whose predictions are missing, or cover other posts, gets "-" there.
    """
    classifiers = [is_classifier_run(run_dir) for run_dir in run_dirs]
    if len(run_dirs) < 2 or classifiers[0]:
        bootstrap = 0  # nothing to compare with (the bootstrap compares entity F1 of tagging runs)
    rows = []
    base_preds = _predictions(Path(run_dirs[0]), split) if bootstrap > 0 and run_dirs else None
    for index, run_dir in enumerate(run_dirs):
        row = {"run": str(run_dir), "P": "-", "R": "-", "F1": "-", "support": "-"}
        if any(classifiers):
            row["Acc"] = "-"
        try:
            micro, status = (_class_scores if classifiers[index] else _split_scores)(Path(run_dir), split)
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
        if bootstrap > 0 and classifiers[index]:
            row.update({"dF1": "-", "CI95": "-", "p": "-"})
            status = f"{status}; not compared (the bootstrap is over tagged posts)"
        elif bootstrap > 0:
            cells, note = _bootstrap_cells(index, base_preds, Path(run_dir), split, bootstrap, bootstrap_seed)
            row.update(cells)
            status = f"{status}; {note}" if note else status
        rows.append({**row, "status": status})
    table = pd.DataFrame(rows).to_string(index=False)
    if bootstrap > 0:
        table += (
            f"\ndF1 in percentage points against {run_dirs[0]}: {significance.TEST_NAME} on {split}, "
            f"{bootstrap} resamples, seed {bootstrap_seed}; p two-sided"
        )
    return table


def _predictions(run_dir: Path, split: str):
    """(words, gold, pred) of a run's pred_<split>.conll, or None when the run has not written it."""
    path = run_dir / f"pred_{split}.conll"
    return significance.read_predictions(path) if path.is_file() else None


def _bootstrap_cells(index: int, base, run_dir: Path, split: str, resamples: int, seed: int):
    """(the dF1 / 95% CI / p cells of one results row, a note for its status or ""); run 0 is the base."""
    cells = {"dF1": "-", "CI95": "-", "p": "-"}
    mine = base if index == 0 else _predictions(run_dir, split)
    if mine is None:
        return cells, f"no pred_{split}.conll to compare"
    if index == 0:
        return {**cells, "dF1": "base"}, ""
    if base is None:
        return cells, ""
    if mine[:2] != base[:2]:
        return cells, "tagged other posts than the base run: not compared"
    result = significance.paired_bootstrap(base[1], [base[2]], [mine[2]], resamples=resamples, seed=seed)
    delta, ci, p = significance.format_comparison(result)
    return {"dF1": delta, "CI95": ci, "p": p}, ""


def _class_scores(run_dir: Path, split: str) -> tuple[dict | None, str]:
    """(macro P/R/F1 as precision/recall/f1, accuracy, support; or None, status) of a classifier run."""
    if not (run_dir / RESULTS_FILE).is_file():
        return None, f"unfinished (epoch {len(read_metrics(run_dir))})"
    results = read_results(run_dir)
    if split not in results:
        return None, f"no {split} results (the split has no labels, or the folder has no {split} file)"
    scores = results[split]
    return {
        "precision": scores["macro_precision"],
        "recall": scores["macro_recall"],
        "f1": scores["macro_f1"],
        "accuracy": scores["accuracy"],
        "support": scores["support"],
    }, "finished (classification: macro P/R/F1, accuracy)"


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
