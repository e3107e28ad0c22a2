"""Case studies: the posts where two runs' predictions differ, as a self-contained HTML page.

This module chooses and counts the posts; train/report/case_pages.py draws them. `write_cases` reads each
run's pred_<split>.conll (`token gold pred`, in the split file's order), the split file itself (for the image keys, which the predictions file does not hold) and a feature cache
(the regions drawn on each image), and writes into one folder:

    index.html   the summary, then one section per post: its PNG and the gold / A / B spans as text
    NNN-KEY.png  per post: the image with its cached regions (as `mner cache show --png` draws them),
                 or a labelled placeholder saying why there is none, over three rows of words (gold,
                 A, B) with the spans coloured by type and wrong spans struck through in a red box
    cases.json   {"config": CasesConfig (paths absolute), "summary": {...}, "posts": [...]} (CASES_KEYS);
                 the folder's marker: a folder holding it is ours and may be written again

Spans are conlleval chunks (`metrics.entities`): (type, start, end), end exclusive. Against gold, B
*fixes* a gold span A misses (exact span and type) and B gets, *breaks* one A gets and B misses; a
span (start, end) both runs predict with different types has *changed type*. Posts are ranked by
fixed - broken (descending; ties keep file order).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mner.cache.conll import Split
from mner.cache.datasets import SPLITS, resolve_data
from mner.cache.inspect import save_png
from mner.cache.manifest import MANIFEST_NAME
from mner.cache.reader import CacheReader
from mner.runtime import SettingError, claim_folder, refuse_inputs_as_output, write_atomic
from mner.train.engine.metrics import entities
from mner.train.engine.run_files import check_data_files, load_run_of, run_config, unfinished
from mner.train.engine.tasks import TOKEN_TAGGING
from mner.train.report.case_pages import case_page, case_picture, case_png, summary_line, type_colours
from mner.train.report.significance import read_predictions

log = logging.getLogger(__name__)

CASES_FILE = "cases.json"
INDEX_FILE = "index.html"
# The keys of cases.json that make a folder one of ours (mner.runtime.claim_folder).
CASES_KEYS = ("config", "summary", "posts")

Span = tuple[str, int, int]  # (type, start, end): words start..end-1


@dataclass
class CasesConfig:
    """Which two runs to compare, on which split, and where the page goes."""

    run_a: str  # the baseline run folder (e.g. text-only)
    run_b: str  # the run compared with it (e.g. multimodal); "fixed" and "broken" are B's
    out_dir: str  # folder for index.html, the PNGs and cases.json: new, empty, or an earlier cases folder
    split: str = "test"  # reads pred_<split>.conll of both runs and <data>/<split>.txt for the image keys
    limit: int = 20  # posts shown, best ranked first (0: every post that differs)
    ids: list[str] = field(default_factory=list)  # show these posts (by image key) instead of the ranking
    image_dir: str | None = None  # raw images to draw on [default: the image folder run B trained with]

    def __post_init__(self):
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 0:
            raise SettingError(
                "{limit} must be an integer >= 0 (0: every post that differs), got {got!r}",
                got=self.limit,
            )
        if not self.split or "/" in self.split:
            raise SettingError(
                "{split} must be a split name such as test or valid, got {got!r}", got=self.split
            )
        self.ids = list(self.ids)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CasePost:
    """One post of the split as both runs tagged it."""

    index: int  # position in the split file (0-based)
    key: str
    line: int
    words: list[str]
    gold: set[Span]
    a: set[Span]
    b: set[Span]
    differs: bool  # the two runs' tag sequences differ

    @property
    def fixed(self) -> set[Span]:
        return (self.gold & self.b) - self.a

    @property
    def broken(self) -> set[Span]:
        return (self.gold & self.a) - self.b

    @property
    def changed_type(self) -> list[dict]:
        by_span_b = {(start, end): kind for kind, start, end in self.b}
        gold = {(start, end): kind for kind, start, end in self.gold}
        return [
            {
                "start": start,
                "end": end,
                "a": kind,
                "b": by_span_b[start, end],
                "gold": gold.get((start, end)),
            }
            for kind, start, end in sorted(self.a, key=lambda s: (s[1], s[2]))
            if (start, end) in by_span_b and by_span_b[start, end] != kind
        ]

    @property
    def score(self) -> int:
        return len(self.fixed) - len(self.broken)


def case_study(cfg: CasesConfig) -> str:
    """`mner cases`: write the case study (write_cases); returns its counts (summary_line) and where it is."""
    page, summary = _write(cfg)
    return f"{summary_line(summary)}\ncase study written to {page}"


def write_cases(cfg: CasesConfig) -> Path:
    """Write the case-study page of cfg.run_b against cfg.run_a; returns the path of index.html.

    Raises:
        ValueError when a run folder or its pred_<split>.conll is missing, the two files do not hold
        the same posts (words and gold tags), the split file does not match them, an --ids key is not
        in the split, or the output folder may not be written (not ours, or an input).
    """
    return _write(cfg)[0]


def _write(cfg: CasesConfig) -> tuple[Path, dict]:
    """write_cases's work: (the path of index.html, the summary of cases.json)."""
    run_a, run_b, out = Path(cfg.run_a), Path(cfg.run_b), Path(cfg.out_dir)
    record_a, record_b = _tagging_run(run_a), _tagging_run(run_b)
    pred_a, pred_b = _pred_file(run_a, cfg.split), _pred_file(run_b, cfg.split)
    words, gold, tags_a = read_predictions(pred_a)
    words_b, gold_b, tags_b = read_predictions(pred_b)
    if (words, gold) != (words_b, gold_b):
        raise ValueError(
            f"{pred_a} and {pred_b} do not hold the same posts (words and gold tags): "
            f"{_first_difference(words, gold, words_b, gold_b)}; compare two runs tagged on the same data"
        )
    # The image keys: the split file the predictions were written from (B's data folder, resolved as
    # evaluate resolves it); raw images from --image-dir, else the image folder B's training resolved.
    recorded = record_b["data_source"]
    source = resolve_data(
        recorded["data_dir"],
        image_dir=cfg.image_dir or recorded["image_dir"],
        columns=run_config(record_b).data.columns,
    )
    check_data_files(
        record_b,
        [source.split_path(name) for name in SPLITS],
        run_b,
        "restore the files: the page shows the posts as the runs tagged them",
    )
    split = _read_split(source, cfg.split, words, pred_b)
    posts = [
        CasePost(
            index=i,
            key=post.key,
            line=post.line,
            words=list(post.words),
            gold=entities(gold[i]),
            a=entities(tags_a[i]),
            b=entities(tags_b[i]),
            differs=tags_a[i] != tags_b[i],
        )
        for i, post in enumerate(split.posts)
    ]
    shown = _select(posts, cfg, split)
    # The cache the images come from: B's, else A's (a text-only run has none); None: raw images only,
    # also when the runs' caches are gone (from --image-dir, else the image folder B trained with).
    recorded = [r["cache"]["dir"] for r in (record_b, record_a) if r.get("cache")]
    cache = next((c for c in recorded if (Path(c) / MANIFEST_NAME).is_file()), None)
    for gone in recorded[: recorded.index(cache) if cache else len(recorded)]:
        log.warning(
            "the cache %s is gone: the pictures are %s",
            gone,
            f"from {cache}" if cache else f"the raw images of {source.image_dir}, without regions",
        )

    refuse_inputs_as_output(
        out,
        "--out",
        files=[
            ("run A's predictions", pred_a),
            ("run B's predictions", pred_b),
            ("the split file", split.path),
        ],
        folders=[
            ("run A", run_a),
            ("run B", run_b),
            ("the data folder", source.data_dir),
            ("the image folder", source.image_dir),
            *([("the cache", cache)] if cache else []),
        ],
    )
    claim = claim_folder(out, CASES_FILE, CASES_KEYS, resume=None, what="cases", flag="--out")
    if claim.state == "ours":
        _remove_old_pngs(out)
    claim.create()
    try:
        types = sorted({kind for post in shown for kind, _, _ in post.gold | post.a | post.b})
        colours = type_colours(types)
        names = (f"A: {run_a.name}", f"B: {run_b.name}")
        entries = []
        reader = CacheReader(cache) if cache else None
        try:
            for rank, post in enumerate(shown, start=1):
                png = f"{rank:03d}-{re.sub(r'[^A-Za-z0-9._-]', '_', post.key)[:60]}.png"
                picture, image = case_picture(post.key, reader, source)
                save_png(case_png(picture, post, names, colours), out / png)
                entries.append(_entry(rank, post, png, image))
        finally:
            if reader is not None:
                reader.close()
        summary = _summary(posts, len(shown), cfg.split)
        resolved = CasesConfig(
            run_a=str(run_a.resolve()),
            run_b=str(run_b.resolve()),
            out_dir=str(out.resolve()),
            split=cfg.split,
            limit=cfg.limit,
            ids=cfg.ids,
            image_dir=str(Path(cfg.image_dir).resolve()) if cfg.image_dir else None,
        )
        record = {"config": resolved.to_dict(), "cache": cache, "summary": summary, "posts": entries}
        write_atomic(out / CASES_FILE, json.dumps(record, indent=2) + "\n")
        page = write_atomic(out / INDEX_FILE, case_page(record, names, colours))
    except BaseException:
        claim.release()
        raise
    claim.unlock()
    return page, summary


