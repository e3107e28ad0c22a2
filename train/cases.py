"""Case studies: the posts where two runs' predictions differ, as a self-contained HTML page.

`write_cases` reads each run's pred_<split>.conll (`token gold pred`, in the split file's order), the
split file itself (for the image keys, which the predictions file does not hold) and a feature cache
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

import html
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from mner.cache.datasets import SPLITS, Split, resolve_data
from mner.cache.inspect import draw_regions, record_regions, save_png
from mner.cache.manifest import MANIFEST_NAME
from mner.cache.reader import CacheReader
from mner.runtime import claim_folder, refuse_inputs_as_output, write_atomic
from mner.train.classify import is_classifier_run
from mner.train.metrics import entities
from mner.train.runs import check_data_files, read_record, run_config, unfinished
from mner.train.significance import read_predictions

log = logging.getLogger(__name__)

CASES_FILE = "cases.json"
INDEX_FILE = "index.html"
# The keys of cases.json that make a folder one of ours (mner.runtime.claim_folder).
CASES_KEYS = ("config", "summary", "posts")
# The longer side of the image in a case PNG, in pixels (tweet thumbnails are enlarged, photos shrunk).
IMAGE_SIDE = 320
# Narrowest PNG: room for the rows of words beside a small image.
MIN_WIDTH = 480
# Span colours, one per entity type (types sorted); light enough for black text on them.
TYPE_COLOURS = ("#8dd3c7", "#ffffb3", "#bebada", "#fdb462", "#b3de69", "#fccde5", "#80b1d3", "#d9d9d9")
WRONG = "#e00000"

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
            raise ValueError(
                f"limit must be an integer >= 0 (0: every post that differs), got {self.limit!r}"
            )
        if not self.split or "/" in self.split:
            raise ValueError(f"split must be a split name such as test or valid, got {self.split!r}")
        self.ids = list(self.ids)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Post:
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


def write_cases(cfg: CasesConfig) -> Path:
    """Write the case-study page of cfg.run_b against cfg.run_a; returns the path of index.html.

    Raises:
        ValueError when a run folder or its pred_<split>.conll is missing, the two files do not hold
        the same posts (words and gold tags), the split file does not match them, an --ids key is not
        in the split, or the output folder may not be written (not ours, or an input).
    """
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
        _Post(
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
        colours = {kind: TYPE_COLOURS[i % len(TYPE_COLOURS)] for i, kind in enumerate(types)}
        names = (f"A: {run_a.name}", f"B: {run_b.name}")
        entries = []
        reader = CacheReader(cache) if cache else None
        try:
            for rank, post in enumerate(shown, start=1):
                png = f"{rank:03d}-{re.sub(r'[^A-Za-z0-9._-]', '_', post.key)[:60]}.png"
                picture, image = _picture(post.key, reader, source)
                save_png(_case_png(picture, post, names, colours), out / png)
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
        page = write_atomic(out / INDEX_FILE, _page(record, names, colours))
    except BaseException:
        claim.release()
        raise
    claim.unlock()
    return page


def summary_line(summary: dict) -> str:
    """The one-line summary the command prints and the page heads with."""
    return (
        f"{summary['posts_differ']} of {summary['posts']} {summary['split']} posts differ: B fixes "
        f"{summary['fixed']} gold spans, breaks {summary['broken']}, changes the type of "
        f"{summary['changed_type']}; {summary['shown']} shown"
    )


# ------------------------------------------------------------------------------------------ reading


def _tagging_run(run_dir: Path) -> dict:
    """The record of a tagging run; ValueError for a classifier run or a folder that is no run."""
    if is_classifier_run(run_dir):
        raise ValueError(
            f"{run_dir} is a classifier run: cases compares tagging runs only (their pred_<split>.conll "
            "of tagged words); compare classifier runs with `mner results`"
        )
    return read_record(run_dir)


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


def _select(posts: list[_Post], cfg: CasesConfig, split: Split) -> list[_Post]:
    """The posts to show: those with cfg.ids in the order given (whether they differ or not), else
    the differing posts ranked by fixed - broken, descending (a stable sort keeps file order in ties);
    at most cfg.limit of them unless it is 0."""
    if cfg.ids:
        by_key: dict[str, list[_Post]] = {}
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


def _summary(posts: list[_Post], shown: int, split: str) -> dict:
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


def _entry(rank: int, post: _Post, png: str, image: dict) -> dict:
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


# ------------------------------------------------------------------------------------------ drawing


def _picture(key: str, reader: CacheReader | None, source) -> tuple[Image.Image, dict]:
    """The post's image with its cached regions, or a placeholder; and what it shows:
    {"shown": "regions" | "image" | "placeholder", "background" or "reason", "regions": count}."""
    try:
        image_path = source.image_path(key)
    except ValueError as err:
        image_path, refused = None, str(err)
    if reader is not None:
        if key not in reader:
            return _placeholder(f"{key!r} is not in the cache {reader.cache_dir}")
        record = reader.get(key)
        if record.status != "ok":
            return _placeholder(
                f"{record.status} in the cache ({record.error})" if record.error else record.status
            )
        regions = record_regions(record, reader.models)
        scale = IMAGE_SIDE / max(record.width, record.height)
        size = (max(1, round(record.width * scale)), max(1, round(record.height * scale)))
        canvas, background = draw_regions(*size, regions, image_path)
        return canvas, {"shown": "regions", "background": background, "regions": len(regions)}
    if image_path is None:
        return _placeholder(refused)
    try:
        with Image.open(image_path) as opened:
            width, height = opened.size
    except FileNotFoundError:
        return _placeholder(f"no cache, and {image_path} does not exist")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        return _placeholder(f"no cache, and {image_path} is not readable ({err})")
    scale = IMAGE_SIDE / max(width, height)
    canvas, background = draw_regions(round(width * scale) or 1, round(height * scale) or 1, [], image_path)
    if not background.startswith(str(image_path)):  # draw_regions fell back to grey: it did not decode
        return _placeholder(f"no cache, and {image_path} is not readable")
    return canvas, {"shown": "image", "background": background, "regions": 0}


def _placeholder(reason: str) -> tuple[Image.Image, dict]:
    """A grey box with a red frame that says "image missing: <reason>" (never a stand-in picture)."""
    text = f"image missing: {reason}"
    canvas = Image.new("RGB", (IMAGE_SIDE, IMAGE_SIDE * 3 // 4), (220, 220, 220))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, canvas.width - 1, canvas.height - 1), outline=WRONG, width=3)
    font = ImageFont.load_default()
    y = 10
    for line in _wrap(draw, text, font, canvas.width - 20):
        draw.text((10, y), line, fill="black", font=font)
        y += _line_height(draw, font)
    return canvas, {"shown": "placeholder", "reason": text, "regions": 0}


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and draw.textlength(candidate, font=font) > width:
            lines.append(line)
            candidate = word
        line = candidate
    return [*lines, line]


def _line_height(draw: ImageDraw.ImageDraw, font) -> int:
    left, top, right, bottom = draw.textbbox((0, 0), "Ag[|", font=font)
    return bottom - top + 8


def _case_png(picture: Image.Image, post: _Post, names: tuple[str, str], colours: dict) -> Image.Image:
    """The picture on top, then the rows gold / A / B and a legend, in Pillow's default font."""
    font = ImageFont.load_default()
    width = max(MIN_WIDTH, picture.width + 20)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    rows = [("gold", post.gold, None), (names[0], post.a, post.gold), (names[1], post.b, post.gold)]
    label_width = max(measure.textlength(name, font=font) for name, _, _ in rows) + 16
    layouts = [_layout(measure, post.words, spans, font, width - label_width - 10) for _, spans, _ in rows]
    step = _line_height(measure, font)
    height = picture.height + 20 + sum(step * layout[1] + 8 for layout in layouts) + 2 * step + 10
    canvas = Image.new("RGB", (width, height), "white")
    canvas.paste(picture, (10, 10))
    draw = ImageDraw.Draw(canvas)
    y = picture.height + 20
    for (name, spans, gold), (places, lines) in zip(rows, layouts):
        draw.text((10, y + 3), name, fill="black", font=font)
        _draw_row(draw, places, spans, gold, colours, font, label_width, y, step)
        y += step * lines + 8
        draw.line((10, y - 4, width - 10, y - 4), fill="#cccccc")
    x = 10
    for kind, colour in [*colours.items(), ("wrong span (struck, red box)", None)]:
        box = (x, y + 2, x + 14, y + step - 6)
        draw.rectangle(box, fill=colour or "white", outline=WRONG if colour is None else colour, width=2)
        draw.text((x + 18, y + 3), kind, fill="black", font=font)
        x += 18 + draw.textlength(kind, font=font) + 16
        if x > width - 120:
            x, y = 10, y + step
    return canvas


