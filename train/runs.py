"""A run folder, and the one place that knows it: file names, the config record, rebuilding the
model, the checks of a run's inputs (data tags, cache keys, cache fingerprint).

Run folder:
    config.json         full resolved RunConfig + labels, encoder folder, cache fingerprint/config/spec,
                        the sha256 of each split file of the data folder ("data_files"),
                        counts of words cut by the encoder's length limit, of orphan I- tags and (with a
                        cache) of posts without a usable image ("no_image"), per split,
                        and "precision" (fp32 | fp16 | bf16: what training ran in, which evaluate and
                        predict reproduce unless --amp says otherwise)
    model.safetensors   the best epoch's weights
    checkpoint/         the last finished epoch (weights, optimiser, scheduler, counters, RNG) for resume;
                        see train/checkpoint.py for how it is swapped in
    metrics.jsonl       one line per epoch
    pred_valid.conll    `token gold pred` (and pred_test.conll when test.txt exists)
    results.json        micro + per-type P/R/F1 for valid and test, best epoch (training-time; what
                        `mner results` and `mner ablate` read)
    eval/<split>-<UTC time>/results.json, pred.conll   one `mner evaluate`, never over the above
    tensorboard/        event files, only when tensorboard is installed

A folder is ours when its config.json is a JSON object holding every key of RECORD_KEYS; training
writes only into a new or empty folder or, with --resume, one of ours (`claim_run_folder`).

`train.loop` writes a run through these functions; `evaluate`, `predict` and `ablate` read it through
them.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from mner.cache.checksums import file_sha256
from mner.cache.datasets import SPLITS, DataSource, Split
from mner.cache.fingerprint import SHOWN_CHARS, fingerprint_diff
from mner.cache.reader import CacheReader
from mner.cache.spec import TokenSpec
from mner.runtime import AMP_MODES, FolderClaim, Runtime, claim_folder, is_our_folder, write_atomic
from mner.train.checkpoint import find_checkpoint, load_weights
from mner.train.config import RUNTIME_SETTINGS, ModelConfig, RunConfig
from mner.train.model import MNERModel
from mner.train.text import load_tokenizer, resolve_text_encoder
from mner.train.visual import check_regions

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
CHECKPOINT_DIR = "checkpoint"
TENSORBOARD_DIR = "tensorboard"
EVAL_DIR = "eval"
# The keys of config.json that make a folder one of ours (make_record writes them all).
RECORD_KEYS = ("model", "train", "label_names", "data_source", "encoder_dir", "cache")
# COCO categories of torchvision detectors (with the background and the 11 unused ids); used only when a
# cache manifest does not list its detector's categories.
DEFAULT_DETECTOR_CLASSES = 91
# What must match for a folder to be resumed: the same model, training and data (the folder and the
# bytes of its split files), not the bookkeeping (and, of train, not config.RUNTIME_SETTINGS).
_RESUME_KEYS = ("model", "train", "label_names", "data_source", "data_files")


def write_json(path: Path, data) -> Path:
    """A run folder's JSON file (config, results), replaced atomically."""
    return write_atomic(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


# ------------------------------------------------------------------------------------------ record


def make_record(cfg: RunConfig, source: DataSource, labels: list[str], encoder_dir: Path, reader) -> dict:
    """config.json: everything needed to rebuild the model and to check a cache against the run."""
    record = cfg.to_dict()
    record["label_names"] = labels
    record["encoder_dir"] = str(Path(encoder_dir).resolve())
    record["data_source"] = {
        "name": source.name,
        "data_dir": str(source.data_dir.resolve()),
        "image_dir": str(source.image_dir.resolve()),
        "fmt": source.fmt,
    }
    record["data_files"] = data_files_record(source.split_path(name) for name in SPLITS)
    record["cache"] = None
    if reader is not None:
        record["cache"] = {
            "dir": str(reader.cache_dir.resolve()),
            "fingerprint": reader.fingerprint,
            "config": reader.config,
            "models": reader.models,
            "spec": reader.spec.to_dict(),
        }
    return record


def data_files_record(files: Iterable[Path]) -> dict[str, str]:
    """config.json "data_files": {file name: sha256} of each split file that exists, both tasks; what
    `check_data_files` compares the data folder with when a command reads the run's data again."""
    return {path.name: file_sha256(path) for path in files if path.is_file()}


# What to do about a changed data folder, as evaluate says it (both tasks).
SCORE_OTHER_DATA = (
    "the scores would not be on the run's data: restore the files, or pass a copy of the changed folder "
    "with --data-dir to score it deliberately"
)


def check_data_files(record: dict, files: Iterable[Path], run_dir, fix: str = SCORE_OTHER_DATA) -> None:
    """Refuse a data folder whose split files differ from those the run was trained on.

    Args:
        record: the run's config.json; one without "data_files" (an older run) is not checked.
        files: the split files the task would read (present or not), in the run's data folder.
        fix: what the message tells the user to do.
    Raises:
        ValueError naming each file that changed, appeared or is gone. A changed train file matters
        even to evaluate: the classifier's valid split is drawn from it, so new lines would move
        training posts into what is scored.
    """
    recorded = record.get("data_files")
    if recorded is None:
        return
    files = list(files)
    found = data_files_record(files)
    folder = files[0].parent if files else run_dir
    differs = [
        f"{name} {'changed' if name in found else 'is gone'}" if name in recorded else f"{name} is new"
        for name in sorted(set(recorded) | set(found))
        if recorded.get(name) != found.get(name)
    ]
    if differs:
        raise ValueError(
            f"{folder} changed since {run_dir} was trained: {', '.join(differs)} (sha256 recorded in "
            f"{Path(run_dir) / CONFIG_FILE}); {fix}"
        )


def is_recorded_folder(record_dir: str, data_dir) -> bool:
    """Whether `data_dir` (None: the recorded one) is the data folder a run recorded, however spelled."""
    if data_dir is None:
        return True
    try:
        return Path(data_dir).expanduser().resolve() == Path(record_dir).resolve()
    except OSError:
        return False


def read_record(run_dir) -> dict:
    """The run's config.json; ValueError when the folder is not a finished-or-running run."""
    return _read_json(
        Path(run_dir) / CONFIG_FILE,
        f"{run_dir} is not a run folder: no {CONFIG_FILE} (train one with `mner train-from-cache`)",
    )


def run_config(record: dict) -> RunConfig:
    """The RunConfig part of a run record."""
    names = ("model", "train", "cache_dir", "data", "out_dir", "resume")
    data = {name: record[name] for name in names}
    data["text_cache"] = record.get("text_cache")  # absent from runs recorded before the field
    return RunConfig.from_dict(data, CONFIG_FILE)


def read_results(run_dir) -> dict:
    """The run's results.json: best_epoch, valid and (when test.txt exists) test scores."""
    return _read_json(
        Path(run_dir) / RESULTS_FILE,
        f"{run_dir}: no {RESULTS_FILE}; the run has not finished (continue it with --resume)",
    )


def unfinished(run_dir) -> str | None:
    """None for a finished run (it has results.json); else "unfinished (epoch k/N)": the epochs its
    metrics.jsonl holds of the epochs its record asks for (train.epochs, or classifier.epochs)."""
    if (Path(run_dir) / RESULTS_FILE).is_file():
        return None
    record = read_record(run_dir)
    epochs = (record.get("train") or record.get("classifier") or {}).get("epochs", "?")
    return f"unfinished (epoch {len(read_metrics(run_dir))}/{epochs})"


def warn_if_unfinished(run_dir) -> None:
    """Log a warning when the run has no results.json (it was killed or failed before the end): a
    command that scores it scores the best weights saved so far, which a finished run may not keep."""
    status = unfinished(run_dir)
    if status is not None:
        log.warning(
            "%s is an %s run (no %s: training stopped before the end); scoring the best model it saved so far",
            run_dir,
            status,
            RESULTS_FILE,
        )


def read_metrics(run_dir) -> list[dict]:
    """metrics.jsonl's lines (one per finished epoch); [] when there is none yet."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [_parse_json(line, path) for line in lines]


def _read_json(path: Path, missing: str):
    """A run file's JSON; ValueError(`missing`) when the file is not there, one line naming the
    file when it is not JSON (truncated, emptied)."""
    if not path.is_file():
        raise ValueError(missing)
    return _parse_json(path.read_text(encoding="utf-8"), path)


def _parse_json(text: str, path: Path):
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except ValueError as err:
        raise ValueError(
            f"{path} is damaged (not valid JSON: {err}); it is written atomically, so it was changed "
            "outside the tool — restore it, or train the run again into a new --out"
        ) from None


def _refuse_constant(name: str):
    raise ValueError(f"bare {name} is not JSON")


def encoder_dir_of(record: dict) -> Path:
    """The text encoder folder the run used; the name is resolved again when that folder is gone
    (a preset materialised on another machine)."""
    recorded = Path(record["encoder_dir"])
    return recorded if recorded.is_dir() else resolve_text_encoder(record["model"]["text_encoder"])


# ------------------------------------------------------------------------------------------- model


def build_model(record: dict, encoder_dir: Path) -> MNERModel:
    """A fresh MNERModel from a run record (config.json): labels, token widths and detector classes
    as recorded from the train split and the cache manifest."""
    model_cfg = ModelConfig.from_dict(record["model"], CONFIG_FILE)
    cache = record["cache"]
    if cache is None:
        return MNERModel(model_cfg, record["label_names"], None, encoder_dir)
    categories = cache["models"].get("detector", {}).get("categories")
    num_classes = len(categories) if categories else DEFAULT_DETECTOR_CLASSES
    spec = TokenSpec.from_dict(cache["spec"])
    check_regions(model_cfg, spec, cache["dir"])  # before the text encoder loads; names the cache
    return MNERModel(model_cfg, record["label_names"], spec, encoder_dir, num_detector_classes=num_classes)


def load_run_model(run_dir, record: dict, runtime: Runtime) -> tuple[MNERModel, object]:
    """The run's best model on `runtime.device` in eval mode, and its tokenizer."""
    weights = Path(run_dir) / WEIGHTS_FILE
    check_weights_file(run_dir, weights)
    encoder_dir = encoder_dir_of(record)
    model = build_model(record, encoder_dir)
    load_weights(model, weights, runtime.device, best_weights_fix(run_dir))
    return model.to(runtime.device).eval(), load_tokenizer(encoder_dir)


def check_weights_file(run_dir, weights: Path) -> None:
    """Refuse a run without its best weights, saying whether they were deleted or never written."""
    if weights.is_file():
        return
    run_dir = Path(run_dir)
    finished = len(read_metrics(run_dir))
    if finished or find_checkpoint(run_dir / CHECKPOINT_DIR) is not None:
        raise ValueError(
            f"the weights file {weights} is missing, though the run has finished {finished} epoch(s); "
            f"restore it, or copy {run_dir / CHECKPOINT_DIR / WEIGHTS_FILE} (the last epoch's weights, "
            "not the best) in its place"
        )
    raise ValueError(
        f"{run_dir}: no {WEIGHTS_FILE}; the run has not finished an epoch (continue it with --resume)"
    )


def best_weights_fix(run_dir) -> str:
    """What to do about damaged best weights (for `load_weights`' message)."""
    last = Path(run_dir) / CHECKPOINT_DIR / WEIGHTS_FILE
    return (
        f"restore it, copy {last} (the last epoch's weights, not the best) in its place, "
        "or train the run again into a new --out"
    )


# Recorded precision (config.json "precision") -> the amp mode that reproduces it.
_PRECISION_AMP = {"fp32": "off", "fp16": "fp16", "bf16": "bf16"}
# Autocast dtype name (str(torch dtype) without "torch.") -> recorded precision.
_DTYPE_PRECISION = {"float16": "fp16", "bfloat16": "bf16"}


def precision_name(runtime: Runtime) -> str:
    """What a run actually trained in: "fp32", "fp16" or "bf16" (train.amp=auto on a CPU is fp32)."""
    if runtime.amp_dtype is None:
        return "fp32"
    return _DTYPE_PRECISION[str(runtime.amp_dtype).removeprefix("torch.")]


def inference_amp(record: dict, requested: str | None = None) -> str:
    """The amp mode `evaluate` and `predict` run in: `requested` (their --amp) when given, else the
    precision the run trained in (config.json "precision"), so a run trained in fp32 (on a CPU, or
    with amp=off) is not autocast to bf16 on a GPU by its amp=auto. A record older than that field
    is scored in full precision, which is exact for any run."""
    amp = _PRECISION_AMP[record.get("precision", "fp32")] if requested is None else requested
    if amp not in AMP_MODES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_MODES)}; got {amp!r}")
    return amp


