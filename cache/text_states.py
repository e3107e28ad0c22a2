"""Text-state caches: for every post of one split file, the text encoder's hidden states after its
frozen bottom layers (model.text_frozen_layers = N), at the post's sub-word positions.

Those states depend only on the post's text and the frozen weights, so they are computed once and
read by every epoch, arm and seed that trains the layers above N (train/text_states.py computes them;
this module alone knows the file). One folder per fingerprint under a root folder:

    ROOT/<fingerprint[:16]>/
      text_states.h5     keys (N,) S utf-8, offsets (N + 1,) int64, input_ids (total,) int32,
                         states (total, D) float32; attrs schema_version, fingerprint, parts_json
      text_states.json   {"schema_version", "fingerprint", "parts", "file", "sha256", "posts",
                          "subwords", "width", "dtype"}: written last, so it marks a complete folder
      mner.lock          held while the folder is written (mner.runtime.lock_folder)

Rows are the split's posts in file order; post i's sub-words are input_ids[offsets[i]:offsets[i+1]]
(padding left out) and its states the same rows of `states`. float32, not float16: the top layers must
see exactly what the frozen layers would hand them in the loop (the equivalence test holds to 1e-6),
and fp16 rounding would already move the states by ~1e-3.

The root is `$MNER_TEXT_CACHE`, else ~/.cache/mner/text-states (never a folder the user gave for
something else); a run's `--text-cache DIR` puts it elsewhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import h5py
import numpy as np

from mner.cache.checksums import ChecksumMemo
from mner.cache.fingerprint import compute_fingerprint, fingerprint_diff
from mner.runtime import fsync_dir, fsync_file, lock_folder, write_atomic

TEXT_STATES_SCHEMA = 1
STATES_FILE = "text_states.h5"
MARKER_FILE = "text_states.json"
# The environment variable naming the root folder, and the root without it.
ROOT_VARIABLE = "MNER_TEXT_CACHE"
DEFAULT_ROOT = Path("~/.cache/mner/text-states")
# Rows of `states` per HDF5 chunk while the file grows.
_CHUNK_ROWS = 4096


def text_cache_root(root: str | os.PathLike | None = None) -> Path:
    """The root folder of text-state caches: `root` when given, else $MNER_TEXT_CACHE, else DEFAULT_ROOT."""
    chosen = root if root is not None else os.environ.get(ROOT_VARIABLE) or DEFAULT_ROOT
    return Path(chosen).expanduser()


def text_state_folder(root: str | os.PathLike | None, parts: dict) -> tuple[Path, str]:
    """(the folder of the cache described by `parts`, its fingerprint) under `text_cache_root(root)`."""
    fingerprint = compute_fingerprint(parts)
    return text_cache_root(root) / fingerprint[:16], fingerprint


def is_text_state_folder(folder) -> bool:
    """Whether `folder` holds a complete text-state cache (its marker file)."""
    return (Path(folder) / MARKER_FILE).is_file()


def write_text_states(
    folder, parts: dict, rows: Iterable[tuple[str, np.ndarray, np.ndarray]], width: int
) -> Path:
    """Write the text-state cache of `parts` into `folder` (made if absent), locked and atomically.

    Args:
        folder: `text_state_folder(root, parts)[0]`.
        parts: what the states depend on (train/text_states.py: encoder and tokenizer files, max_length,
            frozen layers, the split file's sha256, versions); hashed into the fingerprint.
        rows: (post key, input_ids (S_i,), states (S_i, D) float32) per post, in file order.
        width: D.
    Returns:
        folder. The HDF5 file is written as a .tmp, fsynced and renamed; the marker is written last.
    Raises:
        ValueError when another process is writing the folder (naming it), or a row has the wrong shape.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fingerprint = compute_fingerprint(parts)
    with lock_folder(folder, flag="--text-cache"):
        (folder / MARKER_FILE).unlink(missing_ok=True)
        path, tmp = folder / STATES_FILE, folder / (STATES_FILE + ".tmp")
        keys: list[bytes] = []
        offsets = [0]
        try:
            with h5py.File(tmp, "w") as f:
                ids = f.create_dataset(
                    "input_ids", (0,), dtype="int32", maxshape=(None,), chunks=(_CHUNK_ROWS,)
                )
                states = f.create_dataset(
                    "states", (0, width), dtype="float32", maxshape=(None, width), chunks=(_CHUNK_ROWS, width)
                )
                for key, post_ids, post_states in rows:
                    n = len(post_ids)
                    if post_states.shape != (n, width):
                        raise ValueError(
                            f"text states of post {key!r} have shape {post_states.shape}, expected ({n}, {width})"
                        )
                    start = offsets[-1]
                    ids.resize((start + n,))
                    states.resize((start + n, width))
                    ids[start:] = post_ids
                    states[start:] = post_states.astype(np.float32, copy=False)
                    keys.append(key.encode("utf-8"))
                    offsets.append(start + n)
                f.create_dataset("keys", data=np.array(keys, dtype=f"S{max(map(len, keys), default=1)}"))
                f.create_dataset("offsets", data=np.array(offsets, dtype=np.int64))
                f.attrs.update(
                    schema_version=TEXT_STATES_SCHEMA,
                    fingerprint=fingerprint,
                    parts_json=json.dumps(parts, sort_keys=True),
                )
            fsync_file(tmp)
            os.replace(tmp, path)
            fsync_dir(folder)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        marker = {
            "schema_version": TEXT_STATES_SCHEMA,
            "fingerprint": fingerprint,
            "parts": parts,
            "file": STATES_FILE,
            "sha256": ChecksumMemo(folder).sha256(path),
            "posts": len(keys),
            "subwords": offsets[-1],
            "width": width,
            "dtype": "float32",
        }
        write_atomic(folder / MARKER_FILE, json.dumps(marker, indent=2, sort_keys=True) + "\n")
    return folder


class TextStates:
    """A text-state cache checked and loaded into memory: `get(index, key)` -> (input_ids, states).

    Open it with `open_text_states`. Loaded whole (the states of a Twitter-2017 split are a few hundred
    MB), so DataLoader workers share the arrays copy-on-write and no HDF5 handle crosses a fork.
    """

    def __init__(self, folder: Path, marker: dict, keys, offsets, input_ids, states):
        self.folder = folder
        self.fingerprint: str = marker["fingerprint"]
        self.parts: dict = marker["parts"]
        self.keys: list[str] = keys
        self._offsets = offsets
        self._ids = input_ids
        self._states = states
        self.width = states.shape[1]

    def __len__(self) -> int:
        return len(self.keys)

    def get(self, index: int, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids (S,), states (S, D) float32) of post `index` of the split; ValueError when that row
        holds another post's key (the cache was built from another file)."""
        if not 0 <= index < len(self.keys) or self.keys[index] != key:
            held = self.keys[index] if 0 <= index < len(self.keys) else "nothing"
            raise ValueError(
                f"text-state cache {self.folder}: post {index + 1} is {key!r} but the cache holds {held!r} "
                "there; it was built from another split file"
            )
        a, b = self._offsets[index], self._offsets[index + 1]
        return self._ids[a:b], self._states[a:b]


def read_marker(folder) -> dict:
    """The marker (text_states.json) of a complete text-state cache; ValueError when there is none."""
    path = Path(folder) / MARKER_FILE
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{folder} is not a text-state cache (no {MARKER_FILE})") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} cannot be read ({err}); delete {folder} to rebuild it") from None
    if not isinstance(marker, dict) or marker.get("schema_version") != TEXT_STATES_SCHEMA:
        raise ValueError(
            f"{path} is not a text-state cache of schema {TEXT_STATES_SCHEMA}; delete {folder} to rebuild it"
        )
    return marker


