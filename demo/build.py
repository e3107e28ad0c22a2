"""The embedded demo data set: seeded posts in IMGID-CoNLL whose entity TYPE can be told only from the image.

Why it is built this way:

- Text. Every post draws its entity names from ONE pool of ambiguous names (Jordan, Paris, Apple,
  Victoria, ...), shared by all four types, and fills type-neutral templates ("Just saw {E} this
  morning"). The words say where an entity is but not which type it has, so a text-only model finds
  the spans and can only guess the type, while a model that reads the image can tell it. That gap is
  what the demo exists to show; it is the premise of multimodal NER made total.
- Images. The demo runs without downloaded weights, so its vision models are untrained random
  networks. A random CNN or ViT separates images by dominant colour and layout, not by meaning, so each
  type's picture shows a scene for the type AND a palette for it: PER a figure (head and body) on warm
  red/orange, LOC a landscape (blue sky, green ground, yellow sun), ORG a grey-blue building with a
  window grid and a logo block, OTHER a purple/magenta geometric pattern. Jitter in position, size,
  aspect ratio and colour noise keeps every image distinct.
- Failure paths. About 3% of posts have no image file and one image is a zero-byte .jpg, so the
  cache's "missing" and "corrupt" statuses occur in every demo run.
- Determinism. One numpy Generator seeded by `seed` draws everything, in a fixed order; two builds of
  the same config are byte-identical. A folder that already holds the same build is reused.

Layout: `<out_dir>/train.txt valid.txt test.txt images/demo_00017.jpg demo.json`.
"""

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mner.cache.conll import Post, write_split

log = logging.getLogger(__name__)

# Bump when the generator changes what it writes, so old demo folders are rebuilt instead of reused.
DEMO_VERSION = 1
TYPES = ("PER", "LOC", "ORG", "OTHER")
# Entries of the output folder that the demo owns (and may replace on a rebuild); demo.json last.
_OWNED = ("images", "train.txt", "valid.txt", "test.txt", "demo.json")
MISSING_FRACTION = 0.03

# Each name is a plausible person, place, organisation and "other" (team, product, event) at once.
NAMES = (
    "Jordan", "Paris", "Lincoln", "Victoria", "Chelsea", "Phoenix", "Washington", "Apple", "Amazon",
    "Georgia", "Austin", "Madison", "Sydney", "Florence", "Dakota", "Orlando", "Savannah", "Jackson",
    "Houston", "Denver", "Charlotte", "Aurora", "Mercury", "Delta", "Ford", "Chase", "Virgin", "Tesla",
    "Jaguar", "Oracle", "Camden", "Berkeley",
    "Paris Hilton", "Santa Fe", "Green Bay", "Golden State", "Victoria Cross", "Madison Square",
    "Austin Powers", "Amazon Prime", "Phoenix Rising", "Lincoln Park", "Silver Lake", "Blue Ridge",
    "Saint Louis", "Georgia Pacific", "Washington Square", "Golden Gate Park",
)  # fmt: skip
# Type-neutral: nothing in a template hints at the type of what fills it.
TEMPLATES_ONE = (
    "Just saw {E} this morning",
    "{E} is trending again",
    "Can't stop thinking about {E} tonight",
    "Big news from {E} today !",
    "Everyone is talking about {E}",
    "RT @daily_feed : {E} never disappoints",
    "Finally got to see {E} #blessed",
    "Throwback to {E} last summer #tbt",
    "So much love for {E} right now",
    "Nobody does it like {E} .",
    "Photos : {E} , more at http://t.co/x7demo",
    "Who else is following {E} ?",
)
TEMPLATES_TWO = (
    "{E} and {F} all over my feed",
    "From {E} to {F} in one day",
    "{E} vs {F} , who wins ?",
    "Can't decide between {E} and {F}",
    "Shoutout to {E} and {F} !",
    "{E} today , {F} tomorrow",
)