# ------------------------------------------------------------------------------------------ reading


def _tagging_run(run_dir: Path) -> dict:
    """The record of a tagging run; ValueError for a classifier run or a folder that is no run."""
    why = (
        "cases compares tagging runs only (their pred_<split>.conll of tagged words); compare classifier "
        "runs with `mner results`"
    )
    return load_run_of(run_dir, TOKEN_TAGGING, why).record


def _pred_file(run_dir: Path, split: str) -> Path:
    path = run_dir / f"pred_{split}.conll"
    status = None if path.is_file() else unfinished(run_dir)
    if status is not None:
        raise ValueError(
            f"{run_dir} is {status}: it writes {path.name} when it finishes; wait for it, or continue it "
            "with `mner train-from-cache --resume`"
        )
    if not path.is_file():
        raise ValueError(
            f"{run_dir} has no pred_{split}.conll (training writes pred_valid.conll, and pred_test.conll "
            "when the data has a test split)"
        )
    return path


def _first_difference(words_a, gold_a, words_b, gold_b) -> str:
    if len(words_a) != len(words_b):
        return f"{len(words_a)} posts against {len(words_b)}"
    for i, pair in enumerate(zip(words_a, gold_a, words_b, gold_b)):
        if pair[0] != pair[2]:
            return f"post {i + 1} has other words"
        if pair[1] != pair[3]:
            return f"post {i + 1} has other gold tags"
    raise AssertionError("no difference")


