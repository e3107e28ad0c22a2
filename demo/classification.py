"""A tiny seeded MVSA-style folder for sentence-level classification: the label is in every image and
in the text of only some posts.

Why it is built this way:

- Images. Every image shows its label the way an untrained vision model can see it (by palette and
  layout, as demo/build.py explains): positive a bright yellow/orange field with an upward arc (a
  smile), negative a dark blue/grey field with a downward arc, neutral a grey-green field with a flat
  bar. Jitter in size, position and colour noise keeps every image distinct.
- Text. A share `text_fraction` (default 0.4) of posts carries a cue phrase of its label ("love it",
  "so sad", "nothing special"); the rest are filled from label-free templates, identical in
  distribution for every label. A text-only model can therefore reach about text_fraction + (1 -
  text_fraction) / 3 accuracy (0.6 by default), an image-aware one close to 1: the gap (the demo's
  test asks `both` >= `text` + 0.15) is what the demo exists to show.
- Encodings. A share `cp1252_fraction` of text files is written in cp1252 instead of UTF-8, with a
  word the two encode differently (café, naïve, €5), as the real MVSA release mixes encodings; the
  reader decodes them by its fallback and counts them.
- Layout: `train.txt`, labelled `test.txt`, `test_without_label.txt` (`guid,null`, in a shuffled guid
  order), no `valid.txt` (so the reader's split rule runs), `data/<guid>.txt` and `data/<guid>.jpg`,
  and `demo.json` {"version", "config", "labels", "splits": {split: [guids]}, "truth": {guid: label}
  (also of the unlabelled posts), "text_cue": [guids], "cp1252": [guids]}.
- Determinism. One numpy Generator seeded by `seed` draws everything in a fixed order; two builds of
  the same arguments are byte-identical.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mner.cache.classification import NULL_LABEL, TEXT_DIR, UNLABELLED_FILE, Example, write_predictions
from mner.runtime import LOCK_NAME, folder_state

# Bump when the generator changes what it writes.
MVSA_DEMO_VERSION = 1
LABELS = ("negative", "neutral", "positive")
# Only these phrases tell a label from the text; the templates below never contain them.
CUES = {
    "positive": ("love it", "so happy", "best day ever", "amazing"),
    "negative": ("so sad", "hate this", "worst day ever", "awful"),
    "neutral": ("nothing special", "as usual", "just noting", "no opinion"),
}
TEMPLATES = (
    "Look at this {X}",
    "{X} at the station today",
    "Posting the {X} from this morning",
    "Here is the {X} again",
    "Anyone else seen the {X} ?",
    "RT @feed : the {X} , photo by me",
    "{X} #photo #today",
)
# Label-free fillers; the accented ones are where cp1252 and UTF-8 bytes differ.
THINGS = ("bus", "café", "naïve poster", "€5 coffee", "street", "bridge", "dog", "crème brûlée", "sky")
_OWNED = ("data", "train.txt", "test.txt", UNLABELLED_FILE, "demo.json")
_PALETTE = {"positive": (245, 200, 40), "negative": (35, 45, 90), "neutral": (120, 140, 120)}


def make_mvsa_demo(
    out: str | Path,
    seed: int = 0,
    n: int = 60,
    text_fraction: float = 0.4,
    cp1252_fraction: float = 0.1,
    image_size: int = 32,
) -> Path:
    """Write the demo folder (see the module docstring) and return it.

    Args:
        out: the folder; absent, empty or an earlier demo build (its demo.json), whose files are replaced.
        seed: drives labels, texts, images, encodings and guids.
        n: posts in all (>= 12): 70% train, 15% test, the rest test_without_label; labels balanced.
        text_fraction: share of posts whose text carries a cue phrase of its label.
        cp1252_fraction: share of text files written in cp1252.
        image_size: image side in pixels (>= 16).
    Raises:
        ValueError for arguments out of range, or an out folder holding other files.
    """
    if n < 12:
        raise ValueError(f"n must be >= 12 so that every split holds every label, got {n}")
    for name, value in (("text_fraction", text_fraction), ("cp1252_fraction", cp1252_fraction)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be between 0 and 1, got {value}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    out = Path(out)
    _clear(out)

    rng = np.random.default_rng(seed)
    labels = [LABELS[i % len(LABELS)] for i in range(n)]
    rng.shuffle(labels)
    guids = [str(g) for g in rng.choice(10 * n, size=n, replace=False) + 1]  # unsorted, like MVSA's
    cue = rng.random(n) < text_fraction
    cp1252 = rng.random(n) < cp1252_fraction
    (out / TEXT_DIR).mkdir(parents=True)
    for i, (guid, label) in enumerate(zip(guids, labels)):
        text = _text(label, bool(cue[i]), rng)
        (out / TEXT_DIR / f"{guid}.txt").write_bytes(text.encode("cp1252" if cp1252[i] else "utf-8"))
        _draw(label, rng, image_size).save(out / TEXT_DIR / f"{guid}.jpg", format="JPEG", quality=90)

    n_train, n_test = round(0.7 * n), round(0.15 * n)
    bounds = {
        "train": (0, n_train),
        "test": (n_train, n_train + n_test),
        "test_without_label": (n_train + n_test, n),
    }
    splits = {}
    for name, (start, stop) in bounds.items():
        ids = list(range(start, stop))
        examples = [Example(guids[i], "", labels[i], None, 0) for i in ids]
        if name == "test_without_label":
            write_predictions(out / UNLABELLED_FILE, examples, [NULL_LABEL] * len(ids))
        else:
            write_predictions(out / f"{name}.txt", examples, [labels[i] for i in ids])
        splits[name] = [guids[i] for i in ids]
    meta = {
        "version": MVSA_DEMO_VERSION,
        "config": {
            "seed": seed,
            "n": n,
            "text_fraction": text_fraction,
            "cp1252_fraction": cp1252_fraction,
            "image_size": image_size,
        },
        "labels": list(LABELS),
        "splits": splits,
        "truth": dict(zip(guids, labels)),
        "text_cue": [g for g, c in zip(guids, cue) if c],
        "cp1252": [g for g, c in zip(guids, cp1252) if c],
    }
    (out / "demo.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out


def _clear(out: Path) -> None:
    """Make `out` an empty folder to write into: new, empty, or an earlier build (mner.runtime.folder_state)."""
    if folder_state(out, _why_not_a_demo, "demo") == "ours":
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _why_not_a_demo(out: Path) -> str:
    """ "" when the non-empty folder `out` is an earlier build of this demo, else why not."""
    if not (out / "demo.json").is_file():
        return "no demo.json"
    foreign = sorted(p.name for p in out.iterdir() if p.name not in (*_OWNED, LOCK_NAME))
    return f"it holds files no demo wrote: {', '.join(foreign)}" if foreign else ""


def _text(label: str, with_cue: bool, rng: np.random.Generator) -> str:
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    text = template.replace("{X}", THINGS[int(rng.integers(len(THINGS)))])
    if with_cue:
        phrase = CUES[label][int(rng.integers(len(CUES[label])))]
        text = f"{text} , {phrase}"
    return text


def _draw(label: str, rng: np.random.Generator, size: int) -> Image.Image:
    """The label's palette with its mark (an arc up, an arc down, a flat bar), jittered and noisy."""
    base = np.asarray(_PALETTE[label]) + rng.integers(-20, 21, size=3)
    image = Image.new("RGB", (size, size), tuple(int(c) for c in np.clip(base, 0, 255)))
    draw = ImageDraw.Draw(image)
    cx, cy = size * rng.uniform(0.35, 0.65), size * rng.uniform(0.4, 0.6)
    r = size * rng.uniform(0.2, 0.3)
    mark = (255, 255, 255) if label == "negative" else (40, 30, 20)
    width = max(1, size // 12)
    box = (cx - r, cy - r, cx + r, cy + r)
    if label == "positive":
        draw.arc(box, start=20, end=160, fill=mark, width=width)  # a smile: the lower half of a circle
    elif label == "negative":
        draw.arc(box, start=200, end=340, fill=mark, width=width)  # a frown: the upper half
    else:
        draw.rectangle((cx - r, cy - width / 2, cx + r, cy + width / 2), fill=mark)
    noisy = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 6.0, size=(size, size, 3))  # (H, W, 3)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
