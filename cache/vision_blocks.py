"""The weights of the vision blocks stage two trains on a cache's `vision_state` (extract-features
--vision-trainable-blocks K > 0): one safetensors file in the cache folder, and the manifest entry
that describes it (the module config that rebuilds the blocks, the file's sha256 and size).

The CLIP entry holds the last K encoder layers (renumbered 0..K-1), post_layernorm and the visual
projection when the cache's global embedding is projected; the ResNet entry holds layer4. With them
stage two reproduces the cached patch tokens and global embedding from the stored state without the
user's CLIP or ResNet folder. Read through numpy, so that the cache commands stay torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mner.cache.checksums import file_sha256
from mner.runtime import fsync_dir, fsync_file

BLOCKS_FILE = "vision_blocks.safetensors"
BLOCK_KINDS = ("clip", "resnet")


def write_vision_blocks(cache_dir, arrays: dict[str, np.ndarray], config: dict) -> dict:
    """Write `arrays` as cache_dir/vision_blocks.safetensors (tmp file, fsync, rename); returns the
    manifest entry {"file", "sha256", "bytes", "config"}.

    Args:
        arrays: parameter and buffer name -> array, named as the stage-two module names them.
        config: {"kind": "clip" | "resnet", "blocks": K, ...}: what rebuilds the module (JSON-ready).
    The bytes depend on the arrays alone (safetensors sorts the names), so a re-run writes the same file.
    """
    from safetensors.numpy import save

    if config.get("kind") not in BLOCK_KINDS:
        raise ValueError(f"vision blocks config kind must be one of {', '.join(BLOCK_KINDS)}, got {config!r}")
    path = Path(cache_dir) / BLOCKS_FILE
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_bytes(save({name: np.array(value, order="C") for name, value in arrays.items()}))
        fsync_file(tmp)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return {"file": BLOCKS_FILE, "sha256": file_sha256(path), "bytes": path.stat().st_size, "config": config}


def blocks_problem(cache_dir, entry: dict) -> str:
    """Why the weight file of the manifest entry `entry` cannot be used ("" when it can)."""
    path = Path(cache_dir) / entry["file"]
    if not path.is_file():
        return f"{entry['file']}: the vision blocks' weight file listed in manifest.json is missing"
    if file_sha256(path) != entry["sha256"]:
        return f"{entry['file']}: sha256 differs from manifest.json (the file changed or is corrupt)"
    return ""


def read_vision_blocks(cache_dir, entry: dict) -> dict[str, np.ndarray]:
    """The arrays of the manifest entry's weight file, checked against its sha256 first (ValueError
    naming the file and the remedy when it is missing or differs)."""
    from safetensors.numpy import load_file

    problem = blocks_problem(cache_dir, entry)
    if problem:
        raise ValueError(
            f"{Path(cache_dir) / entry['file']}: {problem.split(': ', 1)[1]}; re-run the "
            "`mner extract-features` command that made the cache: it keeps the shards and writes the file again"
        )
    return load_file(str(Path(cache_dir) / entry["file"]))
