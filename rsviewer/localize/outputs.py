"""Georeferenced outputs of a localization: the probability map as a COG and the top
regions as GeoJSON (``LocalizeResult.write_cog`` / ``.regions`` / ``.write_geojson``).

The map is written on the localizer's coarse grid — one COG pixel per ``cell`` scene
pixels — with the scene's CRS and the scene's transform scaled by ``cell`` (same origin,
same orientation), so it lies exactly over the scene in QGIS. Regions are the connected
components (4-connected) of the grid cells at or above a threshold, ranked by their
maximum score; their outlines are the cell edges, clipped to the scene, in the scene's
CRS, then (by default) in WGS 84 lon/lat as RFC 7946 asks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import RsviewerError
from ..raster.georef import WGS84, Georef, compose
from ..raster.write import write_cog, write_geojson

__all__ = ["grid_transform", "write_prob_cog", "find_regions", "write_regions"]


def _georef(res) -> Georef:
    g = getattr(res, "georef", None)
    if g is None:
        from affine import Affine

        g = Georef(None, Affine.identity(), res.scene_size, Path(res.scene_path).name if res.scene_path else "scene")
    return g


def grid_transform(res):
    """The transform of the coarse grid: the scene's, scaled by the cell size."""
    from affine import Affine

    return compose(_georef(res).transform, Affine.scale(res.cell))


def _tags(res, model: Optional[str]) -> dict:
    text = res.text if isinstance(res.text, str) else " | ".join(res.text)
    tags = {"RSVIEWER_QUERY": text, "RSVIEWER_MODEL": model or "", "RSVIEWER_CELL_PX": str(res.cell),
            "RSVIEWER_SCENE": str(res.scene_path or ""), "RSVIEWER_WINDOWS": res.info.get("window_sizes", []),
            "RSVIEWER_SCORE": "min-max normalised mean window cosine, smoothed (SeLo)"}
    if res.info.get("stretch"):
        tags["RSVIEWER_STRETCH"] = res.info["stretch"]
    if res.info.get("bands"):
        tags["RSVIEWER_BANDS"] = res.info["bands"]
    return tags


def write_prob_cog(res, path, dtype: str = "uint8", model: Optional[str] = None) -> Path:
    """The probability map as a COG: ``uint8`` (0–255) or ``float32`` (0–1, NaN nodata).
    Cells with no valid scene pixels are masked."""
    if dtype not in ("uint8", "float32"):
        raise RsviewerError(f"COG dtype must be uint8 or float32, not {dtype!r}")
    g = _georef(res)
    prob = np.asarray(res.prob, np.float32)
    data = np.clip(np.rint(prob * 255), 0, 255).astype(np.uint8) if dtype == "uint8" else prob
    valid = res.valid_cells() if hasattr(res, "valid_cells") else None
    return write_cog(path, data, grid_transform(res), g.crs, valid=valid, tags=_tags(res, model))


