"""An extraction's dealings with its cache folder: claim it (never a folder that is not ours), lock it,
reuse or refuse what is there, clear it, decide which shards to write, and write them on a background
thread.

`extract_features` calls, in order: `check_folder` (is `--out` new, empty or a cache?), `lock_folder`
(one extraction per folder), `check_existing` (is the cache in the folder this configuration's?),
`clear_cache` (with --overwrite), `plan_shards` (which shards are still to do, and why a shard that is
there is done again), then feeds the records to a `ShardSink`. The folder layout itself is
`cache/shards.py`'s.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from mner.cache.checksums import MEMO_NAME, ChecksumMemo
from mner.cache.fingerprint import canonical_json, describe_fingerprint_difference
from mner.cache.manifest import CONFIG_NAME, MANIFEST_NAME, read_manifest
from mner.cache.shards import (
    IMAGE_STATS_ATTR,
    SHARD_GLOB,
    ShardWriter,
    completed_shard,
    image_change,
    open_shard,
    shard_path,
    shard_state,
    tmp_path,
)
from mner.cache.spec import Record, TokenSpec
from mner.runtime import LOCK_NAME, FolderLock, folder_state
from mner.runtime import lock_folder as runtime_lock_folder

log = logging.getLogger(__name__)

# Batches the writer thread may hold before the model loop waits for it.
_WRITE_QUEUE_BATCHES = 8
# Names (files, images) a message lists before it counts the rest.
_SHOWN_NAMES = 5
# Keys of the extraction record extract_features writes as extract_config.json (and nothing else does).
_CONFIG_KEYS = ("clip", "detector", "fingerprint_parts")


def _listed(names: list[str]) -> str:
    """ "a, b, c (+4 more)": whole names only, never a name cut short."""
    more = len(names) - _SHOWN_NAMES
    return ", ".join(names[:_SHOWN_NAMES]) + (f" (+{more} more)" if more > 0 else "")


def _short(fingerprint: str) -> str:
    """The first 12 hex digits of a fingerprint; any other text (a reason) whole."""
    return fingerprint[:12] if re.fullmatch("[0-9a-f]{64}", fingerprint) else fingerprint


def check_folder(out: Path) -> None:
    """Refuse an `--out` that is neither new, empty, nor a feature cache (mner.runtime.folder_state);
    reads only, changes nothing. The lock is not looked at here: `extract_features` takes it next on
    rank 0 and raises a refusal on every rank, so that no rank waits at a barrier for one that left."""
    folder_state(out, _why_not_a_cache, "feature cache", check_lock=False)


def _why_not_a_cache(out: Path) -> str:
    """ "" when the non-empty folder `out` is a feature cache, else why not (for folder_state).

    A cache is a folder holding shard files (a run killed before its manifest leaves only shards), our
    manifest.json, or our extract_config.json. A folder whose only sign is an extract_config.json that
    mner did not write is refused even with --overwrite, which would otherwise delete it.
    """
    entries = sorted(path for path in out.iterdir() if path.name != LOCK_NAME)
    if any(path.name.startswith("shard-") for path in entries) or _our_manifest(out / MANIFEST_NAME):
        return ""
    config = out / CONFIG_NAME
    problem = _foreign_config(config) if config.exists() else "missing"
    if problem == "":
        return ""
    if problem != "missing":
        return f"its {CONFIG_NAME} is not an mner extraction record: {problem}"
    shown = _listed([path.name + ("/" if path.is_dir() else "") for path in entries])
    return f"no {MANIFEST_NAME}, {CONFIG_NAME} or shard files; it holds {shown}"


def _foreign_config(path: Path) -> str:
    """Why `path` is not an extract_config.json extract_features wrote; "" when it is."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"unreadable: {type(err).__name__}"
    if not isinstance(config, dict):
        return f"a JSON {type(config).__name__}, not an object"
    missing = [key for key in _CONFIG_KEYS if key not in config]
    return f"no {', '.join(missing)}" if missing else ""


def _our_manifest(path: Path) -> bool:
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(manifest, dict) and "schema_version" in manifest and "shards" in manifest


