"""Stage two's training loop: `train_from_cache(RunConfig) -> run folder`.

Labels come from the train split, token shapes and the fingerprint from the cache manifest, so a run
can only be built from what is on disk. The best epoch is chosen on dev F1 (never on test); its
weights are reloaded at the end to write the valid/test predictions and results.

Run folder:
    config.json         full resolved RunConfig + labels, encoder folder, cache fingerprint/config/spec,
                        counts of words cut by the encoder's length limit and of orphan I- tags, per split
    model.safetensors   the best epoch's weights
    checkpoint/         the last finished epoch (weights, optimiser, scheduler, counters, RNG) for resume
    metrics.jsonl       one line per epoch
    pred_valid.conll    `token gold pred` (and pred_test.conll when test.txt exists)
    results.json        micro + per-type P/R/F1 for valid and test, best epoch
    tensorboard/        event files, only when tensorboard is installed

Under torchrun (WORLD_SIZE > 1) every rank trains on its DistributedSampler shard, dev/test decoding
is split across ranks and gathered, and rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from mner.cache.datasets import DataSource, Split, label_names
from mner.cache.reader import CacheReader
from mner.cache.shards import TokenSpec
from mner.train.config import ModelConfig, RunConfig
from mner.train.data import Collate, PostDataset, make_loader
from mner.train.metrics import entity_scores, write_conll
from mner.train.model import MNERModel
from mner.train.text import load_tokenizer, resolve_text_encoder

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.pt"
# COCO categories of torchvision detectors (with the background and the 11 unused ids); used only when a
# cache manifest does not list its detector's categories.
DEFAULT_DETECTOR_CLASSES = 91
# Posts per tokenizer call when counting truncated words.
_COUNT_CHUNK = 256


@dataclass
class Runtime:
    """Where this process runs: device, autocast dtype and its place in a torchrun job."""

    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype on CUDA; None: full precision
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


@dataclass
class _Progress:
    """Early-stopping counters; saved in the checkpoint."""

    epoch: int = 0  # last finished epoch
    best_f1: float = -1.0  # best dev micro F1 so far (-1: none yet, so epoch 1 is always kept)
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the last improvement
    stopped: bool = False  # patience ran out

    def update(self, epoch: int, dev_f1: float, patience: int) -> bool:
        """Count a finished epoch; returns whether its dev F1 is the best so far."""
        self.epoch = epoch
        if dev_f1 > self.best_f1:
            self.best_f1, self.best_epoch, self.bad_epochs = dev_f1, epoch, 0
            return True
        self.bad_epochs += 1
        self.stopped = self.bad_epochs >= patience
        return False


def train_from_cache(cfg: RunConfig) -> Path:
    """Train one model and write its run folder.

    Args:
        cfg: the resolved run config. `cfg.cache_dir` is required unless `cfg.model.text_only`, in
            which case it is never opened. `cfg.data` says where the posts are.
            `cfg.resume` continues from `out_dir/checkpoint/` when it exists.
    Returns:
        The run folder (`cfg.out_dir`).
    Raises:
        ValueError when the cache is missing for a multimodal run or lacks a post's image key, a
        valid/test tag does not occur in train, the folder already holds a run and resume is off, or
        a resumed folder was made with a different config.
    """
    # Seeded first: the CUDA determinism setting must be in place before any CUDA context exists.
    seed_everything(cfg.train.seed)
    runtime, owns_group = _start_runtime(cfg.train.device, cfg.train.amp)
    try:
        return _train(cfg, runtime)
    finally:
        if owns_group:
            dist.destroy_process_group()


def _train(cfg: RunConfig, runtime: Runtime) -> Path:
    run_dir = Path(cfg.out_dir)
    source = cfg.data.resolve()
    splits = {name: source.read(name) for name in ("train", "valid")}
    if source.split_path("test").is_file():
        splits["test"] = source.read("test")
    labels = label_names(splits["train"])
    # Checked before anything is built: a tag unknown to the model would only fail after a full epoch.
    check_tags(splits, labels)
    reader = open_cache(cfg.cache_dir, cfg.model.text_only, cfg.train.cache_in_memory)
    if reader is not None:
        check_cache_keys(list(splits.values()), reader)
    encoder_dir = resolve_text_encoder(cfg.model.text_encoder)
    tokenizer = load_tokenizer(encoder_dir)

    record = _run_record(cfg, source, labels, encoder_dir, reader)
    resuming = _prepare_folder(run_dir, cfg.resume, record, runtime)
    record["truncated_words"] = {
        name: count_truncated(split, tokenizer, labels, cfg.model.max_length)
        for name, split in splits.items()
    }
    log.log(
        logging.WARNING if any(record["truncated_words"].values()) else logging.INFO,
        "words past the encoder's %d sub-word limit (predicted O, still scored): %s",
        cfg.model.max_length,
        record["truncated_words"],
    )
    record["orphan_i"] = {name: split.orphan_i for name, split in splits.items()}
    log.info(
        "I- tags with no B- before them (kept, counted as entity starts as conlleval does): %s",
        ", ".join(f"{name} {count}" for name, count in record["orphan_i"].items()),
    )

    model = build_model(record, encoder_dir).to(runtime.device)
    if runtime.is_main:
        # Written once the model builds, so a config the model rejects leaves no half-made run behind.
        write_json(run_dir / CONFIG_FILE, record)
    sampler = DistributedSampler(
        splits["train"].posts,
        num_replicas=runtime.world_size,
        rank=runtime.rank,
        shuffle=True,
        seed=cfg.train.seed,
    )
    train_loader = make_loader(
        splits["train"], reader, tokenizer, labels, cfg.model, cfg.train, shuffle=False, sampler=sampler
    )
    optimizer = torch.optim.AdamW(model.param_groups(cfg.train), weight_decay=cfg.train.weight_decay)
    total_steps = cfg.train.epochs * len(train_loader)
    # Linear warm-up from 0, then linear decay to 0 at the last step (BERT fine-tuning schedule).
    scheduler = get_linear_schedule_with_warmup(
        optimizer, round(cfg.train.warmup_ratio * total_steps), total_steps
    )
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    progress = _Progress()
    if resuming:
        progress = _load_checkpoint(run_dir / CHECKPOINT_DIR, model, optimizer, scheduler, scaler)
        if runtime.is_main:
            _trim_metrics(run_dir / METRICS_FILE, progress.epoch)
        log.info(
            "resuming %s after epoch %d (best dev F1 %.4f at epoch %d)",
            run_dir,
            progress.epoch,
            progress.best_f1,
            progress.best_epoch,
        )
    trained = model
    if runtime.world_size > 1:
        # Some modules get no gradient in a batch (all images missing or dropped), hence find_unused_parameters.
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        trained = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)

    board = _tensorboard(run_dir) if runtime.is_main else None
    while progress.epoch < cfg.train.epochs and not progress.stopped:
        epoch = progress.epoch + 1
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        # A manual bar (not tqdm(loader)), so it is still open to show dev F1 after the epoch.
        with tqdm(
            total=len(train_loader), desc=f"epoch {epoch}/{cfg.train.epochs}", disable=not runtime.is_main
        ) as bar:
            train_loss = _train_epoch(
                trained, train_loader, bar, optimizer, scheduler, scaler, cfg.train.max_grad_norm, runtime
            )
            _, dev = decode_and_score(model, splits["valid"], reader, tokenizer, labels, cfg, runtime)
            dev_f1 = dev["micro"]["f1"]
            bar.set_postfix(loss=f"{train_loss:.4f}", dev_f1=f"{dev_f1:.4f}")

        improved = progress.update(epoch, dev_f1, cfg.train.patience)
        line = {
            "epoch": epoch,
            "train_loss": train_loss,
            "dev_precision": dev["micro"]["precision"],
            "dev_recall": dev["micro"]["recall"],
            "dev_f1": dev_f1,
            "best": improved,
            "seconds": round(time.perf_counter() - started, 3),
        }
        log.info(
            "epoch %d: train loss %.4f, dev F1 %.4f%s",
            epoch,
            train_loss,
            dev_f1,
            " (best)" if improved else "",
        )
        if runtime.is_main:
            _write_epoch(run_dir, line, model if improved else None, board)
            _save_checkpoint(
                run_dir / CHECKPOINT_DIR, model, optimizer, scheduler, scaler, progress, runtime.device
            )
        runtime.barrier()
    if progress.stopped:
        log.info(
            "dev F1 did not improve for %d epochs; stopped after epoch %d", cfg.train.patience, progress.epoch
        )
    if board is not None:
        board.close()

    # The reported model is the best dev epoch, as saved, not the last one.
    load_model(model, str(run_dir / WEIGHTS_FILE), device=str(runtime.device))
    results = {"best_epoch": progress.best_epoch, "epochs_run": progress.epoch}
    for name in ("valid", "test"):
        if name in splits:
            predictions, results[name] = decode_and_score(
                model, splits[name], reader, tokenizer, labels, cfg, runtime
            )
            if runtime.is_main:
                write_conll(run_dir / f"pred_{name}.conll", splits[name].posts, predictions)
    if runtime.is_main:
        write_json(run_dir / RESULTS_FILE, results)
    runtime.barrier()
    return run_dir


def _write_epoch(run_dir: Path, line: dict, best_model: MNERModel | None, board) -> None:
    """Append the epoch's metrics line (and TensorBoard scalars); save the weights when they are the best."""
    if best_model is not None:
        save_model(best_model, str(run_dir / WEIGHTS_FILE))
    with open(run_dir / METRICS_FILE, "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")
    if board is not None:
        for name in ("train_loss", "dev_precision", "dev_recall", "dev_f1"):
            board.add_scalar(name, line[name], line["epoch"])


