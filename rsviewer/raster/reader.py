"""The one raster reader of rsviewer: region reads of scenes of any size.

:func:`open_raster` picks a backend per file:

- **rasterio** (GDAL) for GeoTIFF / COG / JPEG 2000 / VRT / any other format GDAL can read
  by block: a region read decodes only the blocks it touches; reduced-resolution reads
  come from the file's overviews (internal or a sidecar ``.ovr``, see
  :func:`rsviewer.raster.overviews.build_overviews`) so a thumbnail of a 30,000 px scene
  touches a few MB; without overviews a large reduced read is done by GDAL block by
  block (bounded memory, slower). Never a full-resolution array of the whole scene.
- **Pillow/OpenCV** for PNG, JPEG, BMP, WebP: these cannot be decoded by region, so the
  image is decoded once and kept while the raster is open (JPEG at 1/2, 1/4, 1/8 by DCT
  scaling when a read needs no more), under an explicit pixel limit
  (:func:`rsviewer.data.images.max_pixels`, ``RSVIEWER_MAX_PIXELS``). A world file or
  ``.aux.xml`` next to such a file still gives it a CRS (read by rasterio).

Bands: RGB by colour interpretation, else 1-2-3; one band is shown as grey (a palette is
expanded); two bands need an alpha band or an explicit ``bands=``. Non-8-bit data go to
8 bit with one per-band 2–98 % percentile stretch computed from an overview (or a
decimated read), kept in :attr:`Raster.stretch` so a result can say exactly how its
pixels were made (pass it back as ``stretch=`` to reproduce). Nodata, alpha and mask
bands give :meth:`Raster.valid_grid`; windows that are mostly nodata are skipped by the
localizer and score nothing.

Coordinates are full-resolution pixels, ``(x, y)`` = column, row; parts of a region
outside the raster read as black.
"""
from __future__ import annotations

import math
import os
import threading
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageOps

from ..data.images import _check_file, _pillow_limit_off, _to_rgb, image_size, max_pixels
from ..errors import ImageError
from .georef import Georef

__all__ = ["Raster", "open_raster", "resize_rgb", "max_scene_pixels"]

# GDAL's block cache: bounded, so reading a 30k scene never grows past it
os.environ.setdefault("GDAL_CACHEMAX", "256")
_PILLOW_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"}
# a region read at full resolution up to this many pixels is decoded whole and resized here;
# bigger reduced reads use overviews or GDAL's decimation
_DIRECT_PIXELS = 40_000_000
_DEFAULT_MAX_SCENE = 100_000_000_000  # 1e11 px (≈ 316,000²); a header declaring more is not a scene


def max_scene_pixels() -> int:
    """Largest declared size accepted (``RSVIEWER_MAX_SCENE_PIXELS``, default 1e11)."""
    raw = os.environ.get("RSVIEWER_MAX_SCENE_PIXELS", "").strip()
    try:
        return int(float(raw)) if raw else _DEFAULT_MAX_SCENE
    except ValueError:
        return _DEFAULT_MAX_SCENE


