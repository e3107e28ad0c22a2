"""Labelled post collections for sentence-level multimodal classification (MVSA-style sentiment, the
BertResNet seed): the reader of both layouts, the writer of the submission file, and the split rule.

It is one concern, the classification folder format, and so one module past 500 lines: both layouts go
through one reader (`_Reader`: decoding, fallbacks, `file:line` errors) that fills the same
`ClassSplit` / `ReadReport`, and the writer and the split rule are the inverse and the completion of
that reader. Split apart, each half would need the other's private rules.

Layouts (`ClassDataConfig.layout`, "auto" picks by the train file present):

- `mvsa`: `train.txt` (a header `guid,tag`, then `guid,label` lines), optional `valid.txt` and a
  labelled `test.txt` in the same form, optional `test_without_label.txt` (`guid,null` lines, read
  with label None in file order, the order `write_predictions` keeps); the text of a post is
  `data/<guid>.txt` and its image `data/<guid>.jpg`.
- `csv`: `train.csv`, optional `val.csv` (read as the split "valid") and `test.csv`, with columns
  `guid,tag` and optionally `text` (else the text is `data/<guid>.txt`) and `image` (a path relative
  to the data folder, empty for a post without image; else `data/<guid>.jpg`). The BertResNet seed's
  own files (`text_id,text,img_path,tag`) read as they are: `text_id` is the guid, `img_path` the
  image. Other columns (a pandas index) are ignored and named in the report. A `test.csv` whose tags
  are all empty or `null` is unlabelled.

Encodings. The MVSA release mixes encodings between its text files, so every text file and every
split-file line is decoded by `decode_text`: a UTF-8 BOM is stripped, then the encodings of
`ClassDataConfig.encodings` (default `DEFAULT_ENCODINGS` = utf-8, cp1252, latin-1) are tried in
order. latin-1 maps every byte to a character, so with it last nothing is ever refused: a text in an
unlisted encoding (GBK, say) comes through as mojibake rather than an error. That is why every decode
past the first encoding is counted per encoding in `ReadReport.fallbacks`, named in
`ReadReport.fallback_sources` and logged as a warning; pass `encodings=("utf-8",)` to make any
non-UTF-8 byte a `file:line` error instead.

Split rule. Without `valid.txt` / `val.csv`, a validation split is drawn from train: round(fraction
* N) examples (Python's round, at least 1; `valid_fraction`, default 0.2 as in the seed's notebook),
stratified by label so that each label's share is kept (largest remainders settle the rounding) and
every label keeps at least one train example (so a label seen once is never drawn, and the split can
come out smaller; when every label is seen once it is an error); which examples of a label go is a
`random.Random(seed)` shuffle, labels in sorted order. Both splits keep the train file's order. The
fraction, the seed and the sizes are recorded in `ReadReport.split_made`. Stratified rather than
plain random because MVSA's labels are unbalanced (neutral is rare) and a small valid split drawn
at random can miss a label, which makes its validation score meaningless.

Errors. Anything off is a `DatasetError` (a ValueError) naming the file and line: a missing or
wrong header, a wrong field count, malformed CSV quoting, an empty split file, a duplicate guid (both
lines, across all splits; the labelled test file and test_without_label.txt may list the same posts), an unlabelled line in a labelled split, a label in valid/test that train does not have, a
guid that could leave the data folder (`..`, absolute, a symlink out), a missing or empty text. A
missing image is not an error: stage one records it as missing.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import io
import logging
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from mner.cache.conll import DatasetError
from mner.cache.datasets import unsafe_path_reason, unsafe_relative_path_reason
from mner.runtime import SettingError, write_atomic

log = logging.getLogger(__name__)

LAYOUTS = ("auto", "mvsa", "csv")
# Tried in order (after a UTF-8 BOM is stripped). latin-1 never fails, so it must stay last: see the
# module docstring for what that means for a text in an unlisted encoding.
DEFAULT_ENCODINGS = ("utf-8", "cp1252", "latin-1")
HEADER = "guid,tag"  # the first line of every MVSA split file and of the submission file
NULL_LABEL = "null"  # the tag of an unlabelled post in test_without_label.txt
TEXT_DIR = "data"  # data/<guid>.txt holds a post's text, data/<guid>.jpg its image
# split name -> file, per layout, in reading order (train first: the others are checked against it).
_MVSA_FILES = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}
UNLABELLED_FILE = "test_without_label.txt"
UNLABELLED_SPLIT = "test_without_label"
_CSV_FILES = {"train": "train.csv", "valid": "val.csv", "test": "test.csv"}
_CSV_COLUMNS = ("guid", "tag", "text", "image")
# The BertResNet seed's own names for two of them (TOMYUE/BertResNet, train.csv / val.csv / test.csv:
# `text_id,text,img_path,tag`), read as ours so its files are read as they are.
_CSV_SEED_COLUMNS = {"text_id": "guid", "img_path": "image"}
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Example:
    guid: str  # the post's id, as in the split file; also its image's cache key
    text: str  # decoded, surrounding whitespace stripped; never empty
    label: str | None  # None in an unlabelled split (test_without_label)
    image: Path | None  # where the image should lie (existence is stage one's business); None: no image
    line: int  # 1-based line of the example in its split file (for a made valid split: in train's)


@dataclass
class ClassSplit:
    name: str  # "train" | "valid" | "test" | "test_without_label"
    path: Path  # the file it was read from (train's for a valid split drawn from train)
    examples: list[Example]  # in file order
    labelled: bool  # False: every label is None

    def label_counts(self) -> dict[str, int]:
        """label -> examples, labels sorted; {} for an unlabelled split."""
        return dict(sorted(Counter(e.label for e in self.examples if e.label is not None).items()))


@dataclass
class ReadReport:
    layout: str  # "mvsa" | "csv"
    encodings: tuple[str, ...]  # tried in this order
    fallbacks: dict[str, int] = field(
        default_factory=dict
    )  # encoding past the first -> texts decoded with it
    fallback_sources: list[str] = field(default_factory=list)  # "path:line [encoding]" of each, in read order
    # None when a valid split was read; else {"from": "train", "fraction", "seed", "stratified": True,
    # "train": examples left in train, "valid": examples drawn}
    split_made: dict | None = None
    ignored_columns: dict[str, list[str]] = field(default_factory=dict)  # csv file -> columns not read

    def summary(self) -> list[str]:
        """The report as log lines (also what read_classification logs)."""
        lines = []
        if self.fallbacks:
            counts = ", ".join(f"{n} as {enc}" for enc, n in self.fallbacks.items())
            shown = "; ".join(self.fallback_sources[:5]) + (" ..." if len(self.fallback_sources) > 5 else "")
            lines.append(f"decoded {counts} (not {self.encodings[0]}): {shown}")
        if self.split_made:
            s = self.split_made
            lines.append(
                f"no valid split: drew {s['valid']} of {s['train'] + s['valid']} train examples "
                f"(fraction {s['fraction']}, seed {s['seed']}, stratified by label)"
            )
        for file, columns in self.ignored_columns.items():
            lines.append(f"{file}: ignored columns {columns}")
        return lines


@dataclass
class ClassData:
    splits: dict[str, ClassSplit]  # train, valid (read or drawn), then test / test_without_label if present
    labels: tuple[str, ...]  # train's labels, sorted; index = label id
    report: ReadReport


@dataclass(frozen=True)
class ClassDataConfig:
    """Which classification data to read and how (see the module docstring for the rules)."""

    data_dir: str  # folder holding the split files and data/
    layout: str = "auto"  # auto | mvsa | csv; auto: train.txt -> mvsa, train.csv -> csv
    # share of train drawn as valid when the folder has no valid split; the BertResNet notebook's
    # train_test_split(df_train, test_size=0.2, random_state=42) (TOMYUE/BertResNet@0d5c628, cell 10)
    valid_fraction: float = 0.2
    seed: int = 0  # seeds that draw
    encodings: tuple[str, ...] = DEFAULT_ENCODINGS  # tried in order after a BOM is stripped

    def __post_init__(self):
        if isinstance(self.data_dir, Path):
            object.__setattr__(self, "data_dir", str(self.data_dir))
        if not isinstance(self.data_dir, str) or not self.data_dir:
            raise SettingError("{data_dir} must name a folder, got {got!r}", got=self.data_dir)
        if self.layout not in LAYOUTS:
            raise ValueError(f"unknown layout {self.layout!r}; expected one of {', '.join(LAYOUTS)}")
        fraction = self.valid_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
            raise SettingError(
                "{valid_fraction} must be a number between 0 and 1 (exclusive), got {got!r}",
                got=fraction,
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        encodings = (self.encodings,) if isinstance(self.encodings, str) else tuple(self.encodings)
        if not encodings:
            raise ValueError("encodings must name at least one encoding (e.g. utf-8)")
        for name in encodings:
            try:
                codecs.lookup(name)
            except (LookupError, TypeError):
                raise ValueError(f"unknown encoding {name!r} in encodings") from None
        object.__setattr__(self, "encodings", encodings)

    def to_dict(self) -> dict:
        """Every field, encodings as a list (JSON)."""
        return {**dataclasses.asdict(self), "encodings": list(self.encodings)}


def read_classification(cfg: ClassDataConfig) -> ClassData:
    """Read a classification data folder.

    Returns:
        ClassData: splits "train" and "valid" (read, or drawn from train by the split rule), then
        "test" and "test_without_label" when present; train's sorted labels; the report (fallback
        decodes, the split made, ignored columns), whose lines are also logged.
    Raises:
        ValueError when the folder or its train file is missing or the layout cannot be told;
        DatasetError naming the file and line for anything malformed (see the module docstring).
    """
    folder = Path(cfg.data_dir).expanduser()
    if not folder.is_dir():
        raise ValueError(f"classification data folder {folder} does not exist")
    layout = _detect_layout(folder) if cfg.layout == "auto" else cfg.layout
    report = ReadReport(layout=layout, encodings=cfg.encodings)
    reader = _Reader(folder, cfg.encodings, report)
    files = _MVSA_FILES if layout == "mvsa" else _CSV_FILES
    if not (folder / files["train"]).is_file():
        raise ValueError(f"{folder / files['train']}: train file not found ({layout} layout)")

    splits: dict[str, ClassSplit] = {}
    for name, file in files.items():
        path = folder / file
        if not path.is_file():
            continue
        split = reader.read_mvsa(path, name, True) if layout == "mvsa" else reader.read_csv(path, name)
        if name != "train":
            _check_labels_in_train(split, splits["train"])
        splits[name] = split
    if layout == "mvsa" and (folder / UNLABELLED_FILE).is_file():
        splits[UNLABELLED_SPLIT] = reader.read_mvsa(folder / UNLABELLED_FILE, UNLABELLED_SPLIT, False)
    if "valid" not in splits:
        train, valid = split_train(splits["train"], cfg.valid_fraction, cfg.seed)
        report.split_made = {
            "from": "train",
            "fraction": cfg.valid_fraction,
            "seed": cfg.seed,
            "stratified": True,
            "train": len(train.examples),
            "valid": len(valid.examples),
        }
        splits = {"train": train, "valid": valid, **{k: v for k, v in splits.items() if k != "train"}}
    for line in report.summary():
        (log.warning if line.startswith("decoded") else log.info)("%s: %s", folder, line)
    labels = tuple(splits["train"].label_counts())
    return ClassData(splits=splits, labels=labels, report=report)


def split_train(train: ClassSplit, fraction: float, seed: int) -> tuple[ClassSplit, ClassSplit]:
    """Draw a valid split from train by the split rule (module docstring): (train left, valid).

    Raises DatasetError (at train's first example) when train has fewer than 2 examples, or when every
    label has a single example (drawing any would take that label out of train).
    """
    examples = train.examples
    if len(examples) < 2:
        raise DatasetError(
            train.path,
            examples[0].line if examples else 1,
            "train needs at least 2 examples to draw a valid split",
        )
    by_label: dict[str, list[int]] = {}
    for index, example in enumerate(examples):
        by_label.setdefault(example.label, []).append(index)
    total = max(1, round(fraction * len(examples)))
    exact = {label: total * len(ids) / len(examples) for label, ids in by_label.items()}
    quota = {label: min(math.floor(x), len(by_label[label]) - 1) for label, x in exact.items()}
    # Largest remainders first (ties: label order) settle the rounding; no label gives up its last example.
    for label in sorted(exact, key=lambda lab: (-(exact[lab] - quota[lab]), lab)):
        if sum(quota.values()) >= total:
            break
        if quota[label] < len(by_label[label]) - 1:
            quota[label] += 1
    if not any(quota.values()):
        raise DatasetError(
            train.path,
            examples[0].line,
            "cannot draw a valid split: every label has a single train example; give a valid file",
        )
    rng = random.Random(seed)
    drawn: set[int] = set()
    for label in sorted(by_label):
        ids = list(by_label[label])
        rng.shuffle(ids)
        drawn.update(ids[: quota[label]])
    left = ClassSplit("train", train.path, [e for i, e in enumerate(examples) if i not in drawn], True)
    valid = ClassSplit("valid", train.path, [e for i, e in enumerate(examples) if i in drawn], True)
    return left, valid


def write_predictions(path: str | Path, examples: Sequence[Example], labels: Sequence[str]) -> Path:
    """Write the submission file: the header `guid,tag`, then `guid,label` per example, in the given order.

    Args:
        path: the output file (UTF-8, "\\n" line ends, replaced atomically).
        examples: their guids are written (an unlabelled split's, in its file order).
        labels: one predicted label per example.
    Returns:
        path as a Path.
    Written by the csv module, as the reader reads it: a plain guid is written as is (the seed's
    format), one holding a comma, a quote or a newline in double quotes, so every guid reads back.
    Raises:
        ValueError when the counts differ, or a guid or label is empty or has surrounding whitespace
        (the reader strips fields, so it would not read back as itself).
    """
    if len(examples) != len(labels):
        raise ValueError(f"{len(examples)} examples but {len(labels)} labels")
    rows = [HEADER.split(",")]
    for example, label in zip(examples, labels):
        for what, value in (("guid", example.guid), ("label", label)):
            if not isinstance(value, str) or not value or value != value.strip():
                raise ValueError(f"guid {example.guid!r}: {what} {value!r} is empty or padded")
        rows.append([example.guid, label])
    return write_atomic(path, csv_text(rows))


def seed_form_file(path: str | Path) -> Path:
    """Where the seed's output form goes beside the `guid,tag` (or `guid,gold,pred`) file `path`:
    pred_test.txt -> pred_test.seed.csv."""
    path = Path(path)
    return path.with_name(f"{path.stem}.seed.csv")


def write_seed_form(
    path: str | Path, source: str | Path, labels: Sequence[str], encodings: Sequence[str] = DEFAULT_ENCODINGS
) -> Path:
    """The BertResNet seed's output form of a csv split file: `source` as read, every column in its
    order and every field as written (texts unstripped), with the tag column filled in by `labels`.
    The seed's notebook writes its test.csv so (TOMYUE/BertResNet@0d5c628, BertResNet.ipynb cell 53:
    `df_test.at[i, 'tag'] = label; df_test.to_csv(..., index=False)`); like pandas' `to_csv`, fields
    are quoted only where needed (csv_text), in UTF-8 with "\n" line ends.

    Args:
        path: the output file (replaced atomically).
        source: the csv split file the predictions are for (its tag column is `tag`, or the seed's).
        labels: one predicted label per post of `source`, in file order (blank records are skipped,
            as the reader skips them).
    Returns:
        path as a Path.
    Raises:
        ValueError when the counts differ; a DatasetError for a file the reader refuses.
    """
    source = Path(source)
    encodings = (encodings,) if isinstance(encodings, str) else tuple(encodings)
    reader = _Reader(source.parent, encodings, ReadReport("csv", encodings))
    (_, header), *records = reader.records(source)
    if len(records) != len(labels):
        raise ValueError(f"{source} holds {len(records)} posts but {len(labels)} labels were given")
    tag = [_CSV_SEED_COLUMNS.get(cell.strip(), cell.strip()) for cell in header].index("tag")
    rows = [header]
    for (_, row), label in zip(records, labels):
        rows.append([*row[:tag], label, *row[tag + 1 :]])
    return write_atomic(path, csv_text(rows))


def csv_text(rows: Sequence[Sequence[str]]) -> str:
    """Rows as CSV text ("\\n" line ends, fields quoted only where needed): the one way a
    classification CSV is written (the submission file, a run's pred_<split>.csv)."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerows(rows)
    return out.getvalue()


def read_csv_rows(path: str | Path) -> list[list[str]]:
    """The rows of a CSV file written by `csv_text` (UTF-8), header included, fields as written."""
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.reader(handle, strict=True))


def decode_text(data: bytes, encodings: Sequence[str] = DEFAULT_ENCODINGS) -> tuple[str, str]:
    """(text, the encoding that decoded it): a UTF-8 BOM stripped, then each encoding tried in order.

    Raises UnicodeDecodeError (the first encoding's) when none decodes the bytes; with latin-1 in the
    list that never happens.
    """
    data = data.removeprefix(_BOM)
    first_error = None
    for name in encodings:
        try:
            return data.decode(name), name
        except UnicodeDecodeError as err:
            first_error = first_error or err
    raise first_error


class _Reader:
    """Reads split files of one folder, decoding through the encodings and counting the fallbacks."""

    def __init__(self, folder: Path, encodings: tuple[str, ...], report: ReadReport):
        self.folder = folder
        self.encodings = encodings
        self.report = report
        # guid -> ("file:line", split name) of its first occurrence, across splits
        self.seen: dict[str, tuple[str, str]] = {}

    def decode(self, path: Path, line: int, data: bytes) -> str:
        """Decode one unit (a text file: line 1; a split-file line); a fallback is counted."""
        try:
            text, used = decode_text(data, self.encodings)
        except UnicodeDecodeError as err:
            raw = data.removeprefix(_BOM)
            at = line + raw[: err.start].count(b"\n")
            column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
            raise DatasetError(
                path,
                at,
                f"not valid {' / '.join(self.encodings)} (byte 0x{raw[err.start]:02x} at column {column})",
            ) from None
        if used != self.encodings[0]:
            self.report.fallbacks[used] = self.report.fallbacks.get(used, 0) + 1
            self.report.fallback_sources.append(f"{path}:{line} [{used}]")
        return text

    def lines(self, path: Path) -> list[str]:
        """The file's lines, each decoded on its own, line ends (CRLF too) removed."""
        data = path.read_bytes().removeprefix(_BOM)
        return [self.decode(path, n, raw.removesuffix(b"\r")) for n, raw in enumerate(data.split(b"\n"), 1)]

    def records(self, path: Path) -> list[tuple[int, list[str]]]:
        """The file's non-blank CSV records as (first line, fields), both layouts: a field in double
        quotes may hold a comma, a quote (doubled) or a newline, so any guid written by
        `write_predictions` or a pandas `to_csv` reads back as itself. Malformed quoting is an error
        at its line rather than fields silently merged."""
        text = "\n".join(self.lines(path))
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        records = []
        start = 1
        try:
            for row in reader:
                if any(cell.strip() for cell in row):
                    records.append((start, row))
                start = reader.line_num + 1
        except csv.Error as err:
            raise DatasetError(
                path,
                start,
                f"malformed quoting ({err}); a field holding a comma, a quote or a newline must be "
                'wrapped in double quotes, with each quote inside doubled ("")',
            ) from None
        return records

    def read_mvsa(self, path: Path, name: str, labelled: bool) -> ClassSplit:
        rows = self.records(path)
        if not rows:
            raise DatasetError(path, 1, f"file is empty; expected the header {HEADER!r} and guid,tag lines")
        number, header = rows[0]
        if not is_header(header):
            raise DatasetError(path, number, f"expected the header {HEADER!r}, got {','.join(header)!r}")
        if len(rows) == 1:
            raise DatasetError(path, number, "no examples after the header")
        examples = []
        for number, row in rows[1:]:
            fields = [f.strip() for f in row]
            if len(fields) != 2:
                raise DatasetError(path, number, f"{len(fields)} comma-separated fields; expected 'guid,tag'")
            guid, tag = fields
            label = self.label(path, number, guid, tag, labelled)
            examples.append(self.example(path, number, name, guid, label, None, None))
        return ClassSplit(name, path, examples, labelled)

    def read_csv(self, path: Path, name: str) -> ClassSplit:
        records = self.records(path)  # (first line of the record, its fields)
        if not records:
            raise DatasetError(path, 1, "file is empty; expected a header with guid and tag columns")
        number, header = records[0]
        header = [cell.strip() for cell in header]
        for column in set(header):
            if column and header.count(column) > 1:
                raise DatasetError(path, number, f"header names the column {column!r} twice")
        for seed, ours in _CSV_SEED_COLUMNS.items():
            if seed in header and ours in header:
                raise DatasetError(
                    path,
                    number,
                    f"header names both {ours!r} and {seed!r} (the BertResNet seed's name for "
                    f"{ours!r}); keep one",
                )
        written, header = header, [_CSV_SEED_COLUMNS.get(cell, cell) for cell in header]
        for column in ("guid", "tag"):
            if column not in header:
                seed = next((s for s, ours in _CSV_SEED_COLUMNS.items() if ours == column), None)
                also = f" (or {seed!r})" if seed else ""
                raise DatasetError(
                    path, number, f"header {','.join(written)!r} has no {column!r}{also} column"
                )
        ignored = [c for c in header if c not in _CSV_COLUMNS]
        if ignored:
            self.report.ignored_columns[str(path)] = ignored
        if len(records) == 1:
            raise DatasetError(path, number, "no examples after the header")
        at = {column: header.index(column) for column in _CSV_COLUMNS if column in header}
        tags = [row[at["tag"]].strip() if len(row) == len(header) else "" for _, row in records[1:]]
        # test.csv may be unlabelled as a whole (every tag empty or null); train and val never.
        labelled = name != "test" or any(tag and tag.lower() != NULL_LABEL for tag in tags)
        examples = []
        for number, row in records[1:]:
            if len(row) != len(header):
                raise DatasetError(path, number, f"{len(row)} fields; the header has {len(header)}")
            guid = row[at["guid"]].strip()
            label = self.label(path, number, guid, row[at["tag"]].strip(), labelled)
            text = row[at["text"]].strip() if "text" in at else None
            if text is not None and not text:
                raise DatasetError(path, number, f"guid {guid!r}: the text is empty")
            image = row[at["image"]].strip() if "image" in at else None
            examples.append(self.example(path, number, name, guid, label, text, image))
        return ClassSplit(name, path, examples, labelled)

    def label(self, path: Path, number: int, guid: str, tag: str, labelled: bool) -> str | None:
        unlabelled = not tag or tag.lower() == NULL_LABEL
        if labelled and unlabelled:
            raise DatasetError(
                path,
                number,
                f"guid {guid!r} has no label ({tag!r}) in a labelled split; unlabelled posts belong in "
                f"{UNLABELLED_FILE} (mvsa) or an all-unlabelled test.csv",
            )
        if not labelled and not unlabelled:
            raise DatasetError(
                path, number, f"guid {guid!r}: expected {NULL_LABEL!r} in an unlabelled split, got {tag!r}"
            )
        return tag if labelled else None

    def example(
        self,
        path: Path,
        number: int,
        name: str,
        guid: str,
        label: str | None,
        text: str | None,
        image: str | None,
    ) -> Example:
        """Check the guid, find the text (the csv cell, else data/<guid>.txt) and the image path."""
        if not guid:
            raise DatasetError(path, number, "empty guid")
        here = f"{path.name}:{number}"
        first = self.seen.get(guid)
        # The labelled test file and test_without_label.txt may list the same posts (one cache key);
        # any other repeat, train or valid against test included, would leak or double-count a post.
        if first is not None and {first[1], name} != {"test", UNLABELLED_SPLIT}:
            raise DatasetError(path, number, f"duplicate guid {guid!r} (first at {first[0]})")
        self.seen.setdefault(guid, (here, name))
        data_dir = self.folder / TEXT_DIR
        for suffix in (".txt", ".jpg"):
            reason = unsafe_path_reason(data_dir, guid, suffix)
            if reason:
                raise DatasetError(path, number, f"guid {guid!r} refused: {reason}")
        if text is None:
            text_file = data_dir / f"{guid}.txt"
            if not text_file.is_file():
                raise DatasetError(path, number, f"guid {guid!r}: text file {text_file} not found")
            text = self.decode(text_file, 1, text_file.read_bytes()).strip()
            if not text:
                raise DatasetError(path, number, f"guid {guid!r}: text file {text_file} is empty")
        if image is None:
            image_path = data_dir / f"{guid}.jpg"
        elif not image:
            image_path = None
        else:
            reason = unsafe_relative_path_reason(self.folder, image)
            if reason:
                raise DatasetError(path, number, f"guid {guid!r}: image path {image!r} refused: {reason}")
            image_path = self.folder / image
        return Example(guid=guid, text=text, label=label, image=image_path, line=number)


def _detect_layout(folder: Path) -> str:
    has_txt, has_csv = (folder / "train.txt").is_file(), (folder / "train.csv").is_file()
    if has_txt and has_csv:
        raise ValueError(f"{folder} holds both train.txt and train.csv; pass layout 'mvsa' or 'csv'")
    if not has_txt and not has_csv:
        raise ValueError(f"{folder} holds neither train.txt (mvsa layout) nor train.csv (csv layout)")
    return "mvsa" if has_txt else "csv"


def _check_labels_in_train(split: ClassSplit, train: ClassSplit) -> None:
    known = train.label_counts()
    for example in split.examples:
        if example.label is not None and example.label not in known:
            raise DatasetError(
                split.path,
                example.line,
                f"label {example.label!r} of guid {example.guid!r} is not in train (train labels: "
                f"{', '.join(known)})",
            )


def split_files(folder: str | Path) -> list[Path]:
    """Every file a classification folder's splits may be read from (both layouts, present or not),
    and the MVSA texts' folder data/: what a run records the sha256 of, and compares again before it
    reads the folder anew."""
    folder = Path(folder).expanduser()
    names = (*_MVSA_FILES.values(), UNLABELLED_FILE, *_CSV_FILES.values(), TEXT_DIR)
    return [folder / name for name in names]


def is_header(fields: Sequence[str]) -> bool:
    """Whether a split file's first record is the MVSA header `guid,tag` (fields compared stripped and
    in any case, so `guid, tag` is one too). The one rule the reader and `is_classification_folder`
    share, so that a folder train-classifier reads is never taken for NER posts by extract-features."""
    return [f.strip().lower() for f in fields] == HEADER.split(",")


def is_classification_folder(folder: str | Path) -> bool:
    """Whether `folder` holds classification data rather than NER posts: a csv split file (`train.csv`,
    `val.csv`, `test.csv`), or MVSA split files whose first (in train, valid, test, test_without_label
    order) starts with the header `guid,tag` (`is_header`; an NER split file starts with `IMGID:`,
    `IMAGE:` or a token line). A folder without a train file counts, so that the images of a folder of
    posts to label (only `test_without_label.txt`) can be extracted for `mner predict`."""
    folder = Path(folder).expanduser()
    if any((folder / file).is_file() for file in _CSV_FILES.values()):
        return True
    for file in (*_MVSA_FILES.values(), UNLABELLED_FILE):
        if (folder / file).is_file():
            with open(folder / file, "rb") as handle:
                first = handle.readline().removeprefix(_BOM).decode("utf-8", errors="replace")
            return is_header(first.split(","))
    return False


@dataclass
class ClassImages:
    """The images of a classification folder, as stage one sees them: one cache key per guid."""

    data_dir: Path  # the data folder
    image_dir: Path  # data/, where `data/<guid>.jpg` images lie
    paths: dict[str, Path | None]  # guid -> its image (None: the csv gives it no image), every split

    def keys(self) -> list[str]:
        """Every guid of every split (train, valid, test, test_without_label), sorted."""
        return sorted(self.paths)

    def image_path(self, key: str) -> Path | None:
        """The image of guid `key` (None: the csv gives it none); ValueError for a guid of no split."""
        if key not in self.paths:
            raise ValueError(f"guid {key!r} is in no split of {self.data_dir}")
        return self.paths[key]


def classification_images(cfg: ClassDataConfig) -> ClassImages:
    """The image of every post of a classification folder (read_classification's rules and errors).

    A folder without a train file (posts to label for `mner predict`: a `test_without_label.txt`, an
    unlabelled `test.csv`) gives the guids of every split file it holds, each read as `read_split_file`
    reads it (labelled or not as a whole)."""
    folder = Path(cfg.data_dir).expanduser()
    layout = cfg.layout
    if layout == "auto":
        layout = "csv" if any((folder / f).is_file() for f in _CSV_FILES.values()) else "mvsa"
    files = _CSV_FILES if layout == "csv" else {**_MVSA_FILES, UNLABELLED_SPLIT: UNLABELLED_FILE}
    if (folder / files["train"]).is_file():
        data = read_classification(cfg)
        splits = list(data.splits.values())
    else:
        reader = _Reader(folder, cfg.encodings, ReadReport(layout, cfg.encodings))
        splits = [
            _read_file(reader, folder / file, name)
            for name, file in files.items()
            if (folder / file).is_file()
        ]
        if not splits:
            raise ValueError(f"{folder} holds no split file: looked for {', '.join(files.values())}")
    paths = {e.guid: e.image for split in splits for e in split.examples}
    return ClassImages(data_dir=folder, image_dir=folder / TEXT_DIR, paths=paths)


def read_split_file(path: str | Path, encodings: Sequence[str] = DEFAULT_ENCODINGS) -> ClassSplit:
    """One split file of a classification folder, for prediction: an MVSA `.txt` (guid,tag) or a `.csv`,
    texts from the folder's `data/<guid>.txt` (or the csv's text column). It is unlabelled when every tag
    is empty or `null`, else every line needs a label. Errors as read_classification's (`file:line`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{path}: split file not found")
    encodings = (encodings,) if isinstance(encodings, str) else tuple(encodings)
    layout = "csv" if path.suffix.lower() == ".csv" else "mvsa"
    reader = _Reader(path.parent, encodings, ReadReport(layout, encodings))
    return _read_file(reader, path, "test" if layout == "csv" else path.stem)


def _read_file(reader: _Reader, path: Path, name: str) -> ClassSplit:
    """One split file read on its own: a csv by read_csv's rule, an MVSA file labelled unless every
    tag is empty or `null`."""
    if path.suffix.lower() == ".csv":
        return reader.read_csv(path, name)
    tags = [row[-1].strip().lower() for _, row in reader.records(path)[1:]]
    labelled = any(tag and tag != NULL_LABEL for tag in tags)
    return reader.read_mvsa(path, name, labelled)
