"""The HDF5 shard files: their names, the atomic shard writer, and whether a shard on disk is
complete and may be reused.

This is the only module that writes the shard layout (see the "Cache" section of docs/design.md).
A shard holds N images at fixed, padded shapes; the three token tensors are stored one image per
chunk so a reader fetches one image with one chunk read. A shard is written to `<name>.tmp` and
renamed only once every row is written, so a file named `shard-*.h5` is always complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import h5py
import numpy as np

from mner.cache.fingerprint import canonical_json
from mner.cache.rows import checked_arrays
from mner.cache.spec import DTYPES, SCHEMA_VERSION, STATUS_CODES, TOKEN_DATASETS, Record, TokenSpec
from mner.runtime import fsync_dir, fsync_file

SHARD_GLOB = "shard-*.h5"
# Shard attribute: JSON list, per row, of the image file's [size, mtime_ns] when it was read (or null).
IMAGE_STATS_ATTR = "image_stats_json"
# Attributes the caller passes to ShardWriter; the writer adds schema_version, spec_json, complete.
REQUIRED_ATTRS = ("fingerprint", "config_json", "shard_index")


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
                value = canonical_json(value)
            self._file.attrs[name] = value
        self._file.attrs["schema_version"] = SCHEMA_VERSION
        self._file.attrs["spec_json"] = canonical_json(self.spec.to_dict())
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
        arrays = checked_arrays(record, self.spec)
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
