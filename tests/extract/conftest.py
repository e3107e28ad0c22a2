"""Small image data sets for the extraction tests: solid-colour JPEGs in an IMGID-CoNLL data folder."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mner.cache.conll import Post, write_split

# Four well-separated colours; image i gets COLOURS[i % 4], so several images share a colour.
COLOURS = [(220, 30, 30), (30, 160, 40), (40, 60, 210), (240, 200, 20)]


@dataclass
class ImageDataset:
    data_dir: Path  # folder with train.txt / valid.txt / test.txt and images/
    keys: list[str]  # every image key, sorted (what the cache holds)
    status: dict[str, str]  # key -> the status extraction must record
    colour: dict[str, tuple[int, int, int]]  # key -> RGB of the ok images


def make_image_dataset(
    tmp_path: Path,
    n: int = 12,
    missing: int = 1,
    corrupt: int = 1,
    size: tuple[int, int] = (48, 40),
    solid: bool = False,
    name: str = "data",
) -> ImageDataset:
    """n posts with image keys "1000", "1001", ...: the last `missing` have no file, the `corrupt` before
    them are text files named .jpg, the rest are JPEGs of `size` (width, height) in one of four colours.

    Images of one colour are byte-identical. Unless `solid`, each colour carries its own fixed blocky
    texture: a flat picture makes every same-size detector proposal score exactly alike, and such ties
    would let rounding noise pick the top-k boxes. The splits overlap (the first key is in train and
    test) so key deduplication is exercised.
    """
    folder = tmp_path / name
    images = folder / "images"
    images.mkdir(parents=True)
    keys = [str(1000 + i) for i in range(n)]
    n_ok = n - missing - corrupt
    status, colour = {}, {}
    for i, key in enumerate(keys):
        if i < n_ok:
            colour[key] = COLOURS[i % len(COLOURS)]
            _picture(i % len(COLOURS), size, solid).save(images / f"{key}.jpg", quality=95)
            status[key] = "ok"
        elif i < n_ok + corrupt:
            (images / f"{key}.jpg").write_text("this is not a picture\n")
            status[key] = "corrupt"
        else:
            status[key] = "missing"
    splits = {
        "train": [key for i, key in enumerate(keys) if i % 3 != 2],
        "valid": [key for i, key in enumerate(keys) if i % 3 == 2],
        "test": [keys[0], keys[-1]],
    }
    words, tags = ("Visit", "Paris", "with", "Anna"), ("O", "B-LOC", "O", "B-PER")
    for split, split_keys in splits.items():
        posts = [Post(key=key, words=words, tags=tags, line=0) for key in split_keys]
        write_split(folder / f"{split}.txt", posts, blank_after_last=False)
    return ImageDataset(folder, keys, status, colour)


def _picture(colour: int, size: tuple[int, int], solid: bool) -> Image.Image:
    width, height = size
    base = np.full((height, width, 3), COLOURS[colour], np.float64)  # (H, W, 3)
    if not solid:
        blocks = np.random.default_rng(colour).integers(0, 256, (height // 8 + 1, width // 8 + 1, 3))
        texture = blocks.repeat(8, axis=0).repeat(8, axis=1)[:height, :width]  # 8x8-pixel blocks
        base = 0.6 * base + 0.4 * texture
    return Image.fromarray(base.round().astype(np.uint8))


@pytest.fixture(scope="session")
def image_dataset():
    """`make_image_dataset` for test modules (a conftest is not importable by module name)."""
    return make_image_dataset
