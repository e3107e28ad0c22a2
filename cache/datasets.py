"""Data folders: which data a stage reads (`DataConfig`, shared by both stages) and where it lies
(`DataSource`: the split files, their format, the image folder), and image paths that cannot escape
their folder. The text formats themselves are `cache/conll.py`'s.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from mner import configs

# The format's names both stages import from this module, beside the DataSource that reads them.
from mner.cache.conll import (  # noqa: F401
    FORMATS,
    DatasetError,
    Post,
    Split,
    check_format,
    label_names,
    parse_columns,
    read_split,
    tag_line,
    unsafe_key_reason,
    write_split,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")


@dataclass
class DataSource:
    name: str  # dataset name (config name, or the data folder's name)
    data_dir: Path  # folder holding train.txt / valid.txt / test.txt
    image_dir: Path  # folder the image keys are relative to (may not exist: every image is then missing)
    fmt: str  # "imgid" | "image-path"
    columns: tuple[int, int] | None = None  # (word, tag) columns of the token lines (see read_split)

    def __post_init__(self):
        check_format(self.fmt)
        self.data_dir = Path(self.data_dir)
        self.image_dir = Path(self.image_dir)

    def split_path(self, split: str) -> Path:
        """The text file of a split: data_dir / f"{split}.txt"."""
        return self.data_dir / f"{split}.txt"

    def read(self, split: str, require_tags: bool = True) -> Split:
        """Read a split of this source (see `read_split`)."""
        return read_split(
            self.split_path(split), self.fmt, name=split, require_tags=require_tags, columns=self.columns
        )

    def image_path(self, key: str) -> Path:
        """Where the image of a post lies: image_dir / f"{key}.jpg" (imgid) or image_dir / key (image-path).

        Raises ValueError naming the key if it could reach outside image_dir: a `..` component, an
        absolute path, a backslash, a NUL byte, or a symlink that resolves outside.
        """
        if self.fmt == "imgid":
            reason = unsafe_path_reason(self.image_dir, key, ".jpg")
        else:
            reason = unsafe_relative_path_reason(self.image_dir, key)
        if reason:
            raise ValueError(f"image key {key!r} refused: {reason}")
        return self.image_dir / (f"{key}.jpg" if self.fmt == "imgid" else key)


def unsafe_path_reason(folder: Path, key: str, suffix: str = "") -> str:
    """Why `folder / (key + suffix)` could name a file outside `folder`; "" when it cannot.

    The key's text is refused first (empty, a NUL byte, a backslash, an absolute path, a `..`
    component), then the path itself when it resolves outside `folder` through a symlink. The one
    safe-path rule for every file named by a key: NER image keys, classification guids.
    """
    reason = unsafe_key_reason(key)
    if reason:
        return reason
    if not (folder / f"{key}{suffix}").resolve().is_relative_to(Path(folder).resolve()):
        return f"it resolves outside {folder} through a symlink"
    return ""


def unsafe_relative_path_reason(folder: Path, path: str) -> str:
    """Why a data file's path relative to a data folder (an `IMAGE:` line, a classification csv's image
    cell) could name a file outside it; "" when it cannot.

    `unsafe_path_reason`'s rule, except that the path's first folder may be a symlink: an image folder
    kept on another disk is the data's layout (as MVSA's `data/` link is), not a post's path escaping.
    Beneath that folder nothing may resolve outside it.
    """
    reason = unsafe_key_reason(path)
    if reason:
        return reason
    parts = PurePosixPath(path).parts
    if len(parts) > 1 and (Path(folder) / parts[0]).is_dir():
        return unsafe_path_reason(Path(folder) / parts[0], str(PurePosixPath(*parts[1:])))
    return unsafe_path_reason(folder, path)


# DataConfig's fields, as artifacts record them: under "data" in a run's config.json, at the top level
# of a cache manifest's config.
_PATH_FIELDS = ("data_dir", "dataset", "data_root", "image_dir")
DATA_FIELDS = (*_PATH_FIELDS, "columns")


@dataclass(frozen=True)
class DataConfig:
    """Which data a stage reads: a data folder, or a named dataset under a root folder; and the images.

    Shared by extraction (`ExtractConfig.data`), training (`RunConfig.data`) and ablations. Paths are
    kept as given; `absolute()` makes them independent of the working folder.
    """

    data_dir: str | None = None  # folder with train.txt / valid.txt / test.txt (the format is sniffed)
    dataset: str | None = None  # a name with configs/datasets/<name>.toml; goes with data_root
    data_root: str | None = None  # folder holding the named dataset's sub-folder
    image_dir: str | None = None  # image folder when it is not found next to the data (optional)
    # (word column, tag column) of token lines with more than two fields; "0,3" or [0, 3] are read
    # as (0, 3). None: exactly `token<TAB>tag` (or the dataset config's `columns`)
    columns: tuple[int, int] | None = None

    def __post_init__(self):
        object.__setattr__(self, "columns", parse_columns(self.columns))
        for name in _PATH_FIELDS:
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                object.__setattr__(self, name, os.fspath(value))
            elif value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a path or None, got {value!r}")
        if self.data_dir is not None and self.dataset is not None:
            raise ValueError("give either data_dir or dataset (with data_root), not both")
        if self.data_dir is None and self.dataset is None:
            raise ValueError("give data_dir, or dataset with data_root")
        if self.data_dir is not None and self.data_root is not None:
            raise ValueError("data_root goes with dataset; with data_dir, leave it out")

    @classmethod
    def from_dict(cls, data: dict, source: str = "dict") -> DataConfig:
        """Build from a dict of some or all fields (a run's recorded "data"); ValueError for other keys."""
        unknown = sorted(set(data) - set(DATA_FIELDS))
        if unknown:
            raise ValueError(f"{source}: unknown data keys {unknown}; known keys: {', '.join(DATA_FIELDS)}")
        return cls(**data)

    def to_dict(self) -> dict:
        """Every field, None included, in field order."""
        return dataclasses.asdict(self)

    def absolute(self) -> DataConfig:
        """The same config with its paths expanded (~) and absolute, for an artifact read from elsewhere."""
        paths = {
            name: str(Path(getattr(self, name)).expanduser().absolute())
            for name in ("data_dir", "data_root", "image_dir")
            if getattr(self, name)
        }
        return dataclasses.replace(self, **paths)

    def resolve(self) -> DataSource:
        """Find the dataset's folder, format and image folder.

        `data_dir` is a folder with train.txt, valid.txt, test.txt (the format is read from the first
        post line); `dataset` names a configs/datasets/<name>.toml whose `subdir` lies in `data_root`.
        The image folder is `image_dir` if given, else the first that exists of: the dataset config's
        image_dir, `<data>/images`, `<data>/<data name>_images` and, for the imgid layout, the sibling
        `<data>/../<data name>_images`. When none exists the first is returned anyway and every image
        will be recorded as missing.

        Raises ValueError for an unknown dataset, a dataset without data_root, or a missing data folder.
        """
        if self.dataset is not None:
            cfg = _dataset_config(self.dataset)
            if self.data_root is None:
                raise ValueError(
                    f"dataset {self.dataset!r} needs data_root: the folder that holds {cfg['subdir']}/"
                )
            folder = Path(self.data_root).expanduser() / cfg["subdir"]
            name, fmt, configured = self.dataset, cfg["format"], [folder / cfg["image_dir"]]
            columns = self.columns or cfg["columns"]
        else:
            folder = Path(self.data_dir).expanduser()
            name, fmt, configured, columns = folder.name, None, [], self.columns
        if not folder.is_dir():
            raise ValueError(f"data folder {folder} does not exist")
        fmt = fmt or _sniff_format(folder)

        if self.image_dir is not None:
            return DataSource(
                name=name,
                data_dir=folder,
                image_dir=Path(self.image_dir).expanduser(),
                fmt=fmt,
                columns=columns,
            )
        if fmt == "image-path":
            candidates = configured + [folder]
        else:
            candidates = configured + [
                folder / "images",
                folder / f"{folder.name}_images",
                folder.parent / f"{folder.name}_images",
            ]
        candidates = list(dict.fromkeys(candidates))  # the config's folder may also be a default one
        found = next((c for c in candidates if c.is_dir()), None)
        if found is None:
            found = candidates[0]
            looked = ", ".join(str(c) for c in candidates)
            # Only extraction needs the images (it warns); text-only training and evaluation do not.
            log.debug("no image folder for %s (looked in %s)", folder, looked)
        return DataSource(name=name, data_dir=folder, image_dir=found, fmt=fmt, columns=columns)


def resolve_data(
    data_dir: str | Path | None = None,
    dataset: str | None = None,
    data_root: str | Path | None = None,
    image_dir: str | Path | None = None,
    columns: str | tuple[int, int] | None = None,
) -> DataSource:
    """`DataConfig(data_dir, dataset, data_root, image_dir, columns).resolve()`: see `DataConfig.resolve`."""
    return DataConfig(
        data_dir=data_dir, dataset=dataset, data_root=data_root, image_dir=image_dir, columns=columns
    ).resolve()


def recorded_data(config: dict) -> DataSource | None:
    """The data folder an artifact's config recorded (data_dir / dataset / data_root / image_dir at its
    top level), or None when it can no longer be resolved (moved, deleted): callers then skip what needs it."""
    try:
        return DataConfig(**{name: config.get(name) for name in DATA_FIELDS}).resolve()
    except ValueError:
        return None


def _sniff_format(folder: Path) -> str:
    """'image-path' when the first post line of the first split file found is `IMAGE:`, else 'imgid'."""
    for split in SPLITS:
        file = folder / f"{split}.txt"
        if file.is_file():
            with file.open("rb") as f:
                for raw in f:
                    line = raw.removeprefix(b"\xef\xbb\xbf").strip()
                    if line:
                        return "image-path" if line.startswith(b"IMAGE:") else "imgid"
    return "imgid"


def _dataset_config(name: str) -> dict:
    """configs/datasets/<name>.toml, checked: {"format", "subdir", "image_dir"}."""
    if name not in configs.dataset_names():
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(configs.dataset_names())}")
    file = configs.path("datasets", f"{name}.toml")
    cfg = configs.load_toml(file)
    for key in ("format", "subdir", "image_dir"):
        if not isinstance(cfg.get(key), str):
            raise ValueError(f"{file}: '{key}' must be a string")
    if cfg["format"] not in FORMATS:
        raise ValueError(f"{file}: format {cfg['format']!r} is not one of {', '.join(FORMATS)}")
    try:
        cfg["columns"] = parse_columns(cfg.get("columns"))  # optional: (word, tag) columns
    except ValueError as err:
        raise ValueError(f"{file}: {err}") from None
    return cfg
