"""Small Qt helpers: image conversion, heatmap colouring, settings, thumbnails."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from PySide6.QtCore import QObject, QRunnable, QSettings, QThreadPool, Signal
from PySide6.QtGui import QImage, QPixmap

# display colormaps (OpenCV LUTs: fast enough to re-colour on every slider move)
COLORMAPS = ("jet", "turbo", "viridis", "inferno", "magma", "hot", "plasma")


def settings() -> QSettings:
    """App settings: ``$RSVIEWER_CONFIG_DIR/gui.ini`` if set (tests), else the user's."""
    folder = os.environ.get("RSVIEWER_CONFIG_DIR")
    if folder:
        return QSettings(str(Path(folder) / "gui.ini"), QSettings.IniFormat)
    return QSettings(QSettings.IniFormat, QSettings.UserScope, "rsviewer", "rsviewer")


def recent(key: str) -> list[str]:
    v = settings().value(key, [])
    if isinstance(v, str):
        v = [v]
    return [str(x) for x in (v or []) if x]


def remember(key: str, value: str, limit: int = 10) -> list[str]:
    items = [value] + [x for x in recent(key) if x != value]
    items = items[:limit]
    s = settings()
    s.setValue(key, items)
    s.sync()
    return items


def rgb_to_qimage(arr: np.ndarray) -> QImage:
    """(H, W, 3) uint8 RGB → QImage (deep copy, safe to use from any thread)."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    if arr.ndim == 2:
        arr = np.ascontiguousarray(np.stack([arr] * 3, -1))
    h, w = arr.shape[:2]
    if arr.shape[2] == 4:
        return QImage(arr.data, w, h, 4 * w, QImage.Format_RGBA8888).copy()
    return QImage(arr.data, w, h, 3 * w, QImage.Format_RGB888).copy()


def pil_to_qimage(im: Image.Image) -> QImage:
    if im.mode == "RGBA":
        return rgb_to_qimage(np.asarray(im))
    return rgb_to_qimage(np.asarray(im.convert("RGB")))


def qimage_to_rgb(img: QImage) -> np.ndarray:
    img = img.convertToFormat(QImage.Format_RGB888)
    w, h = img.width(), img.height()
    ptr = img.constBits()
    arr = np.frombuffer(ptr, np.uint8, count=img.bytesPerLine() * h).reshape(h, img.bytesPerLine())
    return arr[:, : 3 * w].reshape(h, w, 3).copy()


def colorize(heat: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """(H, W) float in [0, 1] → (H, W, 3) uint8 RGB through an OpenCV colormap."""
    import cv2

    code = getattr(cv2, f"COLORMAP_{cmap.upper()}", cv2.COLORMAP_JET)
    u8 = np.clip(np.nan_to_num(np.asarray(heat, np.float32)) * 255.0, 0, 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(u8, code), cv2.COLOR_BGR2RGB)


def blend(image_rgb: np.ndarray, heat: np.ndarray, cmap: str = "jet", alpha: float = 0.5,
          contour: bool = False) -> np.ndarray:
    """Heatmap over an image (both at the image's resolution)."""
    import cv2

    h, w = image_rgb.shape[:2]
    if heat.shape[:2] != (h, w):
        heat = cv2.resize(np.asarray(heat, np.float32), (w, h), interpolation=cv2.INTER_LINEAR)
    col = colorize(heat, cmap).astype(np.float32)
    out = (1 - alpha) * image_rgb.astype(np.float32) + alpha * col
    out = np.clip(out, 0, 255).astype(np.uint8)
    if contour:
        mask = (heat >= 0.5).astype(np.uint8)
        cnts, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        out = np.ascontiguousarray(out)
        cv2.drawContours(out, cnts, -1, (255, 255, 255), max(1, w // 200))
    return out


# ---- thumbnails ---------------------------------------------------------------------


class _ThumbSignals(QObject):
    ready = Signal(str, QImage)
    failed = Signal(str, str)


class _ThumbJob(QRunnable):
    def __init__(self, path: str, size: int, signals: _ThumbSignals):
        super().__init__()
        self.path, self.size, self.signals = path, size, signals

    def run(self) -> None:
        from .workers import background_priority, plain_message

        background_priority()
        try:
            img = pil_to_qimage(load_thumb(self.path, self.size))
            # the raster backend's own format: QPixmap.fromImage on the GUI thread then converts nothing
            img = img.convertToFormat(QImage.Format_ARGB32_Premultiplied if img.hasAlphaChannel() else
                                      QImage.Format_RGB32)
            self.signals.ready.emit(self.path, img)
        except Exception as e:  # noqa: BLE001 - an unreadable file is a "no preview" line, never a crash
            self.signals.failed.emit(self.path, plain_message(e))


_TILES: dict[str, tuple[str, dict]] = {}  # thumbnail key of a tile hit → (scene path, tile record)


def thumb_key(hit) -> str:
    """The thumbnail key of a search hit: its image path, or for a tile-index hit a key naming
    the scene and the tile's box (the thumbnail is that window, never the whole scene)."""
    return tile_thumb_key(hit.path, getattr(hit, "tile", None))


def item_thumb_key(item: dict) -> str:
    """The same for an index item (the embedding map's points)."""
    return tile_thumb_key(item["path"], item.get("tile"))


def tile_thumb_key(path: str, tile: Optional[dict]) -> str:
    if not tile:
        return path
    key = f"{path}#tile={','.join(str(int(v)) for v in tile['box'])}"
    _TILES[key] = (path, tile)
    return key


def load_thumb(key: str, side: int) -> Image.Image:
    """What a thumbnail key shows (see :func:`thumb_key`), at most ``side`` px. For workers."""
    if key in _TILES:
        from ..localize.tiles import read_tile

        path, tile = _TILES[key]
        return read_tile(path, tile, side)
    return load_preview(key, side)


def load_hit_image(hit, side: Optional[int] = None) -> Image.Image:
    """The pixels of a hit: its image file, or its tile's window of the scene. ``side``: a
    preview of at most that many pixels. For workers."""
    tile = getattr(hit, "tile", None)
    if tile:
        from ..localize.tiles import read_tile

        return read_tile(hit.path, tile, side)
    if side is not None:
        return load_preview(hit.path, side)
    from ..data import load_image

    return load_image(hit.path)


def _open_plain(path) -> Optional[Image.Image]:
    """``path`` opened (header only) when it is a plain 8-bit RGB/L single-frame file within
    the pixel limit, without transparency or an EXIF rotation; ``None`` otherwise (the
    caller then goes through ``load_image``, which handles all of those). A PNG's EXIF is
    read only when it precedes the pixels: ``PngImageFile.getexif()`` decodes the whole
    image to look behind them, the very cost this path avoids."""
    import warnings

    from ..data.images import max_pixels

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # checked against our own limit below
        try:
            src = Image.open(path)
        except (OSError, ValueError, Image.DecompressionBombError):
            return None  # load_image says why, in one line
    try:
        w, h = src.size
        if src.mode in ("RGB", "L") and w * h <= max_pixels() and "transparency" not in src.info and \
                _orientation(src) == 1 and getattr(src, "n_frames", 1) == 1:
            return src
    except (OSError, ValueError, SyntaxError):  # a broken header: load_image reports it
        pass
    src.close()
    return None


def _orientation(src: Image.Image) -> int:
    if src.format != "PNG":
        return src.getexif().get(0x0112, 1)
    raw = src.info.get("exif")  # getexif() would decode the whole PNG to look past its pixels
    if not raw:
        return 1
    exif = Image.Exif()
    exif.load(raw)
    return exif.get(0x0112, 1)


def _decode_reduced(path, keep: int) -> Optional[Image.Image]:
    """A plain image decoded by OpenCV and box-reduced by the largest integer factor that
    keeps its shorter side ≥ ``keep`` — Pillow's ``reduce``, which ``resize(reducing_gap=…)``
    also starts with. OpenCV decodes and reduces with the GIL released; Pillow holds it
    while it allocates (and zeroes) a full-size image, ~100 ms for 7000² on which the GUI
    thread waits. JPEGs are decoded at 1/2, 1/4 or 1/8 scale where that still keeps ``keep``.
    ``None`` when OpenCV cannot read the file (the caller falls back to Pillow)."""
    import cv2

    src = _open_plain(path)
    if src is None:
        return None
    with src:
        w, h, fmt = src.width, src.height, src.format
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION  # orientation 1 checked by _open_plain
    scale = 1
    if fmt == "JPEG":
        for s, f in ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2)):
            if min(w, h) // s >= keep:
                flags, scale = f | cv2.IMREAD_IGNORE_ORIENTATION, s
                break
    try:
        arr = cv2.imread(str(path), flags)
    except cv2.error:
        return None
    if arr is None:
        return None
    factor = max(1, min(arr.shape[:2]) // max(1, keep))
    if factor > 1:
        arr = cv2.resize(arr, (arr.shape[1] // factor, arr.shape[0] // factor), interpolation=cv2.INTER_AREA)
    return Image.fromarray(cv2.cvtColor(arr, cv2.COLOR_BGR2RGB))


def load_preview(path, side: int) -> Image.Image:
    """An RGB image whose longest side is at most ``side``, decoded as cheaply as the
    format allows, off the GIL for plain 8-bit files (:func:`_decode_reduced`); anything
    else (16-bit, TIFF, EXIF-rotated, alpha) through ``load_image``. No full-resolution
    QImage is ever made, so images past Qt's 256 MB image limit preview too. For worker threads."""
    from ..data import load_image

    im = _decode_reduced(path, side)
    if im is None:
        im = load_image(path)  # applies EXIF rotation, alpha, 16-bit stretch
        factor = max(1, min(im.width, im.height) // max(1, side))
        if factor > 1:
            im = im.reduce(factor)
    im.thumbnail((side, side), Image.BILINEAR)
    return im


def load_plain(path, model_side: Optional[int] = None) -> Optional[Image.Image]:
    """A plain 8-bit RGB file for an image query; with ``model_side``, decoded off the GIL
    and box-reduced while its shorter side stays ≥ 3 × ``model_side`` (Pillow's
    ``reducing_gap=3``: the model's bicubic resize then sees the same picture — cosine to
    the full-size path measured in tests). None for anything else (or a file that does
    not decode): the caller passes the path to the engine instead, which says why."""
    if model_side:
        return _decode_reduced(path, 3 * model_side)  # checks plainness itself: the header is read once
    src = _open_plain(path)
    if src is None:
        return None
    try:
        src.load()  # a single-frame file opened by name: Pillow closes the file itself
    except (OSError, ValueError):
        src.close()
        return None
    return src if src.mode == "RGB" else src.convert("RGB")


def save_file(write, path, report) -> Optional[Path]:
    """The GUI's one way to write a file: ``write(path)`` writes it (atomically);
    success and every failure (OSError, a user error) go to ``report(line, error)``."""
    from ..errors import RsviewerError
    from .workers import plain_message

    try:
        out = Path(write(path) or path)
    except (OSError, RsviewerError, ValueError) as e:
        report(f"could not save {path}: {plain_message(e)}", True)
        return None
    report(f"saved {out}", False)
    return out


class ThumbCache(QObject):
    """Thumbnails loaded on a background pool; ``get`` returns one or schedules it."""

    updated = Signal(str)

    def __init__(self, size: int = 192, parent=None, limit: int = 4000):
        super().__init__(parent)
        self.size = size
        self.limit = limit
        self.pixmaps: dict[str, QPixmap] = {}
        self.failed: dict[str, str] = {}
        self.pending: set[str] = set()
        self.pool = QThreadPool(self)
        self.pool.setMaxThreadCount(2)
        self.signals = _ThumbSignals()
        self.signals.ready.connect(self._ready)
        self.signals.failed.connect(self._failed)
        _CACHES.append(self)

    def get(self, path: str) -> Optional[QPixmap]:
        pm = self.pixmaps.get(path)
        if pm is None and path not in self.pending and path not in self.failed:
            self.pending.add(path)
            self.pool.start(_ThumbJob(path, self.size, self.signals))
        return pm

    def _ready(self, path: str, img: QImage) -> None:
        self.pending.discard(path)
        if len(self.pixmaps) >= self.limit:
            self.pixmaps.pop(next(iter(self.pixmaps)))
        self.pixmaps[path] = QPixmap.fromImage(img)
        self.updated.emit(path)

    def _failed(self, path: str, msg: str) -> None:
        self.pending.discard(path)
        self.failed[path] = msg
        self.updated.emit(path)

    def idle(self) -> bool:
        return not self.pending


_THUMBS: Optional[ThumbCache] = None
_CACHES: list = []  # every ThumbCache, so shutdown can stop their pools


def shutdown_thumbs(msecs: int = 200) -> bool:
    """Drop queued thumbnails and wait briefly for the running ones; True if all stopped."""
    ok = True
    for c in list(_CACHES):
        try:
            c.pool.clear()
            ok = c.pool.waitForDone(msecs) and ok
        except RuntimeError:  # already deleted with its parent
            pass
    return ok


def thumbs() -> ThumbCache:
    global _THUMBS
    if _THUMBS is None:
        _THUMBS = ThumbCache()
    return _THUMBS
