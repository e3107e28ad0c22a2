"""Dataset files: the reader and writer of IMGID-CoNLL (Twitter-2015/2017) and image-path CoNLL
(NewsMKG), the data-folder config every stage shares (`DataConfig`) and its resolution, and image paths
that cannot escape their folder.

`imgid` format (one post):

    IMGID:1015799
    George<TAB>B-PER
    Zimmerman<TAB>I-PER
    got<TAB>O
    <blank line>

`image-path` format: the same with `IMAGE:<path relative to the data folder>` as the first line.
Both tolerate CRLF, trailing whitespace, runs of blank lines, a UTF-8 BOM and a missing final blank
line. A token line is `token<TAB>tag`, or `token tag` (one run of spaces) in a file without tabs;
a line with more fields (`Camden Street B-OTHER`, or CoNLL-2003's four columns) is an error unless
`columns=(WORD, TAG)` (`--columns 0,3`) says which field holds the token and which the tag, because
guessing drops a word or takes a chunk tag for the entity tag. Tag types that differ only by case
(`B-per` beside `B-PER`) are an error. Everything else that is off is a `DatasetError` naming the
file and line, because a silently skipped post changes the scores. `write_split` writes the same format back, and refuses a post that
would not read back as itself (a tab or newline in a word, a word that looks like a header line, ...).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from mner import configs

log = logging.getLogger(__name__)

FORMATS = ("imgid", "image-path")
SPLITS = ("train", "valid", "test")
# The line that opens a post, per format.
_HEADERS = {"imgid": "IMGID:", "image-path": "IMAGE:"}
# What the header carries, per format, for messages.
_KEY_NAMES = {"imgid": "id", "image-path": "path"}
# BIO only: `B-`/`I-` followed by any type name (PER, LOC, ORG, OTHER, MISC, ...).
_TAG = re.compile(r"O|[BI]-\S+")


class DatasetError(ValueError):
    """A malformed dataset file; the message reads f"{path}:{line}: {what}"."""

    def __init__(self, path: Path, line: int, what: str):
        super().__init__(f"{path}:{line}: {what}")
        self.path = path
        self.line = line
        self.what = what

    def __reduce__(self):
        # The default rebuilds from self.args (the message alone), which would fail in a worker process.
        return type(self), (self.path, self.line, self.what)


@dataclass(frozen=True)
class Post:
    key: str  # image key: the IMGID (Twitter) or the relative image path (NewsMKG); cache key
    words: tuple[str, ...]  # the post's tokens, as in the file
    tags: tuple[str, ...]  # same length as words; all "O" when the file has no tags (predict input)
    line: int  # 1-based line of the post's IMGID/IMAGE line; 0 for a post not read from a file

    def tag_line(self, index: int) -> int:
        """The 1-based line of word `index`; 0 for a post not read from a file (see `tag_line`)."""
        return tag_line(self.line, index)


def tag_line(header_line: int, index: int) -> int:
    """The 1-based line of word `index` of the post whose header is at `header_line`: its token lines
    follow the header without a gap (a blank line ends a post). 0 when header_line is 0 (no file)."""
    return header_line + 1 + index if header_line else 0


@dataclass
class Split:
    name: str  # "train" | "valid" | "test" | file stem
    path: Path  # the file it was read from
    fmt: str  # "imgid" | "image-path"
    posts: list[Post]  # in file order
    orphan_i: int  # I- tags with no B-/I- of the same type before them (kept, counted)


def read_split(
    path: str | Path,
    fmt: str = "imgid",
    name: str | None = None,
    require_tags: bool = True,
    columns: tuple[int, int] | None = None,
) -> Split:
    """Read one split file.

    Args:
        path: the text file.
        fmt: "imgid" (`IMGID:<id>` lines) or "image-path" (`IMAGE:<relative path>` lines).
        name: split name; defaults to the file stem.
        require_tags: False for predict input, where a line may be a bare token (its tag becomes "O").
        columns: (word column, tag column), counted from 0, for files with more than two fields per
            token line (CoNLL-2003: (0, 3)); None reads exactly `token<TAB>tag` or `token tag`.
    Returns:
        Split with the posts in file order.
    Raises:
        ValueError if the file is missing or fmt unknown; DatasetError (a ValueError) naming the file
        and line for anything malformed.
    """
    _check_format(fmt)
    columns = parse_columns(columns)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: dataset file not found")
    lines = _decode_lines(path, path.read_bytes())
    if not any(line.strip() for line in lines):
        raise DatasetError(path, 1, "file is empty")

    header = _HEADERS[fmt]
    posts: list[Post] = []
    first_line: dict[str, int] = {}  # key -> line of its header, to name both lines of a duplicate
    types: dict[str, tuple[str, int]] = {}  # casefolded type -> (its spelling, line it first appears)
    draft: _Draft | None = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            if draft is not None:
                posts.append(draft.finish(path))
                draft = None
        elif line.startswith(header):
            if draft is not None:
                posts.append(draft.finish(path))
            key = line[len(header) :].strip()
            _check_key(path, number, fmt, key)
            if key in first_line:
                raise DatasetError(
                    path,
                    number,
                    f"duplicate image {_KEY_NAMES[fmt]} {key!r} (first at line {first_line[key]})",
                )
            first_line[key] = number
            draft = _Draft(key=key, line=number)
        elif draft is None:
            raise DatasetError(
                path, number, f"token line outside a post: expected a '{header}' line before it"
            )
        else:
            word, tag = _parse_token_line(path, number, line, require_tags, columns)
            if tag != "O":
                spelling, seen_at = types.setdefault(tag[2:].casefold(), (tag[2:], number))
                if spelling != tag[2:]:
                    raise DatasetError(
                        path,
                        number,
                        f"tag type {tag[2:]!r} differs only by case from {spelling!r} (first at line "
                        f"{seen_at}); they would be two entity types: spell them one way",
                    )
            draft.words.append(word)
            draft.tags.append(tag)
    if draft is not None:
        posts.append(draft.finish(path))

    orphan_i = sum(_count_orphan_i(post.tags) for post in posts)
    return Split(name=name or path.stem, path=path, fmt=fmt, posts=posts, orphan_i=orphan_i)


def write_split(
    path: str | Path, posts: Iterable[Post], fmt: str = "imgid", blank_after_last: bool = True
) -> Path:
    """Write posts in the format `read_split` reads: the header line, then `word<TAB>tag` lines.

    Args:
        path: the text file (UTF-8, "\\n" line ends).
        posts: their key, words and tags are written (`line` is not: the reader counts lines itself).
        fmt: "imgid" (`IMGID:<key>`) or "image-path" (`IMAGE:<key>`).
        blank_after_last: a blank line after every post (True), or only between posts (False).
    Returns:
        path as a Path.
    Raises:
        ValueError naming the post when it would not read back as itself: an unsafe or padded key, no
        words, words and tags of different lengths, a word that is empty, holds a tab or a newline or
        starts like a header line, a tag that is not BIO.
    """
    _check_format(fmt)
    header = _HEADERS[fmt]
    blocks = []
    for post in posts:
        _check_writable(post, fmt)
        rows = [f"{header}{post.key}"] + [f"{word}\t{tag}" for word, tag in zip(post.words, post.tags)]
        blocks.append("\n".join(rows) + "\n")
    path = Path(path)
    path.write_text(
        "\n".join(blocks) + ("\n" if blank_after_last and blocks else ""), encoding="utf-8", newline="\n"
    )
    return path


def label_names(split: Split) -> list[str]:
    """["O"], then "B-<type>", "I-<type>" for each type seen in the split's tags, types sorted."""
    types = sorted({tag[2:] for post in split.posts for tag in post.tags if tag != "O"})
    return ["O"] + [f"{prefix}-{t}" for t in types for prefix in ("B", "I")]