def lock_folder(out: Path) -> FolderLock:
    """Take the folder's write lock for this extraction (ValueError at once if another command holds
    it, naming it and its pid); see mner.runtime.FolderLock."""
    return runtime_lock_folder(out, command="mner extract-features")


def check_existing(out: Path, fingerprint: str, parts: dict, overwrite: bool) -> dict[str, str]:
    """Refuse a cache folder made with another configuration.

    Args:
        out: the cache folder (it need not exist yet).
        fingerprint: the fingerprint of `parts`, the configuration about to extract.
        parts: the fingerprint parts; a refusal names the leaves where the folder's recorded ones differ.
        overwrite: when True nothing is checked (the caller clears the folder).
    Returns the error messages of a matching earlier manifest ({key: message}), which a re-run that
    skips those images' shards would otherwise not know. Raises ValueError for a foreign cache: a
    manifest, or a readable shard, recording another fingerprint. A damaged or missing manifest is
    no refusal: the shards' own attributes tell, and the run rebuilds the manifest from them.
    """
    if overwrite or not out.is_dir():
        return {}
    old_fp, old_config, manifest = None, None, {}
    if (out / MANIFEST_NAME).is_file():
        try:
            manifest = read_manifest(out)
            old_fp, old_config = manifest["fingerprint"], manifest["config"]
        except ValueError:
            pass  # damaged: the shards tell, and the run rebuilds it (manifest_problem says so)
    if old_fp in (None, fingerprint):
        # The folder is this configuration's when its manifest or one of its shards says so; a shard of
        # another configuration among them (copied in from another cache) is then extracted again by
        # plan_shards, alone. Only a folder with no sign of this configuration is a foreign cache.
        ours, foreign = old_fp == fingerprint, []
        for path in sorted(out.glob(SHARD_GLOB)):
            if completed_shard(path, fingerprint):
                ours = True
                continue
            found, config = _shard_fingerprint(path)
            if found is not None and found != fingerprint:
                foreign.append((path.name, found, config))
            # Unreadable, or never completed: plan_shards extracts it again.
        if foreign and not ours:
            old_fp, old_config = foreign[0][1], foreign[0][2]
        elif foreign:
            log.warning(
                "%s of %s hold(s) another configuration's tokens (fingerprint %s, not %s): extracted again; "
                "the cache's other shards are kept",
                _listed([name for name, _, _ in foreign]),
                out,
                ", ".join(sorted({_short(found) for _, found, _ in foreign})),
                _short(fingerprint),
            )
    if old_fp is None or old_fp == fingerprint:
        return {image["key"]: image["error"] for image in manifest.get("images", []) if image.get("error")}
    old_parts = (old_config or {}).get("fingerprint_parts")
    differs = describe_fingerprint_difference(old_parts, parts) if isinstance(old_parts, dict) else ""
    raise ValueError(
        f"cache at {out} was made with a different configuration (fingerprint {_short(old_fp)} != "
        f"{_short(fingerprint)}); use --overwrite to replace it"
        + (f"; differs: {differs}" if differs else "")
    )


def manifest_problem(out: Path) -> str:
    """Why a cache folder's manifest.json cannot be used ("missing", or read_manifest's reason) when
    the folder holds shards; "" when it can, or when there is nothing to rebuild it from."""
    if not any(out.glob(SHARD_GLOB)):
        return ""
    if not (out / MANIFEST_NAME).is_file():
        return "missing"
    try:
        read_manifest(out)
    except ValueError as err:
        return f"unusable ({err})"
    return ""


def _shard_fingerprint(path: Path) -> tuple[str | None, dict | None]:
    """(fingerprint, config) a shard records; (None, None) when HDF5 cannot read it."""
    try:
        with open_shard(path) as handle:
            return str(handle.attrs.get("fingerprint", "none")), json.loads(
                handle.attrs.get("config_json", "null")
            )
    except (OSError, ValueError, KeyError, RuntimeError, TypeError):
        return None, None


def clear_cache(out: Path) -> None:
    """Delete the cache files in `out` (shards, tmp shards, manifest, config, checksum memo); other
    files stay, and so does the lock file the caller holds."""
    for pattern in (SHARD_GLOB, SHARD_GLOB + ".tmp", MANIFEST_NAME + "*", CONFIG_NAME + "*", MEMO_NAME + "*"):
        for path in out.glob(pattern):
            path.unlink()