# ------------------------------------------------------------------------------------------ folder


def new_eval_folder(run_dir, split: str) -> Path:
    """A new run_dir/eval/<split>-<UTC time>[-k]/ for one evaluation, both tasks (k counts the
    evaluations of the split within the same second, so none lands in another's folder)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    parent = Path(run_dir) / EVAL_DIR
    parent.mkdir(exist_ok=True)
    for k in range(1, 1000):
        out = parent / (f"{split}-{stamp}" if k == 1 else f"{split}-{stamp}-{k}")
        try:
            out.mkdir()
        except FileExistsError:
            continue
        return out
    raise ValueError(f"{parent}: too many evaluations of {split} within one second")


def recorded_task(run_dir) -> str | None:
    """The task a run folder records (a TASKS name: "tagging", "classification"): config.json's "task",
    else its model's; None when the folder holds no readable config.json of a run."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    model = record.get("model")
    return record.get("task") or (model.get("task") if isinstance(model, dict) else None)


def is_run_folder(path) -> bool:
    """Whether `path` is one of our run folders (config.json with every key of RECORD_KEYS)."""
    return is_our_folder(path, CONFIG_FILE, RECORD_KEYS)


def claim_run_folder(run_dir, resume: bool) -> FolderClaim:
    """The run folder training may write: new, empty, or (with `resume`) one of ours; refused
    otherwise before anything is read or created (mner.runtime.claim_folder)."""
    return claim_folder(run_dir, CONFIG_FILE, RECORD_KEYS, resume, what="run", finished=RESULTS_FILE)


