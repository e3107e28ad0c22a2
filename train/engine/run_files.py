"""A run folder's files, and the one place that knows them: names, the config record, metrics and
results I/O, the folder claim, the recorded task, the fingerprint check and the wording of a diff.
Torch-free, so that `mner results`, `--plot` and `mner cases` read runs without loading torch;
rebuilding a run's model is train/engine/runs.py's.

Run folder (tagging; a classifier run's config.json is train/engine/classify.py's):
    config.json         full resolved RunConfig + labels, encoder folder, cache fingerprint/config/spec,
                        the sha256 of each split file of the data folder ("data_files"),
                        counts of words cut by the encoder's length limit, of orphan I- tags and (with a
                        cache) of posts without a usable image ("no_image"), per split,
                        and "precision" (fp32 | fp16 | bf16: what training ran in, which evaluate and
                        predict reproduce unless --amp says otherwise)
    model.safetensors   the best epoch's weights
    checkpoint/         the last finished epoch (weights, optimiser, scheduler, counters, RNG) for resume;
                        see train/engine/checkpoint.py for how it is swapped in
    metrics.jsonl       one line per epoch
    pred_valid.conll    `token gold pred` (and pred_test.conll when test.txt exists)
    results.json        micro + per-type P/R/F1 for valid and test, best epoch (training-time; what
                        `mner results` and `mner ablate` read)
    eval/<split>-<UTC time>/results.json, pred.conll   one `mner evaluate`, never over the above
    tensorboard/        event files, only when tensorboard is installed

A folder is a run of ours when its config.json names a task (train/zoo/registry.py TASKS) and holds every
key of that task's `record_keys`; training writes only into a new or empty folder or, with --resume,
one of its runs (`claim_run_folder`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from mner.cache.checksums import file_sha256
from mner.cache.datasets import SPLITS, DataSource
from mner.cache.fingerprint import SHOWN_CHARS, fingerprint_diff
from mner.cache.reader import CacheReader
from mner.runtime import AMP_MODES, FolderClaim, Runtime, claim_folder, write_atomic
from mner.train.engine.config import RUNTIME_SETTINGS, RunConfig
from mner.train.engine.tasks import TOKEN_TAGGING
from mner.train.zoo.registry import TASKS

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
CHECKPOINT_DIR = "checkpoint"
TENSORBOARD_DIR = "tensorboard"
EVAL_DIR = "eval"
# The keys of config.json that make a folder a tagging run of ours (make_record writes them all).
RECORD_KEYS = TOKEN_TAGGING.record_keys
# What must match for a tagging run to be resumed: the same model, training and data (the folder and the
# bytes of its split files), not the bookkeeping (and, of train, not config.RUNTIME_SETTINGS).
RESUME_KEYS = TOKEN_TAGGING.resume_keys
# Fingerprint parts that describe which images a cache holds, not how their tokens were made.
DATA_PARTS = ("keys_sha256", "num_images")


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
    `check_data_files` compares the data folder with when a command reads the run's data again. A folder
    among `files` (an MVSA folder's data/, one text file per post) is recorded as "NAME/": the sha256 of
    its .txt files' names and sha256s, so an edited text counts as changed data."""
    record = {path.name: file_sha256(path) for path in files if path.is_file()}
    record.update({f"{path.name}/": _texts_sha256(path) for path in files if path.is_dir()})
    return record


def _texts_sha256(folder: Path) -> str:
    """sha256 of the lines `name<TAB>sha256` of the .txt files directly in `folder`, sorted by name."""
    lines = "".join(f"{p.name}\t{file_sha256(p)}\n" for p in sorted(folder.glob("*.txt")) if p.is_file())
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


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
    # A run recorded before its texts folder was recorded still has its split files compared.
    found = {name: sha for name, sha in found.items() if not name.endswith("/") or name in recorded}
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


@dataclass(frozen=True)
class Run:
    """A run folder as its config.json records it, of either task: what every command that reads a
    run (evaluate, predict, results, cases, ablate) starts from."""

    path: Path
    record: dict  # config.json
    task: object  # the TASKS entry it records (train/engine/tasks.py)


