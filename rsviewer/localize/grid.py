"""Sliding windows and the coarse score grid.

Windows (SeLo): for every window size ``s`` two square grids, one starting at 0 and one
offset by ``s // 2`` (in x and y), step ``s``; the last window of a row or column is
moved back so that it ends flush with the scene border, so edges are always covered.
Identical boxes (the flush ones often coincide) are kept once, as SeLo's file-per-crop
layout does. A window larger than the scene is shrunk to the scene's short side.

Coarse grid: the scene is divided into square cells of ``cell`` px (the last row and
column of cells may be cut by the border). The value of a cell is the **exact area
mean, over the scene pixels of the cell, of the per-pixel SeLo map** (each pixel = the
mean score of the windows covering it). It is computed without any full-resolution
array: the window edges and the cell edges split each axis into elementary intervals
inside which the per-pixel map is constant; sums and counts are accumulated on that
(non-uniform, ≈ cells + a few) grid with 2-D difference arrays, divided, and area-
averaged into the cells. For a 10240 px scene with 32 px cells that is a 320×320 array.
"""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "axis_starts",
    "sliding_windows",
    "default_cell",
    "accumulate",
    "normalize",
    "median_cells",
    "smooth",
]


def axis_starts(length: int, size: int, offset: int = 0) -> list[int]:
    """Window starts along one axis: ``offset, offset+size, …``; the last one flush
    with the border (SeLo: a window whose end reaches the border is moved to end on it)."""
    size = int(size)
    if size >= length:
        return [0]
    starts = []
    s = int(offset)
    while s < length:
        if s + size >= length:
            starts.append(length - size)
            break
        starts.append(s)
        s += size
    return sorted(set(starts))


