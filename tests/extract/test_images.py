"""Image decoding: every odd file either decodes to what a viewer shows or gets a status saying why not."""

import io
import os

import numpy as np
import pytest
from PIL import Image, ImageFile

from mner.extract.images import MAX_ASPECT_RATIO, load_image

RED, BLUE = (255, 0, 0), (0, 0, 255)


def pixels(loaded) -> np.ndarray:
    assert loaded.status == "ok", loaded.error
    assert loaded.image.mode == "RGB"
    return np.asarray(loaded.image).astype(int)  # (H, W, 3)


def test_plain_rgb_jpeg(tmp_path):
    path = tmp_path / "a.jpg"
    Image.new("RGB", (30, 20), (10, 200, 30)).save(path, quality=95)
    loaded = load_image(path)
    assert (loaded.width, loaded.height, loaded.error) == (30, 20, "")
    assert np.abs(pixels(loaded) - (10, 200, 30)).max() <= 3


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    # C=0, M=Y=255, K=0 is pure red in CMYK.
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    assert np.abs(pixels(load_image(path)) - RED).max() <= 3


def test_greyscale_becomes_three_equal_channels(tmp_path):
    path = tmp_path / "grey.png"
    Image.new("L", (8, 6), 77).save(path)
    assert (pixels(load_image(path)) == 77).all()


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((6, 8), 32896, np.uint16)).save(path)  # 32896 / 257 = 128
    assert Image.open(path).mode.startswith("I")
    assert (pixels(load_image(path)) == 128).all()


def test_palette_transparency_is_composited_on_white(tmp_path):
    path = tmp_path / "palette.png"
    image = Image.new("P", (4, 2), 0)
    image.putpalette([0, 0, 255, 255, 0, 0] + [0] * 762)  # index 0 blue, index 1 red
    image.putpixel((3, 1), 1)
    image.save(path, transparency=0)  # index 0 is fully transparent
    got = pixels(load_image(path))
    assert (got[1, 3] == RED).all()
    assert (got[0, 0] == (255, 255, 255)).all()  # transparent blue shows the white background


def test_rgba_alpha_blends_with_white(tmp_path):
    path = tmp_path / "rgba.png"
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (255, 0, 0, 255))  # opaque red
    image.putpixel((1, 0), (255, 0, 0, 128))  # half-transparent red
    image.save(path)
    got = pixels(load_image(path))
    assert (got[0, 0] == RED).all()
    assert np.abs(got[0, 1] - (255, 127, 127)).max() <= 1


def test_exif_orientation_is_applied_and_size_is_after_rotation(tmp_path):
    path = tmp_path / "rotated.jpg"
    stored = Image.new("RGB", (60, 30), RED)
    stored.paste(BLUE, (30, 0, 60, 30))  # stored: left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation 6: display rotated 90 degrees clockwise
    stored.save(path, exif=exif, quality=95)
    loaded = load_image(path)
    assert (loaded.width, loaded.height) == (30, 60)
    got = pixels(loaded)
    # Rotating clockwise carries the stored left edge to the top.
    assert np.abs(got[:25] - RED).max() <= 10
    assert np.abs(got[35:] - BLUE).max() <= 10


def test_truncated_jpeg_is_corrupt(tmp_path):
    path = tmp_path / "cut.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (120, 160, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    loaded = load_image(path)
    assert (loaded.status, loaded.image, loaded.width) == ("corrupt", None, 0)
    assert "truncated" in loaded.error and str(path) in loaded.error


def test_truncated_loading_switched_on_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(
        ValueError, match="LOAD_TRUNCATED_IMAGES is True, so truncated images would decode silently"
    ):
        load_image(tmp_path / "any.jpg")


@pytest.mark.parametrize(
    "content, why",
    [(b"", "cannot identify image file"), (b"IMGID:1\nhello\tO\n", "cannot identify image file")],
    ids=["zero-byte", "text-named-jpg"],
)
def test_non_images_are_corrupt(tmp_path, content, why):
    path = tmp_path / "x.jpg"
    path.write_bytes(content)
    loaded = load_image(path)
    assert loaded.status == "corrupt" and loaded.image is None
    assert why in loaded.error


@pytest.mark.parametrize("side", [40, 50], ids=["warning-range", "error-range"])
def test_decompression_bomb_is_corrupt(tmp_path, monkeypatch, side):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (side, side), RED).save(path)
    # Pillow warns above MAX_IMAGE_PIXELS (1600 > 1000) and raises above twice that (2500 > 2000).
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    loaded = load_image(path)
    assert loaded.status == "corrupt"
    assert "decompression bomb" in loaded.error


def test_missing_file(tmp_path):
    loaded = load_image(tmp_path / "nope.jpg")
    assert (loaded.status, loaded.image, loaded.width, loaded.height) == ("missing", None, 0, 0)
    assert loaded.error == f"image not found: {tmp_path / 'nope.jpg'}"


def test_a_directory_named_like_an_image_says_so(tmp_path):
    (tmp_path / "1234.jpg").mkdir()
    loaded = load_image(tmp_path / "1234.jpg")
    assert (loaded.status, loaded.image, loaded.width, loaded.height) == ("missing", None, 0, 0)
    assert loaded.error == f"image path is a directory, not a file: {tmp_path / '1234.jpg'}"


def test_a_fifo_is_never_opened(tmp_path):
    # Opening a FIFO for reading blocks until a writer comes: load_image must decide from stat alone.
    path = tmp_path / "pipe.jpg"
    os.mkfifo(path)
    loaded = load_image(path)
    assert (loaded.status, loaded.error) == ("missing", f"image path is a FIFO, not a regular file: {path}")


def test_a_broken_symlink_says_so(tmp_path):
    path = tmp_path / "link.jpg"
    path.symlink_to(tmp_path / "gone.jpg")
    loaded = load_image(path)
    assert (loaded.status, loaded.error) == ("missing", f"image not found: {path} (a broken symlink)")


@pytest.mark.parametrize(
    "size, status",
    [
        ((MAX_ASPECT_RATIO, 1), "ok"),
        ((1, MAX_ASPECT_RATIO), "ok"),
        ((MAX_ASPECT_RATIO + 1, 1), "corrupt"),
        ((1, MAX_ASPECT_RATIO + 1), "corrupt"),
        ((20000, 20), "corrupt"),
        ((20, 20000), "corrupt"),
        ((1, 1), "ok"),
    ],
    ids=lambda value: "x".join(map(str, value)) if isinstance(value, tuple) else value,
)
def test_elongated_pictures_are_corrupt_with_their_size(tmp_path, size, status):
    path = tmp_path / "x.png"
    Image.new("RGB", size, RED).save(path)
    loaded = load_image(path)
    assert loaded.status == status
    if status == "corrupt":
        width, height = size
        assert loaded.error == (
            f"image {path} is {width}x{height}: its long side is more than {MAX_ASPECT_RATIO} times its "
            "short side, which the models' resizing cannot handle; crop or pad it"
        )
        assert (loaded.image, loaded.width, loaded.height) == (None, 0, 0)
    else:
        assert (loaded.width, loaded.height) == size
