"""What the image models share: the preset files' names and version, the weight files of a model
folder, strict state-dict loading with one-line errors, and single-threaded preprocessing.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from torch import nn

PRESET_MARKER = "mner_preset.json"  # written beside a preset's weights: {"preset": NAME, "untrained": true}
# Part of every preset's file name: bump it when a preset's recipe changes, so a folder written by an
# older recipe is never mistaken for the current one (presets are written once and then reused).
PRESET_VERSION = 2
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a model folder, by name (each is hashed into the manifest)."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def weight_names(folder: Path) -> set[str]:
    """Parameter names stored in a HF folder (safetensors headers, a sharded index, or a .bin)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    names: set[str] = set()
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                names.update(handle.keys())
        elif path.suffix == ".bin":
            names.update(torch.load(path, map_location="cpu", weights_only=True, mmap=True))
    return names


def read_marker(folder: Path) -> dict:
    marker = folder / PRESET_MARKER
    return json.loads(marker.read_text()) if marker.is_file() else {}


def read_state(path: Path, role: str):
    """torch.load(path, weights_only=True), or a one-line ValueError naming the `role` checkpoint file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load on a non-checkpoint raises Unpickling/Key/EOF/Runtime errors alike
        # torch's own message runs over many lines of advice about weights_only; its first line says what failed.
        first = (str(err).strip().splitlines() or [""])[0]
        raise ValueError(
            f"{role} checkpoint {path} is not a torchvision state_dict file readable with "
            f"torch.load(weights_only=True): {type(err).__name__}: {first}"
        ) from err


def load_state(model: nn.Module, path: Path, name: str, role: str) -> None:
    """Load a state-dict file into `model` strictly; one-line ValueErrors naming the file."""
    state = read_state(path, role)
    if not isinstance(state, dict):
        raise ValueError(
            f"{role} checkpoint {path} holds a {type(state).__name__}, not a state_dict for {name}"
        )
    try:
        result = model.load_state_dict(state, strict=False)
    except (RuntimeError, TypeError, AttributeError) as err:
        # "Error(s) in loading state_dict ...:" then a line per size mismatch -> one line
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        sizes = [line for line in lines if line.startswith("size mismatch for")]
        detail = f"{len(sizes)} size mismatches, the first {sizes[0]}" if sizes else (lines or [""])[-1]
        raise ValueError(f"{role} checkpoint {path} does not fit {name}: {detail}") from err
    parts = [
        f"{len(keys)} {kind} keys (e.g. {keys[0]})"
        for kind, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys))
        if keys
    ]
    if parts:
        raise ValueError(f"{role} checkpoint {path} does not fit {name}: {', '.join(parts)}")


@contextlib.contextmanager
def one_thread():
    """Run torch ops single-threaded: CPU interpolation rounds differently with the thread count, and
    preprocessing must give the same bits in a DataLoader worker (1 thread) and in the main process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
