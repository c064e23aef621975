"""Overviews for rasters that have none: one sidecar ``SCENE.ovr`` built once.

GDAL reads ``X.tif.ovr`` as the overviews of ``X.tif`` (the ``.ovr``'s own pixels are the
first overview, its internal overviews the next ones), so a big scene without overviews
becomes viewable and fast to analyse at coarse scales without touching the file itself.

The 1/2 level — three quarters of the work — is computed here band of rows by band of
rows (area average of the full-resolution blocks, bounded memory) with progress and
cancel; the coarser levels are then made by GDAL from it (1/4 of the pixels). The file is
written under a temporary name and renamed, so a cancel leaves nothing behind; an
existing ``.ovr`` is never overwritten.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import ImageError
from ..utils.progress import check, report

__all__ = ["build_overviews", "overview_path", "needs_overviews"]


def overview_path(path) -> Path:
    return Path(str(path) + ".ovr")


def needs_overviews(raster, min_side: int = 4096) -> bool:
    """A raster read by region whose long side exceeds ``min_side`` and has no overviews."""
    return raster.backend == "rasterio" and not raster.overviews and max(raster.size) > min_side


def _factors(size, min_side: int = 256) -> list[int]:
    out, f = [], 2
    while max(size) / f >= min_side:
        out.append(f)
        f *= 2
    return out or [2]


def build_overviews(raster, progress=None, cancel=None, rows: int = 1024) -> Path:
    """Write ``<scene>.ovr`` (factors 2, 4, 8, … down to ~256 px) and re-open ``raster``
    so it uses them. Returns the ``.ovr`` path. Raises :class:`ImageError` when the scene
    already has overviews, a sidecar exists, or its folder is not writable."""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.errors import NotGeoreferencedWarning
    from rasterio.windows import Window

    if raster.backend != "rasterio":
        raise ImageError(f"{raster.path.name} is read whole ({raster.format}); overviews apply to GeoTIFF/COG/JP2/VRT")
    if raster.overviews:
        raise ImageError(f"{raster.path.name} already has overviews (1/{', 1/'.join(map(str, raster.overviews))})")
    ovr = overview_path(raster.path)
    if ovr.exists():
        raise ImageError(f"{ovr.name} exists already; it is not rsviewer's to replace")
    if not os.access(ovr.parent, os.W_OK):
        raise ImageError(f"cannot write {ovr.name}: folder {ovr.parent} is not writable")
    W, H = raster.size
    factors = _factors((W, H))
    with raster._lock:
        src = raster._dataset(0)
        w2, h2 = math.ceil(W / 2), math.ceil(H / 2)
        profile = {"driver": "GTiff", "width": w2, "height": h2, "count": src.count, "dtype": src.dtypes[0],
                   "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate",
                   "interleave": "pixel", "BIGTIFF": "IF_SAFER"}
        if src.nodata is not None:
            profile["nodata"] = src.nodata
        fd, tmp = tempfile.mkstemp(prefix=f".{ovr.name}.", suffix=".tmp", dir=ovr.parent)
        os.close(fd)
        try:
            steps = math.ceil(H / rows) + len(factors) - 1
            with warnings.catch_warnings():  # the .ovr carries no georeference of its own
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                dst = rasterio.open(tmp, "w", **profile)
            with dst:
                for k, y0 in enumerate(range(0, H, rows)):
                    check(cancel)
                    y1 = min(H, y0 + rows)
                    oy0, oy1 = y0 // 2, min(h2, math.ceil(y1 / 2))
                    data = src.read(window=Window(0, y0, W, y1 - y0), out_shape=(src.count, oy1 - oy0, w2),
                                    resampling=Resampling.average)
                    dst.write(data, window=Window(0, oy0, w2, oy1 - oy0))
                    report(progress, k + 1, steps, f"overview 1/2: rows {y1}/{H}")
            if len(factors) > 1:
                check(cancel)
                with rasterio.open(tmp, "r+") as dst:
                    dst.build_overviews([f // 2 for f in factors[1:]], Resampling.average)
                report(progress, steps, steps, "overviews 1/" + ", 1/".join(map(str, factors)))
            check(cancel)
            if ovr.exists():
                raise ImageError(f"{ovr.name} appeared while building; left as it is")
            os.replace(tmp, ovr)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    raster.reopen()
    if not raster.overviews:
        raise ImageError(f"GDAL did not pick up {ovr.name} for {raster.path.name}")
    return ovr


def overview_summary(raster) -> Optional[str]:
    if not raster.overviews:
        return None
    return "1/" + ", 1/".join(str(f) for f in raster.overviews)