@dataclass
class ShardPlan:
    """Which shards an extraction writes, and why each one already on disk is written again."""

    todo: list[int]  # shard indices to extract, ascending
    redo: dict[int, str] = field(default_factory=dict)  # index -> "shard-00001.h5: <why>" (file was there)
    not_retried: int = 0  # missing/corrupt images in reused shards whose files did not change
    unknown_stats: int = 0  # reused shards written before image sizes/mtimes were recorded


def plan_shards(
    out: Path,
    shard_keys: dict[int, list[str]],
    fingerprint: str,
    spec: TokenSpec,
    stats: dict[str, list | None],
) -> ShardPlan:
    """Decide which of the shards `shard_keys` ({index: keys in row order}) must be (re-)extracted.

    Deletes the tmp files a killed run left. A shard on disk is reused only if it is complete, of this
    configuration, holds exactly its keys in the spec's layout (`shard_state`), its bytes match the
    sha256 manifest.json records for it (when the manifest is this configuration's and lists it), and
    every image's [size, mtime_ns] it recorded equals `stats` (the files now; None = no file): so a
    changed, appeared or vanished image, and a missing or corrupt image whose file was since fixed,
    gets its shard extracted again.
    """
    try:
        manifest = read_manifest(out)
        recorded = (
            {s["file"]: s["sha256"] for s in manifest["shards"]}
            if manifest["fingerprint"] == fingerprint
            else {}
        )
    except (ValueError, KeyError, TypeError):
        recorded = {}
    memo = ChecksumMemo(out)
    plan = ShardPlan(todo=[])
    for index, keys in sorted(shard_keys.items()):
        path = shard_path(out, index)
        tmp_path(path).unlink(missing_ok=True)  # left by a killed run
        if not path.exists():
            plan.todo.append(index)
            continue
        why, found = shard_state(path, fingerprint, keys, spec)
        if not why and path.name in recorded and not memo.matches(path, recorded[path.name]):
            why = "has a sha256 other than manifest.json records (the file changed or is corrupt)"
        if not why and found is not None:
            changed = [
                f"{key} ({image_change(before, stats.get(key))})"
                for key, before in zip(keys, found)
                if before != stats.get(key)
            ]
            if changed:
                why = f"holds {len(changed)} image(s) that changed on disk since: {_listed(changed)}"
        if why:
            plan.todo.append(index)
            plan.redo[index] = f"{path.name} {why}"
            continue
        if found is None:
            plan.unknown_stats += 1
        plan.not_retried += _not_ok_rows(path)
    return plan


def _not_ok_rows(path: Path) -> int:
    with open_shard(path) as f:
        return int((f["status"][:] != 0).sum())


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

    def __init__(
        self,
        out: Path,
        spec: TokenSpec,
        shard_keys: dict[int, list[str]],
        attrs: dict,
        image_stats: dict[str, list | None] | None = None,
    ):
        """
        Args:
            out: the cache folder.
            spec: the token spec of every record.
            shard_keys: {shard index: its image keys in row order} of the shards to write.
            attrs: ShardWriter attrs shared by the shards ("fingerprint", "config_json"); the sink
                adds each shard's "shard_index".
            image_stats: {key: [size, mtime_ns] or None} of the image files, taken before they were
                read; each shard records its rows' (attribute image_stats_json) for plan_shards.
        """
        self.out, self.spec, self.shard_keys, self.attrs = out, spec, shard_keys, attrs
        self.image_stats = image_stats
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
                    if self.image_stats is not None:
                        stats = [self.image_stats.get(key) for key in self.shard_keys[shard]]
                        attrs[IMAGE_STATS_ATTR] = canonical_json(stats)
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
            if isinstance(err, OSError) and err.filename is None and index is not None:
                # h5py's OSError (a full disk, a lost mount) names no file: name the shard being written
                err = OSError(
                    err.errno,
                    os.strerror(err.errno) if err.errno else str(err),
                    str(shard_path(self.out, index)),
                )
            self.error = err
            while self.queue.get() is not None:
                pass
        finally:
            if writer is not None:
                writer.abort()