def _train_epoch(
    model, loader, bar, optimizer, scheduler, scaler, max_grad_norm: float, runtime: Runtime
) -> float:
    """One pass over the training batches; returns the mean loss over all ranks' batches."""
    model.train()
    total, steps = 0.0, 0
    for batch in loader:
        batch = to_device(batch, runtime.device)
        with runtime.autocast():
            loss = model(batch)["loss"]
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        total += loss.item()
        steps += 1
        bar.update()
        bar.set_postfix(loss=f"{total / steps:.4f}", refresh=False)
    sums = torch.tensor([total, steps], dtype=torch.float64, device=runtime.device)
    if runtime.world_size > 1:
        dist.all_reduce(sums)
    return (sums[0] / sums[1].clamp(min=1)).item()


def decode_and_score(
    model: MNERModel, split: Split, reader, tokenizer, labels: list[str], cfg: RunConfig, runtime: Runtime
) -> tuple[list[list[str]], dict]:
    """Predict tags for every post of a split and score them against its gold tags.

    Returns (predicted tags per post, `entity_scores` dict). Under torchrun each rank decodes a
    share and every rank gets the whole list.
    """
    predictions = decode_split(model, split, reader, tokenizer, labels, cfg, runtime)
    gold = [list(post.tags) for post in split.posts]
    return predictions, entity_scores(gold, predictions)


