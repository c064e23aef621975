"""How the app decodes dropped images and thumbnails off the GUI thread's way (issue 16):
plain 8-bit files through OpenCV (the GIL released), box-reduced like Pillow's
``reducing_gap``, and giving the model the same picture as the full-size path."""
from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest
from PIL import Image, ImageFile

from conftest import GALLERY_JSON

DEMO_IMAGES = GALLERY_JSON.parent / "images"  # real UCM tiles, shipped with the app


def _upscaled(src, out, side: int):
    Image.open(src).convert("RGB").resize((side, side), Image.BICUBIC).save(out)
    return out


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_reduced_query_decode_embeds_like_the_full_size_image(default_model, tmp_path, suffix):
    import torch

    from rsviewer.data import load_image
    from rsviewer.gui.util import load_plain

    m = default_model
    cos = []
    assert DEMO_IMAGES.is_dir()
    for src in sorted(p for p in DEMO_IMAGES.iterdir() if p.suffix in (".jpg", ".tif", ".png"))[:3]:
        path = _upscaled(src, tmp_path / f"{src.stem}{suffix}", 2600)
        reduced = load_plain(path, m.image_size)
        assert min(reduced.size) >= 3 * m.image_size and max(reduced.size) < 2600
        with torch.no_grad():
            full = m.image_states(m.preprocess([load_image(path)]))["emb"]
            fast = m.image_states(m.preprocess([reduced]))["emb"]
        cos.append(torch.nn.functional.cosine_similarity(full, fast).item())
    assert min(cos) >= 0.9995, cos  # measured 0.99986–0.999999 on UCM tiles upscaled to 2600²


def test_plain_png_is_decoded_without_pillow(tmp_path, monkeypatch):
    """Pillow's PNG ``getexif()`` decodes the whole image, and Pillow holds the GIL while it
    allocates it: neither happens for a plain PNG (preview or query)."""
    from rsviewer.gui.util import load_plain, load_preview

    arr = np.random.default_rng(0).integers(0, 255, (900, 1200, 3), dtype=np.uint8)
    path = tmp_path / "plain.png"
    Image.fromarray(arr).save(path)

    def refuse(self, *a, **k):
        raise AssertionError("Pillow decoded the pixels")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    prev = load_preview(path, 200)
    assert max(prev.size) == 200 and prev.mode == "RGB"
    q = load_plain(path, 100)
    assert q.size == (1200 // 3, 900 // 3)  # factor 3 keeps the shorter side ≥ 300
    # the box reduce is Pillow's reduce (to rounding)
    monkeypatch.undo()
    ref = np.asarray(Image.fromarray(arr).reduce(3), dtype=np.int16)
    assert np.abs(np.asarray(q, dtype=np.int16) - ref).max() <= 1


def test_exif_rotated_jpeg_still_goes_through_load_image(tmp_path):
    from rsviewer.gui.util import load_plain, load_preview

    im = Image.new("RGB", (400, 200), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    path = tmp_path / "rotated.jpg"
    im.save(path, exif=exif)
    assert load_plain(path, 50) is None  # the engine's loader applies the rotation
    prev = load_preview(path, 100)
    assert prev.size[0] < prev.size[1]  # shown upright: 200 wide, 400 tall → 50×100


def test_worker_threads_run_below_the_gui_thread(qtbot):
    """On a 2-core machine a job and its intra-op threads took every core and the GUI
    thread waited for one: pool threads run at nice ≥ 10 (Linux/macOS), the GUI thread not."""
    from rsviewer.gui.workers import JobManager

    jobs = JobManager()
    got = []

    def work(progress, cancel):
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) if hasattr(os, "getpriority") else None

    jobs.start("nice", work, on_result=got.append)
    qtbot.waitUntil(lambda: bool(got), timeout=10_000)
    if sys.platform.startswith(("linux", "darwin")):
        gui = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert got[0] >= 10 and gui < 10, (got, gui)
    else:
        assert got == [None]
    jobs.wait_all(5_000)


def test_details_image_is_scaled_once_per_image_and_size(qtbot):
    """The dock relayouts on every selection; the smooth rescale runs only for a new image or size."""
    from rsviewer.gui.details import ImageLabel

    label = ImageLabel()
    qtbot.addWidget(label)
    label.resize(300, 300)
    rgb = np.zeros((256, 256, 3), np.uint8)
    rgb[:, :128] = 255
    label.set_rgb(rgb)
    first = label.pixmap().cacheKey()
    label._rescale()  # what a relayout at the same size does
    assert label.pixmap().cacheKey() == first
    label.resize(400, 400)
    label._rescale()
    assert label.pixmap().cacheKey() != first and label.pixmap().width() == 396
    resized = label.pixmap().cacheKey()
    label.set_rgb(rgb)  # a new image at the same size is drawn anew
    assert label.pixmap().cacheKey() != resized
    label.set_rgb(None)
    assert label.pixmap().isNull()


def test_thumbnails_reach_the_gui_thread_in_the_raster_format(qtbot, tmp_path):
    """Workers hand over RGB32 (thumbnails are opaque): no per-thumbnail conversion on the GUI thread."""
    from PySide6.QtGui import QImage

    from rsviewer.gui.util import ThumbCache

    Image.new("RGB", (300, 200), (10, 200, 30)).save(tmp_path / "rgb.png")
    cache = ThumbCache(size=64)
    got = {}
    cache.signals.ready.connect(lambda path, img: got.__setitem__(path, img.format()))
    cache.get(str(tmp_path / "rgb.png"))
    qtbot.waitUntil(cache.idle, timeout=20_000)
    assert got == {str(tmp_path / "rgb.png"): QImage.Format_RGB32}
    assert not cache.get(str(tmp_path / "rgb.png")).isNull()
