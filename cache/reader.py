"""Random access to cached image tokens by image key; lazy, fork-safe and fast.

Speed comes from doing the per-image HDF5 work once: when a shard is first opened its small
per-image arrays (keys, status, sizes, region labels/scores/boxes, counts) are loaded into numpy,
and each token tensor is then fetched with one raw chunk read (`read_direct_chunk`, one image per
chunk, uncompressed), which skips h5py's selection machinery. A shard whose token chunks are
filtered or laid out otherwise (say, repacked with h5repack) is read by ordinary indexing instead.
See benchmarks/bench_cache.py for the numbers.

Integrity: every shard's sha256 is checked against manifest.json when a CacheReader is made, and
again on a later open if the file's stat changed meanwhile (cache/checksums.py remembers results
per file stat, so a check of an unchanged file costs a stat); a shard whose bytes differ is refused
with a ValueError naming it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from mner.cache.checksums import ChecksumMemo, file_stat
from mner.cache.manifest import read_manifest
from mner.cache.shards import open_shard_checked
from mner.cache.spec import STATUS_NAMES, VISION_STATE, Record, TokenSpec
from mner.cache.vision_blocks import read_vision_blocks

# Small per-image datasets loaded whole when a shard is opened.
_META_DATASETS = (
    "keys",
    "status",
    "image_size",
    "num_regions",
    "region_labels",
    "region_scores",
    "region_boxes",
)


class _Shard:
    """One shard's data in the process that opened it: metadata in numpy, tokens on disk or in RAM."""

    def __init__(
        self, path: Path, spec: TokenSpec, fingerprint: str, expected_keys: list[str], in_memory: bool
    ):
        if not path.is_file():
            raise ValueError(
                f"{path}: shard listed in manifest.json is missing; re-run `mner extract-features`"
            )
        self.file = open_shard_checked(path)
        try:
            found = self.file.attrs.get("fingerprint")
            if found != fingerprint:
                raise ValueError(
                    f"{path}: shard fingerprint {found} differs from the manifest's {fingerprint}; "
                    "the folder mixes two extractions, re-run `mner extract-features`"
                )
            meta = {name: self.file[name][:] for name in _META_DATASETS}
            keys = [key.decode("utf-8") for key in meta["keys"]]
            if keys != expected_keys:
                raise ValueError(
                    f"{path}: image keys differ from manifest.json; re-run `mner extract-features`"
                )
            self.keys = keys
            self.status = meta["status"]  # (N,) uint8
            self.image_size = meta["image_size"]  # (N, 2) width, height
            self.num_regions = meta["num_regions"]  # (N,)
            self.region_labels = meta["region_labels"]  # (N, K)
            self.region_scores = meta["region_scores"]  # (N, K)
            self.region_boxes = meta["region_boxes"]  # (N, K, 4)
            shapes = spec.shapes()
            if in_memory:
                self.tokens = {name: _RamTokens(self.file[name][:]) for name in spec.token_datasets()}
                self.file.close()
                self.file = None
            else:
                self.tokens = {
                    name: _DiskTokens(self.file[name], shapes[name]) for name in spec.token_datasets()
                }
        except BaseException:
            if self.file is not None:
                self.file.close()
            raise

    def record(self, row: int, error: str) -> Record:
        count = int(self.num_regions[row])
        return Record(
            key=self.keys[row],
            status=STATUS_NAMES[self.status[row]],
            width=int(self.image_size[row, 0]),
            height=int(self.image_size[row, 1]),
            num_regions=count,
            patch_tokens=self.tokens["patch_tokens"].read(row),
            global_embed=self.tokens["global_embed"].read(row),
            region_feats=self.tokens["region_feats"].read(row),
            region_labels=self.region_labels[row].copy(),
            region_scores=self.region_scores[row].copy(),
            region_boxes=self.region_boxes[row].copy(),
            error=error,
            vision_state=self.tokens[VISION_STATE].read(row) if VISION_STATE in self.tokens else None,
        )

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class _RamTokens:
    """Rows of a token tensor held in RAM; copies so callers cannot modify the cache."""

    def __init__(self, array: np.ndarray):
        self.array = array  # (N, ...) the whole dataset

    def read(self, row: int) -> np.ndarray:
        return self.array[row].copy()