def load_run(run_dir) -> Run:
    """The run in `run_dir`: its record and task.

    Raises:
        ValueError when the folder has no config.json, a damaged one, or one that is not a run of
        ours (an unknown task, or a key of the task's record missing).
    """
    record = read_record(run_dir)
    name = task_of(record) if isinstance(record, dict) else None
    if name not in TASKS.names:
        raise ValueError(
            f"{Path(run_dir) / CONFIG_FILE} is not the record of a run: it names no task of "
            f"{', '.join(TASKS.names)} (train one with `mner train-from-cache` or `mner train-classifier`)"
        )
    task = TASKS.get(name)
    missing = [key for key in task.record_keys if key not in record]
    if missing:
        raise ValueError(
            f"{Path(run_dir) / CONFIG_FILE} is not the record of a {task.kind}: it lacks {', '.join(missing)}"
        )
    return Run(Path(run_dir), record, task)


def load_run_of(run_dir, task, why: str) -> Run:
    """`load_run`, refusing a run of another task: "<run_dir> is a <its kind>: <why>" (why says which
    command takes such a run)."""
    run = load_run(run_dir)
    if run.task is not task:
        raise ValueError(f"{run_dir} is a {run.task.kind}: {why}")
    return run


def task_of(record: dict) -> str | None:
    """The task a run record names: its "task", else its model's (a tagging record keeps it there)."""
    model = record.get("model")
    return record.get("task") or (model.get("task") if isinstance(model, dict) else None)


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
    run = load_run(run_dir)
    epochs = run.record[run.task.settings]["epochs"]
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


# Recorded precision (config.json "precision") -> the amp mode that reproduces it.
_PRECISION_AMP = {"fp32": "off", "fp16": "fp16", "bf16": "bf16"}
# Autocast dtype name (str(torch dtype) without "torch.") -> recorded precision.
_DTYPE_PRECISION = {"float16": "fp16", "bfloat16": "bf16"}


def precision_name(runtime: Runtime) -> str:
    """What a run actually trained in: "fp32", "fp16" or "bf16" (train.amp=auto on a CPU is fp32)."""
    if runtime.amp_dtype is None:
        return "fp32"
    return _DTYPE_PRECISION[str(runtime.amp_dtype).removeprefix("torch.")]


# How `evaluate` and `predict` tag a post longer than the encoder's max_length sub-words (train/engine/decode.py);
# the first is the default everywhere.
LONG_POSTS = ("truncate", "window")


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
    """The name of the task a run folder records ("tagging", "classification"); None when the folder
    holds no run of ours (load_run)."""
    try:
        return load_run(run_dir).task.name
    except ValueError:
        return None


def is_run_folder(path, task: str | None = None) -> bool:
    """Whether `path` is one of our run folders (of `task`, when given)."""
    found = recorded_task(path)
    return found is not None and task in (None, found)


def claim_run_folder(run_dir, resume: bool, task=TOKEN_TAGGING) -> FolderClaim:
    """The run folder training of `task` may write: new, empty, or (with `resume`) one of its runs;
    refused otherwise before anything is read or created (mner.runtime.claim_folder)."""
    return claim_folder(run_dir, CONFIG_FILE, task.record_keys, resume, what=task.kind, finished=RESULTS_FILE)


def resume_differences(
    old: dict, new: dict, keys: tuple[str, ...] = RESUME_KEYS, skip: frozenset = RUNTIME_SETTINGS
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


def extractor_differences(reader: CacheReader, record: dict) -> list[str]:
    """`cache_differences` of a cache of other posts (new images) and the run's: every fingerprinted
    part but the image list (DATA_PARTS) must be the run's, for its tokens to be made the same way."""
    found = {"config": reader.config, "models": reader.models, "spec": reader.spec.to_dict()}
    return cache_differences(found, record["cache"], ignore=DATA_PARTS)


def cache_differences(found: dict, recorded: dict, ignore: tuple[str, ...] = ()) -> list[str]:
    """Lines "key: cache X, run Y" for every setting where two cache descriptions differ.

    Args:
        found: {"config", "models", "spec"} of a cache manifest.
        recorded: the run record's "cache": the same parts (a classifier run records models and spec).
        ignore: top-level fingerprint parts to leave out.
    When both configs carry the extractor's "fingerprint_parts" only those are compared (paths,
    workers and the like do not change the tokens); otherwise the parts the run recorded.
    """
    parts = found["config"].get("fingerprint_parts"), recorded.get("config", {}).get("fingerprint_parts")
    if parts[0] is not None and parts[1] is not None:
        a, b = parts
    else:
        names = [name for name in ("config", "models", "spec") if name in recorded]
        a, b = ({name: side[name] for name in names} for side in (found, recorded))
    return [
        f"{key}: cache {_short(x)}, run {_short(y)}" for key, (x, y) in fingerprint_diff(a, b, ignore).items()
    ]


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."
