"""Large scenes: region reads and thumbnails without decoding a 10k–30k px image at once
where the file format allows it.

Backends, chosen per file by :func:`open_scene`:

- **tifffile** (optional, imported lazily) for TIFFs: a region read decodes only the
  tiles or strips it touches (``TiffPage.decode`` on each segment); an uncompressed
  single-strip TIFF is memory-mapped. Any scene size works; memory is bounded by the
  region (plus one band of tiles for reduced-resolution reads). 16-bit / float data
  are mapped to 8 bit with one per-band 2nd–98th percentile stretch computed once per
  scene from a sample of segments, so every window of the scene is scaled alike.
- **Pillow** for everything else (JPEG, PNG, BMP, WebP, and TIFFs tifffile cannot
  decode): these formats cannot be decoded by region, so the image is decoded whole,
  once, and kept while the :class:`Scene` is open (with any reduced JPEG levels: at most
  1.34 × the RGB size). JPEGs are decoded at a reduced
  scale (1/2, 1/4, 1/8, the DCT ``draft`` mode) whenever a read asks for no more
  resolution than that, which is what thumbnails and the 512/768 px windows need.
  JPEGs are decoded by OpenCV straight into one array (Pillow as the fallback).
  **Pixel limit**: a decode of more than :func:`rsviewer.data.images.max_pixels`
  pixels (250 Mpx by default, ≈750 MB as RGB; ``RSVIEWER_MAX_PIXELS`` overrides it) is
  refused with an :class:`~rsviewer.errors.ImageError` that says to convert the scene
  to a tiled TIFF. A 10240×10240 JPEG (105 Mpx, 315 MB) is well inside it.

Coordinates are scene pixels of the full-resolution image, ``(x, y)`` = column, row,
sizes ``(w, h)``. Parts of a requested region outside the scene read as black.
"""
from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps

from ..data.images import _check_file, _pillow_limit_off, _to_rgb, image_size, max_pixels
from ..errors import ImageError

__all__ = ["Scene", "open_scene", "resize_rgb"]

_TIFF_SUFFIXES = {".tif", ".tiff"}
# reduced-resolution reads of a tiled TIFF work in bands of about this many pixels
_BAND_PIXELS = 32_000_000


