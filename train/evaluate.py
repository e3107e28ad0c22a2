"""Score a finished run on a split, and tabulate the results of several runs.

The model is rebuilt from the run folder alone (config.json + model.safetensors). A multimodal run
only accepts a cache with the fingerprint it was trained on: the same images through different
models or settings give different tokens, and the scores would be meaningless.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from mner.cache.datasets import resolve_data
from mner.runtime import resolve_runtime
from mner.train.decode import decode_and_score, log_long_posts, long_post_summary, truncated_per_post
from mner.train.metrics import write_conll
from mner.train.runs import (
    check_cache_keys,
    check_fingerprint,
    load_run_model,
    open_cache,
    read_record,
    read_results,
    run_config,
    write_json,
)

# Scores are fractions in results files; tables print percent.
PERCENT = 100.0


def evaluate_run(
    run_dir, split: str = "test", cache_dir=None, data_dir=None, long_posts: str = "truncate"
) -> dict:
    """Score a run's best model on one split; writes results_<split>.json and pred_<split>.conll.

    Args:
        run_dir: a run folder written by `train_from_cache`.
        split: "train", "valid" or "test" (the file <data>/<split>.txt).
        cache_dir: feature cache to read (default: the one the run was trained on); ignored for a
            text-only run.
        data_dir: data folder (default: the run's, as resolved when it was trained).
        long_posts: "truncate" (words past the encoder's limit are predicted O) or "window" (overlapping
            windows tag them; train/decode.py). results_<split>.json records it and the count under
            "long_posts" (`decode.long_post_summary`).
    Returns:
        `entity_scores` dict: {"micro": {"precision", "recall", "f1", "support"}, "per_type": {...}}.
    Raises:
        ValueError if the cache's fingerprint differs from the run's (the message lists what
        differs), the split file does not exist, or a post's image key is not in the cache.
    Runs on a GPU when there is one, else on the CPU, whatever the run was trained on.
    """
    run_dir = Path(run_dir)
    record = read_record(run_dir)
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
    if not source.split_path(split).is_file():
        raise ValueError(
            f"{source.split_path(split)}: there is no {split} split to evaluate in {source.data_dir}"
        )
    data = source.read(split)
    if reader is not None:
        check_cache_keys([data], reader)
    runtime = resolve_runtime("auto", cfg.train.amp)
    model, tokenizer = load_run_model(run_dir, record, runtime)
    cut = truncated_per_post(data, tokenizer, record["label_names"], cfg.model.max_length)
    long = long_post_summary(cut, cfg.model.max_length, long_posts)
    log_long_posts(split, long)
    predictions, scores = decode_and_score(
        model, data, reader, tokenizer, record["label_names"], cfg, runtime, long_posts
    )
    write_conll(run_dir / f"pred_{split}.conll", data.posts, predictions)
    write_json(run_dir / f"results_{split}.json", {**scores, "long_posts": long})
    return scores


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


def results_table(run_dirs: list, split: str = "test") -> str:
    """Micro P/R/F1 (percent) of each run on `split`: results_<split>.json from `evaluate_run` if
    present, else the run's results.json."""
    rows = []
    for run_dir in run_dirs:
        scores = _split_scores(Path(run_dir), split)
        micro = scores["micro"]
        rows.append(
            {
                "run": str(run_dir),
                "P": micro["precision"] * PERCENT,
                "R": micro["recall"] * PERCENT,
                "F1": micro["f1"] * PERCENT,
                "support": micro["support"],
            }
        )
    return pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.2f}")


def _split_scores(run_dir: Path, split: str) -> dict:
    evaluated = run_dir / f"results_{split}.json"
    if evaluated.is_file():
        return json.loads(evaluated.read_text(encoding="utf-8"))
    results = read_results(run_dir)
    if split not in results:
        raise ValueError(f"{run_dir}: no {split} results; run `mner evaluate {run_dir} --split {split}`")
    return results[split]
