"""Stage two's training loop, one for both tasks: `fit(Fitting)`, and the tagging entry
`train_from_cache(RunConfig) -> run folder`, whose preparation is train/engine/tagging.py's (the classifier's
entry and preparation are train/engine/classify.py's).

A task's preparation reads the data and builds a `Fitting`: model, loaders, parameter groups and how
a split is scored; `fit` owns the optimiser, schedule and AMP scaler, the epochs, the progress log,
the metrics line, early stopping (checkpoint.Progress), the best-weights save and reload, the resume
checkpoint and DDP. The best epoch is chosen on the task's valid score (train/engine/tasks.py; never on
test). The run folder's files are train/engine/run_files.py's, the resume checkpoint is train/engine/checkpoint.py's.

Under torchrun (WORLD_SIZE > 1) every rank trains on its DistributedSampler shard and rank 0 alone
writes files; tagging splits dev/test decoding across ranks and gathers it.

The run folder must be new, empty, or (with --resume) one of ours; it is checked before anything is
read, and a run that fails before its first epoch is checkpointed removes what it created. A
non-finite loss (or, in full precision, gradient norm) stops training before the optimiser steps,
so no NaN weights are ever saved.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

from mner.runtime import FolderClaim, ProgressLog, Runtime, seed_everything, start_runtime, to_device
from mner.train.engine.checkpoint import (
    Progress,
    find_checkpoint,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    save_weights,
)
from mner.train.engine.config import RunConfig, TrainConfig
from mner.train.engine.run_files import (
    CHECKPOINT_DIR,
    RESULTS_FILE,
    TENSORBOARD_DIR,
    WEIGHTS_FILE,
    append_metrics,
    claim_run_folder,
    trim_metrics,
    write_json,
)
from mner.train.engine.runs import (
    best_weights_fix,
)
from mner.train.zoo.model import MNERModel

log = logging.getLogger(__name__)

# name -> (optimizer, warm-up steps, total steps) -> LR scheduler
SCHEDULES = {"linear": get_linear_schedule_with_warmup, "cosine": get_cosine_schedule_with_warmup}


class NonFiniteLoss(ValueError):
    """Raised by `train_step` before the optimiser step when the loss (or gradient norm) is not finite."""

    def __init__(self, what: str, value: float, step: int):
        super().__init__(f"{what} is {value}")
        self.what, self.value, self.step = what, value, step  # step: global, 1-based


def train_from_cache(cfg: RunConfig) -> Path:
    """Train one tagging model and write its run folder.

    Args:
        cfg: the resolved run config. `cfg.cache_dir` is required unless `cfg.model.text_only`, in
            which case it is never opened. `cfg.data` says where the posts are.
            `cfg.resume` continues from `out_dir/checkpoint/` when it exists.
    Returns:
        The run folder (`cfg.out_dir`).
    Raises:
        ValueError when the cache is missing for a multimodal run or lacks a post's image key, a
        valid/test tag does not occur in train, the folder is neither new, empty nor ours, already
        holds a run and resume is off, or a resumed folder was made with different settings (other
        than config.RUNTIME_SETTINGS), or the loss becomes non-finite (naming epoch and step).
    """
    # Imported here: the tagging preparation builds this module's Fitting.
    from mner.train.engine.tagging import prepare_tagging

    # Checked before anything is read or built: a folder of other files is never written.
    claim = claim_run_folder(cfg.out_dir, cfg.resume)
    train = cfg.train
    return run_training(
        claim,
        train.seed,
        start=lambda: start_runtime(
            train.device, train.amp, hint="--set train.device=cpu", threads=train.threads
        ),
        prepare=lambda runtime, _: prepare_tagging(cfg, runtime, claim),
    )


def run_training(claim: FolderClaim, seed: int, start, prepare) -> Path:
    """Seed, start the runtime, build the task's `Fitting` and `fit` it into the claimed run folder.

    Args:
        claim: the run folder, checked (runs.claim_run_folder); created by `prepare`.
        start: () -> Runtime. prepare: (runtime, ExitStack for what to close at the end) ->
            (Fitting, the checkpoint to resume from or None); it writes config.json.
    A run that fails before its first checkpoint removes what it created; a non-finite loss is
    reported naming the epoch and step and what was kept.
    """
    # Seeded first: the CUDA determinism setting must be in place before any CUDA context exists.
    seed_everything(seed)
    runtime = start()
    epoch_at: dict = {}  # epoch, its first global step and step count, for the non-finite message
    try:
        with contextlib.ExitStack() as resources:
            runtime.barrier()  # every rank has checked the folder before rank 0 creates anything in it
            fitting, checkpoint = prepare(runtime, resources)
            fit(fitting, runtime, claim.path, checkpoint, epoch_at)
        return claim.path
    except NonFiniteLoss as err:
        _release_unstarted(claim, runtime)
        raise ValueError(_non_finite_message(err, epoch_at, claim.path)) from None
    except BaseException:
        _release_unstarted(claim, runtime)
        raise
    finally:
        claim.unlock()
        runtime.close()


def _release_unstarted(claim: FolderClaim, runtime: Runtime) -> None:
    """A run that failed before its first checkpoint leaves nothing it created (a resumable run stays)."""
    if runtime.is_main and find_checkpoint(claim.path / CHECKPOINT_DIR) is None:
        claim.release()


def _non_finite_message(err: NonFiniteLoss, epoch_at: dict, run_dir: Path) -> str:
    step = err.step - epoch_at["first_step"]
    kept = (
        f"the checkpoint of epoch {epoch_at['epoch'] - 1} is kept (resume from it with --resume)"
        if epoch_at["epoch"] > 1
        else "no epoch was finished, so nothing is kept"
    )
    return (
        f"{run_dir}: training stopped at epoch {epoch_at['epoch']}, step {step} of {epoch_at['steps']}: "
        f"the {err.what} is {err.value}; the epoch was not saved and {kept}. A corrupt feature cache "
        "(check it with `mner cache verify`) or an unstable setting (learning rates, train.amp=fp16) "
        "can cause this"
    )


@dataclass
class Fitting:
    """What `fit` trains and how it scores, as a task's preparation builds it."""

    task: object  # the run's TASKS entry: selection metric, metrics line, prediction files
    select: str  # the task's score that picks the best epoch (task.selects)
    settings: (
        object  # epochs, patience, weight_decay, warmup_ratio, max_grad_norm (TrainConfig, ClassifierConfig)
    )
    model: torch.nn.Module  # on the runtime's device
    param_groups: list[dict]  # AdamW groups: learning rates and weight decay per parameter group
    loader: object  # this rank's training batches
    splits: dict  # split name -> what `score` and task.write_predictions read
    score: object  # (model, split name) -> (predictions, scores), on every rank
    scored: tuple[str, ...]  # the splits scored with the best weights and written at the end
    sampler: object = None  # a DistributedSampler, given each epoch's number; None: the loader shuffles
    generator: torch.Generator | None = None  # the loader's shuffling state, checkpointed for resume
    grad_accum: int = 1  # batches per optimiser step
    schedule: str = "linear"  # the learning-rate schedule after warm-up (make_optimizer's SCHEDULES)
    results: dict = field(default_factory=dict)  # results.json keys after best_epoch and epochs_run
    finish: object = None  # (model) -> None: more files of the best model, on rank 0


