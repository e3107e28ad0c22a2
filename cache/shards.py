"""The HDF5 shard layout, the atomic shard writer, the manifest and the cache fingerprint.

This is the only module that writes the on-disk layout (see the "Cache" section of docs/design.md).
A shard holds N images at fixed, padded shapes; the three token tensors are stored one image per
chunk so a reader fetches one image with one chunk read. A shard is written to `<name>.tmp` and
renamed only once every row is written, so a file named `shard-*.h5` is always complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import shlex
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from mner.cache.checksums import ChecksumMemo, file_sha256  # noqa: F401 - file_sha256 re-exported
from mner.runtime import fsync_dir, fsync_file, write_atomic

SCHEMA_VERSION = 1
STATUS_NAMES = ("ok", "missing", "corrupt")
STATUS_CODES = {name: code for code, name in enumerate(STATUS_NAMES)}
MANIFEST_NAME = "manifest.json"
CONFIG_NAME = "extract_config.json"
SHARD_GLOB = "shard-*.h5"
# Shard attribute: JSON list, per row, of the image file's [size, mtime_ns] when it was read (or null).
IMAGE_STATS_ATTR = "image_stats_json"
# TokenSpec.region_source of a cache extracted without a detector: region datasets of K = 0 rows.
NO_REGIONS = "none"

# The largest finite float16; anything larger becomes inf when cast.
FP16_MAX = 65504.0
# Attributes the caller passes to ShardWriter; the writer adds schema_version, spec_json, complete.
REQUIRED_ATTRS = ("fingerprint", "config_json", "shard_index")
# The three token tensors, stored one image per chunk; everything else is small per-image metadata.
TOKEN_DATASETS = ("patch_tokens", "global_embed", "region_feats")
# Per-region arrays; rows >= num_regions are zero padding.
REGION_DATASETS = ("region_feats", "region_labels", "region_scores", "region_boxes")
# The array fields of a Record, in shard order.
RECORD_ARRAYS = (
    "patch_tokens",
    "global_embed",
    "region_feats",
    "region_labels",
    "region_scores",
    "region_boxes",
)


@dataclass(frozen=True)
class TokenSpec:
    """Shapes of the cached tokens and where they came from; one spec per cache."""

    num_patches: int  # P: patch tokens per image (CLS first when the encoder has one)
    patch_dim: int  # Dp: width of a patch token
    global_dim: int  # Dg: width of the global image embedding
    max_regions: int  # K: detector regions kept per image; shorter lists are zero-padded; 0: no detector
    region_dim: int  # Dr: width of a region feature; 0 when K is 0
    patch_source: str  # e.g. "vision_model.last_hidden_state (CLS first)" or "resnet50.layer4 (7x7 grid)"
    global_source: str  # e.g. "image_embeds (visual_projection)", "pooler_output" or "resnet50.avgpool"
    region_source: str  # "frcnn_box_head" | "clip_crop" | "none" (extracted with --detector none: K = Dr = 0)

    def __post_init__(self):
        for name in ("num_patches", "patch_dim", "global_dim", "max_regions", "region_dim"):
            value = getattr(self, name)
            least = 0 if name in ("max_regions", "region_dim") and self.region_source == NO_REGIONS else 1
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
                raise ValueError(f"TokenSpec.{name} must be a positive integer, got {value!r}")
        for name in ("patch_source", "global_source", "region_source"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"TokenSpec.{name} must be a non-empty string, got {value!r}")
        if self.region_source == NO_REGIONS and (self.max_regions, self.region_dim) != (0, 0):
            raise ValueError(
                f"TokenSpec.region_source {NO_REGIONS!r} needs max_regions = region_dim = 0, got "
                f"{self.max_regions} and {self.region_dim}"
            )

    @property
    def has_regions(self) -> bool:
        """False for a cache extracted with --detector none (its region datasets hold K = 0 rows)."""
        return self.max_regions > 0

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (what the manifest and the `spec_json` attribute hold)."""
        return {field.name: _plain(getattr(self, field.name)) for field in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict) -> TokenSpec:
        """Inverse of `to_dict`; unknown or missing fields raise ValueError."""
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        missing = sorted(names - set(data))
        if unknown or missing:
            raise ValueError(f"token spec has unknown fields {unknown} and missing fields {missing}")
        return cls(**data)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-image shape of every shard dataset (the shard shape is (N, *shape))."""
        K = self.max_regions
        return {
            "keys": (),
            "status": (),
            "image_size": (2,),
            "patch_tokens": (self.num_patches, self.patch_dim),
            "global_embed": (self.global_dim,),
            "region_feats": (K, self.region_dim),
            "region_labels": (K,),
            "region_scores": (K,),
            "region_boxes": (K, 4),
            "num_regions": (),
        }


# dtype of every dataset except `keys`, whose fixed-length bytes width depends on the shard.
DTYPES = {
    "status": np.dtype(np.uint8),
    "image_size": np.dtype(np.int32),
    "patch_tokens": np.dtype(np.float16),
    "global_embed": np.dtype(np.float16),
    "region_feats": np.dtype(np.float16),
    "region_labels": np.dtype(np.int32),
    "region_scores": np.dtype(np.float32),
    "region_boxes": np.dtype(np.float32),
    "num_regions": np.dtype(np.int32),
}


@dataclass
class Record:
    """One image's cached tokens, at the padded shapes of a TokenSpec."""

    key: str  # image key (IMGID or relative image path)
    status: str  # one of STATUS_NAMES
    width: int  # original image width in pixels; 0 when status != "ok"
    height: int  # original image height in pixels; 0 when status != "ok"
    num_regions: int  # detected regions kept, in [0, K]
    patch_tokens: np.ndarray  # (P, Dp) float16
    global_embed: np.ndarray  # (Dg,) float16
    region_feats: np.ndarray  # (K, Dr) float16, rows >= num_regions are zero
    region_labels: np.ndarray  # (K,) int32 COCO category id, 0 on padding
    region_scores: np.ndarray  # (K,) float32
    region_boxes: np.ndarray  # (K, 4) float32 xyxy in [0, 1] of the original width/height
    error: str = ""  # why status != ok (kept in the manifest, not in the shard)


