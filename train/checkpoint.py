"""The resume checkpoint of a run: the last finished epoch's weights, optimiser, scheduler, scaler,
early-stopping counters and every RNG (the training loader's shuffling generator too), so `--resume` continues exactly where a run stopped.

Crash safety: a kill at any instant leaves a loadable checkpoint (the old one or the new one).
`save_checkpoint` writes `<folder>.tmp/` completely (files fsynced), then swaps it in with two
renames: `<folder>/` -> `<folder>.old/`, `<folder>.tmp/` -> `<folder>/`, and deletes `.old`. Only a
complete `.tmp` is ever renamed, so `<folder>/` and `<folder>.old/` are always complete; a kill
between the two renames leaves no `<folder>/` but a complete `<folder>.old/`, which
`find_checkpoint` then returns. `.tmp` is never read (it may be half written).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import pickle
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

from mner.runtime import fsync_dir, fsync_file

# A checkpoint folder's files; the weights have the same name as the run's best weights.
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "state.pt"


@dataclass
class Progress:
    """Early-stopping counters; saved in the checkpoint."""

    epoch: int = 0  # last finished epoch
    # best selection score so far (the task's: dev micro F1, valid macro-F1 or accuracy; -1: none yet,
    # so epoch 1 is always kept)
    best_f1: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0  # epochs since the last improvement
    stopped: bool = False  # patience ran out

    def update(self, epoch: int, dev_f1: float, patience: int) -> bool:
        """Count a finished epoch; returns whether its score is the best so far."""
        self.epoch = epoch
        if dev_f1 > self.best_f1:
            self.best_f1, self.best_epoch, self.bad_epochs = dev_f1, epoch, 0
            return True
        self.bad_epochs += 1
        self.stopped = self.bad_epochs >= patience
        return False


def save_weights(model, path: Path) -> None:
    """The model's weights as safetensors at `path`, written beside it and renamed into place, so a
    kill or a full disk leaves the old file (or none), never a half-written one.

    Raises OSError naming `path` (ENOSPC on a full disk) where safetensors raises its own error.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with writing(tmp):
        save_model(model, str(tmp))
    fsync_file(tmp)
    os.replace(tmp, path)


@contextlib.contextmanager
def writing(path: Path):
    """Raise a failed write of `path` as the OSError it is: safetensors (SafetensorError) and torch.save
    (RuntimeError from its zip writer) word a full disk in their own types, which the CLI's one-line
    rule for OSError would not catch. The partial file is removed."""
    try:
        yield
    except (SafetensorError, RuntimeError) as err:
        Path(path).unlink(missing_ok=True)
        full = "No space left" in str(err) or shutil.disk_usage(Path(path).parent).free < 1 << 20
        code = errno.ENOSPC if full else errno.EIO
        raise OSError(code, "No space left on device" if full else str(err), str(path)) from err


def _sibling(folder: Path, suffix: str) -> Path:
    return folder.with_name(folder.name + suffix)


def find_checkpoint(folder) -> Path | None:
    """The complete checkpoint to resume from: `folder`, else `folder.old` (a kill between the two
    renames of `save_checkpoint`), else None."""
    folder = Path(folder)
    for candidate in (folder, _sibling(folder, ".old")):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def save_checkpoint(
    folder: Path,
    model,
    optimizer,
    scheduler,
    scaler,
    progress: Progress,
    device: torch.device,
    generator: torch.Generator | None = None,
) -> None:
    """Write the checkpoint to `folder` by the protocol of the module docstring; `generator` is the
    training loader's own shuffling generator, when it has one."""
    tmp, old = _sibling(folder, ".tmp"), _sibling(folder, ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    with writing(tmp / WEIGHTS_FILE):
        save_model(model, str(tmp / WEIGHTS_FILE))
    state = {
        "progress": dataclasses.asdict(progress),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": _rng_state(device),
        "loader_rng": None if generator is None else generator.get_state(),
    }
    with writing(tmp / STATE_FILE):
        torch.save(state, tmp / STATE_FILE)
    for name in (WEIGHTS_FILE, STATE_FILE):
        fsync_file(tmp / name)
    fsync_dir(tmp)
    if folder.exists():
        # `folder` is complete, so a stale `.old` (a kill after an earlier swap) can go.
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
    os.replace(tmp, folder)
    fsync_dir(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(
    folder: Path, model, optimizer, scheduler, scaler, generator: torch.Generator | None = None
) -> Progress:
    """Restore everything `save_checkpoint` wrote; tensors and plain values only (weights_only).

    Raises ValueError, one line naming the file, when a file is truncated, empty or not this run's.
    """
    device = next(model.parameters()).device
    folder = Path(folder)
    fix = (
        f"the checkpoint is damaged — delete {folder} and run again with --resume (training restarts "
        "from epoch 1 in the same folder), or train into a new --out"
    )
    load_weights(model, folder / WEIGHTS_FILE, device, fix)
    path = folder / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        progress = Progress(**state["progress"])
        if generator is not None:
            generator.set_state(state["loader_rng"])
    except (OSError, EOFError, RuntimeError, KeyError, TypeError, ValueError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path} cannot be loaded ({_reason(err, path)}); {fix}") from None
    _set_rng_state(state["rng"], device)
    return progress


def load_weights(model, path: Path, device, fix: str) -> None:
    """safetensors weights into `model`; ValueError, one line naming the file and saying `fix`, when
    the file is truncated, empty or holds another model's weights."""
    try:
        load_model(model, str(path), device=str(device))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{path} cannot be loaded ({_reason(err, path)}); {fix}") from None


def _reason(err: Exception, path: Path) -> str:
    """A one-line cause: "empty file", else the error's first line."""
    if path.is_file() and path.stat().st_size == 0:
        return "empty file"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return first.split(". ")[0]


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
