"""Where the seeded, untrained presets (tiny-clip, tiny-frcnn, tiny-bert) are written, and how.

Presets are built from a config and a seed, then saved once so that they load through the same
local-folder / checkpoint-file code path as a user's real weights. Both stages use this; neither
imports the other.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

PRESET_DIR_ENV = "MNER_PRESET_DIR"


def preset_dir() -> Path:
    """Where presets are materialised: $MNER_PRESET_DIR, else ~/.cache/mner/presets."""
    return Path(os.environ.get(PRESET_DIR_ENV, "~/.cache/mner/presets")).expanduser()


def save_model(model, folder: Path) -> None:
    """Save a Hugging Face model's config.json and model.safetensors into `folder` from any process.

    The bytes are those `model.save_pretrained(folder)` writes, but save_pretrained writes nothing on a
    torch.distributed rank other than 0 (transformers' should_save_on_this_rank), and a preset is
    written by whichever process gets there first: under torchrun that may be rank 1, whose empty
    folder would then be renamed into place as the preset for good."""
    from safetensors.torch import save_model as save_weights

    model.config.save_pretrained(folder)
    save_weights(model, str(folder / "model.safetensors"), metadata={"format": "pt"})


def materialise(target: Path, write: Callable[[Path], None], is_dir: bool) -> Path:
    """Write a preset at `target` once, atomically: `write` fills a private temporary path that is
    renamed into place, so concurrent processes (DDP ranks, test workers) never see half a preset;
    when two race, one rename wins and the other's identical seeded copy is discarded."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    if is_dir:
        tmp.mkdir()
    try:
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            # A directory cannot replace a non-empty one: another process finished first.
            if not target.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp) if is_dir else tmp.unlink()
    return target