def decode_split(
    model: MNERModel, split: Split, reader, tokenizer, labels: list[str], cfg: RunConfig, runtime: Runtime
) -> list[list[str]]:
    """Predicted tag names for each post of `split`, in file order (one tag per word)."""
    sampler = None
    if runtime.world_size > 1:
        sampler = DistributedSampler(
            split.posts, num_replicas=runtime.world_size, rank=runtime.rank, shuffle=False
        )
    loader = make_loader(
        split, reader, tokenizer, labels, cfg.model, cfg.train, shuffle=False, sampler=sampler
    )
    model.eval()
    ids: list[list[int]] = []
    with torch.no_grad(), runtime.autocast():
        for batch in loader:
            ids.extend(model.decode(to_device(batch, runtime.device)))
    if sampler is not None:
        # DistributedSampler pads with repeats to an equal share per rank; the index keeps one of each.
        shares = [None] * runtime.world_size
        dist.all_gather_object(shares, (list(sampler), ids))
        by_index = {index: post_ids for indices, share in shares for index, post_ids in zip(indices, share)}
        ids = [by_index[i] for i in range(len(split.posts))]
    assert len(ids) == len(split.posts)
    return [[labels[i] for i in post_ids] for post_ids in ids]


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
            for tag in post.tags:
                if tag not in known:
                    raise ValueError(
                        f"{split.path}:{post.line}: tag {tag!r} does not occur in {train_file}; "
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
    return MNERModel(model_cfg, record["label_names"], spec, encoder_dir, num_detector_classes=num_classes)


def count_truncated(split: Split, tokenizer, labels: list[str], max_length: int) -> int:
    """Words of `split` whose first sub-word lies past the encoder's `max_length` (they are predicted O).

    Counted by the training collate itself, on text alone, so the number is the one the model sees.
    """
    collate = Collate(tokenizer, labels, max_length, with_visual=False)
    posts = PostDataset(split.posts)
    cut = 0
    for start in range(0, len(posts), _COUNT_CHUNK):
        chunk = [posts[i] for i in range(start, min(start + _COUNT_CHUNK, len(posts)))]
        cut += int(collate(chunk)["num_truncated"].sum())
    return cut


def _run_record(cfg: RunConfig, source: DataSource, labels: list[str], encoder_dir: Path, reader) -> dict:
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


# What must match for a folder to be resumed: the same model, training and data, not the bookkeeping.
_RESUME_KEYS = ("model", "train", "label_names", "data_source")


def _prepare_folder(run_dir: Path, resume: bool, record: dict, runtime: Runtime) -> bool:
    """Create the run folder; returns True when training continues from its checkpoint."""
    existing = run_dir / CONFIG_FILE
    if existing.is_file() and not resume:
        raise ValueError(
            f"{run_dir} already holds a run ({CONFIG_FILE}); pass --resume to continue it or choose another --out"
        )
    resuming = resume and (run_dir / CHECKPOINT_DIR / STATE_FILE).is_file()
    if resuming:
        old = json.loads(existing.read_text(encoding="utf-8"))
        differs = [key for key in _RESUME_KEYS if old.get(key) != record[key]]
        if (old.get("cache") or {}).get("fingerprint") != (record["cache"] or {}).get("fingerprint"):
            differs.append("cache fingerprint")
        if differs:
            raise ValueError(
                f"cannot resume {run_dir}: it was started with a different {', '.join(differs)}; use another --out"
            )
    elif runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        # A fresh start (or a resume that never finished an epoch) must not append to stale epochs.
        (run_dir / METRICS_FILE).unlink(missing_ok=True)
    runtime.barrier()
    return resuming


def _save_checkpoint(
    folder: Path, model, optimizer, scheduler, scaler, progress: _Progress, device: torch.device
) -> None:
    """Write checkpoint.tmp/ then swap it in, so a kill leaves either the old or the new checkpoint."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(model, str(tmp / WEIGHTS_FILE))
    state = {
        "progress": dataclasses.asdict(progress),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": _rng_state(device),
    }
    torch.save(state, tmp / STATE_FILE)
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(folder: Path, model, optimizer, scheduler, scaler) -> _Progress:
    """Restore everything `_save_checkpoint` wrote; tensors and plain values only (weights_only)."""
    device = next(model.parameters()).device
    load_model(model, str(folder / WEIGHTS_FILE), device=str(device))
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"], device)
    return _Progress(**state["progress"])


def _trim_metrics(path: Path, last_epoch: int) -> None:
    """Drop metrics lines of epochs after the checkpoint (written before a kill, about to be redone)."""
    if not path.is_file():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["epoch"] <= last_epoch]
    path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _rng_state(device: torch.device) -> dict:
    """Every RNG the loop draws from, as tensors and plain values (no pickled numpy objects).

    Only this process's CUDA device: touching the others would open a context on each of them.
    """
    version, mt_state, gauss = random.getstate()
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": [version, list(mt_state), gauss],
        "numpy_key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
        "numpy_pos": numpy_state["state"]["pos"],
        "numpy_gauss": [numpy_state["has_gauss"], numpy_state["gauss"]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def _set_rng_state(state: dict, device: torch.device) -> None:
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": state["numpy_key"].numpy().astype(np.uint32), "pos": state["numpy_pos"]},
            "has_gauss": has_gauss,
            "gauss": cached,
        }
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch, and ask torch for deterministic kernels.

    warn_only: a kernel with no deterministic version warns instead of failing the run.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    # cuBLAS needs this workspace setting for deterministic matmuls; it must be set before CUDA starts.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False


def to_device(batch: dict, device: torch.device) -> dict:
    """Move every tensor of a batch to `device` (non-tensor values pass through)."""
    return {
        key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
        for key, value in batch.items()
    }


def resolve_runtime(device: str, amp: str, local_rank: int = 0) -> Runtime:
    """Device and autocast dtype of this process.

    Args:
        device: "auto" (cuda:<local_rank> when CUDA is available, else cpu), "cpu", "mps", "cuda"
            (cuda:<local_rank>) or "cuda:N".
        amp: "auto" (bf16 where supported, else fp16), "bf16", "fp16" or "off"; only CUDA autocasts.
    """
    if device == "auto":
        resolved = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    else:
        resolved = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device {device!r} asked for, but torch sees no CUDA device; use --set train.device=cpu"
        )
    amp_dtype = None
    if resolved.type == "cuda" and amp != "off":
        bf16 = amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported())
        amp_dtype = torch.bfloat16 if bf16 else torch.float16
    return Runtime(device=resolved, amp_dtype=amp_dtype)


def _start_runtime(device: str, amp: str) -> tuple[Runtime, bool]:
    """The runtime of this process; joins the torchrun process group when WORLD_SIZE > 1.

    Returns (runtime, whether this call created the process group and must destroy it).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    runtime = resolve_runtime(device, amp, local_rank)
    owns_group = False
    if world_size > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if runtime.device.type == "cuda" else "gloo")
            owns_group = True
        runtime.rank, runtime.world_size = dist.get_rank(), dist.get_world_size()
        if runtime.device.type == "cuda":
            torch.cuda.set_device(runtime.device)
    return runtime, owns_group


def _tensorboard(run_dir: Path):
    """A SummaryWriter under run_dir/tensorboard, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tensorboard"))


def write_json(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
