"""Safe image decoding: an RGB picture exactly as a viewer would show it, or a status saying why not.

A post whose picture cannot be decoded keeps status "missing" or "corrupt" and zeroed tokens; we never
substitute another picture (a placeholder would give the fusion model a confident, wrong signal).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps


@dataclass
class LoadedImage:
    """One decoded image, or why there is none."""

    image: Image.Image | None  # RGB, EXIF orientation applied; None unless status is "ok"
    status: str  # "ok" | "missing" | "corrupt" (cache.shards.STATUS_NAMES)
    width: int  # after EXIF rotation; 0 unless status is "ok"
    height: int  # after EXIF rotation; 0 unless status is "ok"
    error: str = ""  # why status is not "ok"


def load_image(path: str | Path) -> LoadedImage:
    """Decode `path` fully into an RGB PIL image.

    Truncated files, non-images, zero-byte files and decompression bombs (more than
    `Image.MAX_IMAGE_PIXELS` pixels) are "corrupt"; an absent file is "missing".
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ValueError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True, so truncated images would decode silently "
            "with grey bands; set it back to False before extracting"
        )
    path = Path(path)
    if not path.is_file():
        return LoadedImage(None, "missing", 0, 0, f"image not found: {path}")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; both are bombs for us.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # Image.open checks the pixel count against Image.MAX_IMAGE_PIXELS before decoding anything.
            with Image.open(path) as opened:
                # load() decodes every byte now, so a truncated file fails here rather than later.
                opened.load()
                image = _to_rgb(ImageOps.exif_transpose(opened))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return _corrupt(path, f"decompression bomb: {err}")
    except Exception as err:  # noqa: BLE001 - image plugins raise anything (struct.error, IndexError, ...)
        return _corrupt(path, f"{type(err).__name__}: {err}")
    return LoadedImage(image, "ok", image.width, image.height)


def _corrupt(path: Path, why: str) -> LoadedImage:
    return LoadedImage(None, "corrupt", 0, 0, f"cannot decode {path}: {why}")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited on white (what a browser shows for a logo PNG)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # convert("L") clips 16-bit values at 255 (a white picture); scale the full range instead.
        values = np.asarray(image, dtype=np.float64)  # (H, W)
        top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        grey = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, mode="L").convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