def fit(job: Fitting, runtime: Runtime, run_dir: Path, checkpoint: Path | None, epoch_at: dict) -> dict:
    """Train `job.model` epoch by epoch, keep the best weights on the task's selection score, and
    score `job.scored` with them; returns results.json's content (written by rank 0).

    Every epoch appends its metrics line and saves the resume checkpoint; patience counts epochs
    without a better score (checkpoint.Progress). Under torchrun the model trains wrapped in DDP.
    """
    model, s, task = job.model, job.settings, job.task
    steps_per_epoch = optimizer_steps(len(job.loader), job.grad_accum)
    optimizer, scheduler, scaler = make_optimizer(
        job.param_groups, s.weight_decay, s.warmup_ratio, s.epochs * steps_per_epoch, runtime, job.schedule
    )
    metric = task.metric_name(job.select)
    progress = Progress()
    if checkpoint is not None:
        progress = load_checkpoint(checkpoint, model, optimizer, scheduler, scaler, job.generator)
        # patience is a runtime setting: a resume with more patience (or epochs) continues a stopped run.
        progress.stopped = progress.bad_epochs >= s.patience
        if runtime.is_main:
            trim_metrics(run_dir, progress.epoch)
        log.info(
            "resuming %s from %s after epoch %d (best %s %.4f at epoch %d)",
            run_dir,
            checkpoint.name,
            progress.epoch,
            metric,
            progress.best_f1,
            progress.best_epoch,
        )
    trained = model
    if runtime.world_size > 1:
        # Some modules get no gradient in a batch (all images missing or dropped), hence find_unused_parameters.
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        trained = DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)

    board = _tensorboard(run_dir) if runtime.is_main else None
    while progress.epoch < s.epochs and not progress.stopped:
        epoch = progress.epoch + 1
        started = time.perf_counter()
        epoch_at.update(epoch=epoch, first_step=scheduler.last_epoch, steps=steps_per_epoch)
        if job.sampler is not None:
            job.sampler.set_epoch(epoch)
        if runtime.world_size > 1:
            # Each rank its own dropout and image-dropout masks (one seed everywhere would repeat them
            # across ranks, also after a resume restores rank 0's RNG), drawn from (seed, epoch, rank)
            # so that a resumed run draws what the uninterrupted one drew.
            torch.manual_seed(int(np.random.SeedSequence([s.seed, epoch, runtime.rank]).generate_state(1)[0]))
        model.epoch = epoch  # for the losses that warm up over epochs (MANGO's alignment); resumes too
        # A manual bar (not tqdm(loader)), so it is still open to show the dev score after the epoch; in
        # a log file (stderr not a terminal) about ten plain lines per epoch instead of `\r` redraws.
        with ProgressLog(
            len(job.loader),
            f"epoch {epoch}/{s.epochs}",
            unit="step",
            enabled=runtime.is_main,
            every=max(1, -(-len(job.loader) // 10)),
        ) as bar:
            train_loss = train_epoch(
                trained,
                job.loader,
                bar,
                optimizer,
                scheduler,
                scaler,
                s.max_grad_norm,
                runtime,
                job.grad_accum,
            )
            _, dev = job.score(model, "valid")
            bar.set_postfix(loss=f"{train_loss:.4f}", **task.postfix(dev))

        improved = progress.update(epoch, task.selected(dev, job.select), s.patience)
        line = {
            "epoch": epoch,
            "train_loss": train_loss,
            **task.epoch_line(dev),
            "best": improved,
            "seconds": round(time.perf_counter() - started, 3),
        }
        log.info(
            "epoch %d: train loss %.4f, %s%s",
            epoch,
            train_loss,
            task.describe(dev),
            " (best)" if improved else "",
        )
        if runtime.is_main:
            _write_epoch(run_dir, line, model if improved else None, board)
            save_checkpoint(
                run_dir / CHECKPOINT_DIR,
                model,
                optimizer,
                scheduler,
                scaler,
                progress,
                runtime.device,
                job.generator,
            )
        runtime.barrier()
    if progress.stopped:
        log.info(
            "%s did not improve for %d epochs; stopped after epoch %d", metric, s.patience, progress.epoch
        )
    if board is not None:
        board.close()

    # The reported model is the best epoch, as saved, not the last one.
    load_weights(model, run_dir / WEIGHTS_FILE, runtime.device, best_weights_fix(run_dir))
    results = {"best_epoch": progress.best_epoch, "epochs_run": progress.epoch, **job.results}
    for name in job.scored:
        predictions, results[name] = job.score(model, name)
        if runtime.is_main:
            task.write_predictions(run_dir, job.splits[name], name, predictions)
    if runtime.is_main:
        if job.finish is not None:
            job.finish(model)
        write_json(run_dir / RESULTS_FILE, results)
    runtime.barrier()
    return results


def optimizer_steps(batches: int, grad_accum: int) -> int:
    """Optimiser (and schedule) steps of an epoch of `batches` batches, one per `grad_accum` of them."""
    return -(-batches // grad_accum)


def build_optimizer(model: MNERModel, train: TrainConfig, total_steps: int, runtime: Runtime) -> tuple:
    """`make_optimizer` over a tagging model's per-group learning rates (MNERModel.param_groups)."""
    return make_optimizer(
        model.param_groups(train), train.weight_decay, train.warmup_ratio, total_steps, runtime
    )


def make_optimizer(
    groups: list[dict],
    weight_decay: float,
    warmup_ratio: float,
    total_steps: int,
    runtime: Runtime,
    schedule: str = "linear",
) -> tuple:
    """(AdamW over the parameter groups, its LR schedule, the AMP grad scaler).

    The schedule warms up linearly from 0 over `warmup_ratio` of `total_steps`, then decays to 0 at the
    last step: linearly (`linear`, the BERT fine-tuning schedule) or along a half cosine (`cosine`,
    transformers' get_cosine_schedule_with_warmup). The scaler only scales under fp16 autocast.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
    scheduler = SCHEDULES[schedule](optimizer, round(warmup_ratio * total_steps), total_steps)
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    return optimizer, scheduler, scaler


def train_step(
    model, batch: dict | list[dict], optimizer, scheduler, scaler, max_grad_norm: float, runtime: Runtime
) -> float:
    """One optimiser step on one batch, or on the gradients of several accumulated (train.grad_accum:
    each batch's loss divided by their count, so the step is the one of their mean loss); batches are
    moved to the device here. Returns the mean of the batches' losses.

    `model` may be the DDP wrapper; its forward returns {"loss": scalar, ...}; under DDP only the last
    batch's backward all-reduces the summed gradients.
    `max_grad_norm` 0: no clipping.
    Raises NonFiniteLoss, before the optimiser steps, when the loss is NaN or infinite on any rank,
    or the gradient norm is in full precision (under fp16 the scaler skips such steps by design).
    """
    batches = [batch] if isinstance(batch, dict) else list(batch)
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for i, micro in enumerate(batches):
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
        with sync:
            micro = to_device(micro, runtime.device)
            with runtime.autocast():
                loss = model(micro)["loss"]
            _check_finite("training loss", loss.detach(), scheduler, runtime)
            scaler.scale(loss / len(batches)).backward()
        losses.append(loss.item())
    scaler.unscale_(optimizer)
    # max_grad_norm 0 clips nothing (the classifier's default, as the BertResNet notebook); the norm is
    # still measured for the finiteness check
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    if not scaler.is_enabled():
        _check_finite("gradient norm", norm, scheduler, runtime)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return sum(losses) / len(losses)


def _check_finite(what: str, value: torch.Tensor, scheduler, runtime: Runtime) -> None:
    """NonFiniteLoss when `value` (a scalar) is not finite here or on another rank (all ranks stop together)."""
    finite = torch.isfinite(value.float()).to(torch.int32)
    if runtime.world_size > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite.item():
        here = value.item()
        shown = here if not math.isfinite(here) else f"{here} here but not finite on another rank"
        raise NonFiniteLoss(what, shown, scheduler.last_epoch + 1)


def train_epoch(
    model,
    loader,
    bar,
    optimizer,
    scheduler,
    scaler,
    max_grad_norm: float,
    runtime: Runtime,
    grad_accum: int = 1,
) -> float:
    """One pass over the training batches, one optimiser step per `grad_accum` of them (the epoch's
    last step takes what is left); returns the mean loss over all ranks' batches."""
    model.train()
    total, steps, pending = 0.0, 0, []

    def step() -> None:
        nonlocal total, steps
        total += train_step(model, pending, optimizer, scheduler, scaler, max_grad_norm, runtime) * len(
            pending
        )
        steps += len(pending)
        bar.update(len(pending))
        bar.set_postfix(loss=f"{total / steps:.4f}")
        pending.clear()

    for batch in loader:
        pending.append(batch)
        if len(pending) == grad_accum:
            step()
    if pending:
        step()
    sums = torch.tensor([total, steps], dtype=torch.float64, device=runtime.device)
    if runtime.world_size > 1:
        dist.all_reduce(sums)
    return (sums[0] / sums[1].clamp(min=1)).item()


def _write_epoch(run_dir: Path, line: dict, best_model: MNERModel | None, board) -> None:
    """Append the epoch's metrics line (and TensorBoard scalars); save the weights when they are the best."""
    if best_model is not None:
        save_weights(best_model, run_dir / WEIGHTS_FILE)
    append_metrics(run_dir, line)
    if board is not None:
        for name in ("train_loss", "dev_precision", "dev_recall", "dev_f1"):
            board.add_scalar(name, line[name], line["epoch"])


def _tensorboard(run_dir: Path):
    """A SummaryWriter under run_dir/tensorboard, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / TENSORBOARD_DIR))