def find_regions(res, threshold: float = 0.5, top: int = 10) -> list[dict]:
    """Connected components of cells with ``prob >= threshold``, best first (max score),
    as dicts with the pixel-space polygon (``rings``), area, mean/max score."""
    from rasterio.features import shapes
    from scipy import ndimage

    if not 0.0 <= threshold <= 1.0:
        raise RsviewerError(f"the region threshold is a probability in [0, 1], got {threshold}")
    prob = np.asarray(res.prob, np.float32)
    over = prob >= threshold
    valid = res.valid_cells() if hasattr(res, "valid_cells") else None
    if valid is not None:
        over &= valid
    labels, n = ndimage.label(over)  # 4-connected, like rasterio's shapes(connectivity=4)
    if n == 0:
        return []
    idx = np.arange(1, n + 1)
    mx = ndimage.maximum(prob, labels, idx)
    mean = ndimage.mean(prob, labels, idx)
    cells = ndimage.sum(np.ones_like(prob), labels, idx)
    raw = getattr(res, "raw", None)
    rmean = ndimage.mean(np.nan_to_num(raw, nan=0.0), labels, idx) if raw is not None else None
    order = np.argsort(-mx, kind="stable")[: max(0, int(top))]
    W, H = res.scene_size
    c = float(res.cell)
    g = _georef(res)
    px_area = abs(g.transform.a * g.transform.e - g.transform.b * g.transform.d)
    out = []
    keep = {int(idx[k]): rank for rank, k in enumerate(order)}
    geoms: dict[int, list] = {}
    from affine import Affine

    for geom, val in shapes(labels.astype(np.int32), mask=labels > 0, connectivity=4, transform=Affine.scale(c)):
        v = int(val)
        if v in keep:
            geoms.setdefault(v, []).append(geom)
    for v, rank in sorted(keep.items(), key=lambda kv: kv[1]):
        k = v - 1
        rings = []
        for gm in geoms.get(v, []):
            # clip the cell outline to the scene (the last row/column of cells is cut by the border)
            rings.append([[[min(float(x), W), min(float(y), H)] for x, y in ring] for ring in gm["coordinates"]])
        lab = labels == v
        ys, xs = np.nonzero(lab)
        x0, y0 = float(xs.min() * c), float(ys.min() * c)
        x1, y1 = float(min(W, (xs.max() + 1) * c)), float(min(H, (ys.max() + 1) * c))
        area_px = float(np.sum(np.minimum(c, W - xs * c) * np.minimum(c, H - ys * c)))
        peak = np.unravel_index(int(np.argmax(np.where(lab, prob, -1))), prob.shape)
        out.append({
            "rank": rank + 1, "rings": rings, "bbox_px": [x0, y0, x1, y1],
            "peak_px": [float(min(W - 1, (peak[1] + 0.5) * c)), float(min(H - 1, (peak[0] + 0.5) * c))],
            "cells": int(cells[k]), "area_px": area_px,
            "area_m2": area_px * px_area if g.has_crs and _metres(g.crs) else None,
            "area_map_units": area_px * px_area if g.has_crs else None,
            "score_max": float(mx[k]), "score_mean": float(mean[k]),
            "cosine_mean": float(rmean[k]) if rmean is not None else None,
        })
    return out


def _metres(crs) -> bool:
    try:
        return bool(crs.is_projected and (crs.linear_units or "").lower() in ("metre", "meter", "m"))
    except Exception:
        return False


def _project_ring(g: Georef, ring, to_wgs84: bool):
    xs, ys = [p[0] for p in ring], [p[1] for p in ring]
    if to_wgs84:
        lon, lat = g.to_lonlat(xs, ys)
        return [[round(a, 8), round(b, 8)] for a, b in zip(lon, lat)]
    return [list(g.pixel_to_map(x, y)) for x, y in zip(xs, ys)]


def write_regions(res, path, crs: str = "wgs84", threshold: float = 0.5, top: int = 10,
                  model: Optional[str] = None) -> Path:
    """Top regions as GeoJSON: ``crs="wgs84"`` (RFC 7946 lon/lat) or ``"scene"`` (the
    scene's CRS, named in a ``crs`` member). A scene without a CRS is refused in one line."""
    g = _georef(res)
    if crs not in ("wgs84", "scene"):
        raise RsviewerError(f"GeoJSON CRS must be wgs84 or scene, not {crs!r}")
    g.require_crs("GeoJSON regions")
    to_wgs84 = crs == "wgs84"
    if to_wgs84:
        g.check_wgs84("GeoJSON in WGS 84")
    text = res.text if isinstance(res.text, str) else list(res.text)
    feats = []
    for r in find_regions(res, threshold, top):
        polys = [[_project_ring(g, ring, to_wgs84) for ring in rings] for rings in r["rings"]]
        geom = {"type": "Polygon", "coordinates": polys[0]} if len(polys) == 1 else \
            {"type": "MultiPolygon", "coordinates": polys}
        props = {k: v for k, v in r.items() if k != "rings"}
        props.update(query=text, model=model, threshold=threshold, cell_px=res.cell,
                     scene=str(res.scene_path) if res.scene_path else None)
        if to_wgs84:
            props["peak_lonlat"] = [round(v, 8) for v in (g.lonlat_or_none(*r["peak_px"]) or ())]
        props["peak_map"] = list(g.pixel_to_map(*r["peak_px"]))
        feats.append({"type": "Feature", "id": r["rank"], "geometry": geom, "properties": props})
    return write_geojson(path, feats, crs=WGS84 if to_wgs84 else g.crs, name="rsviewer localize",
                         extra={"query": text, "model": model, "scene_crs": g.crs_label()})
