"""Score a finished run on a split: `evaluate_run` (tagging), `evaluate_classifier` (classification);
`evaluate`, `mner evaluate`'s entry, picks one by the run's recorded task.

The model is rebuilt from the run folder alone (config.json + model.safetensors). A multimodal run
only accepts a cache with the fingerprint it was trained on: the same images through different
models or settings give different tokens, and the scores would be meaningless.

`evaluate_run` never overwrites what training wrote (results.json, pred_<split>.conll): each call
writes its own eval/<split>-<UTC time>/ folder. The table of several runs' scores is train/report/results.py's.
"""

from __future__ import annotations

import logging
from pathlib import Path

from mner.cache.datasets import SPLITS, resolve_data
from mner.runtime import SettingError, resolve_runtime
from mner.train.engine.data import unknown_label
from mner.train.engine.decode import decode_and_score, log_long_posts, long_post_summary, truncated_per_post
from mner.train.engine.metrics import write_conll
from mner.train.engine.run_files import (
    RESULTS_FILE,
    check_data_files,
    check_fingerprint,
    inference_amp,
    is_recorded_folder,
    load_run,
    load_run_of,
    new_eval_folder,
    run_config,
    warn_if_unfinished,
    write_json,
)
from mner.train.engine.runs import check_cache_keys, encoder_dir_of, load_run_model, open_cache
from mner.train.engine.scores import format_entity_scores, write_pred_csv
from mner.train.engine.tasks import SENTENCE_CLASSIFICATION, TOKEN_TAGGING
from mner.train.engine.text_states import find_text_states, tagging_posts

log = logging.getLogger(__name__)


def evaluate(*, run_dir, split, cache_dir, data_dir, amp, long_posts, text_cache) -> str:
    """`mner evaluate`: score a run of either task on `split` by its task's evaluation; returns the report.

    `amp`, `long_posts` other than "truncate" and `text_cache` tag words: a classifier run refuses them.
    """
    if load_run(run_dir).task is SENTENCE_CLASSIFICATION:
        if long_posts != "truncate" or amp is not None or text_cache is not None:
            raise SettingError(
                "{amp}, {long_posts} and {text_cache} apply to tagging runs, not to a classifier run"
            )
        scores, folder = evaluate_classifier(run_dir, split=split, cache_dir=cache_dir, data_dir=data_dir)
        return f"{run_dir} on {split} (written to {folder}):\n{SENTENCE_CLASSIFICATION.format_scores(scores)}"
    scores = evaluate_run(
        run_dir,
        split=split,
        cache_dir=cache_dir,
        data_dir=data_dir,
        amp=amp,
        long_posts=long_posts,
        text_cache=text_cache,
    )
    return f"{run_dir} on {split}:\n{format_scores(scores)}"


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
            windows tag them; train/engine/decode.py). The eval results.json records it and the count under
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
    run = load_run_of(
        run_dir,
        TOKEN_TAGGING,
        "it is scored by evaluate_classifier (`mner evaluate` picks it by the run's task)",
    )
    record = run.record
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
            cfg.model.text_frozen_layers,
            tagging_posts(data, tokenizer, record["label_names"], cfg.model.max_length),
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


def evaluate_classifier(run_dir, split: str = "test", cache_dir=None, data_dir=None, device: str = "auto"):
    """Score a classifier run's best model on a labelled split of its data folder (or `data_dir`).

    Writes RUN/eval/<split>-<UTC time>/results.json and pred.csv (guid,gold,pred), and for a split
    read from its own csv file (test.csv, val.csv) also pred.seed.csv, that file with the tag column
    filled in (the seed's output form, write_seed_form); never the training-time files. Returns
    (classification_scores, that folder). Raises ValueError for a split that is absent or unlabelled,
    or a cache that is not the one the run was trained on.
    """
    # Imported here: the classifier's model code is classification's (a tagging evaluation never loads it).
    from mner.cache.classification import (
        ClassDataConfig,
        read_classification,
        seed_form_file,
        split_files,
        write_seed_form,
    )
    from mner.train.engine.classify import (
        check_guids_cached,
        has_seed_form,
        load_classifier_run,
        open_run_cache,
        score_split,
    )

    run_dir = Path(run_dir)
    run, c, model, tokenizer, runtime = load_classifier_run(run_dir, device)
    record = run.record
    warn_if_unfinished(run_dir)
    stored = dict(record["data"])
    if is_recorded_folder(stored["data_dir"], data_dir):
        check_data_files(record, split_files(stored["data_dir"]), run_dir)
    if data_dir is not None:
        stored["data_dir"] = str(data_dir)
    data = read_classification(ClassDataConfig(**stored))
    if split not in data.splits or not data.splits[split].labelled:
        labelled = [name for name, s in data.splits.items() if s.labelled]
        raise ValueError(
            f"{stored['data_dir']} has no labelled {split} split (labelled: {', '.join(labelled)}); "
            "use `mner predict` for unlabelled posts"
        )
    for example in data.splits[split].examples:
        if example.label not in record["label_names"]:
            raise unknown_label(
                data.splits[split].path,
                example.line,
                f"guid {example.guid!r}",
                example.label,
                record["label_names"],
            )
    reader = open_run_cache(run, cache_dir, same_keys=True)
    try:
        check_guids_cached(data.splits[split], reader, "pass the run's cache with --cache")
        predicted, scores = score_split(
            model, data.splits[split], reader, tokenizer, c, runtime, record["label_names"]
        )
    finally:
        if reader is not None:
            reader.close()
        runtime.close()
    out = new_eval_folder(run_dir, split)
    write_json(out / RESULTS_FILE, {split: scores})
    write_pred_csv(out / "pred.csv", data.splits[split], predicted)
    if has_seed_form(data.splits[split]):
        write_seed_form(
            seed_form_file(out / "pred.csv"), data.splits[split].path, predicted, stored["encodings"]
        )
    return scores, out