def open_text_states(folder, parts: dict | None = None) -> TextStates:
    """Check a text-state cache and load it.

    Args:
        folder: a folder written by `write_text_states`.
        parts: what the caller needs the states to depend on; None skips that comparison (inspection).
    Raises:
        ValueError, naming the folder and saying to delete it to rebuild, when it is incomplete, its
        recorded parts differ from `parts` (listing each difference), or the file's sha256 is not the
        recorded one.
    """
    folder = Path(folder)
    marker = read_marker(folder)
    if parts is not None and marker["parts"] != parts:
        changed = fingerprint_diff(marker["parts"], parts)
        lines = [f"{name}: {_short(old)} -> {_short(new)}" for name, (old, new) in list(changed.items())[:8]]
        raise ValueError(
            f"text-state cache {folder} was built for other settings ({'; '.join(lines)}); delete it to "
            "rebuild it, or give another --text-cache folder"
        )
    path = folder / marker["file"]
    if not path.is_file() or not ChecksumMemo(folder).matches(path, marker["sha256"]):
        raise ValueError(
            f"text-state cache file {path} is missing or does not match its recorded sha256 (changed or "
            f"damaged since it was written); delete {folder} to rebuild it"
        )
    with h5py.File(path, "r", locking=False) as f:
        keys = [key.decode("utf-8") for key in f["keys"][()]]
        arrays = (f["offsets"][()], f["input_ids"][()], f["states"][()])
    return TextStates(folder, marker, keys, *arrays)


def inspect_text_states(folder) -> dict:
    """What `mner cache inspect` prints about a text-state cache: its marker less the parts' file
    hashes, plus the file's bytes on disk."""
    folder = Path(folder)
    marker = read_marker(folder)
    parts = marker["parts"]
    return {
        "kind": "text-states",
        "folder": str(folder),
        "fingerprint": marker["fingerprint"],
        "posts": marker["posts"],
        "subwords": marker["subwords"],
        "width": marker["width"],
        "dtype": marker["dtype"],
        "frozen_layers": parts.get("frozen_layers"),
        "max_length": parts.get("max_length"),
        "encoder": parts.get("encoder", {}).get("name"),
        "data_file": parts.get("data_file"),
        "disk_bytes": (folder / marker["file"]).stat().st_size,
    }


def format_text_states(info: dict) -> str:
    """`inspect_text_states`'s dict as the lines `mner cache inspect` prints."""
    data = info["data_file"] or {}
    return "\n".join(
        [
            f"text-state cache {info['folder']} (fingerprint {info['fingerprint'][:16]})",
            f"  states after the embeddings and {info['frozen_layers']} frozen layers of {info['encoder']}",
            f"  split file {data.get('name')} (sha256 {str(data.get('sha256'))[:16]}), max_length "
            f"{info['max_length']}",
            f"  {info['posts']} posts, {info['subwords']} sub-words x {info['width']} {info['dtype']}, "
            f"{info['disk_bytes'] / 1e6:.1f} MB",
        ]
    )


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, dict | list) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
