"""Check a cache folder against its manifest, its own invariants and (optionally) the data files.

verify_cache reads every byte once: file checksums, then the shards in blocks of rows. Problems
are collected, not raised, so one run lists everything that is wrong; each message names the
shard file and, where there is one, the row and image key.
"""

from __future__ import annotations

import fnmatch
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from mner.cache.checksums import file_sha256
from mner.cache.classification import (
    ClassDataConfig,
    ClassImages,
    classification_images,
    is_classification_folder,
)
from mner.cache.datasets import SPLITS, DataConfig, DataSource, recorded_data
from mner.cache.manifest import read_manifest
from mner.cache.rows import row_problems
from mner.cache.shards import SHARD_GLOB, image_change, image_stat, open_shard
from mner.cache.spec import DTYPES, RECORD_ARRAYS, SCHEMA_VERSION, STATUS_NAMES, TokenSpec

# Rows read at once when scanning token tensors (bounded memory for B/32-size shards).
_BLOCK_ROWS = 256
# Messages kept per (file, check); the rest are counted in one summary line.
_MAX_PER_CHECK = 20


@dataclass
class VerifyReport:
    ok: bool  # True when no problem was found
    problems: list[str] = field(default_factory=list)  # one readable line per problem
    checked: dict = field(default_factory=dict)  # what was looked at: counts of shards, rows, bytes, keys
    count: int = 0  # problems found, including those summarised as "... and N more"


class _Problems:
    """Collects messages, keeping at most _MAX_PER_CHECK per (file, check) so a shard full of NaN
    gives a readable report, not one line per row."""

    def __init__(self):
        self.lines: list[str] = []
        self.dropped: dict[tuple[str, str], int] = defaultdict(int)
        self.kept: dict[tuple[str, str], int] = defaultdict(int)

    def add(self, where: str, check: str, message: str) -> None:
        if self.kept[where, check] < _MAX_PER_CHECK:
            self.kept[where, check] += 1
            self.lines.append(message)
        else:
            self.dropped[where, check] += 1

    def total(self) -> int:
        return len(self.lines) + sum(self.dropped.values())

    def finish(self) -> list[str]:
        extra = [
            f"{where}: ... and {n} more '{check}' problems" for (where, check), n in self.dropped.items()
        ]
        return self.lines + extra


