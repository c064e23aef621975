"""load_image / image_size on the odd files remote-sensing users actually have."""
from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from rsviewer.data import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    image_size,
    is_image_file,
    load_image,
    max_pixels,
    stretch_to_uint8,
)
from rsviewer.errors import ImageError, RsviewerError

from conftest import SHARED  # noqa: E402  (finds the shared data wherever the clone is)
UCM_IMAGES = SHARED / "datasets" / "ucm-captions" / "images"


def _rgb(im: Image.Image, size: tuple[int, int]) -> np.ndarray:
    assert isinstance(im, Image.Image)
    assert im.mode == "RGB"
    assert im.size == size
    arr = np.asarray(im)
    assert arr.dtype == np.uint8 and arr.shape == (size[1], size[0], 3)
    return arr


def _raises(path: Path, pattern: str, **kw) -> str:
    with pytest.raises(ImageError, match=pattern) as info:
        load_image(path, **kw)
    msg = str(info.value)
    assert "\n" not in msg and path.name in msg
    assert "Traceback" not in msg
    return msg


# --- formats --------------------------------------------------------------------------

def test_rgb_jpeg_real_ucm_tile():
    if not UCM_IMAGES.is_dir():
        pytest.skip("shared data not available")
    im = load_image(UCM_IMAGES / "1.jpg")
    _rgb(im, image_size(UCM_IMAGES / "1.jpg"))


def test_grayscale_png(tmp_path):
    p = tmp_path / "gray.png"
    Image.new("L", (30, 20), 77).save(p)
    arr = _rgb(load_image(p), (30, 20))
    assert (arr == 77).all()


def test_rgba_png_composited_over_white(tmp_path):
    p = tmp_path / "rgba.png"
    a = np.zeros((10, 12, 4), np.uint8)
    a[..., 0] = 200  # red
    a[:, :6, 3] = 0  # left half fully transparent
    a[:, 6:, 3] = 255  # right half opaque
    a[0, 6, 3] = 128  # one half-transparent pixel
    Image.fromarray(a, "RGBA").save(p)
    arr = _rgb(load_image(p), (12, 10))
    assert (arr[:, :6] == 255).all()  # white, not the hidden red/black
    assert tuple(arr[5, 8]) == (200, 0, 0)
    r, g, b = arr[0, 6]
    assert 220 <= r <= 235 and 120 <= g <= 135 and g == b  # blended with white


def test_palette_gif_with_transparency(tmp_path):
    p = tmp_path / "pal.gif"
    im = Image.new("P", (8, 8), 1)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    im.paste(0, (0, 0, 4, 8))
    im.save(p, transparency=0)
    arr = _rgb(load_image(p), (8, 8))
    assert (arr[:, :4] == 255).all()  # transparent palette index → white
    assert tuple(arr[0, 6]) == (0, 0, 255)


def test_multiframe_gif_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (6, 6), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(p, save_all=True, append_images=frames[1:])
    arr = _rgb(load_image(p), (6, 6))
    assert arr[..., 0].mean() > 200 and arr[..., 1].mean() < 50


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(p, quality=95)  # pure red ink
    arr = _rgb(load_image(p), (16, 16))
    assert arr[..., 0].mean() > 200 and arr[..., 1].mean() < 60


def test_16bit_grayscale_png_uses_full_range(tmp_path):
    p = tmp_path / "g16.png"
    a = (np.arange(40 * 50, dtype=np.uint32).reshape(40, 50) * 3 + 1000).astype(np.uint16)
    Image.fromarray(a).save(p)
    arr = _rgb(load_image(p), (50, 40))
    assert arr.min() == 0 and arr.max() == 255  # stretched, not clipped to white
    assert (arr[..., 0] == arr[..., 2]).all()
    assert np.all(np.diff(arr[20, :, 0].astype(int)) >= 0)  # monotone


def test_16bit_grayscale_tiff_12bit_data_not_dark(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    p = tmp_path / "g16.tif"
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4096, size=(64, 48), dtype=np.uint16)  # 12-bit in a 16-bit file
    a[0, 0] = 65535  # one hot pixel must not darken everything
    tifffile.imwrite(p, a)
    arr = _rgb(load_image(p), (48, 64))
    assert arr.min() == 0 and arr.max() == 255 and 100 < arr.mean() < 155