def prepare_folder(
    claim: FolderClaim,
    resume: bool,
    record: dict,
    runtime: Runtime,
    keys: tuple[str, ...] = _RESUME_KEYS,
    runtime_settings: frozenset = RUNTIME_SETTINGS,
) -> Path | None:
    """Create the run folder; returns the checkpoint training continues from, or None for a fresh start.

    A resume must find the record's `keys` (the task's: tagging's _RESUME_KEYS) and cache fingerprint
    unchanged, but for the dotted `runtime_settings` (how a run is carried out, not what it trains)."""
    run_dir = claim.path
    if runtime.is_main:
        claim.create()  # locked before anything in it is read: one writer per run folder
    checkpoint = find_checkpoint(run_dir / CHECKPOINT_DIR) if resume and claim.state == "ours" else None
    if checkpoint is not None:
        old = read_record(run_dir)
        differs = resume_differences(old, record, keys, runtime_settings)
        if differs:
            raise ValueError(
                f"cannot resume {run_dir}: settings differ from the run's: {'; '.join(differs)}; use another "
                f"--out, or change only {', '.join(sorted(runtime_settings))}, which a resume may change"
            )
    elif runtime.is_main:
        # A fresh start (or a resume that never finished an epoch) must not append to stale epochs.
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
    runtime.barrier()
    return checkpoint


