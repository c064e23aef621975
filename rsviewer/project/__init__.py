"""Embedding maps: a gallery's images and captions in one 2-D layout (SPEC §8).

    from rsviewer.project import project_index, place_query, available_methods
    proj = project_index(index, method="tsne", max_points=5000)   # cached on disk
    proj.xy, proj.kind, proj.row                                    # one entry per point
    xy, rows, weights = place_query(proj, index, query_vector, k=10)

Methods: ``tsne`` (scikit-learn Barnes-Hut on a PCA-50 reduction), ``opentsne`` (FFT
t-SNE, optional: ``pip install openTSNE``), ``umap`` (optional: ``pip install
umap-learn``) and ``pca`` (instant, linear). ``auto`` picks openTSNE when installed,
else scikit-learn t-SNE.

Large galleries are sampled (uniformly at random with the seed, images and captions
alike): ``Projection.sampled`` says so and ``n_total`` gives the full count. Results are
cached in ``$RSVIEWER_CACHE/projections/`` (default ``~/.cache/rsviewer``), keyed by the
index identity (model fingerprint, source, creation time, sizes), the method, the number
of points and the seed; the cache file is written atomically.

The engine never imports Qt; long work takes ``progress``/``cancel`` like every other
engine function. scikit-learn's t-SNE has no callback hook, so a cancel during its
optimisation takes effect when it returns; openTSNE is cancelled between iterations.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import Cancelled, RsviewerError
from ..utils.atomic import atomic_file
from ..utils.progress import CancelToken, ProgressFn, check, report

METHODS = ("tsne", "opentsne", "umap", "pca")
IMAGE, CAPTION = 0, 1
CACHE_VERSION = 1
LANDMARKS = 2500  # above this many points t-SNE/UMAP optimise a subset (see embed_2d)


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def available_methods() -> list[str]:
    """The projection methods usable here (optional packages checked without importing)."""
    out = ["tsne"]
    if _has("openTSNE"):
        out.append("opentsne")
    if _has("umap"):
        out.append("umap")
    out.append("pca")
    return out


def resolve_method(method: str) -> str:
    method = (method or "auto").lower().replace("-", "")
    if method == "auto":
        return "opentsne" if _has("openTSNE") else "tsne"
    if method not in METHODS:
        raise RsviewerError(f"unknown projection method {method!r}; use {', '.join(METHODS)} or auto")
    if method == "opentsne" and not _has("openTSNE"):
        raise RsviewerError("openTSNE is not installed: pip install openTSNE (or use --method tsne)")
    if method == "umap" and not _has("umap"):
        raise RsviewerError("UMAP is not installed: pip install umap-learn (or use --method tsne)")
    return method


@dataclass
class Projection:
    """A 2-D layout of (a sample of) a gallery's images and captions."""

    method: str
    xy: np.ndarray  # (P, 2) float32
    kind: np.ndarray  # (P,) int8: IMAGE or CAPTION
    row: np.ndarray  # (P,) int64: row in image_emb (images) or caption_emb (captions)
    n_total: int  # images + captions in the index (before sampling)
    seed: int = 0
    seconds: float = 0.0
    cached: bool = False
    key: str = ""
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.xy.shape[0])

    @property
    def sampled(self) -> bool:
        return len(self) < self.n_total

    def describe(self) -> str:
        n_img = int((self.kind == IMAGE).sum())
        n_cap = len(self) - n_img
        what = f"{n_img:,} images + {n_cap:,} captions"
        if self.info.get("landmarks"):
            what += f"; {self.method} on {self.info['landmarks']:,} landmarks, the rest placed by nearest landmarks"
        if self.sampled:
            return f"showing {len(self):,} of {self.n_total:,} points (random sample): {what}"
        return f"{len(self):,} points: {what}"


# ---- the 2-D methods ---------------------------------------------------------------