def empty_record(key: str, spec: TokenSpec, status: str, error: str = "") -> Record:
    """A record with zeroed tokens and no regions, for images that could not be read.

    Returns a Record with patch_tokens (P, Dp), global_embed (Dg,), region tensors (K, ...) all zero.
    """
    if status not in STATUS_NAMES:
        raise ValueError(f"image {key!r}: unknown status {status!r}; expected one of {STATUS_NAMES}")
    shapes = spec.shapes()
    return Record(
        key=key,
        status=status,
        width=0,
        height=0,
        num_regions=0,
        **{name: np.zeros(shapes[name], DTYPES[name]) for name in RECORD_ARRAYS},
        error=error,
    )


def compute_fingerprint(parts: dict) -> str:
    """sha256 hex digest of the canonical JSON of `parts` (sorted keys, no whitespace).

    Equal dicts give equal fingerprints whatever their key order; tuples count as lists and paths
    as strings. Values JSON cannot express (objects, NaN) raise ValueError.
    """
    if not isinstance(parts, dict):
        raise ValueError(f"compute_fingerprint expects a dict, got {type(parts).__name__}")
    return hashlib.sha256(_canonical_json(parts).encode("utf-8")).hexdigest()


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


def h5py_version() -> str:
    """The version of the h5py that writes the shards (extraction fingerprints it with the others)."""
    return h5py.__version__


def _canonical_json(value) -> str:
    try:
        return json.dumps(
            value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=_plain
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot fingerprint/serialise config: {err}") from err


def _plain(value):
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


def shard_path(cache_dir, index: int) -> Path:
    """cache_dir / "shard-00000.h5" for index 0."""
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"shard index must be a non-negative integer, got {index!r}")
    return Path(cache_dir) / f"shard-{int(index):05d}.h5"


def tmp_path(path) -> Path:
    """Where ShardWriter writes `path` until commit()."""
    path = Path(path)
    return path.with_name(path.name + ".tmp")


def open_shard(path) -> h5py.File:
    """Open a shard read-only. locking=False: readers never write, and HDF5 file locks fail on some
    network filesystems and across DataLoader workers."""
    return h5py.File(path, "r", locking=False)


def open_shard_checked(path) -> h5py.File:
    """`open_shard` for readers that face the user: an unreadable (truncated, overwritten) shard is a
    ValueError naming the file and the remedy rather than h5py's bare OSError."""
    try:
        return open_shard(path)
    except OSError as err:
        raise ValueError(f"{path}: unreadable shard ({err}); run `mner cache verify` on its folder") from err


