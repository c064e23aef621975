"""SeLo metrics (Yuan et al., "Learning to evaluate performance of semantic
localization", the GaLR/AMFMN group's SLM code): Rsu, Ras, Rda and Rmi.

With ``p`` the probability map in [0, 1] and ``m`` the ground-truth mask (the anno
polygons filled):

- **Rsu** = 1 − exp(−0.707·L·R), L = Σpm / (Σp − Σpm + 1e−7), R = (HW − Σm) / Σm.
- Candidate attention centres: ``gray = uint8(255·p)`` (truncated), five 50×50 box
  filters (8-bit, as ``cv2.boxFilter``), local maxima where a 1000×1000 maximum filter
  equals the map (and the map > 0), 8-connected components, their centroids (truncated
  to integers) kept if ``p`` ≥ 0.5 there.
- Each polygon: centre = mean of its vertices (truncated), radius r = 1.5 × the mean
  vertex distance to the centre (truncated).
- **Ras** = (e^{3g} − 1)/(e³ − 1), g = mean over polygons of (mean distance of the
  candidates within r, or r if none) / r; Ras = 1 when there is no candidate at all.
- **Rda** = mean over polygons: n candidates within r; n ≤ 1 → n; else
  0.5·(1 − mean distance to their centroid / r) + exp(−0.5·(n + 2)).
- **Rmi** = 0.4·Rsu + 0.35·(1 − Ras) + 0.25·Rda.

Memory: the metrics are computed on a **metric raster** whose long side is at most
``max_side`` (2048 px by default). Scenes up to that size (the 2048 px ucm-mosaics) are
evaluated at full resolution, exactly as the SLM code does. For larger scenes the map
is resampled to the raster (a coarse grid is upsampled bilinearly, a full-resolution
map is area-averaged) and every pixel quantity is scaled with it: polygon vertices ×s,
box filter 50·s px, maximum filter 1000·s px, candidate centroids mapped back to scene
pixels before any distance is measured (so r and the distances stay in scene pixels).
Rsu is a ratio of sums and R a ratio of areas, both scale-free. At most ≈ 4 Mpx of
floats are ever allocated, whatever the scene size.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import RsviewerError

__all__ = ["selo_metrics", "load_anno", "region_center_radius", "candidate_centers", "METRIC_MAX_SIDE"]

METRIC_MAX_SIDE = 2048
RSU_BETA, RSU_EPS = 0.707, 1e-7
RAS_EXPAND, RAS_FILTER_TIMES, RAS_BETA = 1.5, 5, 3.0
RDA_ETA = 0.5
W_SU, W_AS, W_DA = 0.4, 0.35, 0.25
BOX_PX, MAXF_PX = 50, 1000


def load_anno(path: str | os.PathLike) -> list[dict]:
    """SeLo annotation file: a JSON list of ``{"caption", "jpg_name", "label",
    "points": [[[x, y], ...], ...]}`` (one or more polygons per query)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RsviewerError(f"annotation file not found: {p}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RsviewerError(f"{p} is not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise RsviewerError(f"{p}: expected a list of {{caption, jpg_name, points}} entries")
    out = []
    for i, item in enumerate(data):
        if not isinstance(item, dict) or not {"caption", "jpg_name", "points"} <= set(item):
            raise RsviewerError(f"{p}: entry {i} lacks caption, jpg_name or points")
        polys = _polygons(item["points"])
        if not polys:
            raise RsviewerError(f"{p}: entry {i} has no polygon")
        out.append({"caption": str(item["caption"]), "jpg_name": str(item["jpg_name"]),
                    "label": item.get("label"), "points": polys})
    return out


def _polygons(points) -> list[list[list[float]]]:
    """Accept one polygon ``[[x, y], ...]`` or a list of polygons."""
    arr = points
    if not arr:
        return []
    if isinstance(arr[0], (list, tuple)) and arr[0] and isinstance(arr[0][0], (int, float)):
        arr = [arr]
    return [[[float(v[0]), float(v[1])] for v in poly] for poly in arr if len(poly) >= 1]


def region_center_radius(poly: Sequence[Sequence[float]]) -> tuple[int, int, int]:
    """SLM's ``_get_region_center_radius``: integer centre and 1.5 × mean vertex distance."""
    pts = np.asarray(poly, dtype=np.float64)
    mx = int(pts[:, 0].sum() / len(pts))
    my = int(pts[:, 1].sum() / len(pts))
    r = int(np.mean(np.linalg.norm(pts - np.array([mx, my], dtype=np.float64), axis=1)) * RAS_EXPAND)
    return mx, my, r


def _metric_raster(prob: np.ndarray, scene_size: tuple[int, int], cell: Optional[float], max_side: int):
    """Resample ``prob`` to the metric raster. Returns (raster float32, s)."""
    import cv2

    W, H = int(scene_size[0]), int(scene_size[1])
    s = min(1.0, max_side / max(W, H))
    mw, mh = max(1, round(W * s)), max(1, round(H * s))
    p = np.asarray(prob, dtype=np.float32)
    ph, pw = p.shape
    if (pw, ph) == (mw, mh) and cell is None:
        return np.clip(p, 0, 1), s
    if (pw, ph) == (W, H) and cell is None:  # full resolution, scene bigger than the raster
        return np.clip(cv2.resize(p, (mw, mh), interpolation=cv2.INTER_AREA), 0, 1), s
    # a coarse grid: cells of `cell` px (last ones cut by the border). Without `cell`: the
    # localizer's default cell if the shape matches it, else a grid covering the scene exactly
    if cell is None:
        from .grid import default_cell, grid_shape

        c = default_cell((W, H))
        if grid_shape((W, H), c) == (ph, pw):
            cell = c
    if cell is None:
        cx, cy = W / pw, H / ph
    else:
        cx = cy = float(cell)
    # upsample the grid to the raster of its full (padded) extent, then crop
    fw, fh = max(1, round(pw * cx * s)), max(1, round(ph * cy * s))
    up = cv2.resize(p, (fw, fh), interpolation=cv2.INTER_LINEAR)
    out = np.zeros((mh, mw), np.float32)
    hh, ww = min(mh, fh), min(mw, fw)
    out[:hh, :ww] = up[:hh, :ww]
    if hh < mh:
        out[hh:, :ww] = up[hh - 1 : hh, :ww]
    if ww < mw:
        out[:, ww:] = out[:, ww - 1 : ww]
    return np.clip(out, 0, 1), s


def candidate_centers(p: np.ndarray, s: float = 1.0) -> list[tuple[float, float]]:
    """SLM's ``_get_prob_center_in_gray`` on a raster at scale ``s`` (1 = full res);
    returns the candidate centres in **scene** pixels ``(x, y)``."""
    import cv2
    from scipy import ndimage

    gray = np.asarray(p * 255.0, dtype=np.float32).astype(np.uint8)  # truncation, as np.uint8(...)
    k = max(1, int(round(BOX_PX * s)))
    for _ in range(RAS_FILTER_TIMES):
        gray = cv2.boxFilter(gray, ddepth=-1, ksize=(k, k))  # normalised, BORDER_REFLECT_101
    K = max(1, int(round(MAXF_PX * s)))
    # = scipy.ndimage.maximum_filter(gray, size=K) (SLM), as two separable dilations:
    # identical values (a reflected border only repeats pixels already in the window)
    mx = cv2.dilate(cv2.dilate(gray, np.ones((1, K), np.uint8)), np.ones((K, 1), np.uint8))
    peaks = (mx == gray) & (gray > 0)
    labels, n = ndimage.label(peaks, structure=np.ones((3, 3), bool))
    if n == 0:
        return []
    cents = ndimage.center_of_mass(peaks, labels, index=np.arange(1, n + 1))
    out = []
    for cy, cx in cents:
        ix, iy = int(cx), int(cy)
        if p[iy, ix] >= 0.5:
            if s == 1.0:
                out.append((float(ix), float(iy)))
            else:  # raster pixel centre → scene pixel
                out.append(((cx + 0.5) / s - 0.5, (cy + 0.5) / s - 0.5))
    return out


def _mask(polys, shape: tuple[int, int], s: float) -> np.ndarray:
    import cv2

    m = np.zeros(shape, np.uint8)
    if s == 1.0:
        pts = [np.asarray(pl, np.float64).astype(np.int32) for pl in polys]  # SLM: np.int32 truncation
        cv2.fillPoly(m, pts, 1)
    else:
        shift = 4
        pts = [np.round(np.asarray(pl, np.float64) * s * (1 << shift)).astype(np.int32) for pl in polys]
        cv2.fillPoly(m, pts, 1, shift=shift)
    return m


def selo_metrics(
    prob_fullres_or_grid: np.ndarray,
    polygons,
    scene_size: tuple[int, int],
    cell: Optional[float] = None,
    max_side: int = METRIC_MAX_SIDE,
    return_details: bool = False,
) -> dict:
    """Rsu, Ras, Rda, Rmi of one probability map against the ground-truth polygons.

    ``prob_fullres_or_grid``: values in [0, 1], either at the scene's resolution
    ``(H, W)`` or a coarse grid (``cell`` px per cell, the last cells cut by the border;
    without ``cell`` the grid is taken to cover the scene exactly). ``polygons``: one
    polygon ``[[x, y], ...]`` or a list of them (an anno entry's ``points``), in scene
    pixels. ``return_details`` adds the candidate centres and the regions.
    """
    W, H = int(scene_size[0]), int(scene_size[1])
    polys = _polygons(polygons)
    if not polys:
        raise RsviewerError("no ground-truth polygon given")
    p, s = _metric_raster(prob_fullres_or_grid, (W, H), cell, max_side)
    m = _mask(polys, p.shape, s)

    # Rsu
    pm = float((p * m).sum(dtype=np.float64))
    sp = float(p.sum(dtype=np.float64))
    sm = float(m.sum(dtype=np.float64))
    area = float(p.shape[0] * p.shape[1])
    if sm <= 0:
        raise RsviewerError("the ground-truth polygons cover no pixel of the scene")
    L = pm / (sp - pm + RSU_EPS)
    R = (area - sm) / sm
    rsu = 1.0 - math.exp(-RSU_BETA * L * R)

    # candidates and regions
    cands = candidate_centers(p, s)
    regions = [region_center_radius(pl) for pl in polys]
    C = np.asarray(cands, dtype=np.float64).reshape(-1, 2)

    # Ras
    if len(cands) == 0:
        ras = 1.0
    else:
        offs = []
        for x, y, r in regions:
            r_ = max(r, 1)
            d = np.linalg.norm(C - np.array([x, y], np.float64), axis=1)
            d = d[d <= r]
            offs.append((float(d.mean()) if d.size else float(r_)) / r_)
        g = float(np.mean(offs))
        ras = (math.exp(RAS_BETA * g) - 1.0) / (math.exp(RAS_BETA) - 1.0)

    # Rda
    rda_vals = []
    for x, y, r in regions:
        r_ = max(r, 1)
        d = np.linalg.norm(C - np.array([x, y], np.float64), axis=1) if len(cands) else np.zeros(0)
        inside = C[d <= r] if len(cands) else C
        n = len(inside)
        if n <= 1:
            rda_vals.append(float(n))
            continue
        cen = inside.mean(0)
        md = float(np.linalg.norm(inside - cen, axis=1).mean()) / r_
        rda_vals.append(0.5 * (1.0 - md) + math.exp(-RDA_ETA * (n + 2)))
    rda = float(np.mean(rda_vals))
    rmi = W_SU * rsu + W_AS * (1.0 - ras) + W_DA * rda
    out = {"Rsu": float(rsu), "Ras": float(ras), "Rda": float(rda), "Rmi": float(rmi)}
    if return_details:
        out["candidates"] = [[float(a), float(b)] for a, b in cands]
        out["regions"] = [list(r) for r in regions]
        out["metric_scale"] = s
    return out