def _pca(x: np.ndarray, dims: int, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    dims = min(dims, x.shape[0], x.shape[1])
    return PCA(n_components=dims, random_state=seed).fit_transform(x).astype(np.float32)


class _Stop(Exception):
    pass


def embed_2d(
    x: np.ndarray,
    method: str = "auto",
    seed: int = 0,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    n_iter: Optional[int] = None,
    landmarks: Optional[int] = LANDMARKS,
) -> np.ndarray:
    """(n, d) vectors → (n, 2) float32 layout with ``method`` (see module doc).

    Above ``landmarks`` points the neighbourhood methods (t-SNE, UMAP) run on a random
    subset of that size and the other points are placed by their nearest landmarks:
    a 10,000-point map then costs about as much as a 2,500-point one. ``None``: all.
    """
    # One BLAS/OpenMP thread: on a shared 2-core CPU scikit-learn's OpenMP t-SNE ran 20x
    # slower with 2 threads (spin-waiting workers), e.g. 180 points: 30 s vs 1.4 s.
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return _embed_2d(x, method, seed, progress, cancel, n_iter, landmarks)


def _embed_2d(x, method, seed, progress, cancel, n_iter, landmarks) -> np.ndarray:
    method = resolve_method(method)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    if n == 0:
        return np.zeros((0, 2), np.float32)
    if n < 5:
        # too few points for a neighbourhood embedding: a PCA (or a line) says as much
        method = "pca"
    check(cancel)
    if method == "pca":
        report(progress, 0, 1, "PCA")
        y = _pca(x, 2, seed) if n > 1 else np.zeros((n, 2), np.float32)
        if y.shape[1] < 2:
            y = np.pad(y, ((0, 0), (0, 2 - y.shape[1])))
        report(progress, 1, 1, "PCA")
        return y.astype(np.float32)
    # neighbourhood methods: PCA to 50 dims first (standard practice, 3-5x faster)
    report(progress, 0, 100, "PCA to 50 dims")
    x50 = _pca(x, 50, seed) if x.shape[1] > 50 and n > 50 else x
    check(cancel)
    if landmarks and n > landmarks:
        # optimise on a random subset, then place every other point at the
        # distance-weighted mean of its 10 nearest landmarks (in the PCA-50 space)
        from sklearn.neighbors import NearestNeighbors

        pick = np.sort(np.random.default_rng(seed).choice(n, size=landmarks, replace=False))
        y_l = _embed_2d(x50[pick], method, seed, progress, cancel, n_iter, None)
        rest = np.setdiff1d(np.arange(n), pick)
        dist, nb = NearestNeighbors(n_neighbors=min(10, landmarks)).fit(x50[pick]).kneighbors(x50[rest])
        w = 1.0 / (dist + 1e-6) ** 2
        w /= w.sum(1, keepdims=True)
        y = np.empty((n, 2), np.float32)
        y[pick] = y_l
        y[rest] = (y_l[nb] * w[..., None]).sum(1)
        return y
    perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
    if method == "tsne":
        from sklearn.manifold import TSNE

        report(progress, 5, 100, "t-SNE (scikit-learn)")
        iters = n_iter or 750
        kw = dict(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
                  random_state=seed, method="barnes_hut", angle=0.5)
        try:
            y = TSNE(max_iter=iters, **kw).fit_transform(x50)
        except TypeError:  # scikit-learn < 1.5
            y = TSNE(n_iter=iters, **kw).fit_transform(x50)
        check(cancel)
        report(progress, 100, 100, "t-SNE (scikit-learn)")
        return np.asarray(y, np.float32)
    if method == "opentsne":
        from openTSNE import TSNE as OTSNE

        iters = n_iter or 400
        total = 250 + iters  # early exaggeration + optimisation
        state = {"done": 0}

        def cb(iteration, error, embedding):
            state["done"] += 25
            report(progress, min(state["done"], total), total, "t-SNE (openTSNE)")
            if cancel is not None and cancel.is_set():
                raise _Stop
            return False

        try:
            y = OTSNE(n_components=2, perplexity=perplexity, n_iter=iters, random_state=seed, n_jobs=1,
                      initialization="pca", callbacks=cb, callbacks_every_iters=25, verbose=False).fit(x50)
        except _Stop:
            raise Cancelled("cancelled") from None
        check(cancel)
        report(progress, total, total, "t-SNE (openTSNE)")
        return np.asarray(y, np.float32)
    # umap
    import umap  # type: ignore

    report(progress, 5, 100, "UMAP")
    y = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, n - 1)).fit_transform(x50)
    check(cancel)
    report(progress, 100, 100, "UMAP")
    return np.asarray(y, np.float32)


# ---- gallery projections -----------------------------------------------------------


def cache_dir() -> Path:
    return Path(os.environ.get("RSVIEWER_CACHE", Path.home() / ".cache" / "rsviewer")) / "projections"


def index_identity(index) -> dict:
    m = index.meta
    return {
        "fingerprint": m.get("fingerprint"),
        "source": m.get("source"),
        "split": m.get("split"),
        "created": m.get("created"),
        "n_images": int(index.image_emb.shape[0]),
        "n_captions": int(index.caption_emb.shape[0]),
    }


