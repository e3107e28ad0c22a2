"""Safe image decoding: an RGB picture exactly as a viewer would show it, or a status saying why not.

A post whose picture cannot be decoded keeps status "missing" or "corrupt" and zeroed tokens; we never
substitute another picture (a placeholder would give the fusion model a confident, wrong signal).

A decoded picture whose long side is more than MAX_ASPECT_RATIO times its short side is "corrupt" too:
the models resize by the short side (CLIP) or fit both sides into a box (the detectors), so a 20000x20
strip becomes a multi-gigabyte array for CLIP or a zero-pixel side for the detector. Every model the
extractor offers handles 100:1 (the tiny detector's 128-pixel box still keeps a 1-pixel side).
"""

from __future__ import annotations

import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Long side / short side above which an image is "corrupt" (see the module docstring).
MAX_ASPECT_RATIO = 100


NO_IMAGE_GIVEN = "no image given for this post (its csv image cell is empty)"


@dataclass
class LoadedImage:
    """One decoded image, or why there is none."""

    image: Image.Image | None  # RGB, EXIF orientation applied; None unless status is "ok"
    status: str  # "ok" | "missing" | "corrupt" (cache.shards.STATUS_NAMES)
    width: int  # after EXIF rotation; 0 unless status is "ok"
    height: int  # after EXIF rotation; 0 unless status is "ok"
    error: str = ""  # why status is not "ok"


def load_image(path: str | Path | None) -> LoadedImage:
    """Decode `path` fully into an RGB PIL image.

    Truncated files, non-images, zero-byte files, decompression bombs (more than
    `Image.MAX_IMAGE_PIXELS` pixels) and pictures more elongated than MAX_ASPECT_RATIO are "corrupt";
    an absent file, a broken symlink, a directory or another non-regular file (FIFO, socket, device:
    never opened, a FIFO would block) is "missing", with the reason in `error`.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise ValueError(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True, so truncated images would decode silently "
            "with grey bands; set it back to False before extracting"
        )
    if path is None:  # a classification csv whose image cell is empty
        return LoadedImage(None, "missing", 0, 0, NO_IMAGE_GIVEN)
    path = Path(path)
    absent = _not_a_file(path)
    if absent:
        return LoadedImage(None, "missing", 0, 0, absent)
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
    width, height = image.width, image.height
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        return LoadedImage(
            None,
            "corrupt",
            0,
            0,
            f"image {path} is {width}x{height}: its long side is more than {MAX_ASPECT_RATIO} times its "
            "short side, which the models' resizing cannot handle; crop or pad it",
        )
    return LoadedImage(image, "ok", width, height)


def _not_a_file(path: Path) -> str:
    """Why `path` is not a regular file ("" when it is one), from stat alone (nothing is opened)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return (
            f"image not found: {path} (a broken symlink)" if path.is_symlink() else f"image not found: {path}"
        )
    except OSError as err:  # permission denied on a parent folder, a name too long, a symlink loop
        return f"image cannot be reached: {path}: {err.strerror or err}"
    if stat.S_ISREG(mode):
        return ""
    if stat.S_ISDIR(mode):
        return f"image path is a directory, not a file: {path}"
    kinds = {stat.S_ISFIFO: "a FIFO", stat.S_ISSOCK: "a socket", stat.S_ISCHR: "a character device"}
    kind = next((name for test, name in kinds.items() if test(mode)), "a block device")
    return f"image path is {kind}, not a regular file: {path}"


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
