"""Score a finished run on a split, and tabulate the results of several runs.

The model is rebuilt from the run folder alone (config.json + model.safetensors). A multimodal run
only accepts a cache with the fingerprint it was trained on: the same images through different
models or settings give different tokens, and the scores would be meaningless.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from safetensors.torch import load_model

from mner.cache.datasets import resolve_data
from mner.cache.reader import CacheReader
from mner.train.config import RunConfig
from mner.train.loop import (
    CONFIG_FILE,
    RESULTS_FILE,
    WEIGHTS_FILE,
    Runtime,
    build_model,
    check_cache_keys,
    decode_and_score,
    open_cache,
    resolve_runtime,
    write_json,
)
from mner.train.metrics import write_conll
from mner.train.model import MNERModel
from mner.train.text import load_tokenizer, resolve_text_encoder

# Scores are fractions in results files; tables print percent.
PERCENT = 100.0
# Longest value shown when listing what differs between two caches.
_SHOWN_CHARS = 60


def evaluate_run(run_dir, split: str = "test", cache_dir=None, data_dir=None) -> dict:
    """Score a run's best model on one split; writes results_<split>.json and pred_<split>.conll.

    Args:
        run_dir: a run folder written by `train_from_cache`.
        split: "train", "valid" or "test" (the file <data>/<split>.txt).
        cache_dir: feature cache to read (default: the one the run was trained on); ignored for a
            text-only run.
        data_dir: data folder (default: the run's, as resolved when it was trained).
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
    source = resolve_data(data_dir=data_dir if data_dir is not None else record["data_source"]["data_dir"])
    if not source.split_path(split).is_file():
        raise ValueError(
            f"{source.split_path(split)}: there is no {split} split to evaluate in {source.data_dir}"
        )
    data = source.read(split)
    if reader is not None:
        check_cache_keys([data], reader)
    runtime = resolve_runtime("auto", cfg.train.amp)
    model, tokenizer = load_run_model(run_dir, record, runtime)
    predictions, scores = decode_and_score(
        model, data, reader, tokenizer, record["label_names"], cfg, runtime
    )
    write_conll(run_dir / f"pred_{split}.conll", data.posts, predictions)
    write_json(run_dir / f"results_{split}.json", scores)
    return scores


def read_record(run_dir) -> dict:
    """The run's config.json; ValueError when the folder is not a finished-or-running run."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(
            f"{run_dir} is not a run folder: no {CONFIG_FILE} (train one with `mner train-from-cache`)"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def run_config(record: dict) -> RunConfig:
    """The RunConfig part of a run record."""
    names = ("model", "train", "cache_dir", "data", "out_dir", "resume")
    return RunConfig.from_dict({name: record[name] for name in names}, CONFIG_FILE)


def read_results(run_dir) -> dict:
    """The run's results.json: best_epoch, valid and (when test.txt exists) test scores."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise ValueError(
            f"{run_dir}: no {RESULTS_FILE}; the run has not finished (continue it with --resume)"
        )
    return json.loads(path.read_text(encoding="utf-8"))


def encoder_dir_of(record: dict) -> Path:
    """The text encoder folder the run used; the name is resolved again when that folder is gone
    (a preset materialised on another machine)."""
    recorded = Path(record["encoder_dir"])
    return recorded if recorded.is_dir() else resolve_text_encoder(record["model"]["text_encoder"])


def load_run_model(run_dir, record: dict, runtime: Runtime) -> tuple[MNERModel, object]:
    """The run's best model on `runtime.device` in eval mode, and its tokenizer."""
    weights = Path(run_dir) / WEIGHTS_FILE
    if not weights.is_file():
        raise ValueError(f"{run_dir}: no {WEIGHTS_FILE}; the run has not finished an epoch")
    encoder_dir = encoder_dir_of(record)
    model = build_model(record, encoder_dir)
    load_model(model, str(weights))
    return model.to(runtime.device).eval(), load_tokenizer(encoder_dir)


def check_fingerprint(reader: CacheReader, record: dict, run_dir) -> None:
    """Refuse a cache other than the one the run was trained on, saying what differs."""
    trained_on = record["cache"]["fingerprint"]
    if reader.fingerprint == trained_on:
        return
    found = {"config": reader.config, "models": reader.models, "spec": reader.spec.to_dict()}
    differences = cache_differences(found, record["cache"])
    raise ValueError(
        f"cache at {reader.cache_dir} has fingerprint {reader.fingerprint} but run {run_dir} was trained on "
        f"{trained_on}; differs: {'; '.join(differences) or 'nothing recorded (the tokens were re-extracted)'}"
    )


def cache_differences(found: dict, recorded: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Lines "key: cache X, run Y" for every setting where two cache descriptions differ.

    Args:
        found, recorded: {"config", "models", "spec"} of a cache manifest and of the run's record.
        ignore: top-level fingerprint parts to leave out.
    When both configs carry the extractor's "fingerprint_parts" only those are compared (paths,
    workers and the like do not change the tokens); otherwise config, models and spec.
    """
    parts = found["config"].get("fingerprint_parts"), recorded["config"].get("fingerprint_parts")
    if parts[0] is not None and parts[1] is not None:
        a, b = parts
    else:
        a, b = ({name: side[name] for name in ("config", "models", "spec")} for side in (found, recorded))
    a, b = ({key: value for key, value in side.items() if key not in ignore} for side in (a, b))
    return [f"{key}: cache {_short(x)}, run {_short(y)}" for key, (x, y) in sorted(_diff(a, b).items())]


def _diff(a, b, prefix: str = "") -> dict[str, tuple]:
    """Dotted key -> (value in a, value in b) for every leaf where two nested dicts differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = {}
        for key in sorted(set(a) | set(b)):
            found.update(_diff(a.get(key), b.get(key), f"{prefix}{key}."))
        return found
    return {} if a == b else {prefix.rstrip("."): (a, b)}


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


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