def sliding_windows(scene_size: tuple[int, int], sizes: Iterable[int], offsets: str = "selo") -> np.ndarray:
    """All windows as an (N, 3) int64 array of ``(x, y, side)`` (squares), grouped by
    size in the given order, deduplicated. ``offsets="selo"``: grids at 0 and side/2;
    ``"single"``: only the grid at 0 (SeLo v2's stage 1)."""
    W, H = int(scene_size[0]), int(scene_size[1])
    out: list[tuple[int, int, int]] = []
    seen: set[tuple[int, int, int]] = set()
    for size in sizes:
        side = int(min(int(size), W, H))
        if side <= 0:
            raise ValueError(f"window size must be positive, got {size}")
        offs = (0, side // 2) if offsets == "selo" else (0,)
        for off in offs:
            xs = axis_starts(W, side, off)
            ys = axis_starts(H, side, off)
            for y in ys:
                for x in xs:
                    key = (x, y, side)
                    if key not in seen:
                        seen.add(key)
                        out.append(key)
    return np.asarray(out, dtype=np.int64).reshape(-1, 3)


def default_cell(scene_size: tuple[int, int], max_cells: int = 512) -> int:
    """Cell size in px: a power of two ≥ 8 with at most ``max_cells`` cells on the long
    side (2048 px scene → 8 px cells; 10240 → 32; 30000 → 64). Powers of two divide the
    128 px steps of the default windows, so most window edges fall on cell edges."""
    long_side = max(int(scene_size[0]), int(scene_size[1]))
    c = 8
    while math.ceil(long_side / c) > max_cells:
        c *= 2
    return c


def grid_shape(scene_size: tuple[int, int], cell: int) -> tuple[int, int]:
    """(gh, gw) = number of cell rows and columns covering the scene."""
    return math.ceil(int(scene_size[1]) / cell), math.ceil(int(scene_size[0]) / cell)


def accumulate(
    boxes: np.ndarray, scores: np.ndarray, scene_size: tuple[int, int], cell: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell area mean of the per-pixel window-mean map.

    ``boxes``: (N, 3) ``(x, y, side)`` or (N, 4) ``(x0, y0, x1, y1)``; ``scores`` (N,).
    Returns ``(grid, covered)``: (gh, gw) float64 means (NaN where no window covers any
    pixel of the cell) and the covered fraction of each cell's pixels.
    """
    W, H = int(scene_size[0]), int(scene_size[1])
    boxes = np.asarray(boxes, dtype=np.int64)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if boxes.shape[1] == 3:
        x0, y0, s = boxes[:, 0], boxes[:, 1], boxes[:, 2]
        x1, y1 = x0 + s, y0 + s
    else:
        x0, y0, x1, y1 = boxes.T
    x0, x1 = np.clip(x0, 0, W), np.clip(x1, 0, W)
    y0, y1 = np.clip(y0, 0, H), np.clip(y1, 0, H)
    gh, gw = grid_shape((W, H), cell)
    bx = np.unique(np.concatenate([x0, x1, np.arange(0, W, cell), [W]]))
    by = np.unique(np.concatenate([y0, y1, np.arange(0, H, cell), [H]]))
    ix0, ix1 = np.searchsorted(bx, x0), np.searchsorted(bx, x1)
    iy0, iy1 = np.searchsorted(by, y0), np.searchsorted(by, y1)
    nx, ny = len(bx) - 1, len(by) - 1
    S = np.zeros((ny + 1, nx + 1))
    C = np.zeros((ny + 1, nx + 1))
    for arr, val in ((S, scores), (C, np.ones_like(scores))):
        np.add.at(arr, (iy0, ix0), val)
        np.add.at(arr, (iy0, ix1), -val)
        np.add.at(arr, (iy1, ix0), -val)
        np.add.at(arr, (iy1, ix1), val)
    S = S.cumsum(0).cumsum(1)[:ny, :nx]
    C = np.rint(C.cumsum(0).cumsum(1)[:ny, :nx])
    cov = C > 0
    M = np.where(cov, S / np.where(cov, C, 1.0), 0.0)
    wx = np.diff(bx).astype(np.float64)
    wy = np.diff(by).astype(np.float64)
    area = wy[:, None] * wx[None, :]
    cx = np.searchsorted(np.arange(0, W, cell), bx[:-1], side="right") - 1  # cell of each interval
    cy = np.searchsorted(np.arange(0, H, cell), by[:-1], side="right") - 1
    sx = np.flatnonzero(np.r_[True, np.diff(cx) != 0])  # first interval of each cell
    sy = np.flatnonzero(np.r_[True, np.diff(cy) != 0])
    num = np.add.reduceat(np.add.reduceat(M * area * cov, sy, axis=0), sx, axis=1)
    den = np.add.reduceat(np.add.reduceat(area * cov, sy, axis=0), sx, axis=1)
    tot = np.add.reduceat(np.add.reduceat(area, sy, axis=0), sx, axis=1)
    assert num.shape == (gh, gw), (num.shape, gh, gw)
    with np.errstate(invalid="ignore", divide="ignore"):
        grid = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return grid, den / tot


def normalize(grid: np.ndarray) -> np.ndarray:
    """Min–max to [0, 1] (NaN cells, i.e. never covered, become 0); constant → zeros."""
    g = np.asarray(grid, dtype=np.float64)
    finite = np.isfinite(g)
    if not finite.any():
        return np.zeros(g.shape, np.float32)
    lo, hi = float(g[finite].min()), float(g[finite].max())
    out = np.where(finite, g, lo)
    if hi <= lo:
        return np.zeros(g.shape, np.float32)
    return ((out - lo) / (hi - lo)).astype(np.float32)


def odd_kernel(px: float, cell: float) -> int:
    """Nearest odd number of cells to a kernel of ``px`` scene pixels (≥ 1)."""
    k = px / cell
    return max(1, 2 * int(round((k - 1) / 2)) + 1)


def median_cells(prob: np.ndarray, k: int) -> np.ndarray:
    """SeLo's median filter at grid scale, on the 8-bit map as SeLo filters its uint8
    probability image (cv2's constant-time median), border replicated; float32 [0, 1]."""
    import cv2

    u8 = np.clip(np.rint(prob * 255.0), 0, 255).astype(np.uint8)
    if k > 1:
        u8 = cv2.medianBlur(u8, int(k))
    return u8.astype(np.float32) / 255.0


def gaussian_cells(prob: np.ndarray, ksize_px: float, cell: float) -> np.ndarray:
    """SeLo v2's ``cv2.GaussianBlur(probmap, (255, 255), 0)`` at grid scale: σ from the
    kernel size by OpenCV's rule, converted to cells; border reflected."""
    from scipy import ndimage

    sigma_px = 0.3 * ((ksize_px - 1) * 0.5 - 1) + 0.8
    sigma = sigma_px / cell
    if sigma < 0.3:
        return prob.astype(np.float32)
    radius = max(1, int(round((ksize_px // 2) / cell)))
    return ndimage.gaussian_filter(prob.astype(np.float32), sigma, mode="mirror", truncate=radius / sigma)


def smooth(prob: np.ndarray, cell: float, kind: str = "median", size_px: float | None = None) -> np.ndarray:
    """``median`` (SeLo, 251 px), ``gaussian`` (SeLo v2, 255 px) or ``none``."""
    if kind in (None, "none"):
        return prob.astype(np.float32)
    if kind == "median":
        return median_cells(prob, odd_kernel(size_px or 251, cell))
    if kind == "gaussian":
        return gaussian_cells(prob, float(size_px or 255), cell)
    raise ValueError(f"unknown filter {kind!r}; use median, gaussian or none")