@dataclass
class DataSource:
    name: str  # dataset name (config name, or the data folder's name)
    data_dir: Path  # folder holding train.txt / valid.txt / test.txt
    image_dir: Path  # folder the image keys are relative to (may not exist: every image is then missing)
    fmt: str  # "imgid" | "image-path"
    columns: tuple[int, int] | None = None  # (word, tag) columns of the token lines (see read_split)

    def __post_init__(self):
        _check_format(self.fmt)
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
    reason = _unsafe_key_reason(key)
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
    reason = _unsafe_key_reason(path)
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


def parse_columns(value) -> tuple[int, int] | None:
    """(word column, tag column) from "W,T", [W, T] or (W, T); None stays None.

    Raises ValueError unless it names two different column numbers >= 0.
    """
    if value is None:
        return None
    parts = value.split(",") if isinstance(value, str) else value
    try:
        numbers = tuple(int(str(part).strip()) for part in parts) if not isinstance(parts, int) else ()
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != 2 or min(numbers) < 0 or numbers[0] == numbers[1]:
        raise ValueError(
            f"columns {value!r}: expected WORD,TAG: two different column numbers counted from 0, "
            "the token's and the tag's (e.g. 0,3 for CoNLL-2003's four columns)"
        )
    return numbers


def recorded_data(config: dict) -> DataSource | None:
    """The data folder an artifact's config recorded (data_dir / dataset / data_root / image_dir at its
    top level), or None when it can no longer be resolved (moved, deleted): callers then skip what needs it."""
    try:
        return DataConfig(**{name: config.get(name) for name in DATA_FIELDS}).resolve()
    except ValueError:
        return None


