"""Shard checksums, remembered per file, so a shard's bytes are checked against the manifest before
use without reading the whole file on every open.

`CACHE_DIR/checksums.json` maps a shard name to the sha256 its bytes had when the file had a given
(size, mtime_ns, inode, ctime_ns). Any write to a file changes its mtime and ctime (and `touch` cannot
set ctime back), a copy gets another inode, so an entry whose stat still matches describes the bytes
on disk. The memo is only a cache: a missing, unreadable or unwritable memo (a read-only cache
folder) costs a full read, never a wrong answer, and a mismatch is always confirmed by a fresh read
before anything is refused. The manifest's sha256 stays the reference.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from mner.runtime import write_atomic

MEMO_NAME = "checksums.json"
# A hash is remembered only for a file whose mtime and ctime are at least this old when it is hashed:
# a write in the same timestamp tick as the hash would otherwise keep the file's stat and slip past
# the memo (git's "racily clean" entries; filesystem timestamps can be as coarse as 1-2 s).
_RACY_NS = 2_000_000_000
# Chunk size for hashing files: large enough to amortise Python overhead, small enough for RAM.
_HASH_BLOCK = 1 << 20


def file_sha256(path) -> str:
    """sha256 hex digest of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def file_stat(path) -> list[int]:
    """[size, mtime_ns, inode, ctime_ns] of a file: what the memo keys a checksum on."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns]


class ChecksumMemo:
    """sha256 of the files in one cache folder, read from and written to its checksums.json.

    memo = ChecksumMemo(cache_dir)
    digest = memo.sha256(cache_dir / "shard-00000.h5")  # a stat when remembered, else a full read
    """

    def __init__(self, cache_dir):
        self.cache_dir = Path(cache_dir)
        self.path = self.cache_dir / MEMO_NAME
        self._entries: dict | None = None  # loaded on first use
        self.hashed = 0  # files read in full by this memo (the benchmark and tests count them)

    def _load(self) -> dict:
        try:
            entries = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return entries if isinstance(entries, dict) else {}

    def sha256(self, path, fresh: bool = False) -> str:
        """The sha256 of `path` (a file in the cache folder); `fresh` always reads the file."""
        path = Path(path)
        if self._entries is None:
            self._entries = self._load()
        stat = file_stat(path)
        if not fresh:
            for reload in (False, True):  # another process may have hashed it since the memo was read
                if reload:
                    self._entries = {**self._entries, **self._load()}
                entry = self._entries.get(path.name)
                if isinstance(entry, dict) and entry.get("stat") == stat:
                    return str(entry.get("sha256"))
        digest = file_sha256(path)
        self.hashed += 1
        settled = time.time_ns() - max(stat[1], stat[3]) > _RACY_NS
        if settled and file_stat(path) == stat:  # unchanged while it was read
            self._remember(path.name, {"stat": stat, "sha256": digest})
        return digest

    def matches(self, path, expected: str) -> bool:
        """True when the bytes of `path` have the sha256 `expected`; a mismatch is read afresh."""
        return self.sha256(path) == expected or self.sha256(path, fresh=True) == expected

    def _remember(self, name: str, entry: dict) -> None:
        self._entries[name] = entry
        self._save()

    def _save(self) -> None:
        # Merge with what other processes (DataLoader workers, ranks) wrote meanwhile; last writer wins
        # per entry, and each entry is true for its stat whoever wrote it.
        merged = {**self._load(), **self._entries}
        try:
            write_atomic(self.path, json.dumps(merged, sort_keys=True) + "\n")
        except OSError:
            pass  # a read-only cache folder: the memo stays in this process only
        self._entries = merged