def verify_cache(cache_dir, data: DataSource | None = None, images: bool = False) -> VerifyReport:
    """Check a cache folder; returns a VerifyReport (raises ValueError only if it is not a cache).

    Checks: every manifest shard exists and matches its sha256; no stray or .tmp shard; shard
    attributes, dataset shapes/dtypes, row counts, keys and per-image status/size/counts agree with
    the manifest; and every row keeps the rules ShardWriter enforces (`row_problems`): status codes
    valid; num_regions in [0, K]; region padding zero; no NaN/inf; boxes in [0, 1] with x2 >= x1,
    y2 >= y1; ok images have a size; non-ok images have zero size, regions and tokens. With `data`,
    every image key of each split file present (train/valid/test) is in the cache and every cache
    key is in a split. With `images`, every image file's size and mtime (data's, else the recorded
    data folder's) must equal what the manifest recorded at extraction; each one that changed,
    appeared or went away is a problem naming the image and its shard.
    """
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    spec = TokenSpec.from_dict(manifest["spec"])
    problems = _Problems()
    checked = {"shards": 0, "rows": 0, "images": len(manifest["images"]), "bytes_hashed": 0}

    listed = [shard["file"] for shard in manifest["shards"]]
    for path in sorted(cache_dir.iterdir()):
        if path.name.endswith(".tmp"):
            problems.add(
                path.name,
                "tmp",
                f"{path.name}: leftover temporary file of an interrupted extraction; delete it",
            )
        elif fnmatch.fnmatch(path.name, SHARD_GLOB) and path.name not in listed:
            problems.add(path.name, "stray", f"{path.name}: stray shard, not listed in manifest.json")

    images_by_shard: dict[str, list[dict]] = defaultdict(list)
    seen: set[str] = set()
    for image in manifest["images"]:
        where = image["shard"]
        if image["key"] in seen:
            problems.add(where, "duplicate", f"manifest.json: image key {image['key']!r} is listed twice")
        seen.add(image["key"])
        if where not in listed:
            problems.add(
                where, "unknown shard", f"manifest.json: image {image['key']!r} names unlisted shard {where}"
            )
        images_by_shard[where].append(image)

    for shard in manifest["shards"]:
        name, path = shard["file"], cache_dir / shard["file"]
        if not path.is_file():
            problems.add(name, "missing", f"{name}: shard listed in manifest.json is missing")
            continue
        checked["shards"] += 1
        checked["bytes_hashed"] += path.stat().st_size
        if file_sha256(path) != shard["sha256"]:
            problems.add(
                name, "sha256", f"{name}: sha256 differs from manifest.json (the file changed or is corrupt)"
            )
        try:
            with open_shard(path) as f:
                checked["rows"] += _check_shard(
                    f, name, shard["rows"], images_by_shard[name], manifest, spec, problems
                )
        except (OSError, KeyError, ValueError, RuntimeError, TypeError) as err:
            # Flipped bytes can break HDF5 structures in many ways; each surfaces as one of these.
            problems.add(name, "unreadable", f"{name}: cannot be read by HDF5 ({type(err).__name__}: {err})")

    if data is None:  # the data folder the cache was extracted from, when it is still there
        data = _recorded(manifest["config"])
    if isinstance(data, ClassImages):
        checked.update(_check_guids(data, images_by_shard, problems))
    elif data is not None:
        checked.update(_check_data(data, images_by_shard, problems))
    else:
        checked["data"] = "data folder not given and the recorded one is gone: image ids not checked"
    if images:
        if data is None:
            problems.add(
                "images",
                "data",
                "cannot check the image files: the recorded data folder is gone; give --data-dir",
            )
        else:
            checked["image_files"] = _check_images(data, manifest["images"], problems)

    lines = problems.finish()
    return VerifyReport(ok=not lines, problems=lines, checked=checked, count=problems.total())


def _check_shard(
    f, name: str, rows: int, images: list[dict], manifest: dict, spec: TokenSpec, problems: _Problems
) -> int:
    """Check one open shard; returns the rows it holds."""
    attrs = f.attrs
    if not bool(attrs.get("complete", False)):
        problems.add(name, "attrs", f"{name}: attribute complete is not True (shard was never committed)")
    if attrs.get("fingerprint") != manifest["fingerprint"]:
        problems.add(
            name, "attrs", f"{name}: fingerprint {attrs.get('fingerprint')} differs from manifest.json"
        )
    if attrs.get("schema_version") != SCHEMA_VERSION:
        problems.add(
            name, "attrs", f"{name}: schema_version {attrs.get('schema_version')} is not {SCHEMA_VERSION}"
        )

    n = f["keys"].shape[0] if "keys" in f else 0
    layout_ok = True
    for dataset, shape in spec.shapes().items():
        if dataset not in f:
            problems.add(name, "layout", f"{name}: dataset {dataset} is missing")
            layout_ok = False
            continue
        found = f[dataset]
        dtype_ok = found.dtype.kind == "S" if dataset == "keys" else found.dtype == DTYPES[dataset]
        if found.shape != (n, *shape) or not dtype_ok:
            problems.add(
                name,
                "layout",
                f"{name}: dataset {dataset} is {found.shape} {found.dtype}, expected {(n, *shape)} "
                f"{'bytes' if dataset == 'keys' else DTYPES[dataset]}",
            )
            layout_ok = False
    if n != rows or len(images) != rows:
        problems.add(
            name,
            "rows",
            f"{name}: holds {n} rows; manifest.json says {rows} rows and lists {len(images)} images",
        )
    if not layout_ok:
        return n

    keys = [key.decode("utf-8", errors="replace") for key in f["keys"][:]]
    status = f["status"][:]
    sizes = f["image_size"][:]  # (N, 2) width, height
    counts = f["num_regions"][:]
    for image in images:
        row = image["row"]
        if not 0 <= row < n:
            problems.add(
                name,
                "rows",
                f"{name}: manifest.json puts {image['key']!r} at row {row}, the shard has {n} rows",
            )
            continue
        where = f"{name} row {row} (key {keys[row]!r})"
        if keys[row] != image["key"]:
            problems.add(name, "manifest", f"{where}: manifest.json says key {image['key']!r}")
            continue
        on_disk = {
            "status": STATUS_NAMES[status[row]] if status[row] < len(STATUS_NAMES) else int(status[row]),
            "width": int(sizes[row, 0]),
            "height": int(sizes[row, 1]),
            "num_regions": int(counts[row]),
        }
        for what, value in on_disk.items():
            if image.get(what) != value:
                problems.add(
                    name, "manifest", f"{where}: {what} is {value!r}, manifest.json says {image.get(what)!r}"
                )

    for start in range(0, n, _BLOCK_ROWS):
        block = slice(start, min(n, start + _BLOCK_ROWS))
        _check_block(f, name, keys, status, sizes, counts, block, spec, problems)
    return n