@dataclass
class DemoConfig:
    out_dir: str  # folder the data set is written to; it becomes the data folder
    seed: int = 13  # drives text, types, images and the missing/corrupt choice
    n_train: int = 240  # posts in train.txt (at least 4, so that every type is in train)
    n_valid: int = 80  # posts in valid.txt
    n_test: int = 80  # posts in test.txt
    image_size: int = 96  # longer image side in pixels; the shorter one is 75-100% of it

    def __post_init__(self):
        if not str(self.out_dir):
            raise ValueError("out_dir must name a folder")
        if self.n_train < len(TYPES):
            raise ValueError(
                f"n_train must be >= {len(TYPES)} so that every type is in train, got {self.n_train}"
            )
        for field in ("n_valid", "n_test"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be >= 32 pixels, got {self.image_size}")


@dataclass(frozen=True)
class _DemoPost:
    key: str  # image id, e.g. "demo_00017"
    type: str  # the type of every mention in the post
    words: tuple[str, ...]
    tags: tuple[str, ...]


def build_demo(cfg: DemoConfig) -> Path:
    """Write the demo data set (or reuse an identical one) and return its data folder.

    Returns:
        Path `cfg.out_dir`, holding train.txt, valid.txt, test.txt (IMGID-CoNLL), images/<id>.jpg and
        demo.json (the config, the ids per split and which ids are missing or corrupt).
    Raises:
        ValueError if out_dir holds split files or images/ that no demo build left there.
    """
    out = Path(cfg.out_dir)
    config = {k: v for k, v in asdict(cfg).items() if k != "out_dir"}  # a moved folder is still reusable
    if _holds_build(out, config):
        log.info("reusing demo data at %s", out)
        return out
    _check_writable(out)

    rng = np.random.default_rng(cfg.seed)
    splits = _make_posts(cfg, rng)
    posts = [post for split_posts in splits.values() for post in split_posts]
    n_missing = max(1, round(MISSING_FRACTION * len(posts)))
    chosen = rng.choice(len(posts), size=n_missing + 1, replace=False)
    missing = sorted(posts[i].key for i in chosen[:n_missing])
    corrupt = posts[chosen[-1]].key

    staging = out.resolve().parent / f".{out.resolve().name}.building"  # same disk: renames are cheap
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted build
    (staging / "images").mkdir(parents=True)
    try:
        for name, split_posts in splits.items():
            # No blank line after the last post: the layout every demo build so far has written.
            posts_only = [Post(key=p.key, words=p.words, tags=p.tags, line=0) for p in split_posts]
            write_split(staging / f"{name}.txt", posts_only, "imgid", blank_after_last=False)
        for post in posts:
            path = staging / "images" / f"{post.key}.jpg"
            if post.key == corrupt:
                path.write_bytes(b"")
            elif post.key not in missing:
                _draw(post.type, rng, cfg.image_size).save(path, format="JPEG", quality=90)
        meta = {
            "version": DEMO_VERSION,
            "config": config,
            "splits": {name: [p.key for p in split_posts] for name, split_posts in splits.items()},
            "missing": missing,
            "corrupt": [corrupt],
        }
        (staging / "demo.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        _move_in(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("built demo data at %s: %d posts, %d without image, 1 corrupt", out, len(posts), len(missing))
    return out


def _holds_build(out: Path, config: dict) -> bool:
    try:
        meta = json.loads((out / "demo.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    same = meta.get("version") == DEMO_VERSION and meta.get("config") == config
    return same and all((out / name).exists() for name in _OWNED)


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"demo out_dir {out} is a file; give a folder")
    if (out / "demo.json").is_file():
        return  # an earlier demo build (other config or version): ours to replace
    foreign = [name for name in _OWNED if (out / name).exists()]
    if foreign:
        raise ValueError(
            f"demo out_dir {out} already holds {', '.join(foreign)} but no demo.json, so it is not a demo "
            "folder; give an empty or new folder"
        )


def _move_in(staging: Path, out: Path) -> None:
    """Replace the owned entries of `out` with the staged ones; demo.json goes first out and last in."""
    out.mkdir(parents=True, exist_ok=True)
    for name in reversed(_OWNED):
        old = out / name
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
    for name in _OWNED:
        (staging / name).rename(out / name)


def _make_posts(cfg: DemoConfig, rng: np.random.Generator) -> dict[str, list[_DemoPost]]:
    """Posts per split; ids run on across splits so every image key is unique."""
    splits, next_id = {}, 0
    for name in ("train", "valid", "test"):  # the order ids are handed out in
        n = getattr(cfg, f"n_{name}")
        # Balanced types, shuffled: every type is in every split of >= 4 posts.
        types = [TYPES[i % len(TYPES)] for i in range(n)]
        rng.shuffle(types)
        splits[name] = [_make_post(f"demo_{next_id + i:05d}", t, rng) for i, t in enumerate(types)]
        next_id += n
    return splits


def _make_post(key: str, entity_type: str, rng: np.random.Generator) -> _DemoPost:
    two = rng.random() < 0.3
    templates = TEMPLATES_TWO if two else TEMPLATES_ONE
    template = templates[int(rng.integers(len(templates)))]
    names = [NAMES[i] for i in rng.choice(len(NAMES), size=2 if two else 1, replace=False)]
    fill = dict(zip(("{E}", "{F}"), names))
    words, tags = [], []
    for word in template.split():
        if word in fill:
            parts = fill[word].split()
            words += parts
            tags += [f"B-{entity_type}"] + [f"I-{entity_type}"] * (len(parts) - 1)
        else:
            words.append(word)
            tags.append("O")
    return _DemoPost(key=key, type=entity_type, words=tuple(words), tags=tuple(tags))


def _draw(entity_type: str, rng: np.random.Generator, image_size: int) -> Image.Image:
    """One jittered picture of the type's scene in the type's palette (see the module docstring)."""
    short = int(round(image_size * rng.uniform(0.75, 1.0)))
    width, height = (image_size, short) if rng.random() < 0.5 else (short, image_size)
    painters = {"PER": _draw_person, "LOC": _draw_landscape, "ORG": _draw_building, "OTHER": _draw_pattern}
    image = Image.new("RGB", (width, height))
    painters[entity_type](ImageDraw.Draw(image), width, height, rng)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 6.0, size=(height, width, 3))  # (H, W, 3)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def _jitter(rgb: tuple[int, int, int], rng: np.random.Generator, spread: int = 20) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-spread, spread + 1), 0, 255)) for c in rgb)


def _draw_person(draw: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator) -> None:
    draw.rectangle((0, 0, w, h), fill=_jitter((230, 95, 45), rng, 25))  # warm red/orange
    cx = w * rng.uniform(0.3, 0.7)
    r = min(w, h) * rng.uniform(0.09, 0.14)
    cy = h * rng.uniform(0.22, 0.38)
    body = _jitter((70, 45, 60), rng)
    draw.rounded_rectangle((cx - 1.6 * r, cy + 1.2 * r, cx + 1.6 * r, h), radius=int(r), fill=body)
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=_jitter((240, 195, 160), rng))


def _draw_landscape(draw: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator) -> None:
    horizon = h * rng.uniform(0.45, 0.65)
    draw.rectangle((0, 0, w, horizon), fill=_jitter((95, 165, 235), rng))  # blue sky
    hill = _jitter((45, 120, 50), rng)
    peak = (w * rng.uniform(0.2, 0.8), horizon - h * rng.uniform(0.1, 0.2))
    draw.polygon([(0, horizon), peak, (w, horizon)], fill=hill)
    draw.rectangle((0, horizon, w, h), fill=_jitter((70, 170, 60), rng))  # green ground
    r = min(w, h) * rng.uniform(0.07, 0.12)
    sx, sy = w * rng.uniform(0.15, 0.85), horizon * rng.uniform(0.2, 0.5)
    draw.ellipse((sx - r, sy - r, sx + r, sy + r), fill=_jitter((250, 220, 60), rng, 5))  # yellow sun


def _draw_building(draw: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator) -> None:
    draw.rectangle((0, 0, w, h), fill=_jitter((175, 185, 200), rng))  # pale grey-blue sky
    left, right = w * rng.uniform(0.12, 0.3), w * rng.uniform(0.7, 0.88)
    top = h * rng.uniform(0.12, 0.3)
    draw.rectangle((left, top, right, h), fill=_jitter((85, 100, 130), rng))  # grey/blue facade
    rows, cols = int(rng.integers(3, 6)), int(rng.integers(2, 5))
    cell_w, cell_h = (right - left) / cols, (h - top - h * 0.12) / (rows + 1)
    window = _jitter((210, 220, 235), rng, 10)
    for i in range(rows):
        for j in range(cols):
            x, y = left + j * cell_w, top + (i + 1) * cell_h
            draw.rectangle(
                (x + 0.25 * cell_w, y + 0.2 * cell_h, x + 0.75 * cell_w, y + 0.75 * cell_h), fill=window
            )
    logo = min(right - left, h) * 0.18
    lx = (left + right) / 2
    draw.rectangle(
        (lx - logo, top + 2, lx + logo, top + 2 + logo), fill=_jitter((30, 60, 150), rng)
    )  # logo block


def _draw_pattern(draw: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator) -> None:
    draw.rectangle((0, 0, w, h), fill=_jitter((115, 35, 140), rng))  # purple
    palette = ((225, 50, 200), (170, 70, 230), (250, 120, 235), (90, 20, 120))  # magenta/violet
    for _ in range(int(rng.integers(5, 10))):
        colour = _jitter(palette[int(rng.integers(len(palette)))], rng, 15)
        x, y = w * rng.uniform(0, 1), h * rng.uniform(0, 1)
        s = min(w, h) * rng.uniform(0.1, 0.3)
        kind = int(rng.integers(3))
        if kind == 0:
            draw.ellipse((x - s, y - s, x + s, y + s), fill=colour)
        elif kind == 1:
            draw.rectangle((x - s, y - s / 2, x + s, y + s / 2), fill=colour)
        else:
            draw.polygon([(x, y - s), (x - s, y + s), (x + s, y + s)], fill=colour)