def resize_rgb(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w, 3) uint8 → ``size`` = (w', h'): area averaging when shrinking (no aliasing
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


def _tifffile():
    try:
        import tifffile  # optional dependency (pip install rsviewer[tiff])
    except ImportError:
        return None
    return tifffile


class Scene:
    """A large image read by region. Use :func:`open_scene`; close it (or use ``with``)
    to release decoded pixels and file handles.

    Attributes: ``path``; ``size`` = (W, H) at full resolution, read from the header;
    ``backend`` = ``"tifffile"`` | ``"pillow"``; ``format`` (e.g. ``"JPEG"``).
    """

    def __init__(self, path: Path, size: tuple[int, int], backend: str, fmt: str):
        self.path = path
        self.size = (int(size[0]), int(size[1]))
        self.backend = backend
        self.format = fmt
        self._lock = threading.RLock()
        # pillow backend: decoded levels {reduction: (h, w, 3) uint8}; all kept while the
        # scene is open (1 + 1/4 + 1/16 + 1/64 ≤ 1.34 × the RGB size), so a viewer reading
        # thumbnails and tiles while localize reads windows never re-decodes
        self._levels: dict[int, np.ndarray] = {}
        # tifffile backend
        self._tif = None
        self._page = None
        self._memmap: Optional[np.ndarray] = None
        self._stretch: Optional[list[tuple[float, float]]] = None
        st = path.stat()
        self.file_key = (str(path.resolve()), int(st.st_size), int(st.st_mtime_ns))

    # ---- public ----------------------------------------------------------------------
    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    def read_region(
        self, x: int, y: int, w: int, h: int, out_size: Optional[tuple[int, int]] = None
    ) -> np.ndarray:
        """Pixels of ``[x, x+w) × [y, y+h)`` as (h', w', 3) uint8 RGB, resized to
        ``out_size`` = (w', h') when given. Outside the scene reads as black."""
        x, y, w, h = int(x), int(y), int(w), int(h)
        if w <= 0 or h <= 0:
            raise ImageError(f"empty region {w}×{h} requested from {self.path.name}")
        out = out_size if out_size is not None else (w, h)
        out = (max(1, int(out[0])), max(1, int(out[1])))
        with self._lock:
            if self.backend == "tifffile":
                arr = self._tiff_region(x, y, w, h, out)
            else:
                arr = self._pillow_region(x, y, w, h, out)
        return resize_rgb(arr, out)

    def check_readable(self, ratio: float = 1.0) -> None:
        """Raise :class:`ImageError` now if reads shrinking by ``ratio`` (scene px per
        output px) would need a decode over the pixel limit (Pillow backend), instead of
        failing halfway through a long job."""
        if self.backend != "pillow":
            return
        r = 1
        if self.format == "JPEG":
            while r < 8 and ratio >= 2 * r:
                r *= 2
        self._check_limit(r)

    def thumbnail(self, max_side: int = 2048) -> Image.Image:
        """The whole scene with its long side at most ``max_side`` px (never enlarged)."""
        W, H = self.size
        s = min(1.0, max_side / max(W, H))
        out = (max(1, round(W * s)), max(1, round(H * s)))
        return Image.fromarray(self.read_region(0, 0, W, H, out), "RGB")

    def close(self) -> None:
        with self._lock:
            self._levels.clear()
            self._memmap = None
            if self._tif is not None:
                try:
                    self._tif.close()
                finally:
                    self._tif = None
                    self._page = None

    def __enter__(self) -> "Scene":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Scene({self.path.name!r}, {self.size[0]}×{self.size[1]}, {self.backend})"

    # ---- Pillow backend ------------------------------------------------------------------
    def _level_for(self, w: int, h: int, out: tuple[int, int]) -> int:
        """Largest JPEG reduction (1, 2, 4, 8) that still gives ≥ ``out`` pixels."""
        if self.format != "JPEG":
            return 1
        ratio = min(w / out[0], h / out[1])
        r = 1
        while r < 8 and ratio >= 2 * r:
            r *= 2
        # prefer a level that is already decoded and fine enough
        for have in sorted(self._levels, reverse=True):
            if have <= r and have >= r // 2:
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
                f"{self.format} cannot be read by region: convert it to a tiled TIFF "
                f"(e.g. tifffile.imwrite(out, img, tile=(512, 512))) or raise the limit"
            )
        return lw, lh

    def _decode_level(self, r: int) -> np.ndarray:
        if r in self._levels:
            arr = self._levels.pop(r)
            self._levels[r] = arr  # most recent last
            return arr
        lw, lh = self._check_limit(r)
        W, H = self.size
        arr = self._decode_jpeg_cv2(r) if self.format == "JPEG" else None
        if arr is None:
            arr = self._decode_pillow(r, lw, lh)
        # the reduced decode may differ from ceil(W/r) by a pixel: fix the full-res size
        if r == 1 and (arr.shape[1], arr.shape[0]) != (W, H):
            arr = resize_rgb(arr, (W, H))
        self._levels[r] = arr
        return arr

    def _decode_jpeg_cv2(self, r: int) -> Optional[np.ndarray]:
        """JPEG straight into one RGB array (Pillow needs a second copy of the pixels);
        1/2, 1/4, 1/8 by DCT scaling. None if OpenCV cannot read it (→ Pillow)."""
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
                    rgb = _to_rgb(src)
                    arr = np.asarray(rgb, dtype=np.uint8)  # read-only view of one copy
                    del rgb, src
            except ImageError:
                raise
            except Exception as exc:  # Pillow raises many types for corrupt files
                raise ImageError(f"{self.path} is not a readable image ({' '.join(str(exc).split())[:160]})") from None
        return arr

    def _pillow_region(self, x: int, y: int, w: int, h: int, out: tuple[int, int]) -> np.ndarray:
        r = self._level_for(w, h, out)
        arr = self._decode_level(r)
        W, H = self.size
        lh, lw = arr.shape[:2]
        sx, sy = lw / W, lh / H
        x0, y0 = x * sx, y * sy
        x1, y1 = (x + w) * sx, (y + h) * sy
        ix0, iy0, ix1, iy1 = int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1))
        ix1, iy1 = max(ix1, ix0 + 1), max(iy1, iy0 + 1)
        return _slice_padded(arr, ix0, iy0, ix1, iy1)

    # ---- tifffile backend -----------------------------------------------------------------
    def _open_tiff(self):
        if self._tif is None:
            tifffile = _tifffile()
            self._tif = tifffile.TiffFile(str(self.path))
            self._page = self._tif.pages[0]
            page = self._page
            if (
                not page.is_tiled
                and len(page.dataoffsets) == 1
                and page.compression == 1
                and page.planarconfig == 1
                and page.bitspersample in (8, 16, 32, 64)
                and page.fillorder == 1
            ):
                spp = page.samplesperpixel
                shape = (page.imagelength, page.imagewidth, spp)
                self._memmap = np.memmap(
                    self.path, dtype=page.dtype.newbyteorder(self._tif.byteorder), mode="r",
                    offset=page.dataoffsets[0], shape=shape,
                )
        return self._tif, self._page

    def _segment_layout(self, page):
        if page.is_tiled:
            th, tw = page.tilelength, page.tilewidth
        else:
            th, tw = min(page.rowsperstrip or page.imagelength, page.imagelength), page.imagewidth
        nx = math.ceil(page.imagewidth / tw)
        ny = math.ceil(page.imagelength / th)
        return th, tw, nx, ny

    def _raw_region(self, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """Native-dtype (y1-y0, x1-x0, samples) array of a region inside the scene."""
        tif, page = self._open_tiff()
        spp = page.samplesperpixel
        if self._memmap is not None:
            return np.asarray(self._memmap[y0:y1, x0:x1])
        th, tw, nx, ny = self._segment_layout(page)
        planes = spp if page.planarconfig == 2 else 1
        out = np.zeros((y1 - y0, x1 - x0, spp), dtype=page.dtype)
        decode = page.decode
        fh = tif.filehandle
        per_plane = nx * ny
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                for s in range(planes):
                    idx = s * per_plane + ty * nx + tx
                    off, cnt = page.dataoffsets[idx], page.databytecounts[idx]
                    if cnt == 0:
                        continue
                    fh.seek(off)
                    data = fh.read(cnt)
                    seg, _, _ = decode(data, idx, jpegtables=page.jpegtables)
                    if seg is None:
                        continue
                    seg = seg[0]  # (length, width, contig samples)
                    sy0, sx0 = ty * th, tx * tw
                    # intersection of segment and region
                    a0, a1 = max(y0, sy0), min(y1, sy0 + seg.shape[0])
                    b0, b1 = max(x0, sx0), min(x1, sx0 + seg.shape[1])
                    if a0 >= a1 or b0 >= b1:
                        continue
                    block = seg[a0 - sy0 : a1 - sy0, b0 - sx0 : b1 - sx0]
                    if planes > 1:
                        out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0, s] = block[..., 0]
                    else:
                        out[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0, :] = block
        return out

    def _to_uint8_rgb(self, raw: np.ndarray) -> np.ndarray:
        page = self._page
        photometric = int(page.photometric)
        if photometric == 3 and page.colormap is not None and raw.shape[2] == 1:  # palette
            cmap = np.asarray(page.colormap)
            if cmap.max() > 255:
                cmap = cmap / 257.0
            lut = np.clip(np.round(cmap), 0, 255).astype(np.uint8).T  # (n, 3)
            return lut[np.clip(raw[..., 0], 0, len(lut) - 1).astype(np.intp)]
        bands = raw[..., :3] if raw.shape[2] >= 3 else raw[..., :1]
        if bands.dtype != np.uint8:
            if self._stretch is None:
                self._stretch = self._compute_stretch(bands.shape[2])
            chans = []
            for i in range(bands.shape[2]):
                lo, hi = self._stretch[i]
                b = bands[..., i].astype(np.float32)
                b -= lo
                b *= 255.0 / (hi - lo) if hi > lo else 0.0
                np.nan_to_num(b, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
                chans.append(np.clip(b, 0, 255).astype(np.uint8))
            bands = np.stack(chans, -1)
        if photometric == 0:  # MINISWHITE
            bands = 255 - bands
        if bands.shape[2] == 1:
            bands = np.repeat(bands, 3, axis=2)
        return np.ascontiguousarray(bands)

    def _compute_stretch(self, nb: int) -> list[tuple[float, float]]:
        """Per-band 2nd–98th percentiles from ≤ 64 segments spread over the scene."""
        tif, page = self._open_tiff()
        W, H = self.size
        samples = []
        k = 8
        for j in range(k):
            for i in range(k):
                cx = int((i + 0.5) * W / k)
                cy = int((j + 0.5) * H / k)
                x0, y0 = max(0, cx - 64), max(0, cy - 64)
                raw = self._raw_region(x0, y0, min(W, x0 + 128), min(H, y0 + 128))
                samples.append(raw[..., :nb].reshape(-1, nb).astype(np.float64))
        s = np.concatenate(samples)
        out = []
        for i in range(nb):
            v = s[:, i]
            v = v[np.isfinite(v)]
            if v.size == 0:
                out.append((0.0, 1.0))
                continue
            lo, hi = np.percentile(v, (2.0, 98.0))
            if hi <= lo:
                lo, hi = float(v.min()), float(v.max())
            out.append((float(lo), float(hi)))
        return out

    def _tiff_region(self, x: int, y: int, w: int, h: int, out: tuple[int, int]) -> np.ndarray:
        W, H = self.size
        # clip to the scene; pad the rest black
        cx0, cy0, cx1, cy1 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
        if cx0 >= cx1 or cy0 >= cy1:
            return np.zeros((h, w, 3), np.uint8)
        shrink = (w / out[0]) * (h / out[1])
        area = (cx1 - cx0) * (cy1 - cy0)
        if shrink > 1.5 and area > _BAND_PIXELS:
            # reduced-resolution read of a big region: decode one band of rows at a time
            sy = out[1] / h
            sx = out[0] / w
            band_rows = max(1, _BAND_PIXELS // max(1, cx1 - cx0))
            pieces = []
            r = cy0
            while r < cy1:
                r1 = min(cy1, r + band_rows)
                o0, o1 = round((r - y) * sy), round((r1 - y) * sy)
                if o1 > o0:
                    rgb = self._to_uint8_rgb(self._raw_region(cx0, r, cx1, r1))
                    pieces.append(resize_rgb(rgb, (max(1, round((cx1 - cx0) * sx)), o1 - o0)))
                r = r1
            part = np.concatenate(pieces, 0)
            # place into the requested output frame
            canvas = np.zeros((out[1], out[0], 3), np.uint8)
            ox, oy = round((cx0 - x) * sx), round((cy0 - y) * sy)
            ph, pw = min(part.shape[0], out[1] - oy), min(part.shape[1], out[0] - ox)
            canvas[oy : oy + ph, ox : ox + pw] = part[:ph, :pw]
            return canvas
        rgb = self._to_uint8_rgb(self._raw_region(cx0, cy0, cx1, cy1))
        if (cx0, cy0, cx1, cy1) == (x, y, x + w, y + h):
            return rgb
        canvas = np.zeros((h, w, 3), np.uint8)
        canvas[cy0 - y : cy1 - y, cx0 - x : cx1 - x] = rgb
        return canvas


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


def _tiff_supported(path: Path) -> Optional[tuple[int, int]]:
    """(W, H) if tifffile can read this TIFF by region, else None (→ Pillow)."""
    tifffile = _tifffile()
    if tifffile is None:
        return None
    try:
        with tifffile.TiffFile(str(path)) as tif:
            page = tif.pages[0]
            if page.dtype is None or page.imagedepth != 1:
                return None
            if int(page.photometric) not in (0, 1, 2, 3, 6):  # gray, RGB, palette, YCbCr(JPEG)
                return None
            # check the first segment decodes (codec available)
            idx = 0
            if page.databytecounts and page.databytecounts[0]:
                tif.filehandle.seek(page.dataoffsets[idx])
                data = tif.filehandle.read(page.databytecounts[idx])
                page.decode(data, idx, jpegtables=page.jpegtables)
            return int(page.imagewidth), int(page.imagelength)
    except Exception:
        return None


def open_scene(path: str | os.PathLike) -> Scene:
    """Open a scene for region reads; the size comes from the header (nothing decoded).

    Raises :class:`~rsviewer.errors.ImageError` for a missing, empty or unreadable file.
    """
    if isinstance(path, Scene):
        return path
    p = Path(path)
    _check_file(p)
    if p.suffix.lower() in _TIFF_SUFFIXES or _is_tiff(p):
        size = _tiff_supported(p)
        if size is not None:
            return Scene(p, size, "tifffile", "TIFF")
    W, H = image_size(p)  # header only; raises ImageError for non-images
    with _pillow_limit_off():
        try:
            with Image.open(p) as im:
                fmt = im.format or p.suffix.lstrip(".").upper()
        except Exception:
            fmt = p.suffix.lstrip(".").upper()
    return Scene(p, (W, H), "pillow", fmt)


def _is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
    except OSError:
        return False