def resume_differences(
    old: dict, new: dict, keys: tuple[str, ...] = _RESUME_KEYS, skip: frozenset = RUNTIME_SETTINGS
) -> list[str]:
    """Lines "train.lr_encoder 3e-05 -> 0.001" for every recorded setting a resume may not change."""
    a, b = ({key: record.get(key) for key in keys} for record in (old, new))
    for side, record in ((a, old), (b, new)):
        side["cache.fingerprint"] = (record.get("cache") or {}).get("fingerprint")
    return differences(a, b, skip=skip)


def differences(old: dict, new: dict, skip=frozenset()) -> list[str]:
    """Lines "train.lr_encoder 3e-05 -> 0.001" for every leaf where two settings records differ,
    but the dotted keys in `skip` (a resume of a run, or of an ablation, refuses any of them)."""
    return [
        f"{key} {_short(x)} -> {_short(y)}"
        for key, (x, y) in fingerprint_diff(old, new).items()
        if key not in skip
    ]


def append_metrics(run_dir: Path, line: dict) -> None:
    """Add one epoch's line to metrics.jsonl; a non-finite number is written as null, so the file
    stays strict JSON (no bare NaN or Infinity)."""
    finite = {
        key: None if isinstance(value, float) and not math.isfinite(value) else value
        for key, value in line.items()
    }
    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(finite, allow_nan=False) + "\n")