def _layout(draw, words: list[str], spans: set[Span], font, width: int):
    """Where each word (and each span's type tag) goes: ([(x, line, text, span or None, is_tag)], lines)."""
    ends = {end - 1: (kind, start, end) for kind, start, end in spans}
    starts = {}
    for span in spans:
        for i in range(span[1], span[2]):
            starts[i] = span
    places, x, line = [], 0.0, 0
    space = 2 * draw.textlength(" ", font=font)  # the default font's space is narrow
    for i, word in enumerate(words):
        pieces = [(word, starts.get(i), False)]
        if i in ends:
            pieces.append((ends[i][0], ends[i], True))
        for text, span, is_tag in pieces:
            size = draw.textlength(text, font=font)
            if x and x + size > width:
                x, line = 0.0, line + 1
            places.append((x, line, text, span, is_tag))
            x += size + space
    return places, line + 1


def _draw_row(draw, places, spans, gold, colours, font, left, top, step) -> None:
    """One row of words: a span's words on its type's colour, its type after it in small caps; with
    gold given, a span not in gold is struck through and boxed in red."""
    for x, line, text, span, is_tag in places:
        x0, y0 = left + x, top + line * step
        size = draw.textlength(text, font=font)
        box = (x0 - 2, y0, x0 + size + 2, y0 + step - 4)
        wrong = span is not None and gold is not None and span not in gold
        if span is not None and not is_tag:
            draw.rectangle(box, fill=colours[span[0]], outline=WRONG if wrong else None, width=2)
        colour = "#555555" if is_tag else "black"
        draw.text((x0, y0 + 3), text, fill=WRONG if is_tag and wrong else colour, font=font)
        if wrong and not is_tag:
            middle = y0 + (step - 4) // 2
            draw.line((x0 - 2, middle, x0 + size + 2, middle), fill=WRONG, width=1)