def _check_block(
    f, name, keys, status, sizes, counts, rows: slice, spec: TokenSpec, problems: _Problems
) -> None:
    """Content checks on rows [rows.start, rows.stop) of one shard: ShardWriter's rules, over the block."""
    block = {dataset: f[dataset][rows] for dataset in RECORD_ARRAYS}  # each (B, ...)
    block.update(status=status[rows], image_size=sizes[rows], num_regions=counts[rows])
    for problem in row_problems(block, spec):
        for i in problem.rows:
            row = rows.start + int(i)
            problems.add(name, problem.check, f"{name} row {row} (key {keys[row]!r}): {problem.found(i)}")


def data_for_verify(data_dir) -> DataSource | ClassImages:
    """What `verify_cache` checks a cache against: a classification folder's guids (cache.classification),
    else the NER data folder's splits."""
    if is_classification_folder(data_dir):
        return classification_images(ClassDataConfig(str(data_dir)))
    return DataConfig(data_dir=str(data_dir)).resolve()


def _recorded(config: dict) -> DataSource | ClassImages | None:
    """The recorded data folder (a classification one included), None when it is gone or unreadable."""
    data_dir = config.get("data_dir")
    if data_dir and is_classification_folder(data_dir):
        try:
            return data_for_verify(data_dir)
        except ValueError:
            return None
    return recorded_data(config)


def _locations(images_by_shard: dict[str, list[dict]]) -> dict[str, str]:
    """cache key -> "<shard> row <row>"."""
    return {
        image["key"]: f"{shard} row {image['row']}"
        for shard, images in images_by_shard.items()
        for image in images
    }


def _report_not_in_data(location: dict[str, str], in_data: set[str], data_dir, problems: _Problems) -> None:
    """A problem for every cache key that no split of the data folder holds."""
    for key in sorted(set(location) - in_data):
        where = location[key]
        problems.add(where.split()[0], "not in data", f"{where} (key {key!r}): in no split of {data_dir}")


def _check_guids(data: ClassImages, images_by_shard: dict[str, list[dict]], problems: _Problems) -> dict:
    """Every guid of the classification folder in the cache, every cache key a guid."""
    location = _locations(images_by_shard)
    for key in data.keys():
        if key not in location:
            problems.add("data", "not cached", f"{data.data_dir}: guid {key!r} is not in the cache")
    _report_not_in_data(location, set(data.paths), data.data_dir, problems)
    return {"data_keys": len(data.paths)}


