"""Semantic localization on large scenes (SPEC §7): where in a 10k–30k px scene does a
sentence lie, and how well (the SeLo metrics Rsu, Ras, Rda, Rmi).

    from rsviewer.localize import open_scene, localize, LocalizeResult, load_anno, evaluate_anno, selo_metrics

- :mod:`.scene`   — :class:`Scene`: region reads of JPEG/PNG/TIFF scenes (tiled TIFF
  by segment via optional ``tifffile``; Pillow with an explicit pixel limit and JPEG
  draft decoding otherwise), thumbnails.
- :mod:`.grid`    — SeLo's sliding windows (two grids, edges covered) and the exact
  coarse-grid accumulation, normalisation and filters.
- :mod:`.encode`  — window embeddings: exact crops, or the shared-feature-map fast mode.
- :mod:`.cache`   — window-embedding cache under ``$RSVIEWER_CACHE/localize``.
- :mod:`.engine`  — :func:`localize`, :class:`LocalizeResult`, :func:`evaluate_anno`.
- :mod:`.metrics` — :func:`selo_metrics`, :func:`load_anno`.

Never imports Qt. See docs/localize.md for measurements.
"""
from .engine import DEFAULT_MODE, LocalizeResult, evaluate_anno, localize, query_vector
from .grid import accumulate, default_cell, sliding_windows
from .metrics import load_anno, selo_metrics
from .scene import Scene, open_scene

__all__ = [
    "open_scene",
    "Scene",
    "localize",
    "LocalizeResult",
    "load_anno",
    "evaluate_anno",
    "selo_metrics",
    "sliding_windows",
    "accumulate",
    "default_cell",
    "query_vector",
    "DEFAULT_MODE",
]
