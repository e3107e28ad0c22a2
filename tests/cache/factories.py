"""Small synthetic feature caches for tests (any package's tests may import these).

    from tests.cache.factories import make_cache, TINY_SPEC
    cache_dir = make_cache(tmp_path, n=12)            # 12 images, 3 shards, some missing/corrupt
    cache_dir = make_cache(tmp_path, keys=["a", "b"], statuses={})   # chosen keys, all ok

Records are random but seeded: make_records(keys, spec, seed, statuses) returns exactly what
make_cache(..., same arguments) wrote, for round-trip comparisons.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np

from mner.cache.checksums import file_sha256
from mner.cache.fingerprint import compute_fingerprint
from mner.cache.manifest import MANIFEST_NAME, write_manifest
from mner.cache.shards import IMAGE_STATS_ATTR, ShardWriter, shard_path
from mner.cache.spec import STATUS_NAMES, Record, TokenSpec, empty_record

# Tiny shapes: P=5 patches of width 8, global width 6, K=4 regions of width 10.
TINY_SPEC = TokenSpec(
    num_patches=5,
    patch_dim=8,
    global_dim=6,
    max_regions=4,
    region_dim=10,
    patch_source="vision_model.last_hidden_state (CLS first)",
    global_source="image_embeds (visual_projection)",
    region_source="frcnn_box_head",
)
# A cache extracted with --detector none: the same patches and global embedding, K = Dr = 0.
NO_REGION_SPEC = dataclasses.replace(TINY_SPEC, max_regions=0, region_dim=0, region_source="none")
# 91 detector category names indexed by COCO id, like torchvision's (id 0 is the background).
CATEGORIES = ["__background__"] + [f"class{i}" for i in range(1, 91)]


def default_statuses(keys: list[str]) -> dict[str, str]:
    """The default mix: every 6th image (from the 5th) missing, every 6th (from the 6th) corrupt."""
    pattern = {4: "missing", 5: "corrupt"}
    return {key: pattern[i % 6] for i, key in enumerate(keys) if i % 6 in pattern}


def make_record(key: str, spec: TokenSpec, rng: np.random.Generator, status: str = "ok") -> Record:
    """A random valid record: N(0, 1) tokens, 0..K regions with sorted scores and valid boxes."""
    if status != "ok":
        return empty_record(key, spec, status, error=f"{status}: synthetic test image {key}")
    K = spec.max_regions
    n = int(rng.integers(0, K + 1))
    region_feats = np.zeros((K, spec.region_dim), np.float16)
    region_feats[:n] = rng.standard_normal((n, spec.region_dim))
    labels = np.zeros(K, np.int32)
    labels[:n] = rng.integers(1, len(CATEGORIES), n)
    scores = np.zeros(K, np.float32)
    scores[:n] = np.sort(rng.uniform(0.05, 1.0, n))[::-1]
    corners = np.sort(rng.uniform(0.0, 1.0, (n, 2, 2)), axis=1)  # (n, 2 corners sorted, x/y)
    boxes = np.zeros((K, 4), np.float32)
    boxes[:n] = np.stack([corners[:, 0, 0], corners[:, 0, 1], corners[:, 1, 0], corners[:, 1, 1]], axis=1)
    return Record(
        key=key,
        status="ok",
        width=int(rng.integers(32, 400)),
        height=int(rng.integers(32, 400)),
        num_regions=n,
        patch_tokens=rng.standard_normal((spec.num_patches, spec.patch_dim)).astype(np.float16),
        global_embed=rng.standard_normal(spec.global_dim).astype(np.float16),
        region_feats=region_feats,
        region_labels=labels,
        region_scores=scores,
        region_boxes=boxes,
    )


def make_records(
    keys, spec: TokenSpec | None = None, seed: int = 0, statuses: dict | None = None
) -> list[Record]:
    """One record per key; statuses maps key -> "missing"/"corrupt" (None: default_statuses)."""
    keys = list(keys)
    spec = spec or TINY_SPEC
    statuses = default_statuses(keys) if statuses is None else statuses
    assert set(statuses.values()) <= set(STATUS_NAMES), statuses
    rng = np.random.default_rng(seed)
    return [make_record(key, spec, rng, statuses.get(key, "ok")) for key in keys]


def synthetic_models() -> dict:
    """The `models` block of a synthetic manifest (untrained tiny models)."""
    return {
        "clip": {"path": "tiny-clip", "sha256": None, "untrained": True, "processor": {"image_size": 32}},
        "detector": {
            "name": "tiny-frcnn",
            "ckpt": None,
            "sha256": None,
            "untrained": True,
            "categories": CATEGORIES,
        },
    }


def write_cache(
    cache_dir, records: list[Record], spec: TokenSpec | None = None, shard_size: int = 5, image_stats=None
) -> Path:
    """Write `records` (in order) through ShardWriter + write_manifest; returns cache_dir.

    image_stats: {key: [size, mtime_ns] or None} to record as the image files (as extraction does);
    None writes shards without them, as caches made before they were recorded."""
    spec = spec or TINY_SPEC
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "clip": "tiny-clip",
        "detector": "tiny-frcnn",
        "shard_size": shard_size,
        "max_regions": spec.max_regions,
    }
    models = synthetic_models()
    fingerprint = compute_fingerprint({"config": config, "models": models, "spec": spec.to_dict()})
    shard_files = []
    for index, start in enumerate(range(0, len(records), shard_size)):
        chunk = records[start : start + shard_size]
        attrs = {"fingerprint": fingerprint, "config_json": config, "shard_index": index}
        if image_stats is not None:
            attrs[IMAGE_STATS_ATTR] = json.dumps([image_stats.get(r.key) for r in chunk])
        path = shard_path(cache_dir, index)
        with ShardWriter(path, spec, [r.key for r in chunk], attrs) as writer:
            for row, record in enumerate(chunk):
                writer.write(row, record)
            shard_files.append(writer.commit())
    errors = {r.key: r.error for r in records if r.status != "ok"}
    write_manifest(cache_dir, fingerprint, config, models, spec, shard_files, errors)
    return cache_dir


def make_cache(
    tmp_path,
    n: int = 12,
    spec: TokenSpec | None = None,
    seed: int = 0,
    keys=None,
    statuses: dict | None = None,
    shard_size: int = 5,
    image_stats: dict | None = None,
) -> Path:
    """A synthetic cache in tmp_path/"cache" (returned).

    Args:
        n: number of images (ignored when keys is given); keys default to "img000", "img001", ...
        spec: token shapes (default TINY_SPEC).
        seed: RNG seed of the random tokens/regions.
        keys: image keys to use (sorted, as extraction writes them).
        statuses: key -> "missing"/"corrupt"; None gives default_statuses, {} makes all ok.
        shard_size: rows per shard (12 images -> shards of 5, 5, 2).
        image_stats: the image files' [size, mtime_ns] to record (see write_cache).
    """
    keys = sorted(keys) if keys is not None else [f"img{i:03d}" for i in range(n)]
    records = make_records(keys, spec, seed, statuses)
    return write_cache(Path(tmp_path) / "cache", records, spec, shard_size, image_stats)


def assert_same_record(expected: Record, found: Record) -> None:
    """Every field equal, arrays with the same dtype (what a round trip must preserve)."""
    for field in dataclasses.fields(Record):
        want, got = getattr(expected, field.name), getattr(found, field.name)
        if isinstance(want, np.ndarray):
            assert got.dtype == want.dtype, field.name
            assert np.array_equal(got, want), field.name
        else:
            assert got == want, field.name


def flip_token_byte(path, row: int = 0) -> None:
    """Flip one byte of row `row`'s patch tokens in a shard file, in place: the file still opens and
    says it is complete, only its sha256 (and that token) tell. Other packages' tests use it too."""
    with h5py.File(path, "r", locking=False) as f:
        offset = f["patch_tokens"].id.get_chunk_info(row).byte_offset
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def reseal(cache_dir) -> Path:
    """Record the shards' current sha256 in manifest.json, as for a shard someone changed on purpose
    (repacked, or edited to test a check that runs after the checksum); returns cache_dir."""
    cache_dir = Path(cache_dir)
    path = cache_dir / MANIFEST_NAME
    manifest = json.loads(path.read_text(encoding="utf-8"))
    for shard in manifest["shards"]:
        if (cache_dir / shard["file"]).is_file():
            shard["sha256"] = file_sha256(cache_dir / shard["file"])
    path.write_text(json.dumps(manifest), encoding="utf-8")
    return cache_dir
