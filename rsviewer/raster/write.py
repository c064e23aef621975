"""Georeferenced outputs that QGIS/GDAL open as they are: a Cloud-Optimized GeoTIFF for a
raster map and RFC 7946 GeoJSON for regions. Both written atomically (temporary file in
the same folder, then rename)."""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import RsviewerError
from .georef import WGS84

__all__ = ["write_cog", "write_geojson", "check_output_path"]


def check_output_path(path, suffixes: Optional[Sequence[str]] = None, what: str = "output") -> Path:
    """One-line error now (before any work) for an output whose folder does not exist or
    whose suffix is not one of ``suffixes``."""
    p = Path(path)
    if suffixes and p.suffix.lower() not in suffixes:
        raise RsviewerError(f"cannot tell what to write to {p.name!r} ({what}); end it in {', '.join(suffixes)}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise RsviewerError(f"the folder of {what} {p} does not exist ({parent}); create it first")
    if not os.access(parent, os.W_OK):
        raise RsviewerError(f"cannot write {what} {p}: folder {parent} is not writable")
    if p.is_dir():
        raise RsviewerError(f"{what} {p} is a folder; give a file name")
    return p


@contextlib.contextmanager
def _atomic_path(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp + ".aux.xml")


def write_cog(path, data: np.ndarray, transform, crs=None, valid: Optional[np.ndarray] = None,
              tags: Optional[dict] = None, blocksize: Optional[int] = None) -> Path:
    """Write a single-band ``data`` (h, w) — uint8 or float32 — as a COG (deflate, internal
    overviews, ``valid`` as the internal mask; NaN nodata for float32)."""
    import rasterio
    from rasterio.io import MemoryFile
    from rasterio.shutil import copy as rio_copy

    path = Path(path)
    data = np.asarray(data)
    if data.ndim != 2:
        raise ValueError("write_cog takes one band (h, w)")
    h, w = data.shape
    if blocksize is None:  # small maps still get at least one overview level
        blocksize = 256 if max(h, w) > 1024 else 128 if max(h, w) > 256 else 64
    profile = {"driver": "GTiff", "width": w, "height": h, "count": 1, "dtype": data.dtype.name,
               "transform": transform, "crs": crs}
    if data.dtype == np.float32:
        profile["nodata"] = float("nan")
        if valid is not None:
            data = np.where(valid, data, np.nan).astype(np.float32)
    with MemoryFile() as mem:
        with mem.open(**profile) as ds:
            ds.write(data, 1)
            if valid is not None and data.dtype == np.uint8:
                ds.write_mask(np.where(valid, 255, 0).astype(np.uint8))
            if tags:
                ds.update_tags(**{k: (v if isinstance(v, str) else json.dumps(v)) for k, v in tags.items()})
        with mem.open() as src, _atomic_path(path) as tmp:
            rio_copy(src, tmp, driver="COG", COMPRESS="DEFLATE", BLOCKSIZE=str(blocksize),
                     OVERVIEW_RESAMPLING="AVERAGE" if data.dtype == np.float32 else "NEAREST")
    with rasterio.open(path) as check:  # a COG that GDAL cannot re-open is a bug, not a result
        assert check.width == w and check.height == h
    return path


def write_geojson(path, features: list[dict], crs=None, name: str = "rsviewer", extra: Optional[dict] = None) -> Path:
    """A FeatureCollection. ``crs``: None/"EPSG:4326" → RFC 7946 (lon/lat, no ``crs``
    member); any other CRS → the legacy ``crs`` member naming it (QGIS and GDAL read it)."""
    from ..utils.atomic import atomic_file

    fc: dict = {"type": "FeatureCollection", "name": name}
    if crs is not None and str(crs) != WGS84:
        epsg = crs.to_epsg() if hasattr(crs, "to_epsg") else None
        label = f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else crs.to_wkt()
        fc["crs"] = {"type": "name", "properties": {"name": label}}
    if extra:
        fc.update(extra)
    fc["features"] = features
    with atomic_file(Path(path), "w") as fh:
        json.dump(fc, fh)
        fh.write("\n")
    return Path(path)