# --------------------------------------------------------------------------------------------- page

_CSS = """
body { font-family: sans-serif; margin: 2em; color: #222; }
section { border-top: 1px solid #ccc; padding: 1em 0; }
img { max-width: 100%; border: 1px solid #ddd; }
table.rows th { text-align: left; padding-right: 1em; white-space: nowrap; vertical-align: top; }
table.rows td { line-height: 2; }
.ent { padding: 2px 3px; border-radius: 3px; }
.ent sub { font-size: 70%; color: #555; }
.wrong { outline: 2px solid #e00000; text-decoration: line-through; text-decoration-color: #e00000; }
.legend span { margin-right: 1em; }
"""


def _page(record: dict, names: tuple[str, str], colours: dict) -> str:
    """index.html: inline CSS, PNGs by relative name, nothing fetched from elsewhere."""
    summary, config = record["summary"], record["config"]
    css = _CSS + "".join(f".t-{i} {{ background: {c}; }}\n" for i, c in enumerate(colours.values()))
    type_class = {kind: f"t-{i}" for i, kind in enumerate(colours)}
    legend = (
        "".join(f'<span class="ent {type_class[kind]}">{html.escape(kind)}</span>' for kind in colours)
        + '<span class="ent wrong">wrong span</span>'
    )
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>cases: {html.escape(names[1])} vs {html.escape(names[0])}</title>",
        f"<style>{css}</style></head><body>",
        f"<h1>{html.escape(names[1])} against {html.escape(names[0])} on {html.escape(summary['split'])}</h1>",
        f"<p>A = {html.escape(config['run_a'])}<br>B = {html.escape(config['run_b'])}</p>",
        f'<p class="summary"><b>{html.escape(summary_line(summary))}</b></p>',
        '<table class="counts"><tr><th>posts that differ</th><th>spans fixed</th><th>spans broken</th>'
        "<th>changed type</th></tr>"
        f"<tr><td>{summary['posts_differ']}</td><td>{summary['fixed']}</td><td>{summary['broken']}</td>"
        f"<td>{summary['changed_type']}</td></tr></table>",
        f'<p class="legend">{legend}</p>',
    ]
    for entry in record["posts"]:
        rows = (
            ("gold", entry["gold"], None),
            (names[0], entry["a"], entry["gold"]),
            (names[1], entry["b"], entry["gold"]),
        )
        cells = "".join(
            f"<tr><th>{html.escape(name)}</th><td>{_html_words(entry['words'], spans, gold, type_class)}</td></tr>"
            for name, spans, gold in rows
        )
        parts += [
            f'<section id="post-{entry["rank"]}">',
            f"<h2>#{entry['rank']} {html.escape(entry['key'])} (line {entry['line']}): fixed "
            f"{len(entry['fixed'])}, broken {len(entry['broken'])}, changed type {len(entry['changed_type'])}</h2>",
            f'<img src="{html.escape(entry["png"])}" alt="{html.escape(entry["image"].get("reason", entry["key"]))}">',
            f'<table class="rows">{cells}</table>',
            "</section>",
        ]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _html_words(words: list[str], spans: list[list], gold: list[list] | None, type_class: dict) -> str:
    starts = {start: (kind, start, end) for kind, start, end in spans}
    out, i = [], 0
    while i < len(words):
        if i in starts:
            kind, start, end = starts[i]
            wrong = gold is not None and [kind, start, end] not in gold
            text = html.escape(" ".join(words[start:end]))
            out.append(
                f'<span class="ent {type_class[kind]}{" wrong" if wrong else ""}">{text}'
                f"<sub>{html.escape(kind)}</sub></span>"
            )
            i = end
        else:
            out.append(html.escape(words[i]))
            i += 1
    return " ".join(out)