class ShardWriter:
    """Writes one shard: fixed-shape padded datasets in `<path>.tmp`, renamed to `path` on commit().

    Use as a context manager or call commit()/abort() yourself:

        with ShardWriter(shard_path(cache_dir, 0), spec, keys, attrs) as writer:
            for row, record in enumerate(records):
                writer.write(row, record)
            writer.commit()

    Leaving the `with` block without commit() (or with an exception) removes the tmp file.
    """

    def __init__(self, path, spec: TokenSpec, keys, attrs: dict):
        """
        Args:
            path: final shard path (normally `shard_path(cache_dir, index)`).
            spec: token shapes; every record written must match them.
            keys: the N image keys of this shard, in row order (unique, non-empty strings).
            attrs: shard attributes: "fingerprint" (str), "config_json" (str, or a dict that is
                stored as canonical JSON) and "shard_index" (int) are required; other plain values
                are stored as given. The writer sets schema_version, spec_json and complete.
        Shards are uncompressed: gzip saved 11-23% of the size but made random reads 2.5-9x slower
        (benchmarks/README.md).
        """
        if not isinstance(spec, TokenSpec):
            raise ValueError(f"spec must be a TokenSpec, got {type(spec).__name__}")
        keys = list(keys)
        if not keys:
            raise ValueError(f"shard {path}: no keys to write")
        for key in keys:
            if not isinstance(key, str) or not key or "\0" in key:
                raise ValueError(
                    f"shard {path}: image keys must be non-empty strings without NUL, got {key!r}"
                )
        duplicates = sorted(key for key, count in Counter(keys).items() if count > 1)
        if duplicates:
            raise ValueError(f"shard {path}: duplicate image keys {duplicates[:5]}")
        missing = [name for name in REQUIRED_ATTRS if name not in attrs]
        if missing:
            raise ValueError(f"shard {path}: attrs is missing {missing} (required: {list(REQUIRED_ATTRS)})")
        for name in ("schema_version", "spec_json", "complete"):
            if name in attrs:
                raise ValueError(f"shard {path}: attr {name!r} is set by ShardWriter, do not pass it")

        self.path = Path(path)
        self.tmp_path = tmp_path(self.path)
        self.spec = spec
        self.keys = keys
        self._written = np.zeros(len(keys), dtype=bool)
        _check_room(self.tmp_path, spec, len(keys))
        # HDF5 1.10 format: chunked datasets of fixed size get a fixed-array chunk index (~8 bytes a
        # chunk instead of a B-tree), which keeps small-token shards within a few percent of the raw
        # payload; h5ls/h5dump 1.10+ still open them.
        self._file = h5py.File(self.tmp_path, "w", libver=("v110", "v110"))
        try:
            self._create_datasets()
            self._write_attrs(attrs)
        except BaseException:
            self.abort()
            raise

    def _create_datasets(self) -> None:
        N = len(self.keys)
        encoded = [key.encode("utf-8") for key in self.keys]
        # Fixed-length bytes (S<maxlen>) tagged UTF-8 in HDF5, so other tools decode non-ASCII keys.
        key_dtype = h5py.string_dtype("utf-8", max(len(key) for key in encoded))
        self._file.create_dataset("keys", data=np.array(encoded, dtype=key_dtype))
        self._tokens = {}
        self._meta = {}
        for name, shape in self.spec.shapes().items():
            if name in TOKEN_DATASETS:
                # One image per chunk: a reader fetches an image's tensor with one chunk read. HDF5 has
                # no empty chunks, so the zero-size region_feats (N, 0, 0) of a K = 0 cache is contiguous.
                self._tokens[name] = self._file.create_dataset(
                    name,
                    shape=(N, *shape),
                    dtype=DTYPES[name],
                    chunks=(1, *shape) if all(shape) else None,
                )
            elif name != "keys":
                # Small per-image metadata, contiguous on disk (readers load it whole); buffered in
                # RAM and written once at commit, since one small HDF5 write per row is slow.
                self._meta[name] = np.zeros((N, *shape), DTYPES[name])

    def _write_attrs(self, attrs: dict) -> None:
        for name, value in attrs.items():
            if name == "config_json" and not isinstance(value, str):
                value = _canonical_json(value)
            self._file.attrs[name] = value
        self._file.attrs["schema_version"] = SCHEMA_VERSION
        self._file.attrs["spec_json"] = _canonical_json(self.spec.to_dict())
        self._file.attrs["complete"] = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file is not None:
            self.abort()

    def write(self, row: int, record: Record) -> None:
        """Write `record` at `row`; its key must be keys[row] and its shapes must match the spec."""
        if self._file is None:
            raise ValueError(f"shard {self.path}: write() after commit() or abort()")
        if not 0 <= row < len(self.keys):
            raise ValueError(f"shard {self.path}: row {row} out of range [0, {len(self.keys)})")
        if record.key != self.keys[row]:
            raise ValueError(
                f"shard {self.path}: row {row} is image {self.keys[row]!r}, got record {record.key!r}"
            )
        arrays = _checked_arrays(record, self.spec)
        for name, array in arrays.items():
            if name in TOKEN_DATASETS:
                self._tokens[name][row] = array
            else:
                self._meta[name][row] = array
        self._meta["status"][row] = STATUS_CODES[record.status]
        self._meta["image_size"][row] = (record.width, record.height)
        self._meta["num_regions"][row] = record.num_regions
        self._written[row] = True

    def commit(self) -> Path:
        """Mark complete, flush, fsync and atomically rename to the final path; returns it."""
        if self._file is None:
            raise ValueError(f"shard {self.path}: commit() after commit() or abort()")
        unwritten = np.flatnonzero(~self._written)
        if unwritten.size:
            first = [self.keys[i] for i in unwritten[:5]]
            raise ValueError(
                f"shard {self.path}: {unwritten.size} rows were never written (first keys: {first})"
            )
        for name, array in self._meta.items():
            self._file.create_dataset(name, data=array)
        self._file.attrs["complete"] = True
        self._file.flush()
        self._file.close()
        self._file = None
        fsync_file(self.tmp_path)
        os.replace(self.tmp_path, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Close and delete the tmp file; the final path is left untouched."""
        if self._file is not None:
            file, self._file = self._file, None
            self._tokens = {}  # datasets hold HDF5 ids too: none may outlive the file's close
            try:
                file.close()
            except OSError:
                # A full disk fails the close's own flush. Give the file's blocks back and close again:
                # an HDF5 handle left open is flushed at interpreter exit, which then crashes (SIGSEGV).
                with contextlib.suppress(OSError):
                    os.truncate(self.tmp_path, 0)
                with contextlib.suppress(OSError, RuntimeError):
                    file.close()
        self.tmp_path.unlink(missing_ok=True)


# Room a shard needs beyond its datasets' bytes (HDF5 headers, chunk index, attributes).
_SHARD_OVERHEAD = 1 << 20


def _check_room(path: Path, spec: TokenSpec, rows: int) -> None:
    """Refuse to start a shard the disk has no room for, with an OSError ENOSPC naming it.

    HDF5 cannot recover a file whose write failed for want of space: its handles can then be neither
    flushed nor closed, and the interpreter crashes at exit (SIGSEGV). So the room is checked before
    HDF5 writes anything; only a disk filled by someone else meanwhile still reaches HDF5.
    """
    payload = sum(
        int(np.prod(shape)) * DTYPES[name].itemsize for name, shape in spec.shapes().items() if name in DTYPES
    )
    needed = rows * payload + _SHARD_OVERHEAD
    free = shutil.disk_usage(path.parent).free
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device (shard needs about {needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free)",
            str(path),
        )


def _checked_arrays(record: Record, spec: TokenSpec) -> dict[str, np.ndarray]:
    """Validate a record against the spec; returns its arrays cast to the shard dtypes."""
    key = record.key
    if record.status not in STATUS_NAMES:
        raise ValueError(f"image {key!r}: unknown status {record.status!r}; expected one of {STATUS_NAMES}")
    shapes = spec.shapes()
    given = {}
    for name in RECORD_ARRAYS:
        array = np.asarray(getattr(record, name))
        if array.shape != shapes[name]:
            raise ValueError(f"image {key!r}: {name} has shape {array.shape}, the spec needs {shapes[name]}")
        given[name] = array
    # The values as given, before the cast: a float32 token above FP16_MAX must not pass as inf.
    block = {name: array[None] for name, array in given.items()}  # (1, ...) each
    block["status"] = np.array([STATUS_CODES[record.status]])  # (1,)
    block["image_size"] = np.array([[record.width, record.height]])  # (1, 2)
    block["num_regions"] = np.array([record.num_regions])  # (1,)
    problems = row_problems(block, spec)
    if problems:
        raise ValueError(f"image {key!r}: {problems[0].rule(0)}")
    return {name: array.astype(DTYPES[name], copy=False) for name, array in given.items()}


@dataclass(frozen=True)
class RowProblem:
    """The rows of a block that break one rule of the shard layout, and the two ways to say so."""

    check: str  # the rule's short name, e.g. "boxes" or "nan patch_tokens"
    rows: np.ndarray  # (M,) indices into the block of the rows that break it
    rule: Callable[[int], str]  # for block row i: the rule, as ShardWriter tells its caller
    found: Callable[[int], str]  # for block row i: what is wrong, as verify_cache reports a stored row


def row_problems(block: dict[str, np.ndarray], spec: TokenSpec) -> list[RowProblem]:
    """Check B rows against what every shard row must satisfy; returns the broken rules in order.

    Args:
        block: "status" (B,) status codes, "image_size" (B, 2) width and height, "num_regions" (B,),
            and each of RECORD_ARRAYS at (B, *shape) for the spec's shapes (any real dtype).
    ShardWriter raises the first problem of the record it is given (B = 1); verify_cache lists every
    problem of each block of stored rows. The shapes are the caller's to check.
    """
    K = spec.max_regions
    codes, count = block["status"], block["num_regions"]  # (B,), (B,)
    width, height = block["image_size"][:, 0], block["image_size"][:, 1]  # (B,), (B,)
    B = len(codes)
    # An explicit size: with K = 0 the region arrays are empty and numpy cannot infer a -1.
    flat = {name: block[name].reshape(B, int(np.prod(block[name].shape[1:]))) for name in RECORD_ARRAYS}
    padding = np.arange(K)[None, :] >= np.clip(count, 0, K)[:, None]  # (B, K) True on padding rows
    boxes = block["region_boxes"]  # (B, K, 4) xyxy
    not_ok = codes != STATUS_CODES["ok"]  # (B,)

    def same(message):
        return message, message

    def status_name(i) -> str:
        return STATUS_NAMES[codes[i]] if codes[i] < len(STATUS_NAMES) else str(codes[i])

    def not_empty(i) -> str:
        return f"status {status_name(i)} must have zero size, regions and tokens (use empty_record)"

    # (check, bad rows (B,), rule message, found message) in the order ShardWriter reports them.
    rules = [
        (
            "status",
            codes >= len(STATUS_NAMES),
            *same(lambda i: f"status code {codes[i]} is not one of 0..{len(STATUS_NAMES) - 1}"),
        ),
        (
            "num_regions",
            (count < 0) | (count > K),
            *same(lambda i: f"num_regions {count[i]} outside [0, {K}]"),
        ),
    ]
    finite = {name: np.isfinite(values) for name, values in flat.items()}  # (B, size) each
    for name in RECORD_ARRAYS:
        rules.append(
            (f"nan {name}", ~finite[name].all(axis=1), *same(lambda i, d=name: f"{d} contains NaN or inf"))
        )
    for name in TOKEN_DATASETS:
        peak = np.abs(np.where(finite[name], flat[name], 0)).max(axis=1, initial=0.0)  # (B,)
        rules.append(
            (
                f"overflow {name}",
                peak > FP16_MAX,
                *same(
                    lambda i, d=name, peak=peak: (
                        f"{d} has |value| {peak[i]:g} > {FP16_MAX:g}, which overflows float16; "
                        "normalise the features before caching"
                    )
                ),
            )
        )
    for name in REGION_DATASETS:
        set_rows = block[name].reshape(B, K, int(np.prod(block[name].shape[2:]))).any(axis=2)  # (B, K)
        rules.append(
            (
                f"padding {name}",
                (set_rows & padding).any(axis=1),
                lambda i, d=name: f"{d} rows >= num_regions ({count[i]}) must be zero padding",
                lambda i, d=name: f"{d} rows >= num_regions ({count[i]}) are not zero",
            )
        )
    outside = ((boxes < 0) | (boxes > 1)).any(axis=2) & ~padding  # (B, K)
    inverted = ((boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])) & ~padding  # (B, K)
    rules += [
        (
            "boxes",
            outside.any(axis=1),
            lambda i: "region_boxes must lie in [0, 1] (normalised by image width/height)",
            lambda i: "region_boxes outside [0, 1]",
        ),
        (
            "boxes",
            inverted.any(axis=1),
            lambda i: "region_boxes must be xyxy with x2 >= x1 and y2 >= y1",
            lambda i: "region_boxes with x2 < x1 or y2 < y1",
        ),
        (
            "ok size",
            ~not_ok & ((width < 1) | (height < 1)),
            *same(lambda i: f"status ok needs width and height >= 1, got {width[i]}x{height[i]}"),
        ),
        (
            "not ok tokens",
            not_ok & np.any([flat[name].any(axis=1) for name in TOKEN_DATASETS], axis=0),
            not_empty,
            lambda i: "status is not ok but its tokens are not zero",
        ),
        (
            "not ok size",
            not_ok & ((width != 0) | (height != 0) | (count != 0)),
            not_empty,
            lambda i: "status is not ok but its size or num_regions is not zero",
        ),
    ]
    return [
        RowProblem(check, np.flatnonzero(bad), rule, found) for check, bad, rule, found in rules if bad.any()
    ]


def completed_shard(path, fingerprint: str) -> bool:
    """True only if `path` exists, opens, is marked complete and carries `fingerprint`.

    Extraction calls this to skip shards already written by an earlier (interrupted) run.
    """
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open_shard(path) as f:
            return (
                bool(f.attrs.get("complete", False))
                and f.attrs.get("fingerprint") == fingerprint
                and int(f.attrs.get("schema_version", -1)) == SCHEMA_VERSION
            )
    except OSError:
        return False


def image_stat(path) -> list[int] | None:
    """[size, mtime_ns] of an image file as extraction found it; None when nothing is there.

    Recorded per image (shard attribute `image_stats_json`, manifest `file_size` / `file_mtime_ns`)
    so a re-run re-extracts the shards whose images changed and `cache verify --images` reports them.
    `path` None (a post given no image) has nothing there.
    """
    if path is None:
        return None
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return [st.st_size, st.st_mtime_ns]


def image_change(before: list | None, now: list | None) -> str:
    """How an image file differs from its record: "appeared", "gone", "size 10 -> 12" or "modified"
    (same size, other mtime); "" when it does not."""
    if before == now:
        return ""
    if before is None:
        return "appeared"
    if now is None:
        return "gone"
    return f"size {before[0]} -> {now[0]}" if before[0] != now[0] else "modified"


def shard_state(path, fingerprint: str, keys: list[str], spec: TokenSpec) -> tuple[str, list | None]:
    """Whether a shard file may be reused as shard `keys` of this configuration.

    Returns ("", the image stats it records, or None for a shard written before they were) for a
    readable shard marked complete with `fingerprint`, this schema, exactly `keys` in order and the
    spec's dataset shapes; otherwise (why not, None), worded to follow "shard-00000.h5 ...".
    """
    path = Path(path)
    try:
        with open_shard(path) as f:
            attrs = f.attrs
            if not bool(attrs.get("complete", False)):
                return "was never marked complete", None
            if (
                attrs.get("fingerprint") != fingerprint
                or int(attrs.get("schema_version", -1)) != SCHEMA_VERSION
            ):
                return "was made with another configuration", None
            found = [key.decode("utf-8", errors="replace") for key in f["keys"][:]] if "keys" in f else []
            if found != list(keys):
                if not found:
                    return f"holds no image keys (it should hold {len(keys)})", None
                return f"holds the image keys {_some(found)}, not {_some(keys)}", None
            for name, shape in spec.shapes().items():
                if name not in f or f[name].shape != (len(keys), *shape):
                    return f"has no dataset {name} of shape {(len(keys), *shape)}", None
            stats = attrs.get(IMAGE_STATS_ATTR)
            return "", None if stats is None else json.loads(stats)
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as err:
        return f"cannot be read by HDF5 ({type(err).__name__}: {err})", None


def _some(keys, shown: int = 3) -> str:
    """ "['a', 'b', 'c', ... 5 in all]": whole keys, never one cut short."""
    keys = list(keys)
    more = f", ... {len(keys)} in all" if len(keys) > shown else ""
    return "[" + ", ".join(repr(key) for key in keys[:shown]) + more + "]"


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
    text = json.dumps(data, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False, default=_plain)
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