def resize_rgb(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w, C) uint8 → ``size`` = (w', h'): area averaging when shrinking (no aliasing
    on 3× reductions), bicubic when enlarging. The one resampler of the localizer, so the
    crop mode and the shared-map mode see the same pixels."""
    import cv2

    w2, h2 = int(size[0]), int(size[1])
    h, w = arr.shape[:2]
    if (w2, h2) == (w, h):
        if arr.flags.c_contiguous and arr.flags.writeable:
            return arr
        return np.array(arr, order="C", copy=True)  # a private, writable copy
    if w2 <= 0 or h2 <= 0:
        raise ValueError(f"bad output size {size}")
    interp = cv2.INTER_AREA if (w2 <= w and h2 <= h) else cv2.INTER_CUBIC
    return cv2.resize(np.ascontiguousarray(arr), (w2, h2), interpolation=interp)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:160]


class Raster:
    """A scene read by region. Use :func:`open_raster`; close it (or use ``with``).

    Attributes: ``path``; ``size`` = (W, H); ``backend`` ``"rasterio"`` | ``"pillow"``;
    ``format`` (GDAL driver or Pillow format); ``count`` bands in the file, ``dtype``;
    ``bands`` the 1-based bands shown as R, G, B; ``georef`` (:class:`Georef`);
    ``overviews`` the file's overview factors; ``stretch`` (None for 8-bit data);
    ``notes`` (what was assumed: grey band, palette, …); ``file_key`` for caches.
    """

    def __init__(self, path: Path, size, backend: str, fmt: str):
        self.path = path
        self.size = (int(size[0]), int(size[1]))
        self.backend = backend
        self.format = fmt
        self.count = 3
        self.dtype = "uint8"
        self.bands: tuple[int, ...] = (1, 2, 3)
        self.georef = Georef(None, _identity(), self.size, path.name)
        self.overviews: list[int] = []
        self.stretch: Optional[dict] = None
        self.notes: list[str] = []
        self.has_mask = False
        self._lock = threading.RLock()
        self._levels: dict[int, np.ndarray] = {}  # pillow: decoded reductions
        self._ds = None  # rasterio: the dataset
        self._ovr_ds: dict[int, object] = {}  # overview index → dataset opened at that level
        self._lut: Optional[np.ndarray] = None  # palette → RGB
        self._valid_cache: dict[int, np.ndarray] = {}
        st = path.stat()
        self.file_key = (str(path.resolve()), int(st.st_size), int(st.st_mtime_ns))

    # ---- public ----------------------------------------------------------------------------
    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    @property
    def crs(self):
        return self.georef.crs

    @property
    def transform(self):
        return self.georef.transform

    def read_region(self, x: int, y: int, w: int, h: int, out_size: Optional[tuple[int, int]] = None) -> np.ndarray:
        """Pixels of ``[x, x+w) × [y, y+h)`` as (h', w', 3) uint8 RGB, resized to
        ``out_size`` = (w', h') when given. Outside the raster reads as black."""
        x, y, w, h = int(x), int(y), int(w), int(h)
        if w <= 0 or h <= 0:
            raise ImageError(f"empty region {w}×{h} requested from {self.path.name}")
        out = out_size if out_size is not None else (w, h)
        out = (max(1, int(out[0])), max(1, int(out[1])))
        with self._lock:
            if self.backend == "rasterio":
                arr = self._gdal_region(x, y, w, h, out)
            else:
                arr = self._pillow_region(x, y, w, h, out)
        return resize_rgb(arr, out)

    def thumbnail(self, max_side: int = 2048) -> Image.Image:
        """The whole raster with its long side at most ``max_side`` px (never enlarged)."""
        W, H = self.size
        s = min(1.0, max_side / max(W, H))
        out = (max(1, round(W * s)), max(1, round(H * s)))
        return Image.fromarray(self.read_region(0, 0, W, H, out), "RGB")

    def check_readable(self, ratio: float = 1.0) -> None:
        """Raise :class:`ImageError` now if reads shrinking by ``ratio`` would need a decode
        over the pixel limit (Pillow backend), instead of failing halfway through a job."""
        if self.backend != "pillow":
            return
        self._check_limit(self._jpeg_level(ratio))

    def valid_grid(self, cell: int) -> Optional[np.ndarray]:
        """Fraction of valid (not nodata, not transparent) pixels per ``cell`` px cell,
        (ceil(H/cell), ceil(W/cell)) float32 — or None when every pixel is valid. Read
        from the mask at reduced resolution (overviews), never at full size."""
        if not self.has_mask:
            return None
        cell = max(1, int(cell))
        if cell in self._valid_cache:
            return self._valid_cache[cell]
        W, H = self.size
        gw, gh = math.ceil(W / cell), math.ceil(H / cell)
        with self._lock:
            m = self._mask_region(0, 0, gw * cell, gh * cell, (gw, gh))
        self._valid_cache[cell] = m
        return m

    def valid_fraction(self, boxes: np.ndarray, cell: Optional[int] = None) -> Optional[np.ndarray]:
        """Valid-pixel fraction of each ``(x, y, side)`` box, from :meth:`valid_grid`
        (None when every pixel is valid)."""
        if not self.has_mask:
            return None
        boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 3)
        if cell is None:
            cell = max(8, int(boxes[:, 2].min()) // 8) if len(boxes) else 32
        g = self.valid_grid(cell)
        ii = np.zeros((g.shape[0] + 1, g.shape[1] + 1))
        ii[1:, 1:] = g.cumsum(0).cumsum(1)
        x0 = np.clip(boxes[:, 0] // cell, 0, g.shape[1])
        y0 = np.clip(boxes[:, 1] // cell, 0, g.shape[0])
        x1 = np.clip(-(-(boxes[:, 0] + boxes[:, 2]) // cell), 0, g.shape[1])
        y1 = np.clip(-(-(boxes[:, 1] + boxes[:, 2]) // cell), 0, g.shape[0])
        s = ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]
        n = np.maximum(1, (x1 - x0) * (y1 - y0))
        return (s / n).astype(np.float32)

    def check_not_empty(self) -> None:
        """Raise :class:`ImageError` if every pixel is nodata/transparent."""
        if not self.has_mask:
            return
        W, H = self.size
        g = self.valid_grid(max(1, math.ceil(max(W, H) / 256)))
        if float(g.max(initial=0.0)) <= 0.0:
            raise ImageError(f"{self.path.name} has no valid pixels (every pixel is nodata or transparent)")

    def ensure_stretch(self) -> Optional[dict]:
        """Compute the 8-bit stretch now (non-8-bit data), so it is fixed before any window
        is read and can be stored with a result; None for 8-bit data."""
        if self.backend == "rasterio" and self.dtype != "uint8" and self._lut is None and self.stretch is None:
            with self._lock:
                self.stretch = self._compute_stretch()
        return self.stretch

    def pixel_key(self) -> dict:
        """What, besides the file, decides the 8-bit pixels (for caches)."""
        return {"bands": list(self.bands), "stretch": self.ensure_stretch()}

    def level_factors(self) -> list[int]:
        """1 (full resolution) then the overview factors, finest first."""
        return [1] + list(self.overviews)

    def describe(self) -> str:
        W, H = self.size
        ov = ("overviews 1/" + ", 1/".join(str(f) for f in self.overviews)) if self.overviews else "no overviews"
        return (f"{self.path.name}: {W}×{H} px, {self.count} band{'s' if self.count != 1 else ''} {self.dtype}, "
                f"{self.format}, {self.georef.crs_label()}, {ov}")

    def info(self) -> dict:
        return {"path": str(self.path), "size": list(self.size), "backend": self.backend, "format": self.format,
                "count": self.count, "dtype": self.dtype, "bands": list(self.bands), "overviews": list(self.overviews),
                "stretch": self.stretch, "nodata_mask": self.has_mask, "notes": list(self.notes),
                **self.georef.to_json()}

    def close(self) -> None:
        with self._lock:
            self._levels.clear()
            for ds in list(self._ovr_ds.values()) + ([self._ds] if self._ds is not None else []):
                try:
                    ds.close()
                except Exception:
                    pass
            self._ovr_ds.clear()
            self._ds = None

    def reopen(self) -> None:
        """Re-read the overview list (after a sidecar ``.ovr`` was built)."""
        if self.backend != "rasterio":
            return
        with self._lock:
            self.close()
            self._ds = _rio_open(self.path)
            self.overviews = list(self._ds.overviews(1)) if self._ds.count else []

    def __enter__(self) -> "Raster":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Raster({self.path.name!r}, {self.size[0]}×{self.size[1]}, {self.backend})"

    # ---- rasterio backend --------------------------------------------------------------------
    def _dataset(self, level: int = 0):
        if self._ds is None:
            self._ds = _rio_open(self.path)
        if level == 0:
            return self._ds
        ds = self._ovr_ds.get(level)
        if ds is None:
            ds = _rio_open(self.path, overview_level=level - 1)
            self._ovr_ds[level] = ds
        return ds

    def _pick_level(self, ratio: float) -> tuple[int, float]:
        """The coarsest overview not coarser than ``ratio`` (scene px per output px)."""
        level, fac = 0, 1.0
        for i, f in enumerate(self.overviews, start=1):
            if f <= ratio * 1.001:
                level, fac = i, float(f)
        return level, fac

    def _read_raw(self, x0: int, y0: int, x1: int, y1: int, out: tuple[int, int], indexes, masks=False):
        """Native-dtype (bands, h', w') of a region inside the raster, at ``out`` size when
        it is much smaller (overview or GDAL decimation), else at full resolution."""
        from rasterio.enums import Resampling
        from rasterio.windows import Window

        w, h = x1 - x0, y1 - y0
        ratio = min(w / out[0], h / out[1])
        level, fac = self._pick_level(ratio)
        ds = self._dataset(level)
        sx, sy = ds.width / self.size[0], ds.height / self.size[1]
        lx0, ly0 = int(math.floor(x0 * sx)), int(math.floor(y0 * sy))
        lx1, ly1 = max(lx0 + 1, int(math.ceil(x1 * sx))), max(ly0 + 1, int(math.ceil(y1 * sy)))
        lx1, ly1 = min(ds.width, lx1), min(ds.height, ly1)
        win = Window(lx0, ly0, lx1 - lx0, ly1 - ly0)
        n_px = (lx1 - lx0) * (ly1 - ly0)
        shape = None
        if n_px > _DIRECT_PIXELS and (lx1 - lx0) > out[0] and (ly1 - ly0) > out[1]:
            shape = (max(1, out[1]), max(1, out[0]))  # GDAL decimates block by block
        try:
            if masks:
                if shape is not None:
                    return ds.dataset_mask(window=win, out_shape=shape, resampling=Resampling.average)
                return ds.dataset_mask(window=win)
            if shape is not None:
                return ds.read(indexes, window=win, out_shape=(len(indexes),) + shape, resampling=Resampling.average)
            return ds.read(indexes, window=win)
        except Exception as e:  # RasterioIOError and friends on damaged blocks
            raise ImageError(f"{self.path.name} is damaged: reading pixels {x0},{y0}–{x1},{y1} failed "
                             f"({_one_line(e)})") from None

    def _gdal_region(self, x: int, y: int, w: int, h: int, out: tuple[int, int]) -> np.ndarray:
        W, H = self.size
        cx0, cy0, cx1, cy1 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
        if cx0 >= cx1 or cy0 >= cy1:
            return np.zeros((out[1], out[0], 3), np.uint8)
        # output pixels that the clipped part covers
        sx, sy = out[0] / w, out[1] / h
        ox0, oy0 = int(round((cx0 - x) * sx)), int(round((cy0 - y) * sy))
        ox1, oy1 = max(ox0 + 1, int(round((cx1 - x) * sx))), max(oy0 + 1, int(round((cy1 - y) * sy)))
        raw = self._read_raw(cx0, cy0, cx1, cy1, (ox1 - ox0, oy1 - oy0), list(self._read_indexes()))
        rgb = self._to_uint8_rgb(raw)
        if (cx0, cy0, cx1, cy1) == (x, y, x + w, y + h):
            return rgb
        part = resize_rgb(rgb, (ox1 - ox0, oy1 - oy0))
        canvas = np.zeros((out[1], out[0], 3), np.uint8)
        canvas[oy0:oy1, ox0:ox1] = part[: out[1] - oy0, : out[0] - ox0]
        return canvas

    def _mask_region(self, x0: int, y0: int, x1: int, y1: int, out: tuple[int, int]) -> np.ndarray:
        """Valid fraction (h', w') float32 of a region (the part outside the raster: 0)."""
        import cv2

        W, H = self.size
        cx1, cy1 = min(W, x1), min(H, y1)
        sx, sy = out[0] / (x1 - x0), out[1] / (y1 - y0)
        ow, oh = max(1, int(round((cx1 - x0) * sx))), max(1, int(round((cy1 - y0) * sy)))
        m = self._read_raw(x0, y0, cx1, cy1, (ow, oh), None, masks=True).astype(np.float32) / 255.0
        if m.shape != (oh, ow):
            m = cv2.resize(m, (ow, oh), interpolation=cv2.INTER_AREA if m.shape[1] >= ow else cv2.INTER_LINEAR)
        canvas = np.zeros((out[1], out[0]), np.float32)
        canvas[:oh, :ow] = m[: out[1], : out[0]]
        return canvas

    def _read_indexes(self) -> tuple[int, ...]:
        # read each distinct band once (a grey band shown as R=G=B is read once)
        return tuple(dict.fromkeys(self.bands))

    def _to_uint8_rgb(self, raw: np.ndarray) -> np.ndarray:
        """(bands, h, w) native → (h, w, 3) uint8."""
        idx = self._read_indexes()
        if self._lut is not None:  # palette
            return self._lut[np.clip(raw[0], 0, len(self._lut) - 1).astype(np.intp)]
        if raw.dtype != np.uint8:
            if self.stretch is None:
                self.stretch = self._compute_stretch()
            lo = np.asarray(self.stretch["lo"], np.float32)
            hi = np.asarray(self.stretch["hi"], np.float32)
            chans = []
            for i in range(raw.shape[0]):
                b = raw[i].astype(np.float32)
                scale = 255.0 / (hi[i] - lo[i]) if hi[i] > lo[i] else 0.0
                b -= lo[i]
                b *= scale
                np.nan_to_num(b, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
                chans.append(np.clip(np.rint(b), 0, 255).astype(np.uint8))
            raw = np.stack(chans)
        pos = {b: i for i, b in enumerate(idx)}
        return np.ascontiguousarray(np.stack([raw[pos[b]] for b in self.bands], -1))

    def _compute_stretch(self) -> dict:
        """Per-band 2nd–98th percentiles of the valid pixels, read from an overview (or a
        decimated read of ≤ 512 px on the long side: ≥ 250k samples per band)."""
        W, H = self.size
        s = max(1.0, max(W, H) / 512)
        out = (max(1, round(W / s)), max(1, round(H / s)))
        idx = list(self._read_indexes())
        raw = self._read_raw(0, 0, W, H, out, idx).astype(np.float64)
        if raw.shape[1:] != (out[1], out[0]):
            raw = raw[:, :: max(1, raw.shape[1] // out[1]), :: max(1, raw.shape[2] // out[0])]
        valid = np.ones(raw.shape[1:], bool)
        if self.has_mask:
            m = self._read_raw(0, 0, W, H, (raw.shape[2], raw.shape[1]), None, masks=True)
            if m.shape == valid.shape:
                valid = m > 0
        lo, hi = [], []
        for i in range(raw.shape[0]):
            v = raw[i][valid & np.isfinite(raw[i])]
            if v.size == 0:
                lo.append(0.0), hi.append(1.0)
                continue
            a, b = np.percentile(v, (2.0, 98.0))
            if b <= a:
                a, b = float(v.min()), float(v.max())
            lo.append(float(a)), hi.append(float(b))
        level, fac = self._pick_level(s)
        return {"method": "percentile 2-98", "bands": idx, "lo": lo, "hi": hi,
                "from": f"overview 1/{int(fac)}" if level else f"decimated read {out[0]}×{out[1]}"}

    # ---- Pillow backend -------------------------------------------------------------------------
    def _jpeg_level(self, ratio: float) -> int:
        r = 1
        if self.format == "JPEG":
            while r < 8 and ratio >= 2 * r:
                r *= 2
        return r

    def _level_for(self, w: int, h: int, out: tuple[int, int]) -> int:
        """Largest JPEG reduction (1, 2, 4, 8) that still gives ≥ ``out`` pixels."""
        r = self._jpeg_level(min(w / out[0], h / out[1]))
        for have in sorted(self._levels, reverse=True):  # prefer a level already decoded
            if r // 2 <= have <= r:
                return have
        return r

    def _check_limit(self, r: int) -> tuple[int, int]:
        W, H = self.size
        limit = max_pixels()
        lw, lh = math.ceil(W / r), math.ceil(H / r)
        if lw * lh > limit:
            raise ImageError(
                f"{self.path.name} is {W}×{H} px; decoding it{' at 1/' + str(r) if r > 1 else ''} needs "
                f"{lw * lh / 1e6:.0f} Mpx, over the {limit / 1e6:.0f} Mpx limit (RSVIEWER_MAX_PIXELS). "
                f"{self.format} cannot be read by region: convert it to a tiled TIFF / COG "
                f"(e.g. gdal_translate -of COG in.jpg out.tif) or raise the limit"
            )
        return lw, lh

    def _decode_level(self, r: int) -> np.ndarray:
        if r in self._levels:
            return self._levels[r]
        lw, lh = self._check_limit(r)
        W, H = self.size
        arr = self._decode_jpeg_cv2(r) if self.format == "JPEG" else None
        if arr is None:
            arr = self._decode_pillow(r, lw, lh)
        if r == 1 and (arr.shape[1], arr.shape[0]) != (W, H):
            arr = resize_rgb(arr, (W, H))
        self._levels[r] = arr
        return arr

    def _decode_jpeg_cv2(self, r: int) -> Optional[np.ndarray]:
        """JPEG straight into one RGB array; 1/2, 1/4, 1/8 by DCT scaling. None → Pillow."""
        try:
            import cv2
        except ImportError:
            return None
        flag = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
                8: cv2.IMREAD_REDUCED_COLOR_8}[r]
        try:
            arr = cv2.imread(str(self.path), flag)  # applies the EXIF orientation, like load_image
        except Exception:
            return None
        if arr is None or arr.ndim != 3 or arr.shape[2] != 3:
            return None
        W, H = self.size
        if abs(arr.shape[1] * r - W) > r or abs(arr.shape[0] * r - H) > r:  # orientation disagreement
            return None
        cv2.cvtColor(arr, cv2.COLOR_BGR2RGB, dst=arr)
        return arr

    def _decode_pillow(self, r: int, lw: int, lh: int) -> np.ndarray:
        with _pillow_limit_off():
            try:
                with Image.open(self.path) as im:
                    if r > 1:
                        im.draft("RGB", (lw, lh))
                    im.load()
                    orient = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
                    src = ImageOps.exif_transpose(im) if orient not in (None, 1) else im
                    arr = np.asarray(_to_rgb(src), dtype=np.uint8)
            except ImageError:
                raise
            except Exception as exc:  # Pillow raises many types for corrupt files
                raise ImageError(f"{self.path} is not a readable image ({_one_line(exc)})") from None
        return arr

    def _pillow_region(self, x: int, y: int, w: int, h: int, out: tuple[int, int]) -> np.ndarray:
        arr = self._decode_level(self._level_for(w, h, out))
        W, H = self.size
        lh, lw = arr.shape[:2]
        sx, sy = lw / W, lh / H
        ix0, iy0 = int(round(x * sx)), int(round(y * sy))
        ix1, iy1 = int(round((x + w) * sx)), int(round((y + h) * sy))
        return _slice_padded(arr, ix0, iy0, max(ix1, ix0 + 1), max(iy1, iy0 + 1))


def _identity():
    from affine import Affine

    return Affine.identity()


def _slice_padded(arr: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    H, W = arr.shape[:2]
    if x0 >= 0 and y0 >= 0 and x1 <= W and y1 <= H:
        return arr[y0:y1, x0:x1]
    out = np.zeros((y1 - y0, x1 - x0, 3), np.uint8)
    a0, a1 = max(0, y0), min(H, y1)
    b0, b1 = max(0, x0), min(W, x1)
    if a0 < a1 and b0 < b1:
        out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = arr[a0:a1, b0:b1]
    return out


def _rio_open(path: Path, **kw):
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        return rasterio.open(path, **kw)


def _choose_bands(ds, bands: Optional[Sequence[int]], name: str) -> tuple[tuple[int, ...], list[str]]:
    from rasterio.enums import ColorInterp

    n = ds.count
    if bands:
        b = tuple(int(v) for v in bands)
        if any(v < 1 or v > n for v in b):
            raise ImageError(f"{name} has {n} band{'s' if n != 1 else ''}; bands {','.join(map(str, b))} do not exist")
        if len(b) == 1:
            b = b * 3
        if len(b) != 3:
            raise ImageError(f"choose 1 or 3 bands to show, got {len(b)} ({','.join(map(str, b))})")
        return b, [f"bands {','.join(map(str, b))} as R,G,B (chosen)"]
    ci = list(ds.colorinterp)
    data = [i + 1 for i, c in enumerate(ci) if c != ColorInterp.alpha]
    if n == 0 or not data:
        raise ImageError(f"{name} has no data bands")
    pos = {c: i + 1 for i, c in enumerate(ci)}
    if all(c in pos for c in (ColorInterp.red, ColorInterp.green, ColorInterp.blue)):
        b = (pos[ColorInterp.red], pos[ColorInterp.green], pos[ColorInterp.blue])
        return b, ([] if b == (1, 2, 3) else [f"bands {','.join(map(str, b))} as R,G,B (colour interpretation)"])
    if len(data) >= 3:
        return tuple(data[:3]), [f"bands {','.join(map(str, data[:3]))} as R,G,B (no RGB colour interpretation)"]
    if len(data) == 1:
        kind = "palette" if ci[data[0] - 1] == ColorInterp.palette else "grey"
        return (data[0],) * 3, [f"1 band shown as {kind}"]
    raise ImageError(f"{name} has {len(data)} data bands and no RGB; say which to show "
                     f"(bands=(1,) or (1,2,2); CLI --bands 1)")


def _validate_gdal(ds, path: Path) -> None:
    """Fail now on a header that is not a scene or blocks that cannot be decoded."""
    from rasterio.windows import Window

    W, H = ds.width, ds.height
    if W <= 0 or H <= 0:
        raise ImageError(f"{path.name} declares an empty raster ({W}×{H})")
    if W * H > max_scene_pixels():
        raise ImageError(f"{path.name} declares {W}×{H} px ({W * H / 1e9:.0f} Gpx), which is not a plausible scene "
                         f"(limit {max_scene_pixels() / 1e9:.0f} Gpx, RSVIEWER_MAX_SCENE_PIXELS); the header is damaged")
    bh, bw = ds.block_shapes[0] if ds.block_shapes else (min(H, 256), min(W, 256))
    bw, bh = min(bw, W), min(bh, H)
    # the first and the last block: a truncated file loses its last blocks first
    for x, y in ((0, 0), ((W - 1) // bw * bw, (H - 1) // bh * bh)):
        try:
            ds.read(1, window=Window(x, y, min(bw, W - x), min(bh, H - y)))
        except Exception as e:
            raise ImageError(f"{path.name} is damaged or truncated: the block at pixel {x},{y} cannot be read "
                             f"({_one_line(e)})") from None


def _palette_lut(ds, band: int) -> Optional[np.ndarray]:
    try:
        cmap = ds.colormap(band)
    except ValueError:
        return None
    n = max(cmap) + 1
    lut = np.zeros((max(256, n), 3), np.uint8)
    for k, v in cmap.items():
        lut[k] = v[:3]
    return lut


def open_raster(path, bands: Optional[Sequence[int]] = None, stretch: Optional[dict] = None) -> Raster:
    """Open a scene for region reads; nothing but headers (and two blocks) is decoded.

    ``bands``: 1-based bands to show as R, G, B (one band = grey); default by colour
    interpretation. ``stretch``: a stretch dict from an earlier :attr:`Raster.stretch`
    (reproduces its 8-bit pixels). Raises :class:`ImageError` (one line) for a missing,
    empty, damaged or implausible file.
    """
    if isinstance(path, Raster):
        return path
    p = Path(path)
    _check_file(p)
    if p.suffix.lower() in _PILLOW_SUFFIXES and not _is_tiff(p):
        return _open_pillow(p)
    try:
        ds = _rio_open(p)
    except Exception as e:
        if _is_tiff(p) or p.suffix.lower() in (".tif", ".tiff", ".jp2", ".vrt"):
            raise ImageError(f"{p.name} is not a readable raster ({_one_line(e)})") from None
        return _open_pillow(p)
    try:
        _validate_gdal(ds, p)
        r = Raster(p, (ds.width, ds.height), "rasterio", ds.driver)
        r._ds = ds
        r.count = ds.count
        r.dtype = str(ds.dtypes[0])
        r.bands, r.notes = _choose_bands(ds, bands, p.name)
        if r.notes and r.notes[0].endswith("palette"):
            r._lut = _palette_lut(ds, r.bands[0])
        if ds.crs is not None:
            r.georef = Georef(ds.crs, ds.transform, r.size, p.name)
        elif not ds.transform.is_identity:
            r.georef = Georef(None, ds.transform, r.size, p.name)
        r.overviews = list(ds.overviews(r.bands[0]))
        from rasterio.enums import MaskFlags

        r.has_mask = any(MaskFlags.all_valid not in f for f in ds.mask_flag_enums)
        if stretch is not None:
            r.stretch = dict(stretch)
        return r
    except BaseException:
        ds.close()
        raise


def _open_pillow(p: Path) -> Raster:
    W, H = image_size(p)  # header only; raises ImageError for non-images
    with _pillow_limit_off():
        try:
            with Image.open(p) as im:
                fmt = im.format or p.suffix.lstrip(".").upper()
        except Exception:
            fmt = p.suffix.lstrip(".").upper()
    r = Raster(p, (W, H), "pillow", fmt)
    if W * H > max_scene_pixels():
        raise ImageError(f"{p.name} declares {W}×{H} px, which is not a plausible scene; the header is damaged")
    r.georef = _sidecar_georef(p, (W, H))
    return r


def _sidecar_georef(p: Path, size) -> Georef:
    """A CRS for a PNG/JPEG from a world file + .prj or .aux.xml, if there is one."""
    sidecars = [p.with_suffix(s) for s in (".pgw", ".jgw", ".wld", ".pngw", ".jpgw")] + [Path(str(p) + ".aux.xml")]
    if not any(s.exists() for s in sidecars):
        return Georef(None, _identity(), size, p.name)
    try:
        with _rio_open(p) as ds:
            if ds.crs is not None and (ds.width, ds.height) == tuple(size):
                return Georef(ds.crs, ds.transform, size, p.name)
    except Exception:
        pass
    return Georef(None, _identity(), size, p.name)


def _is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    except OSError:
        return False