class _DiskTokens:
    """Rows of a token dataset (N, *shape) on disk: one raw chunk read per row when possible."""

    def __init__(self, dset, shape: tuple[int, ...]):
        self.dset, self.dsid, self.dtype, self.shape = dset, dset.id, dset.dtype, shape
        self.offset = (0,) * len(shape)
        # Filtered (e.g. repacked with gzip) or not one image per chunk: HDF5 must decode, so index.
        self.raw = dset.chunks == (1, *shape) and dset.id.get_create_plist().get_nfilters() == 0

    def read(self, row: int) -> np.ndarray:
        if not self.raw:
            return self.dset[row]
        _, raw = self.dsid.read_direct_chunk((row, *self.offset))
        # bytes are immutable; the copy gives callers an ordinary writable array.
        return np.frombuffer(raw, dtype=self.dtype).reshape(self.shape).copy()


class CacheReader:
    """Read records from a cache folder by image key.

    __init__ checks each shard's sha256 against the manifest (ValueError naming a shard that differs)
    but opens no HDF5 file: each process (DataLoader workers included) opens the shards
    it needs on its first get(), and a reader used across os.fork() reopens them in the child.
    in_memory=True loads every shard into RAM once in __init__ (and closes the files).

    Attributes: fingerprint (str), config (dict, the extraction config), models (dict),
    spec (TokenSpec), keys (list[str], manifest order), cache_dir (Path), trainable_blocks (int: the K
    of --vision-trainable-blocks, 0 when the cache stores no vision state).
    """

    def __init__(self, cache_dir, in_memory: bool = False):
        self.cache_dir = Path(cache_dir)
        manifest = read_manifest(self.cache_dir)
        self.fingerprint: str = manifest["fingerprint"]
        self.config: dict = manifest["config"]
        self.models: dict = manifest["models"]
        self.spec = TokenSpec.from_dict(manifest["spec"])
        self._vision_blocks: dict | None = manifest.get("vision_blocks")
        self.trainable_blocks: int = (
            0 if self._vision_blocks is None else self._vision_blocks["config"]["blocks"]
        )
        self.in_memory = in_memory
        self._shard_files = [shard["file"] for shard in manifest["shards"]]
        self._shard_sha256 = [shard["sha256"] for shard in manifest["shards"]]
        # Each shard's bytes are checked against the manifest before its first use; the memo makes a
        # later open (another reader, a DataLoader worker) a stat instead of a full read.
        self._memo = ChecksumMemo(self.cache_dir)
        self._checked: dict[int, list[int]] = {}  # shard -> the file stat it was checked at
        number = {name: i for i, name in enumerate(self._shard_files)}
        self._shard_keys: list[list[str]] = [[] for _ in self._shard_files]
        self._index: dict[str, tuple[int, int]] = {}
        self._status: dict[str, str] = {}
        self._errors: dict[str, str] = {}
        for image in manifest["images"]:
            key = image["key"]
            if image["shard"] not in number:
                raise ValueError(
                    f"{self.cache_dir}/manifest.json: image {key!r} names unknown shard {image['shard']}"
                )
            shard = number[image["shard"]]
            if image["row"] != len(self._shard_keys[shard]):
                raise ValueError(
                    f"{self.cache_dir}/manifest.json: image {key!r} has row {image['row']} out of order"
                )
            self._shard_keys[shard].append(key)
            self._index[key] = (shard, image["row"])
            self._status[key] = image["status"]
            if image.get("error"):
                self._errors[key] = image["error"]
        self.keys: list[str] = [image["key"] for image in manifest["images"]]
        # Checked here, in the process that opens the cache, so a corrupt shard stops a run before its
        # first step, and DataLoader workers (which receive _checked) pay a stat per shard, not a read.
        for shard, name in enumerate(self._shard_files):
            if (self.cache_dir / name).is_file():  # a missing one is named when it is first needed
                self._check_sha256(shard, self.cache_dir / name)
        self._pid: int | None = None
        self._shards: list[_Shard | None] = [None] * len(self._shard_files)
        if in_memory:
            self._shards = [self._load(i) for i in range(len(self._shard_files))]

    def _load(self, shard: int) -> _Shard:
        path = self.cache_dir / self._shard_files[shard]
        if path.is_file():
            self._check_sha256(shard, path)
        return _Shard(path, self.spec, self.fingerprint, self._shard_keys[shard], self.in_memory)

    def _check_sha256(self, shard: int, path: Path) -> None:
        """Refuse a shard whose bytes are not those manifest.json records (ValueError naming it)."""
        stat = file_stat(path)
        if self._checked.get(shard) == stat:
            return
        if not self._memo.matches(path, self._shard_sha256[shard]):
            raise ValueError(
                f"{path}: sha256 differs from manifest.json (the shard changed or is corrupt); "
                f"run `mner cache verify {self.cache_dir}` to see what is wrong, then re-run the "
                "`mner extract-features` command that made the cache to extract that shard again"
            )
        self._checked[shard] = stat

    def vision_blocks_config(self) -> dict | None:
        """The vision blocks' module config the manifest records, without reading their weights; None
        for a cache that stores no vision state."""
        return None if self._vision_blocks is None else self._vision_blocks["config"]

    def vision_blocks(self) -> tuple[dict, dict]:
        """(config, arrays) of the vision blocks stage two runs on each record's `vision_state`: the
        module config the manifest records ({"kind": "clip" | "resnet", "blocks": K, ...}) and the
        weight file's arrays by name (numpy), its sha256 checked first. ValueError for a cache that
        stores no vision state, naming the option that makes one."""
        if self._vision_blocks is None:
            raise ValueError(
                f"cache {self.cache_dir} stores no vision state to train vision blocks on: it was extracted "
                "without --vision-trainable-blocks; extract it again with --vision-trainable-blocks K"
            )
        return self._vision_blocks["config"], read_vision_blocks(self.cache_dir, self._vision_blocks)

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, key) -> bool:
        return key in self._index

    def _locate(self, key: str) -> tuple[int, int]:
        try:
            return self._index[key]
        except (KeyError, TypeError):
            raise ValueError(f"image key {key!r} is not in the cache {self.cache_dir}") from None

    def status(self, key: str) -> str:
        """ "ok", "missing" or "corrupt" (from the manifest; opens no file)."""
        self._locate(key)
        return self._status[key]

    def get(self, key: str) -> Record:
        """The record of image `key`: patch_tokens (P, Dp), global_embed (Dg,), region_* (K, ...)."""
        shard, row = self._locate(key)
        if not self.in_memory and self._pid != os.getpid():
            # First call in this process, or we are a forked child holding the parent's handles:
            # never use an HDF5 handle across fork, open our own.
            self._shards = [None] * len(self._shard_files)
            self._pid = os.getpid()
        opened = self._shards[shard]
        if opened is None:
            opened = self._shards[shard] = self._load(shard)
        return opened.record(row, self._errors.get(key, ""))

    def close(self) -> None:
        """Close open shard files (a later get() reopens them)."""
        if not self.in_memory:
            for shard in self._shards:
                if shard is not None:
                    shard.close()
            self._shards = [None] * len(self._shard_files)

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()

    def __getstate__(self) -> dict:
        # HDF5 handles cannot be pickled; the receiving process opens its own on first get().
        state = self.__dict__.copy()
        if not self.in_memory:
            state["_shards"] = [None] * len(self._shard_files)
            state["_pid"] = None
        return state

    def __repr__(self) -> str:
        return f"CacheReader({str(self.cache_dir)!r}, images={len(self)}, in_memory={self.in_memory})"
