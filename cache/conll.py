"""The two token-per-line text formats: the one reader and the one writer of IMGID-CoNLL
(Twitter-2015/2017) and image-path CoNLL (NewsMKG), the `Post` and `Split` they hold, and the label set
of a split.

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

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

FORMATS = ("imgid", "image-path")
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
    check_format(fmt)
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
    check_format(fmt)
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
    reason = unsafe_key_reason(post.key)
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


def check_format(fmt: str) -> None:
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
            # Guessing here dropped words ("Camden Street B-OTHER") or took a chunk tag.
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
    reason = unsafe_key_reason(key)
    if reason:
        raise DatasetError(path, number, f"image {what} {key!r} refused: {reason}")


def unsafe_key_reason(key: str) -> str:
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
