"""The drawing of a case study (train/report/cases.py chooses the posts): each post's PNG (its image with the
cached regions, or a placeholder saying why there is none, over the gold / A / B rows of words with
the spans coloured by type and wrong spans struck through) and the self-contained index.html.
"""

from __future__ import annotations

import html
from typing import TYPE_CHECKING

from PIL import Image, ImageDraw, ImageFont

from mner.cache.inspect import draw_regions, record_regions
from mner.cache.reader import CacheReader

if TYPE_CHECKING:
    from mner.train.report.cases import CasePost, Span

# The longer side of the image in a case PNG, in pixels (tweet thumbnails are enlarged, photos shrunk).
IMAGE_SIDE = 320
# Narrowest PNG: room for the rows of words beside a small image.
MIN_WIDTH = 480
# Span colours, one per entity type (types sorted); light enough for black text on them.
TYPE_COLOURS = ("#8dd3c7", "#ffffb3", "#bebada", "#fdb462", "#b3de69", "#fccde5", "#80b1d3", "#d9d9d9")
WRONG = "#e00000"


def summary_line(summary: dict) -> str:
    """The one-line summary the command prints and the page heads with."""
    return (
        f"{summary['posts_differ']} of {summary['posts']} {summary['split']} posts differ: B fixes "
        f"{summary['fixed']} gold spans, breaks {summary['broken']}, changes the type of "
        f"{summary['changed_type']}; {summary['shown']} shown"
    )


def type_colours(types) -> dict[str, str]:
    """A colour per entity type, in the order given (TYPE_COLOURS, repeated past its end)."""
    return {kind: TYPE_COLOURS[i % len(TYPE_COLOURS)] for i, kind in enumerate(types)}


def case_picture(key: str, reader: CacheReader | None, source) -> tuple[Image.Image, dict]:
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


def case_png(picture: Image.Image, post: CasePost, names: tuple[str, str], colours: dict) -> Image.Image:
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


def case_page(record: dict, names: tuple[str, str], colours: dict) -> str:
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