def trim_metrics(run_dir: Path, last_epoch: int) -> None:
    """Drop metrics lines of epochs after the checkpoint (written before a kill, about to be redone)."""
    path = run_dir / METRICS_FILE
    kept = [line for line in read_metrics(run_dir) if line["epoch"] <= last_epoch]
    if path.is_file():
        write_atomic(path, "".join(json.dumps(line, allow_nan=False) + "\n" for line in kept))


# ------------------------------------------------------------------------------------------ inputs


def open_cache(cache_dir, text_only: bool, in_memory: bool = False) -> CacheReader | None:
    """The run's cache reader; None (and nothing opened) for a text-only model."""
    if text_only:
        return None
    if cache_dir is None:
        raise ValueError("a multimodal run needs a feature cache (cache_dir); pass --cache, or --text-only")
    return CacheReader(cache_dir, in_memory=in_memory)


def check_tags(splits: dict[str, Split], labels: list[str]) -> None:
    """Refuse a valid/test tag the model cannot predict: the label set is read from train alone.

    Args:
        splits: split name -> Split; "train" (where `labels` came from) is not checked.
        labels: the run's label names (`label_names` of train).
    """
    known, train_file = set(labels), splits["train"].path.name
    for name, split in splits.items():
        if name == "train":
            continue
        for post in split.posts:
            for index, tag in enumerate(post.tags):
                if tag not in known:
                    raise ValueError(
                        f"{split.path}:{post.tag_line(index)}: tag {tag!r} does not occur in {train_file}; "
                        "the label set comes from the training file"
                    )


def check_cache_keys(splits: list[Split], reader: CacheReader) -> None:
    """Refuse a cache extracted from other data.

    Extraction writes a record for every key of its data, missing and unreadable images included,
    so a key absent from the cache means the wrong cache, whose posts would all train image-masked.
    """
    absent = [(split, post) for split in splits for post in split.posts if post.key not in reader]
    if absent:
        split, post = absent[0]
        total = sum(len(split.posts) for split in splits)
        raise ValueError(
            f"{split.path}:{post.line}: image key {post.key!r} is not in the cache at {reader.cache_dir} "
            f"({len(absent)} of {total} posts' keys are absent); the cache was extracted from other data "
            "— re-run `mner extract-features` on this data folder"
        )


def report_images(keys: dict[str, list[str]], reader: CacheReader, fallback: str, image_only: bool = False):
    """Posts per split without a usable image in the cache (what config.json records as "no_image").

    A post without one is trained and scored with no visual tokens (`fallback` says what that means for
    the model, for the log). When no train post has a usable image, the image side learns nothing: a
    model that also reads text is in effect text-only, which is said loudly; one that reads only the
    image (`image_only`) would learn a constant, so it is refused.
    Args:
        keys: each split's cache keys, in order. reader: the run's cache.
    Returns:
        {split: posts without a usable image}.
    Raises:
        ValueError (image_only) naming the cache and the statuses of its train images.
    """
    report = {name: sum(reader.status(key) != "ok" for key in split) for name, split in keys.items()}
    train = keys.get("train", [])
    if not train or report["train"] < len(train):
        log.info("posts without a usable image (%s): %s", fallback, report)
        return report
    statuses = ", ".join(f"{status} {n}" for status, n in sorted(Counter(map(reader.status, train)).items()))
    where = f"none of the {len(train)} train posts has a usable image in the cache {reader.cache_dir} ({statuses})"
    fix = f"check the images (`mner cache verify {reader.cache_dir} --images`) and extract them again"
    if image_only:
        raise ValueError(
            f"{where}: a model of the image alone would learn a constant; {fix}, or train on the text"
        )
    log.warning("%s: the image side learns nothing and this run is text-only in effect; %s", where, fix)
    return report


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
    return [
        f"{key}: cache {_short(x)}, run {_short(y)}" for key, (x, y) in fingerprint_diff(a, b, ignore).items()
    ]


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."
