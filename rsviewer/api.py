"""The Python API: the same engine the CLI and the GUI use, as plain functions.

    import rsviewer as rv
    model = rv.load_model("default")
    index = rv.build_index(model, "assets/gallery/gallery.json", "runs/gallery-index")
    hits = rv.search_text(model, index, "many planes parked at the airport", k=10).hits
    print(rv.evaluate(model, "dataset_ucm.json", split="val", rerank="smr"))
    pq = rv.evaluate_per_query(model, "dataset_ucm.json", split="val")  # where it fails, query by query
    rv.write_table(rv.per_query_table(pq), "per_query.parquet")

Every long function takes ``progress=(done, total, message) -> None`` and
``cancel=<object with is_set()>``; user errors raise :class:`rsviewer.errors.RsviewerError`.
Outputs (``save_model``, ``build_index(..., out)``, ``train(..., out)``) go to an absent or
empty folder, or over a folder rsviewer wrote with ``overwrite=True``; a folder of anything
else is never replaced (:class:`rsviewer.errors.OutputError`).
"""
from __future__ import annotations

from .archs.registry import create_model, list_archs
from .checkpoint import list_models, load_model, save_model
from .data import load_dataset, load_image
from .retrieval.classify import classify
from .retrieval.evaluate import evaluate
from .retrieval.index import build_index, load_index
from .retrieval.metrics import retrieval_metrics
from .retrieval.per_query import (PerQuery, class_recall, compare_table, confusion, per_query, per_query_table,
                                  score_dataset, score_index, write_table)
from .retrieval.rerank import rerank
from .retrieval.search import search_image, search_text
from .train.trainer import TrainConfig, train

__all__ = [
    "TrainConfig", "build_index", "classify", "create_model", "evaluate", "list_archs", "list_models",
    "PerQuery", "class_recall", "compare_table", "confusion", "evaluate_per_query", "per_query_table", "write_table",
    "load_dataset", "load_image", "load_index", "load_model", "rerank", "retrieval_metrics", "save_model",
    "search_image", "search_text", "train", "explain", "localize", "project", "open_raster", "build_tile_index",
]


def evaluate_per_query(model, data, split: str = "val", rerank: str = "none", images=None, progress=None,
                       cancel=None, batch_size: int = 32) -> PerQuery:
    """Per-query ranks (the rows of ``rsviewer eval --per-query``) of ``model`` on a dataset
    split, or on a ``GalleryIndex`` (``split`` is then ignored). Its ``metrics`` are
    :func:`evaluate`'s numbers; ``compare_table(pq_a, pq_b)`` puts two models side by side."""
    from .retrieval.index import GalleryIndex

    if isinstance(data, GalleryIndex):
        scores = score_index(model, data, rerank, progress, cancel)
    else:
        scores = score_dataset(model, data, split, rerank, images, progress, cancel, batch_size)
    return per_query(scores)


def explain(*args, **kwargs):
    """See :func:`rsviewer.explain.explain`."""
    from .explain import explain as _explain

    return _explain(*args, **kwargs)


def localize(*args, **kwargs):
    """See :func:`rsviewer.localize.localize`."""
    from .localize import localize as _localize

    return _localize(*args, **kwargs)


def project(*args, **kwargs):
    """See :func:`rsviewer.project.project_index`."""
    from . import project as _project

    return _project.project_index(*args, **kwargs)


def open_raster(*args, **kwargs):
    """See :func:`rsviewer.raster.open_raster` (GeoTIFF/COG/JP2/VRT/PNG/JPEG by region)."""
    from .raster import open_raster as _open

    return _open(*args, **kwargs)


def build_tile_index(*args, **kwargs):
    """See :func:`rsviewer.localize.tiles.build_tile_index` (search the tiles of whole scenes)."""
    from .localize.tiles import build_tile_index as _build

    return _build(*args, **kwargs)