def _read_split(source, split_name: str, words: list[list[str]], pred: Path) -> Split:
    """The split file behind `pred`, checked to hold its posts in its order (write_conll writes
    whitespace inside a word as "_", so words are compared the same way)."""
    path = source.split_path(split_name)
    if not path.is_file():
        raise ValueError(f"{path} is gone: the image keys of {pred} are read from it")
    split = source.read(split_name)
    written = [["_".join(word.split()) or "_" for word in post.words] for post in split.posts]
    if written != words:
        raise ValueError(
            f"{path} does not hold the posts of {pred} in its order (the data changed after training?)"
        )
    return split


def _select(posts: list[CasePost], cfg: CasesConfig, split: Split) -> list[CasePost]:
    """The posts to show: those with cfg.ids in the order given (whether they differ or not), else
    the differing posts ranked by fixed - broken, descending (a stable sort keeps file order in ties);
    at most cfg.limit of them unless it is 0."""
    if cfg.ids:
        by_key: dict[str, list[CasePost]] = {}
        for post in posts:
            by_key.setdefault(post.key, []).append(post)
        for key in cfg.ids:
            if key not in by_key:
                raise ValueError(f"image key {key!r} (--ids) is not in the {cfg.split} split {split.path}")
        chosen = [post for key in dict.fromkeys(cfg.ids) for post in by_key[key]]
    else:
        chosen = sorted((post for post in posts if post.differs), key=lambda post: -post.score)
    return chosen[: cfg.limit] if cfg.limit else chosen


def _remove_old_pngs(out: Path) -> None:
    """An earlier page's PNGs (named in its cases.json), so no stale post stays beside the new page."""
    try:
        old = json.loads((out / CASES_FILE).read_text(encoding="utf-8"))["posts"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    for entry in old:
        name = entry.get("png") if isinstance(entry, dict) else None
        if isinstance(name, str) and re.fullmatch(r"\d{3}-[A-Za-z0-9._-]+\.png", name):
            (out / name).unlink(missing_ok=True)


def _summary(posts: list[CasePost], shown: int, split: str) -> dict:
    """Counts over every post of the split (not only those shown)."""
    return {
        "split": split,
        "posts": len(posts),
        "posts_differ": sum(post.differs for post in posts),
        "fixed": sum(len(post.fixed) for post in posts),
        "broken": sum(len(post.broken) for post in posts),
        "changed_type": sum(len(post.changed_type) for post in posts),
        "shown": shown,
    }


def _spans(spans) -> list[list]:
    return [[kind, start, end] for kind, start, end in sorted(spans, key=lambda s: (s[1], s[2], s[0]))]


def _entry(rank: int, post: CasePost, png: str, image: dict) -> dict:
    """One post of cases.json; spans are [type, start, end] with end exclusive."""
    return {
        "rank": rank,
        "index": post.index,
        "key": post.key,
        "line": post.line,
        "words": post.words,
        "gold": _spans(post.gold),
        "a": _spans(post.a),
        "b": _spans(post.b),
        "fixed": _spans(post.fixed),
        "broken": _spans(post.broken),
        "changed_type": post.changed_type,
        "score": post.score,
        "differs": post.differs,
        "png": png,
        "image": image,
    }