def projection_key(index, method: str, n: int, seed: int, captions: bool) -> str:
    payload = {"v": CACHE_VERSION, "index": index_identity(index), "method": method, "n": n, "seed": seed,
               "captions": captions}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def sample_points(n_images: int, n_captions: int, max_points: Optional[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(kind, row) of the points to show: all of them, or a uniform random sample."""
    kind = np.concatenate([np.full(n_images, IMAGE, np.int8), np.full(n_captions, CAPTION, np.int8)])
    row = np.concatenate([np.arange(n_images, dtype=np.int64), np.arange(n_captions, dtype=np.int64)])
    total = kind.shape[0]
    if max_points and total > max_points:
        pick = np.sort(np.random.default_rng(seed).choice(total, size=max_points, replace=False))
        kind, row = kind[pick], row[pick]
    return kind, row


def point_vectors(index, kind: np.ndarray, row: np.ndarray) -> np.ndarray:
    d = index.image_emb.shape[1]
    x = np.empty((kind.shape[0], d), np.float32)
    im = kind == IMAGE
    if im.any():
        x[im] = np.asarray(index.image_emb[row[im]], np.float32)
    if (~im).any():
        x[~im] = np.asarray(index.caption_emb[row[~im]], np.float32)
    return x


def project_index(
    index,
    method: str = "auto",
    max_points: Optional[int] = 5000,
    seed: int = 0,
    captions: bool = True,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    cache: bool = True,
) -> Projection:
    """Project an index's images (and captions) to 2-D; cached on disk per key."""
    method = resolve_method(method)
    n_img = int(index.image_emb.shape[0])
    n_cap = int(index.caption_emb.shape[0]) if captions else 0
    if n_img + n_cap == 0:
        raise RsviewerError("this index is empty: nothing to project")
    n = min(n_img + n_cap, max_points or (n_img + n_cap))
    key = projection_key(index, method, n, seed, captions)
    path = cache_dir() / f"{key}.npz"
    if cache and path.exists():
        try:
            with np.load(path) as z:
                proj = Projection(method, z["xy"], z["kind"], z["row"], int(z["n_total"]), seed,
                                  float(z["seconds"]), True, key, json.loads(str(z["info"])))
            report(progress, 1, 1, "map from cache")
            return proj
        except (OSError, ValueError, KeyError):
            pass  # damaged cache entry: recompute and overwrite
    t0 = time.perf_counter()
    kind, row = sample_points(n_img, n_cap, max_points, seed)
    check(cancel)
    x = point_vectors(index, kind, row)
    xy = embed_2d(x, method, seed, progress, cancel)
    info = {"method": method, "sampled": bool(len(kind) < n_img + n_cap)}
    if method != "pca" and len(kind) > LANDMARKS:
        info["landmarks"] = LANDMARKS
    proj = Projection(method, xy, kind, row, n_img + n_cap, seed, time.perf_counter() - t0, False, key, info)
    if cache:
        try:
            with atomic_file(path) as fh:
                np.savez(fh, xy=proj.xy, kind=proj.kind, row=proj.row, n_total=proj.n_total,
                         seconds=proj.seconds, info=json.dumps(info))
        except OSError:
            pass  # a read-only or full cache is not worth failing the map for
    return proj


def place_query(proj: Projection, index, qvec: np.ndarray, k: int = 10, temperature: float = 0.05):
    """Where a query lands on the map: the similarity-weighted mean position of its ``k``
    nearest projected points (images and captions), weights ``exp((s - s_max)/T)``.

    Returns ``(xy (2,), point_indices (k,), weights (k,))``. t-SNE has no out-of-sample
    transform; this kNN placement is the usual stand-in and is labelled so in the app.
    """
    if len(proj) == 0:
        raise RsviewerError("the map has no points")
    q = np.asarray(qvec, np.float32).reshape(-1)
    x = point_vectors(index, proj.kind, proj.row)
    s = x @ q
    k = max(1, min(k, len(s)))
    top = np.argpartition(-s, k - 1)[:k]
    top = top[np.argsort(-s[top])]
    w = np.exp((s[top] - s[top].max()) / temperature)
    w = w / w.sum()
    xy = (proj.xy[top] * w[:, None]).sum(0)
    return xy.astype(np.float32), top, w.astype(np.float32)


def point_rows(proj: Projection, index) -> list[dict]:
    """One dict per point: kind, row, id, label, x, y, text (CSV/JSON export)."""
    items = index.items
    caps = index.captions if (proj.kind == CAPTION).any() else []
    cap_img = np.asarray(index.caption_image)
    out = []
    for (x, y), k, r in zip(proj.xy.tolist(), proj.kind.tolist(), proj.row.tolist()):
        if k == IMAGE:
            it = items[r]
            out.append({"kind": "image", "row": r, "id": it["id"], "label": it.get("label") or "", "x": x, "y": y,
                        "text": ""})
        else:
            it = items[int(cap_img[r])]
            out.append({"kind": "caption", "row": r, "id": it["id"], "label": it.get("label") or "", "x": x, "y": y,
                        "text": caps[r]})
    return out


CSV_COLUMNS = ("kind", "row", "id", "label", "x", "y", "text")


def write_csv(proj: Projection, index, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_file(path, "w") as fh:
        w = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in point_rows(proj, index):
            r = dict(r, x=f"{r['x']:.4f}", y=f"{r['y']:.4f}")
            w.writerow(r)
    return path


__all__ = [
    "CAPTION", "CSV_COLUMNS", "IMAGE", "METHODS", "Projection", "available_methods", "embed_2d", "place_query",
    "point_rows", "point_vectors", "project_index", "resolve_method", "sample_points", "write_csv",
]
