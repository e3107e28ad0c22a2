"""A cache folder's manifest.json (and extract_config.json): written from the committed shards,
read and checked, and the `mner extract-features` command that reproduces a cache's tokens.

manifest.json is the marker of a finished cache; see the "Cache" section of docs/design.md.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from mner.cache.checksums import ChecksumMemo
from mner.cache.fingerprint import json_default
from mner.cache.shards import IMAGE_STATS_ATTR, SHARD_GLOB, completed_shard, open_shard
from mner.cache.spec import SCHEMA_VERSION, STATUS_NAMES, TokenSpec
from mner.runtime import write_atomic

MANIFEST_NAME = "manifest.json"
CONFIG_NAME = "extract_config.json"


def write_manifest(
    cache_dir, fingerprint: str, config: dict, models: dict, spec: TokenSpec, shard_files, errors
) -> Path:
    """Write manifest.json (and extract_config.json) describing the committed shards.

    Args:
        cache_dir: the cache folder holding the shards.
        fingerprint: the cache fingerprint every shard must carry.
        config: the full resolved extraction config (JSON-ready dict).
        models: {"clip": {...}, "detector": {..., "categories": [names by COCO id]}}.
        spec: the token spec of every shard.
        shard_files: committed shard paths (or names inside cache_dir), in order.
        errors: {key: message} for images whose status is not ok.
    Returns the manifest path. The per-image rows (with the image file's size and mtime the shard
    records) are read back from the shards, so the manifest describes what is on disk, not what the
    caller meant to write. Checksums go through the folder's ChecksumMemo.
    """
    cache_dir = Path(cache_dir)
    memo = ChecksumMemo(cache_dir)
    shards, images, seen = [], [], {}
    for shard_file in shard_files:
        path = cache_dir / Path(shard_file).name
        if not completed_shard(path, fingerprint):
            raise ValueError(
                f"{path} is not a complete shard with fingerprint {fingerprint}; cannot write the manifest"
            )
        with open_shard(path) as f:
            keys = [key.decode("utf-8") for key in f["keys"][:]]
            status = f["status"][:]
            sizes = f["image_size"][:]  # (N, 2) width, height
            num_regions = f["num_regions"][:]
            stats = f.attrs.get(IMAGE_STATS_ATTR)
        stats = None if stats is None else json.loads(stats)  # None: written before they were recorded
        for row, key in enumerate(keys):
            if key in seen:
                raise ValueError(f"image key {key!r} is in both {seen[key]} and {path.name}")
            seen[key] = path.name
            images.append(
                {
                    "key": key,
                    "shard": path.name,
                    "row": row,
                    "status": STATUS_NAMES[status[row]],
                    "width": int(sizes[row, 0]),
                    "height": int(sizes[row, 1]),
                    "num_regions": int(num_regions[row]),
                    "error": str(errors.get(key, "")),
                }
            )
            if stats is not None:  # the image file as extraction found it; null: no file
                images[-1]["file_size"], images[-1]["file_mtime_ns"] = stats[row] or (None, None)
        shards.append({"file": path.name, "rows": len(keys), "sha256": memo.sha256(path)})
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "fingerprint": fingerprint,
        "config": config,
        "models": models,
        "spec": spec.to_dict(),
        "shards": shards,
        "images": images,
    }
    # extract_config.json first: manifest.json is the marker of a finished cache.
    _write_json_atomic(cache_dir / CONFIG_NAME, config)
    return _write_json_atomic(cache_dir / MANIFEST_NAME, manifest)


def _write_json_atomic(path: Path, data) -> Path:
    text = json.dumps(
        data, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False, default=json_default
    )
    return write_atomic(path, text + "\n")


# The extraction settings that decide the tokens, as `mner extract-features` flags (extract.config's
# fields; the manifest records them at the top of its config).
_TOKEN_FLAGS = (
    ("vision", "--vision"),
    ("vision_ckpt", "--vision-ckpt"),
    ("clip", "--clip"),
    ("detector", "--detector"),
    ("detector_ckpt", "--detector-ckpt"),
    ("region_features", "--region-features"),
    ("topk", "--topk"),
    ("score_thr", "--score-thr"),
    ("nms_iou", "--nms-iou"),
)


def extract_command(config: dict, data_dir, out: str = "NEW_CACHE") -> str:
    """The `mner extract-features` command that extracts `data_dir`'s images into `out` with the token
    settings of the cache whose manifest config is `config` (so the two caches' tokens are comparable)."""
    words = ["mner", "extract-features", "--data-dir", str(data_dir), "--out", out]
    for field, flag in _TOKEN_FLAGS:
        if config.get(field) is not None:
            words += [flag, str(config[field])]
    return shlex.join(words)


def read_manifest(cache_dir) -> dict:
    """Load and check CACHE_DIR/manifest.json; ValueError when the folder is not a usable cache."""
    path = Path(cache_dir) / MANIFEST_NAME
    # Re-running the extraction keeps intact shards and rebuilds the manifest from their attributes.
    rebuild = "re-run the `mner extract-features` command that made this cache: it keeps the intact shards and rebuilds manifest.json"
    if not path.is_file():
        if any(Path(cache_dir).glob(SHARD_GLOB)):
            raise ValueError(
                f"{cache_dir} holds shards but no manifest.json (an extraction stopped early); {rebuild}"
            )
        raise ValueError(
            f"{cache_dir} is not a feature cache: no manifest.json; run `mner extract-features` first"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err}); {rebuild}") from err
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema_version {version!r} is not supported (this code reads {SCHEMA_VERSION}); {rebuild}"
        )
    missing = [
        name
        for name in ("fingerprint", "config", "models", "spec", "shards", "images")
        if name not in manifest
    ]
    if missing:
        raise ValueError(f"{path}: missing fields {missing}; {rebuild}")
    return manifest