def test_float_tiff(tmp_path):
    p = tmp_path / "f.tif"
    a = np.linspace(-1, 1, 20 * 30, dtype=np.float32).reshape(20, 30)
    Image.fromarray(a, "F").save(p)
    arr = _rgb(load_image(p), (30, 20))
    assert arr.min() == 0 and arr.max() == 255


def test_16bit_4band_tiff_via_tifffile(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    p = tmp_path / "ms.tif"
    h, w = 24, 32
    bands = np.zeros((4, h, w), np.uint16)
    bands[0] = 3000  # R bright
    bands[0, 0, 0] = 0
    bands[1, :, : w // 2] = 1000  # G: left half
    bands[1, :, w // 2:] = 2000
    bands[2] = np.arange(w, dtype=np.uint16)[None, :] * 100
    bands[3] = 60000  # NIR, must not be used as alpha
    tifffile.imwrite(p, bands, photometric="minisblack", planarconfig="separate")
    with pytest.raises(Exception):
        Image.open(p).load()  # the reason for the fallback
    arr = _rgb(load_image(p), (w, h))
    assert arr[5, 5, 0] == 255 and arr[5, 2, 1] == 0 and arr[5, -2, 1] == 255
    assert arr[5, 0, 2] == 0 and arr[5, -1, 2] == 255
    assert image_size(p) == (w, h)


def test_16bit_rgb_tiff_contig_not_truncated_to_high_byte(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    p = tmp_path / "rgb16.tif"
    a = np.zeros((10, 10, 4), np.uint16)
    a[..., :3] = np.arange(10, dtype=np.uint16)[None, :, None] * 400  # max 3600 → high byte ≤ 14
    a[..., 3] = 100  # 4th band (e.g. NIR, or alpha) is ignored
    tifffile.imwrite(p, a, photometric="rgb", extrasamples=[2])
    arr = _rgb(load_image(p), (10, 10))
    assert arr[..., 0].max() == 255 and arr[0, 0, 0] == 0


def test_tiff_one_and_two_bands(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    one = tmp_path / "one.tif"
    two = tmp_path / "two.tif"
    a = np.arange(12 * 8, dtype=np.float64).reshape(8, 12)
    tifffile.imwrite(one, a, photometric="minisblack")
    tifffile.imwrite(two, np.stack([a, -a]), photometric="minisblack", planarconfig="separate")
    for p in (one, two):
        arr = _rgb(load_image(p), (12, 8))
        assert (arr[..., 0] == arr[..., 1]).all() and arr[0, 0, 0] == 0 and arr[-1, -1, 0] == 255


def test_multipage_tiff_first_page(tmp_path):
    p = tmp_path / "pages.tif"
    frames = [Image.new("L", (5, 7), v) for v in (10, 240)]
    frames[0].save(p, save_all=True, append_images=frames[1:])
    arr = _rgb(load_image(p), (5, 7))
    assert (arr == 10).all()


def test_exif_rotated_jpeg(tmp_path):
    p = tmp_path / "rot.jpg"
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 10, 20))  # red stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    im.save(p, exif=exif.tobytes(), quality=95)
    out = load_image(p)
    arr = _rgb(out, (20, 40))
    assert arr[2, 10, 0] > 200 and arr[2, 10, 2] < 60  # the stripe is now on top
    assert image_size(p) == (20, 40)


def test_bmp_webp_and_l_with_transparency(tmp_path):
    Image.new("RGB", (4, 3), (1, 2, 3)).save(tmp_path / "a.bmp")
    _rgb(load_image(tmp_path / "a.bmp"), (4, 3))
    Image.new("RGBA", (4, 3), (9, 9, 9, 0)).save(tmp_path / "a.webp", lossless=True)
    assert (_rgb(load_image(tmp_path / "a.webp"), (4, 3)) == 255).all()
    Image.new("L", (4, 3), 50).save(tmp_path / "t.png", transparency=50)
    assert (_rgb(load_image(tmp_path / "t.png"), (4, 3)) == 255).all()


def test_result_is_detached_from_file(tmp_path):
    p = tmp_path / "x.png"
    Image.new("RGB", (3, 3), (5, 6, 7)).save(p)
    im = load_image(p)
    p.unlink()
    assert im.getpixel((1, 1)) == (5, 6, 7)


# --- errors ---------------------------------------------------------------------------

def test_missing_file(tmp_path):
    _raises(tmp_path / "nope.jpg", "not found")
    with pytest.raises(ImageError, match="nope.jpg"):
        image_size(tmp_path / "nope.jpg")


def test_directory(tmp_path):
    d = tmp_path / "folder.png"
    d.mkdir()
    _raises(d, "directory")


def test_zero_byte(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    _raises(p, "empty")


def test_text_file_named_png(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("hello, I am not a picture\n" * 10)
    _raises(p, "not a readable image")
    with pytest.raises(ImageError, match="notes.png"):
        image_size(p)


def test_truncated_jpeg(tmp_path):
    p = tmp_path / "half.jpg"
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (128, 128, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = buf.getvalue()
    p.write_bytes(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    _raises(p, "not a readable image.*truncated")


@pytest.mark.filterwarnings("ignore:Corrupt EXIF:UserWarning")  # Pillow's, before it fails
def test_corrupt_tiff(tmp_path):
    p = tmp_path / "bad.tif"
    p.write_bytes(b"II*\x00" + b"\xff" * 40)
    _raises(p, "bad.tif")


def test_too_large_checked_before_decode(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(p)

    def boom(self, *a, **k):  # decoding must not even start
        raise AssertionError("decoded before the size check")

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    msg = _raises(p, r"big.png is 300×200 px \(0.06 Mpx\), over the 0.05 Mpx limit", max_pixels=50_000)
    assert "RSVIEWER_MAX_PIXELS" in msg
    monkeypatch.undo()
    _rgb(load_image(p, max_pixels=60_000), (300, 200))


def test_too_large_tifffile_path_checked_before_decode(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    p = tmp_path / "big4.tif"
    tifffile.imwrite(p, np.zeros((4, 100, 100), np.uint16), photometric="minisblack",
                     planarconfig="separate")
    _raises(p, r"100×100 px", max_pixels=9_999)


def test_env_var_limit(tmp_path, monkeypatch):
    p = tmp_path / "e.png"
    Image.new("L", (100, 100)).save(p)
    monkeypatch.setenv("RSVIEWER_MAX_PIXELS", "5000")
    assert max_pixels() == 5000
    _raises(p, "over the")
    monkeypatch.setenv("RSVIEWER_MAX_PIXELS", "lots")
    with pytest.raises(ImageError, match="RSVIEWER_MAX_PIXELS"):
        max_pixels()
    monkeypatch.delenv("RSVIEWER_MAX_PIXELS")
    assert max_pixels() == DEFAULT_MAX_PIXELS == 250_000_000


def test_pillow_bomb_limit_never_escapes(tmp_path, monkeypatch):
    # Pillow's own limit is far lower here; our limit (the default) must win, silently.
    p = tmp_path / "wide.png"
    Image.new("L", (400, 300)).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _rgb(load_image(p), (400, 300))
        assert image_size(p) == (400, 300)
    assert Image.MAX_IMAGE_PIXELS == 1000  # restored after the call


def test_errors_are_rsviewer_errors(tmp_path):
    with pytest.raises(RsviewerError):
        load_image(tmp_path / "x.jpg")


# --- helpers --------------------------------------------------------------------------

def test_is_image_file_and_extensions():
    assert IMAGE_EXTENSIONS >= {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif"}
    assert all(e == e.lower() and e.startswith(".") for e in IMAGE_EXTENSIONS)
    assert is_image_file("a/B.TIF") and is_image_file(Path("x.jpeg"))
    assert not is_image_file("notes.txt") and not is_image_file("jpg")


def test_stretch_handles_constant_and_nan():
    assert (stretch_to_uint8(np.full((4, 4), 7.0)) == 0).all()
    a = np.array([[np.nan, 0.0], [1.0, np.inf]])
    out = stretch_to_uint8(a)
    assert out.dtype == np.uint8 and out[0, 0] == 0 and out[1, 0] == 255
    same = np.zeros((2, 2), np.uint8)
    assert stretch_to_uint8(same) is same  # 8-bit data is never stretched
