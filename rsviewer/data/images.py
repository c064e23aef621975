"""Reading image files into 8-bit RGB, with one clear error for every bad file.

Every model, the index builder and the GUI go through :func:`load_image`, so this is
the one place that knows about odd remote-sensing files: 16-bit and float grayscale,
16-bit multi-band TIFFs (read with ``tifffile`` because Pillow cannot), CMYK, palette
and alpha images, EXIF orientation, multi-page files.

Size guard: a whole image is decoded into memory, so :func:`load_image` refuses
images over :func:`max_pixels` (default 250 Mpx, about 750 MB as RGB; environment
variable ``RSVIEWER_MAX_PIXELS`` overrides it). The size is checked from the header
*before* any pixel is decoded, which is what makes it a guard against decompression
bombs (a tiny compressed file that expands to gigabytes). Large scenes are not meant
to go through here: the localize module reads them tiled. Pillow's own
``DecompressionBombWarning``/``Error`` never reaches the caller: during our calls its
limit is switched off (our check replaces it) and anything it still raises becomes an
:class:`ImageError`.

Scaling of 16-bit / float data to 8 bit (:func:`stretch_to_uint8`): a per-band
2nd–98th percentile stretch, falling back to min–max when those percentiles
coincide. Percentiles rather than plain min–max because satellite products often hold
12-bit data in 16-bit containers with a few saturated or dead pixels: min–max (or a
fixed ``/257``) would leave such images almost black.
"""
from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DEFAULT_MAX_PIXELS",
    "max_pixels",
    "load_image",
    "image_size",
    "is_image_file",
    "stretch_to_uint8",
]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif"}
)

DEFAULT_MAX_PIXELS = 250_000_000

_ENV_MAX_PIXELS = "RSVIEWER_MAX_PIXELS"
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_ORIENTATION_TAG = 0x0112
# Pillow's exceptions for a corrupt or truncated file; all become ImageError.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError,
                  EOFError, IndexError, KeyError, TypeError, MemoryError,
                  Image.DecompressionBombError)


def max_pixels() -> int:
    """The effective pixel limit: ``$RSVIEWER_MAX_PIXELS`` if set, else 250 Mpx.

    Large scenes should be read tiled by the localize module instead of raising this;
    the limit exists as an explicit guard against decompression bombs.
    """
    raw = os.environ.get(_ENV_MAX_PIXELS, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw.replace("_", "")))
    except (ValueError, OverflowError):
        value = 0
    if value <= 0:
        raise ImageError(f"{_ENV_MAX_PIXELS} must be a positive number of pixels, got {raw!r}")
    return value


def is_image_file(path: str | os.PathLike) -> bool:
    """True if the name has an image extension (case-insensitive); the file is not opened."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


# --- Pillow's own bomb limit -------------------------------------------------------
# Pillow reads the module global Image.MAX_IMAGE_PIXELS, warns above it and raises
# above twice it (≈179 Mpx by default, below our 250 Mpx). We switch it off only while
# one of our calls runs (reference-counted, so concurrent GUI workers are safe) and do
# our own check from the header size; outside our calls Pillow's default is untouched.
_limit_lock = threading.Lock()
_limit_depth = 0
_limit_saved: int | None = None


@contextmanager
def _pillow_limit_off() -> Iterator[None]:
    global _limit_depth, _limit_saved
    with _limit_lock:
        if _limit_depth == 0:
            _limit_saved = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _limit_depth += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_depth -= 1
            if _limit_depth == 0:
                Image.MAX_IMAGE_PIXELS = _limit_saved


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    # Pillow repeats the file name in some messages; keep them short.
    return (text[:160] + "…") if len(text) > 160 else (text or type(exc).__name__)


def _check_file(path: Path) -> None:
    """Errors a user can fix before any decoding: missing, directory, empty, unreadable."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ImageError(f"image not found: {path}") from None
    except PermissionError:
        raise ImageError(f"cannot read {path}: permission denied") from None
    except OSError as exc:
        raise ImageError(f"cannot read {path}: {_one_line(exc)}") from None
    if path.is_dir():
        raise ImageError(f"{path} is a directory, not an image")
    if st.st_size == 0:
        raise ImageError(f"{path} is empty (0 bytes)")
    if not os.access(path, os.R_OK):
        raise ImageError(f"cannot read {path}: permission denied")


def _check_pixels(path: Path, w: int, h: int, limit: int) -> None:
    if w * h > limit:
        raise ImageError(
            f"{path.name} is {w}×{h} px ({_mpx(w * h)} Mpx), over the "
            f"{_mpx(limit)} Mpx limit; set {_ENV_MAX_PIXELS} or use the tiled scene reader"
        )