def _check_data(data: DataSource, images_by_shard: dict[str, list[dict]], problems: _Problems) -> dict:
    """Every split key in the cache, every cache key in some split; returns counts for `checked`."""
    location = _locations(images_by_shard)
    in_splits: set[str] = set()
    counted = {}
    for split in SPLITS:
        path = data.split_path(split)
        if not path.is_file():
            continue
        try:
            posts = data.read(split, require_tags=False).posts
        except ValueError as err:
            problems.add(path.name, "read", f"{path.name}: cannot be read ({err})")
            continue
        counted[split] = len(posts)
        for post in posts:
            in_splits.add(post.key)
            if post.key not in location:
                problems.add(
                    path.name, "not cached", f"{path}:{post.line}: image key {post.key!r} is not in the cache"
                )
    if not counted:
        problems.add(
            str(data.data_dir),
            "splits",
            f"{data.data_dir}: no readable {'/'.join(SPLITS)}.txt to check against",
        )
        return {"splits": counted}
    _report_not_in_data(location, in_splits, data.data_dir, problems)
    return {"splits": counted, "data_keys": len(in_splits)}


def _check_images(data: DataSource, images: list[dict], problems: _Problems) -> int:
    """Each image file's [size, mtime_ns] against the manifest's record; returns the images checked."""
    unrecorded = [image["key"] for image in images if "file_size" not in image]
    if unrecorded:
        problems.add(
            "images",
            "unrecorded",
            f"manifest.json records no file size or mtime for {len(unrecorded)} image(s) (made by an "
            "older mner); run `mner extract-features ... --overwrite` to record them",
        )
    for image in images:
        if "file_size" not in image:
            continue
        key = image["key"]
        try:
            path = data.image_path(key)
        except ValueError as err:
            problems.add("images", "changed", f"image {key!r}: {err}")
            continue
        size, mtime = image.get("file_size"), image.get("file_mtime_ns")
        change = image_change(None if size is None else [size, mtime], image_stat(path))
        if change:
            problems.add(
                "images",
                "changed",
                f"{path}: image {key!r} changed since extraction ({change}; {image['shard']} row "
                f"{image['row']}); re-run `mner extract-features` to extract its shard again",
            )
    return len(images) - len(unrecorded)


# EXIF orientations that turn the picture by 90 degrees: extraction (ImageOps.exif_transpose) records
# the turned size, a file header gives the stored one.
_TURNED = (5, 6, 7, 8)
_ORIENTATION_TAG = 0x0112


def image_size_mismatches(cache_dir, paths: dict[str, Path | None]) -> list[str]:
    """The keys whose image file no longer has the size the cache recorded for it, read cheaply.

    Args:
        cache_dir: the cache whose manifest records each ok image's (width, height).
        paths: key -> its image file now (None: no image); keys the cache holds as not ok, or whose
            file is absent, are not compared.
    Returns:
        the differing keys, in `paths` order. Each file is opened by PIL for its header only (nothing
        is decoded) and its EXIF orientation applied as extraction applied it, so this costs little
        more than a stat: the check a run makes that its images are still the ones the tokens came
        from (images moved between posts bring their own sizes). A file PIL cannot open at all
        counts as differing.
    """
    from PIL import Image

    recorded = {
        image["key"]: (image.get("width"), image.get("height"))
        for image in read_manifest(Path(cache_dir))["images"]
        if image["status"] == "ok"
    }
    differing = []
    for key, path in paths.items():
        if key not in recorded or path is None or not Path(path).is_file():
            continue
        try:
            with Image.open(path) as opened:
                width, height = opened.size
                if opened.getexif().get(_ORIENTATION_TAG) in _TURNED:
                    width, height = height, width
        except Exception:  # noqa: BLE001 - image plugins raise anything; an unreadable header differs
            differing.append(key)
            continue
        if (width, height) != recorded[key]:
            differing.append(key)
    return differing
