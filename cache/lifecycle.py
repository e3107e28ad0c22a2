"""An extraction's dealings with its cache folder: reuse or refuse what is there, clear it, and write
the shards on a background thread.

`extract_features` calls, in order: `check_existing` (is the cache in the folder this configuration's?),
`clear_cache` (with --overwrite), `shards_to_write` (which shards are still to do), then feeds the
records to a `ShardSink`. The folder layout itself is `cache/shards.py`'s.
"""

from __future__ import annotations

import json
import queue
import threading
from pathlib import Path

from mner.cache.shards import (
    CONFIG_NAME,
    MANIFEST_NAME,
    SHARD_GLOB,
    Record,
    ShardWriter,
    TokenSpec,
    completed_shard,
    fingerprint_diff,
    open_shard,
    read_manifest,
    shard_path,
    tmp_path,
)

# Batches the writer thread may hold before the model loop waits for it.
_WRITE_QUEUE_BATCHES = 8
# Differences a refusal names; the rest are counted.
_SHOWN_DIFFERENCES = 8
# A difference shows its two values only when their JSON fits in this many characters.
_SHOWN_CHARS = 60


def check_existing(out: Path, fingerprint: str, parts: dict, overwrite: bool) -> dict[str, str]:
    """Refuse a cache folder made with another configuration.

    Args:
        out: the cache folder (it need not exist yet).
        fingerprint: the fingerprint of `parts`, the configuration about to extract.
        parts: the fingerprint parts; a refusal names the leaves where the folder's recorded ones differ.
        overwrite: when True nothing is checked (the caller clears the folder).
    Returns the error messages of a matching earlier manifest ({key: message}), which a re-run that
    skips those images' shards would otherwise not know. Raises ValueError for a foreign cache.
    """
    if overwrite or not out.is_dir():
        return {}
    old_fp, old_config, manifest = None, None, {}
    if (out / MANIFEST_NAME).is_file():
        try:
            manifest = read_manifest(out)
            old_fp, old_config = manifest["fingerprint"], manifest["config"]
        except ValueError:
            old_fp = "unreadable manifest"
    if old_fp in (None, fingerprint):
        for path in sorted(out.glob(SHARD_GLOB)):
            # Shards are renamed into place only when complete, so a mismatch means another configuration.
            if not completed_shard(path, fingerprint):
                old_fp, old_config = _shard_fingerprint(path)
                break
    if old_fp is None or old_fp == fingerprint:
        return {image["key"]: image["error"] for image in manifest.get("images", []) if image.get("error")}
    differs = _differences((old_config or {}).get("fingerprint_parts"), parts)
    raise ValueError(
        f"cache at {out} was made with a different configuration (fingerprint {old_fp[:12]} != "
        f"{fingerprint[:12]}); use --overwrite to replace it" + (f"; differs: {differs}" if differs else "")
    )


def _shard_fingerprint(path: Path) -> tuple[str, dict | None]:
    """(fingerprint, config) a shard records, or a description of why it cannot be read."""
    try:
        with open_shard(path) as handle:
            return str(handle.attrs.get("fingerprint", "none")), json.loads(
                handle.attrs.get("config_json", "null")
            )
    except (OSError, ValueError):
        return f"unreadable shard {path.name}", None


def _differences(old: dict | None, new: dict) -> str:
    """ "topk 20 -> 10, models.clip.sha256.model.safetensors" for the leaves that differ."""
    if not isinstance(old, dict):
        return ""
    differences = fingerprint_diff(old, new)
    shown = []
    for name, values in list(differences.items())[:_SHOWN_DIFFERENCES]:
        before, after = (json.dumps(value) for value in values)
        short = len(before) + len(after) <= _SHOWN_CHARS
        shown.append(f"{name} {before} -> {after}" if short else name)
    more = len(differences) - _SHOWN_DIFFERENCES
    return ", ".join(shown) + (f" (+{more} more)" if more > 0 else "")


def clear_cache(out: Path) -> None:
    """Delete the cache files in `out` (shards, tmp shards, manifest, config); other files stay."""
    for pattern in (SHARD_GLOB, SHARD_GLOB + ".tmp", MANIFEST_NAME + "*", CONFIG_NAME + "*"):
        for path in out.glob(pattern):
            path.unlink()


def shards_to_write(out: Path, indices: list[int], fingerprint: str) -> list[int]:
    """The shards of `indices` not yet complete with `fingerprint`; deletes their leftover tmp files."""
    for index in indices:
        tmp_path(shard_path(out, index)).unlink(missing_ok=True)  # left by a killed run
    return [index for index in indices if not completed_shard(shard_path(out, index), fingerprint)]


class ShardSink:
    """Writes records on a background thread so HDF5 IO overlaps the next forward pass.

    Batches arrive shard by shard in row order; a shard is committed (renamed into place) as soon as its
    last row is written:

        sink = ShardSink(out, spec, {3: keys_of_shard_3}, {"fingerprint": fp, "config_json": config})
        try:
            for rows in batches:  # [(row, Record), ...] of shard 3, in row order
                sink.put(3, rows)
            sink.close()
        except BaseException:
            sink.abort()
            raise
    """

    def __init__(self, out: Path, spec: TokenSpec, shard_keys: dict[int, list[str]], attrs: dict):
        """
        Args:
            out: the cache folder.
            spec: the token spec of every record.
            shard_keys: {shard index: its image keys in row order} of the shards to write.
            attrs: ShardWriter attrs shared by the shards ("fingerprint", "config_json"); the sink
                adds each shard's "shard_index".
        """
        self.out, self.spec, self.shard_keys, self.attrs = out, spec, shard_keys, attrs
        self.queue: queue.Queue = queue.Queue(maxsize=_WRITE_QUEUE_BATCHES)
        self.error: BaseException | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="shard-writer", daemon=True)
        self.thread.start()

    def put(self, index: int, rows: list[tuple[int, Record]]) -> None:
        """Queue rows of shard `index`; re-raises an error the writer thread met earlier."""
        self._raise()
        self.queue.put((index, rows))

    def close(self) -> None:
        """Wait for every queued batch to be written; re-raises a writer error."""
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop without committing the shard in progress (its .tmp file is removed)."""
        self.stopping = True
        self.queue.put(None)
        self.thread.join()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error  # its own type: a ValueError from ShardWriter stays a ValueError

    def _run(self) -> None:
        writer, index, written = None, None, 0
        try:
            while (item := self.queue.get()) is not None and not self.stopping:
                if self.error is not None:
                    continue  # drain so the model loop never blocks on a full queue
                shard, rows = item
                if shard != index:
                    assert writer is None, f"shard {index} was left unfinished"
                    attrs = {**self.attrs, "shard_index": shard}
                    writer = ShardWriter(
                        shard_path(self.out, shard), self.spec, self.shard_keys[shard], attrs
                    )
                    index, written = shard, 0
                for row, record in rows:
                    writer.write(row, record)
                written += len(rows)
                if written == len(self.shard_keys[shard]):
                    writer.commit()
                    writer = None
        except BaseException as err:  # noqa: BLE001 - handed to the main thread by put()/close()
            self.error = err
            while self.queue.get() is not None:
                pass
        finally:
            if writer is not None:
                writer.abort()