@dataclass
class _Draft:
    """A post while its token lines are being read."""

    key: str
    line: int
    words: list[str] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)

    def finish(self, path: Path) -> Post:
        if not self.words:
            raise DatasetError(path, self.line, f"post {self.key!r} has no tokens")
        return Post(key=self.key, words=tuple(self.words), tags=tuple(self.tags), line=self.line)


def _check_writable(post: Post, fmt: str) -> None:
    """Refuse what `read_split` would read back differently (or not at all)."""
    what = f"post {post.key!r}"
    reason = _unsafe_key_reason(post.key)
    if reason:
        raise ValueError(f"{what}: image {_KEY_NAMES[fmt]} refused: {reason}")
    if post.key != post.key.strip() or "\n" in post.key:
        raise ValueError(f"{what}: image {_KEY_NAMES[fmt]} has surrounding whitespace or a newline")
    if not post.words:
        raise ValueError(f"{what} has no words")
    if len(post.words) != len(post.tags):
        raise ValueError(f"{what} has {len(post.words)} words but {len(post.tags)} tags")
    for word, tag in zip(post.words, post.tags):
        if not word or "\t" in word or "\n" in word:
            raise ValueError(f"{what}: word {word!r} is empty or holds a tab or a newline")
        if word.startswith(_HEADERS[fmt]):
            raise ValueError(f"{what}: word {word!r} would read as a {_HEADERS[fmt]} line")
        if not _TAG.fullmatch(tag):
            raise ValueError(f"{what}: tag {tag!r} is not BIO (expected O, B-<type> or I-<type>)")


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _decode_lines(path: Path, data: bytes) -> list[str]:
    """UTF-8 lines without line endings or trailing whitespace; a bad byte is an error at its line."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            lines.append(raw.decode("utf-8").rstrip())
        except UnicodeDecodeError as e:
            raise DatasetError(
                path, number, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
            ) from None
    return lines


# How a file names the fix for a token line with more fields than the reader can take.
_COLUMNS_HINT = (
    "expected 'token<TAB>tag'; if the file has more columns, pass --columns WORD,TAG (data.columns) "
    "to say which hold the token and the tag, counted from 0 (e.g. --columns 0,3 for CoNLL-2003)"
)


def _parse_token_line(
    path: Path, number: int, line: str, require_tags: bool, columns: tuple[int, int] | None
) -> tuple[str, str]:
    # Tab-separated as the Twitter files are; whitespace-separated when there is no tab. A token may
    # itself be whitespace (Twitter-2015 valid has a lone U+00A0 token), so a tab line is not stripped.
    tabbed = "\t" in line
    fields = line.split("\t") if tabbed else line.split()
    if columns is None:
        if len(fields) > 2:
            # Guessing here dropped words ("Camden Street B-OTHER") or took a chunk tag (issue 10 A7).
            kind = "tab-separated columns" if tabbed else "space-separated fields and no tab"
            raise DatasetError(path, number, f"{len(fields)} {kind}; {_COLUMNS_HINT}")
        word_at, tag_at = 0, 1
    else:
        word_at, tag_at = columns
        if len(fields) > 1 and len(fields) <= max(columns):
            raise DatasetError(
                path,
                number,
                f"{len(fields)} columns, but columns {word_at},{tag_at} need at least {max(columns) + 1}",
            )
        if len(fields) == 1:
            word_at = 0  # a bare token: predict input without tags
    word = fields[word_at]
    if not word:
        raise DatasetError(path, number, "token is empty")
    if len(fields) == 1:
        if require_tags:
            raise DatasetError(path, number, f"token {word!r} has no tag (expected 'token<TAB>tag')")
        return word, "O"
    tag = fields[tag_at].strip()
    if not _TAG.fullmatch(tag):
        raise DatasetError(path, number, f"tag {tag!r} is not BIO (expected O, B-<type> or I-<type>)")
    return word, tag


def _count_orphan_i(tags: tuple[str, ...]) -> int:
    orphans, previous = 0, "O"
    for tag in tags:
        if tag.startswith("I-") and previous[2:] != tag[2:]:
            orphans += 1
        previous = tag
    return orphans


def _check_key(path: Path, number: int, fmt: str, key: str) -> None:
    what = _KEY_NAMES[fmt]
    if not key:
        raise DatasetError(path, number, f"{_HEADERS[fmt]} line has an empty {what}")
    reason = _unsafe_key_reason(key)
    if reason:
        raise DatasetError(path, number, f"image {what} {key!r} refused: {reason}")


def _unsafe_key_reason(key: str) -> str:
    """Why a key could name a file outside its image folder by its text alone; "" when it cannot."""
    if not key:
        return "it is empty"
    if "\x00" in key:
        return "it contains a NUL byte"
    if "\\" in key:
        return "it contains a backslash"
    if key.startswith("/") or re.match(r"[A-Za-z]:", key):
        return "it is an absolute path"
    if ".." in PurePosixPath(key).parts:
        return "it has a '..' component"
    return ""


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
