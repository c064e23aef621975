"""Models and galleries for the app (no Qt): loading, index caching, ground truth.

Galleries: a dataset file or an image folder is indexed once per model and the index is
kept in ``$RSVIEWER_CACHE/indexes/`` (default ``~/.cache/rsviewer/indexes/``), keyed by
the model fingerprint and the gallery's path and modification time; an index folder is
used as it is (after the fingerprint check). The demo gallery also accepts the prebuilt
``assets/gallery/index/`` when its fingerprint matches the model. Loaded models and
indexes are kept in memory for the session, so switching back is instant.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..checkpoint import PACKAGE_ROOT, list_models, load_model, resolve_model_dir
from ..runtime import warm_up
from ..errors import IndexError_, RsviewerError
from ..retrieval.index import GalleryIndex, build_index, is_index, load_index

DEMO_GALLERY = PACKAGE_ROOT / "assets" / "gallery" / "gallery.json"
DEMO_INDEX = PACKAGE_ROOT / "assets" / "gallery" / "index"
DEMO_SCENES = [
    PACKAGE_ROOT.parent / "shared" / "scenes" / "ucm-mosaics" / "images" / "scene0.jpg",
    PACKAGE_ROOT / "assets" / "scenes" / "scene0.jpg",
]

_lock = threading.Lock()
_models: dict[str, object] = {}
_indexes: dict[tuple[str, str], GalleryIndex] = {}


def cache_root() -> Path:
    return Path(os.environ.get("RSVIEWER_CACHE", Path.home() / ".cache" / "rsviewer"))


def model_choices() -> list[Path]:
    try:
        return list_models()
    except OSError:
        return []


def get_model(spec: str, device=None, progress=None):
    """Load (or reuse) a model; ``spec`` as for ``load_model``."""
    from ..utils.device import pick_device

    folder = str(resolve_model_dir(spec).resolve())
    device = pick_device(device or "auto")
    key = f"{folder}@{device}"
    with _lock:
        if key in _models:
            return _models[key]
    if progress:
        progress(0, 0, f"loading model {Path(folder).name}")
    model = load_model(folder, device=device)
    warm_up(model)  # rsviewer.runtime: towers exported/loaded and run once, so the first query is warm
    with _lock:
        _models[key] = model
    return model


def gallery_label(spec: Optional[str]) -> str:
    if not spec or Path(spec) == DEMO_GALLERY:
        return "demo gallery (UCM val, 210 images)"
    p = Path(spec)
    return p.name if p.name not in ("gallery.json", "index", "images") else f"{p.parent.name}/{p.name}"


def _mtime(p: Path) -> float:
    try:
        return p.stat().st_mtime
    except OSError:
        return 0.0


def index_cache_dir(model, source: Path) -> Path:
    src = source.resolve()
    payload = {"fp": getattr(model, "fingerprint", "untrained"), "src": str(src), "mtime": _mtime(src)}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in src.stem)[:40]
    return cache_root() / "indexes" / f"{name}-{key}"


def open_gallery(spec: Optional[str], model, progress=None, cancel=None) -> GalleryIndex:
    """An index for ``spec`` (dataset JSON/CSV, precomp folder, image folder or index)
    under ``model``: reused from memory, the shipped demo index or the disk cache,
    else built (with progress/cancel) and cached."""
    src = Path(spec).expanduser() if spec else DEMO_GALLERY
    fp = getattr(model, "fingerprint", "untrained")
    key = (fp, str(src.resolve()) if src.exists() else str(src))
    with _lock:
        if key in _indexes:
            return _indexes[key]
    if not src.exists():
        raise RsviewerError(f"gallery {src} does not exist")
    if src.is_dir() and is_index(src):
        index = load_index(src)
        if index.fingerprint != fp:
            source = Path(index.meta.get("source", ""))
            if source.exists():  # rebuild the same gallery for this model, cached
                index = _cached_or_build(source, model, progress, cancel)
            else:
                load_index(src, model)  # raises the clear "built with another model" error
    else:
        index = None
        if src.resolve() == DEMO_GALLERY.resolve() and is_index(DEMO_INDEX):
            try:
                index = load_index(DEMO_INDEX, model)
            except IndexError_:
                index = None  # shipped for another model: index it ourselves
        if index is None:
            index = _cached_or_build(src, model, progress, cancel)
    with _lock:
        _indexes[key] = index
    return index


def _cached_or_build(src: Path, model, progress, cancel) -> GalleryIndex:
    out = index_cache_dir(model, src)
    if is_index(out):
        try:
            return load_index(out, model)
        except IndexError_:
            pass  # damaged or stale: rebuild below
    return build_index(model, src, out=out, progress=progress, cancel=cancel, overwrite=True)  # our cache


def forget_gallery(index: GalleryIndex) -> None:
    with _lock:
        for k, v in list(_indexes.items()):
            if v is index:
                del _indexes[k]


@dataclass
class GroundTruth:
    rows: np.ndarray  # gallery rows that count as correct
    rule: str  # how they were found (tooltip text)

    def __bool__(self) -> bool:
        return len(self.rows) > 0


def text_ground_truth(index: GalleryIndex, text: str) -> Optional[GroundTruth]:
    from ..retrieval.search import ground_truth_rows

    rows = ground_truth_rows(index, text)
    if len(rows) == 0:
        return None
    return GroundTruth(rows, "ground truth: the query is one of this gallery's captions; correct = the image(s) it "
                             "describes")


def gallery_row_of(index: GalleryIndex, path) -> Optional[int]:
    try:
        p = str(Path(path).resolve())
    except OSError:
        return None
    for i, it in enumerate(index.items):
        try:
            if it["path"] == p or str(Path(it["path"]).resolve()) == p:
                return i
        except OSError:
            continue
    return None


def image_ground_truth(index: GalleryIndex, path) -> Optional[GroundTruth]:
    """An image query taken from the gallery: correct = same scene label."""
    row = gallery_row_of(index, path) if path is not None else None
    if row is None:
        return None
    label = index.items[row].get("label")
    if not label:
        return None
    rows = np.array([i for i, it in enumerate(index.items) if it.get("label") == label], np.int64)
    return GroundTruth(rows, f"ground truth: the query image is in this gallery; correct = same scene label "
                             f"({label})")


def recall_at(hit_rows: list[int], gt: GroundTruth, ks=(1, 5, 10)) -> dict[str, float]:
    """Per-query R@K: 100 if any ground-truth image is within the top K, else 0."""
    g = set(int(r) for r in gt.rows)
    return {f"R@{k}": 100.0 * any(r in g for r in hit_rows[:k]) for k in ks}


def precision_at(hit_rows: list[int], gt: GroundTruth, ks=(1, 5, 10), exclude: Optional[int] = None) -> dict[str, float]:
    """Per-query P@K (label agreement), the query image itself excluded."""
    g = set(int(r) for r in gt.rows)
    rows = [r for r in hit_rows if r != exclude]
    return {f"P@{k}": 100.0 * sum(r in g for r in rows[:k]) / k for k in ks if len(rows) >= 1}
