"""The cache fingerprint: a sha256 of the canonical JSON of everything that decides the tokens, and
the one wording of how two fingerprint descriptions differ.

Extraction refuses a cache folder of another configuration with `describe_fingerprint_difference`;
stage two names what differs between a run's cache and another with `fingerprint_diff`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

# Differences a description names; the rest are counted.
SHOWN_DIFFERENCES = 8
# A difference shows its two values only when their JSON fits in this many characters.
SHOWN_CHARS = 60


def compute_fingerprint(parts: dict) -> str:
    """sha256 hex digest of the canonical JSON of `parts` (sorted keys, no whitespace).

    Equal dicts give equal fingerprints whatever their key order; tuples count as lists and paths
    as strings. Values JSON cannot express (objects, NaN) raise ValueError.
    """
    if not isinstance(parts, dict):
        raise ValueError(f"compute_fingerprint expects a dict, got {type(parts).__name__}")
    return hashlib.sha256(canonical_json(parts).encode("utf-8")).hexdigest()


def fingerprint_diff(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Dotted path -> (old value, new value) for every leaf where two fingerprint descriptions differ.

    E.g. {"models.clip.sha256": ("ab12", "cd34"), "topk": (20, 10)}, sorted by path. A key missing
    on one side counts as None; where only one side holds a dict, its path is one difference.
    `ignore` names top-level parts to leave out. Extraction words this for a refused cache folder,
    evaluate and predict for a cache other than a run's.
    """
    if not isinstance(old, dict) or not isinstance(new, dict):
        raise ValueError(
            f"fingerprint_diff compares two dicts, got {type(old).__name__} and {type(new).__name__}"
        )
    old, new = ({key: value for key, value in side.items() if key not in ignore} for side in (old, new))
    return dict(sorted(_leaf_diff(old, new, "").items()))


def _leaf_diff(a, b, path: str) -> dict[str, tuple]:
    if isinstance(a, dict) and isinstance(b, dict):
        found = {}
        for key in a.keys() | b.keys():
            found.update(_leaf_diff(a.get(key), b.get(key), f"{path}.{key}" if path else key))
        return found
    return {} if a == b else {path: (a, b)}


def describe_fingerprint_difference(old: dict, new: dict, ignore: tuple[str, ...] = ()) -> str:
    """ "topk 20 -> 10, models.clip.sha256.model.safetensors (+2 more)": the leaves where two
    fingerprint descriptions differ (`fingerprint_diff`), in path order.

    Each difference shows its two values as JSON when together they fit in SHOWN_CHARS characters,
    else its path alone; the first SHOWN_DIFFERENCES are named and the rest counted. "" when the two
    do not differ.
    """
    differences = fingerprint_diff(old, new, ignore)
    shown = []
    for name, values in list(differences.items())[:SHOWN_DIFFERENCES]:
        before, after = (json.dumps(value) for value in values)
        short = len(before) + len(after) <= SHOWN_CHARS
        shown.append(f"{name} {before} -> {after}" if short else name)
    more = len(differences) - SHOWN_DIFFERENCES
    return ", ".join(shown) + (f" (+{more} more)" if more > 0 else "")


def h5py_version() -> str:
    """The version of the h5py that writes the shards (extraction fingerprints it with the others)."""
    return h5py.__version__


def canonical_json(value) -> str:
    """Sorted keys, no whitespace, no NaN: the text that is hashed, and a shard's `config_json`."""
    try:
        return json.dumps(
            value,
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
            default=json_default,
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot fingerprint/serialise config: {err}") from err


def json_default(value):
    """JSON fallback for the few non-JSON types configs may hold (paths, numpy scalars)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    raise TypeError(f"value {value!r} of type {type(value).__name__} is not JSON serialisable")