def _mpx(pixels: int) -> str:
    m = pixels / 1e6
    return f"{m:.0f}" if m >= 100 else f"{m:.3g}"


def _is_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) in _TIFF_MAGIC
    except OSError:
        return False


def _tifffile():
    try:
        import tifffile  # optional: only needed for multi-band / >8-bit TIFFs
    except ImportError:
        return None
    return tifffile


def _needs_tifffile(im: Image.Image) -> bool:
    """Pillow opens 16-bit RGB(A) TIFFs by keeping the high byte (dark images) and
    reads a 4th band as alpha even when it is near-infrared; tifffile does better."""
    if im.format != "TIFF":
        return False
    tags = getattr(im, "tag_v2", {})
    bits = tags.get(258, (8,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    return int(tags.get(277, 1)) > 1 and max(bits, default=8) > 8


def read_hint(path: str | os.PathLike) -> Optional[str]:
    """One line worth telling the user before ``path`` is used, from its header alone (no
    decode): a 16-bit (or multi-band) TIFF without the optional ``tifffile``, which Pillow
    reads by keeping the high byte — an almost black image. ``None`` when nothing to say."""
    # the magic bytes first: importing tifffile holds the GIL ~25 ms, spent only on a TIFF
    if not _is_tiff(_as_path(path)) or _tifffile() is not None:
        return None
    try:
        with Image.open(_as_path(path)) as im:
            if _needs_tifffile(im):
                return (f"{Path(path).name} is a >8-bit TIFF: without tifffile it reads dark (high byte only); "
                        "pip install 'rsviewer[tiff]' reads it properly")
    except Exception:  # noqa: BLE001 — unreadable files are reported by load_image itself
        return None
    return None


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if value in range(1, 9) else 1
    except Exception:  # a broken EXIF block must not stop the image from loading
        return 1


# --- pixel conversion --------------------------------------------------------------

def stretch_to_uint8(band: np.ndarray) -> np.ndarray:
    """Scale one band (2-D array of any numeric dtype) to uint8.

    2nd–98th percentile stretch (min–max if those coincide); NaN/inf become 0; a
    constant band becomes 0. Percentiles are taken on a ≤1 Mpx strided sample so a
    250 Mpx band costs no more than a thumbnail.
    """
    band = np.asarray(band)
    if band.dtype == np.uint8:
        return band
    step = max(1, int(np.sqrt(band.size / 1_000_000)))
    sample = band[::step, ::step] if band.ndim == 2 else band.ravel()[::step * step]
    sample = sample.astype(np.float64, copy=False).ravel()
    finite = sample[np.isfinite(sample)]
    if finite.size == 0:
        return np.zeros(band.shape, np.uint8)
    lo, hi = np.percentile(finite, (2.0, 98.0))
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(band.shape, np.uint8)
    out = band.astype(np.float32)  # in-place from here: one float copy of the band
    out -= np.float32(lo)
    out *= np.float32(255.0 / (hi - lo))
    np.nan_to_num(out, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def _bands_to_rgb(bands: list[np.ndarray]) -> Image.Image:
    """1 band → gray, 2 bands → the first (gray + alpha/extra), ≥3 → the first three."""
    chans = [stretch_to_uint8(b) for b in (bands[:1] if len(bands) < 3 else bands[:3])]
    if len(chans) == 1:
        chans = chans * 3
    return Image.fromarray(np.ascontiguousarray(np.stack(chans, axis=-1)), "RGB")


def _composite_over_white(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba.convert("RGB"), mask=rgba.getchannel("A"))
    return out


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # convert("RGB") would clip everything above 255 to white: stretch instead.
        return _bands_to_rgb([np.asarray(im)])
    if "transparency" in im.info and mode in ("P", "L", "RGB", "1"):
        im = im.convert("RGBA")  # colour-key / palette transparency → real alpha
        mode = im.mode
    if mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        return _composite_over_white(im)
    if mode == "RGB":
        return im
    return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGBX, LAB, HSV


def _load_with_tifffile(path: Path, limit: int | None, tifffile) -> Image.Image:
    """First page of a TIFF via tifffile: any band count / bit depth, scaled per band."""
    with tifffile.TiffFile(str(path)) as tif:
        if not tif.pages:
            raise ImageError(f"{path} is not a readable image (TIFF without pages)")
        page = tif.pages[0]
        w, h = int(page.imagewidth), int(page.imagelength)
        if limit is not None:
            _check_pixels(path, w, h, limit)
        arr = page.asarray()
        axes = page.axes
    # Keep Y, X and the sample axis S; take index 0 of anything else (depth, pages).
    if arr.ndim != len(axes):
        axes = "YXS"[: arr.ndim] if arr.ndim <= 3 else axes
    for ax in [a for a in axes if a not in "YXS"]:
        arr = np.take(arr, 0, axis=axes.index(ax))
        axes = axes.replace(ax, "", 1)
    if "S" not in axes:
        arr, axes = arr[..., None], axes + "S"
    arr = np.moveaxis(arr, [axes.index("Y"), axes.index("X"), axes.index("S")], [0, 1, 2])
    if np.iscomplexobj(arr):
        arr = np.abs(arr)
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    return _bands_to_rgb([arr[..., i] for i in range(arr.shape[2])])


def _as_path(path: str | os.PathLike) -> Path:
    try:
        return Path(path)
    except TypeError:
        raise ImageError(f"not a file path: {path!r}") from None


# --- public API ----------------------------------------------------------------------

def load_image(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """Read an image file as a fully loaded 8-bit RGB ``PIL.Image``.

    ``max_pixels`` defaults to :func:`max_pixels` (250 Mpx or ``$RSVIEWER_MAX_PIXELS``);
    it is checked from the header before decoding. EXIF orientation is applied; alpha
    is composited over white; 16-bit/float data is percentile-stretched per band; for
    multi-page files the first page is read. Raises :class:`ImageError` (one line,
    naming the file) for a missing, empty, corrupt, truncated or too-large file.
    """
    path = _as_path(path)
    limit = _effective_limit(max_pixels)
    _check_file(path)
    with _pillow_limit_off():
        try:
            im = Image.open(path)
        except _DECODE_ERRORS as exc:
            return _tiff_fallback(path, limit, exc)
        with im:
            _check_pixels(path, im.width, im.height, limit)
            if _needs_tifffile(im) and _tifffile() is not None:
                return _tiff_fallback(path, limit, None)
            try:
                im.load()  # decode now so truncation errors surface here
                src = ImageOps.exif_transpose(im) if _orientation(im) != 1 else im
                out = _to_rgb(src)
                if out is im:
                    out = im.copy()  # detach from the file handle closed below
            except ImageError:
                raise
            except _DECODE_ERRORS as exc:
                if im.format == "TIFF":  # a layout Pillow opens but cannot decode
                    return _tiff_fallback(path, limit, exc)
                raise ImageError(f"{path} is not a readable image ({_one_line(exc)})") from None
    return out


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(width, height)`` from the header, as :func:`load_image` would return it
    (EXIF rotation by 90° swaps them). No pixels are decoded and no size limit applies,
    so callers can use it to decide whether to read a scene tiled."""
    path = _as_path(path)
    _check_file(path)
    with _pillow_limit_off():
        try:
            with Image.open(path) as im:
                w, h = im.size
                if _orientation(im) in (5, 6, 7, 8):
                    w, h = h, w
                return int(w), int(h)
        except _DECODE_ERRORS as exc:
            tifffile = _tifffile() if _is_tiff(path) else None
            if tifffile is not None:
                try:
                    with tifffile.TiffFile(str(path)) as tif:
                        page = tif.pages[0]
                        return int(page.imagewidth), int(page.imagelength)
                except Exception:
                    pass
            raise ImageError(f"{path} is not a readable image ({_one_line(exc)})") from None


def _effective_limit(value: int | None) -> int:
    if value is None:
        return max_pixels()
    if int(value) <= 0:
        raise ImageError(f"max_pixels must be positive, got {value}")
    return int(value)


def _tiff_fallback(path: Path, limit: int, exc: BaseException | None) -> Image.Image:
    """Pillow failed (or would truncate bits): try tifffile for TIFFs, else report."""
    tifffile = _tifffile() if _is_tiff(path) else None
    if tifffile is None:
        reason = _one_line(exc) if exc is not None else "unsupported TIFF layout"
        if isinstance(exc, UnidentifiedImageError):
            reason = "not an image file or an unsupported format"
        raise ImageError(f"{path} is not a readable image ({reason})") from None
    try:
        return _load_with_tifffile(path, limit, tifffile)
    except ImageError:
        raise
    except Exception as tiff_exc:  # tifffile raises many types (codec missing, corrupt)
        raise ImageError(f"{path} is not a readable TIFF ({_one_line(tiff_exc)})") from None

