"""Query a gallery index: text → images, image → images, image → captions.

Exact top-K: one matrix–vector product over the (memory-mapped) float32 embeddings,
chunked so the temporary score vector stays small, and ``argpartition``.

**Compressed scan** (large galleries, faiss installed: ``pip install rsviewer[faiss]``):
the embeddings are also kept as 8-bit codes with a per-dimension range (faiss
``IndexScalarQuantizer``, ``QT_8bit``, inner product; ``image_sq8.faiss`` in the index,
or built in memory for an index without it), scanned with faiss's SIMD kernels, and the
top ``rescore`` candidates re-scored exactly against the float32 rows. A 1M × 256
query reads 256 MB of codes + the candidates' rows instead of 1 GB. ``scan="auto"``
uses it from ``COMPRESSED_MIN_ROWS`` images on, ``"exact"`` never, ``"compressed"``
always (docs/runtime.md has the measured agreement with float32).

Pairwise models (MSSA) search in two stages: candidates from the image-independent
embeddings, then full pairwise scoring of the top ``candidates`` images.

Reranking one query (MR/SMR, SPEC §4) needs reverse search: each candidate image is
scored against every gallery caption *and* the query, and the reranker runs on that
(candidates × (captions + 1)) matrix. This is exact for SMR; for MR the significance
term sums over the candidate images rather than the whole gallery.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ..archs.base import RetrievalModel
from ..data import load_image
from ..errors import QueryError
from ..utils.device import autocast
from .index import SQ_FILE, GalleryIndex, check_model, state_tensors
from ..runtime import towers
from .rerank import rerank as apply_rerank

log = logging.getLogger("rsviewer.search")

CHUNK = 1 << 18  # rows per matmul chunk (256k × D floats)
COMPRESSED_MIN_ROWS = 100_000  # below this the float32 scan is a few ms: exact and simplest
RESCORE = 256  # candidates of the compressed scan re-scored in float32 (at least 4 × k)
SCAN_THREADS = 1  # faiss threads for one query (bench/query.py: 1 beats 2 with the other core busy)
SCANS = ("auto", "exact", "compressed")


@dataclass
class Hit:
    rank: int
    row: int  # row in the index (image row, or caption row for image→text)
    score: float
    id: str
    path: str
    label: Optional[str]
    captions: list[str]
    text: Optional[str] = None  # the matched caption (image→text)
    tile: Optional[dict] = None  # a tile index's record: pixel box, level, map/lon-lat bounds, CRS


@dataclass
class SearchResult:
    query: str
    mode: str  # "text→image" | "image→image" | "image→text"
    hits: list[Hit]
    seconds: dict = field(default_factory=dict)
    rerank: str = "none"
    n_gallery: int = 0

    def to_json(self) -> dict:
        d = asdict(self)
        d["hits"] = [asdict(h) for h in self.hits]
        return d


def topk(emb: np.ndarray, q: np.ndarray, k: int, allowed: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` rows of ``emb @ q`` (descending). ``allowed``: bool mask of rows."""
    n = emb.shape[0]
    k = max(0, min(k, n))
    if k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    q = np.asarray(q, dtype=np.float32).reshape(-1)
    best_i: list[np.ndarray] = []
    best_s: list[np.ndarray] = []
    for s in range(0, n, CHUNK):
        sc = np.asarray(emb[s : s + CHUNK], dtype=np.float32) @ q
        if allowed is not None:
            sc = np.where(allowed[s : s + CHUNK], sc, -np.inf)
        kk = min(k, sc.shape[0])
        part = np.argpartition(-sc, kk - 1)[:kk] if kk < sc.shape[0] else np.arange(sc.shape[0])
        best_i.append(part + s)
        best_s.append(sc[part])
    idx = np.concatenate(best_i)
    sco = np.concatenate(best_s)
    order = np.argsort(-sco, kind="stable")[:k]
    idx, sco = idx[order], sco[order]
    keep = np.isfinite(sco)
    return idx[keep], sco[keep].astype(np.float32)


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


class CompressedScan:
    """8-bit scalar-quantized copy of an (N, D) float32 matrix, scanned by faiss, with an
    exact float32 re-score of the candidates (see the module docstring)."""

    def __init__(self, fi, emb: np.ndarray):
        self.fi, self.emb = fi, emb

    @classmethod
    def build(cls, emb: np.ndarray, train_rows: int = 200_000, chunk: int = 1 << 17) -> "CompressedScan":
        import faiss

        n, d = emb.shape
        fi = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        step = max(1, n // train_rows)  # per-dimension ranges from an even sample (memmap-friendly)
        fi.train(np.ascontiguousarray(emb[::step], dtype=np.float32))
        for s in range(0, n, chunk):
            fi.add(np.ascontiguousarray(emb[s : s + chunk], dtype=np.float32))
        return cls(fi, emb)

    @classmethod
    def load(cls, path, emb: np.ndarray) -> "CompressedScan":
        import faiss

        fi = faiss.read_index(str(path))
        if fi.ntotal != emb.shape[0] or fi.d != emb.shape[1]:
            raise ValueError(f"{path.name} holds {fi.ntotal}×{fi.d} codes for {emb.shape[0]}×{emb.shape[1]} embeddings")
        return cls(fi, emb)

    def write(self, path) -> None:
        import faiss

        faiss.write_index(self.fi, str(path))

    @property
    def nbytes(self) -> int:
        return int(self.fi.ntotal) * int(self.fi.sa_code_size())

    def topk(self, q: np.ndarray, k: int, rescore: int = RESCORE, threads: int = SCAN_THREADS):
        """Top-``k`` rows of ``emb @ q``: faiss scan of the codes for ``max(rescore, 4k)``
        candidates, then their exact float32 scores (ties: the lower row first)."""
        import faiss

        n = self.emb.shape[0]
        k = max(0, min(k, n))
        if k == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        c = min(n, max(rescore, 4 * k))
        q = np.ascontiguousarray(np.asarray(q, np.float32).reshape(1, -1))
        prev = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(threads)
        try:
            _, cand = self.fi.search(q, c)
        finally:
            faiss.omp_set_num_threads(prev)
        cand = np.sort(cand[0][cand[0] >= 0])  # sorted rows: a forward pass over the memmap
        exact = np.asarray(self.emb[cand], np.float32) @ q[0]
        order = np.argsort(-exact, kind="stable")[:k]
        return cand[order].astype(np.int64), exact[order].astype(np.float32)


def compressed_scan(index: GalleryIndex, build: bool = True) -> Optional[CompressedScan]:
    """The index's compressed scan: its ``image_sq8.faiss`` when present and valid, else one
    built in memory (``build``), memoised on the index; None without faiss."""
    cs = getattr(index, "_compressed", None)
    if cs is not None or not faiss_available():
        return cs
    path = Path(index.folder) / SQ_FILE if index.folder is not None else None
    if path is not None and path.exists():
        try:
            cs = CompressedScan.load(path, index.image_emb)
        except (RuntimeError, ValueError) as e:  # damaged or stale codes: rebuild in memory
            log.warning("rsviewer: %s: %s; rebuilding the compressed scan in memory", index.folder, e)
    if cs is None and build:
        cs = CompressedScan.build(index.image_emb)
    index._compressed = cs
    return cs


def scan_images(index: GalleryIndex, q: np.ndarray, k: int, allowed: Optional[np.ndarray] = None,
                scan: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` gallery images for the query vector ``q``: exact float32, or the compressed
    scan (``scan``, see the module docstring). A label filter always scans exactly."""
    if scan not in SCANS:
        raise QueryError(f"unknown scan {scan!r}; use {', '.join(SCANS)}")
    use = scan == "compressed" or (scan == "auto" and len(index) >= COMPRESSED_MIN_ROWS and faiss_available())
    if use and allowed is None:
        if not faiss_available():
            raise QueryError("the compressed scan needs faiss: pip install faiss-cpu")
        return compressed_scan(index).topk(q, k)
    return topk(index.image_emb, q, k, allowed)


def _hits(index: GalleryIndex, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
    out = []
    for r, (i, s) in enumerate(zip(rows.tolist(), scores.tolist())):
        it = index.items[i]
        out.append(Hit(r + 1, i, float(s), it["id"], it["path"], it.get("label"), list(it.get("captions", [])),
                       tile=it.get("tile")))
    return out


def _label_mask(index: GalleryIndex, labels: Optional[Sequence[str]]) -> Optional[np.ndarray]:
    if not labels:
        return None
    wanted = set(labels)
    return np.array([it.get("label") in wanted for it in index.items], dtype=bool)


@torch.no_grad()
def encode_query_text(model: RetrievalModel, text: str, runtime: str = "auto") -> dict[str, torch.Tensor]:
    """Text states of one query: through :mod:`rsviewer.runtime` (its 1-thread query session
    under ONNX Runtime), or ``model.text_states`` with ``runtime="torch"``."""
    if runtime != "torch":
        return towers(model, runtime).text_states([text])
    with torch.no_grad(), autocast(model.device):
        return {k: v.float().cpu() for k, v in model.text_states([text]).items()}


@torch.no_grad()
def encode_query_image(model: RetrievalModel, image: str | Path | Image.Image, runtime: str = "auto") -> dict[str, torch.Tensor]:
    if not isinstance(image, Image.Image):
        image = load_image(image)
    pixels = model.preprocess([image])
    if runtime != "torch":
        return towers(model, runtime).image_states(pixels)
    with torch.no_grad(), autocast(model.device):
        return {k: v.float().cpu() for k, v in model.image_states(pixels.to(model.device)).items()}


def search_text(
    model: RetrievalModel,
    index: GalleryIndex,
    text: str,
    k: int = 10,
    rerank: str = "none",
    labels: Optional[Sequence[str]] = None,
    candidates: int = 50,
    runtime: str = "auto",
    scan: str = "auto",
) -> SearchResult:
    """Top-``k`` gallery images for a text query. ``runtime``: how the query is encoded
    (:mod:`rsviewer.runtime`); ``scan``: ``auto`` | ``exact`` | ``compressed``."""
    check_model(index, model)
    t0 = time.perf_counter()
    q = encode_query_text(model, text, runtime)
    t1 = time.perf_counter()
    allowed = _label_mask(index, labels)
    n_first = max(k, candidates if (model.pairwise or rerank != "none") else k)
    rows, scores = scan_images(index, q["emb"].numpy()[0], n_first, allowed, scan)
    t2 = time.perf_counter()
    seconds = {"encode": t1 - t0, "search": t2 - t1}
    if model.pairwise and len(rows):
        with torch.no_grad(), autocast(model.device):
            full = model.score(
                {kk: v.to(model.device) for kk, v in state_tensors(index, rows).items()},
                {kk: v.to(model.device) for kk, v in q.items()},
            )[:, 0].float().cpu().numpy()
        order = np.argsort(-full, kind="stable")
        rows, scores = rows[order], full[order]
        seconds["rescore"] = time.perf_counter() - t2
    if rerank != "none" and len(rows) and index.caption_emb.shape[0]:
        t3 = time.perf_counter()
        rows, scores = _rerank_text_query(index, rows, scores, rerank)
        seconds["rerank"] = time.perf_counter() - t3
    hits = _hits(index, rows[:k], scores[:k])
    return SearchResult(text, "text→image", hits, {kk: round(v * 1000, 2) for kk, v in seconds.items()}, rerank, len(index))


def _rerank_text_query(index: GalleryIndex, rows: np.ndarray, scores: np.ndarray, method: str):
    """Rerank candidate images for one text query with MR/SMR (t2i direction)."""
    cap = np.asarray(index.caption_emb, dtype=np.float32)
    img = np.asarray(index.image_emb[rows], dtype=np.float32)
    sub = np.concatenate([img @ cap.T, scores[:, None].astype(np.float32)], axis=1)  # (C, M+1)
    k = min(len(rows), 25)
    _, s_t2i = apply_rerank(sub, method, k=k)
    col = s_t2i[:, -1]
    order = np.argsort(-col, kind="stable")
    return rows[order], col[order]


def search_image(
    model: RetrievalModel,
    index: GalleryIndex,
    image: str | Path | Image.Image,
    k: int = 10,
    target: str = "images",
    labels: Optional[Sequence[str]] = None,
    rerank: str = "none",
    runtime: str = "auto",
    scan: str = "auto",
) -> SearchResult:
    """Top-``k`` gallery images (``target="images"``) or captions (``"captions"``) for an image.
    ``runtime`` and ``scan`` as in :func:`search_text`."""
    check_model(index, model)
    name = image if not isinstance(image, Image.Image) else "<image>"
    t0 = time.perf_counter()
    q = encode_query_image(model, image, runtime)
    qv = q["emb"].numpy()[0]
    t1 = time.perf_counter()
    if target == "images":
        rows, scores = scan_images(index, qv, k, _label_mask(index, labels), scan)
        hits = _hits(index, rows, scores)
        mode = "image→image"
    elif target == "captions":
        if index.caption_emb.shape[0] == 0:
            raise QueryError("this gallery has no captions to search")
        n = max(k, 50) if rerank != "none" else k
        rows, scores = topk(index.caption_emb, qv, n)
        if rerank != "none":
            cap = np.asarray(index.caption_emb[rows], dtype=np.float32)
            img = np.asarray(index.image_emb, dtype=np.float32)
            sub = np.concatenate([cap @ img.T, scores[:, None]], axis=1).T  # (N+1, C): query is the last image row
            s_i2t, _ = apply_rerank(sub, rerank, k=min(len(rows), 25))
            row = s_i2t[-1]
            order = np.argsort(-row, kind="stable")
            rows, scores = rows[order][:k], row[order][:k]
        hits = []
        for r, (c, s) in enumerate(zip(rows.tolist(), scores.tolist())):
            i = int(index.caption_image[c])
            it = index.items[i]
            hits.append(Hit(r + 1, i, float(s), it["id"], it["path"], it.get("label"), list(it.get("captions", [])), index.captions[c]))
        mode = "image→text"
    else:
        raise QueryError(f"unknown search target {target!r}; use images or captions")
    t2 = time.perf_counter()
    return SearchResult(str(name), mode, hits, {"encode": round((t1 - t0) * 1000, 2), "search": round((t2 - t1) * 1000, 2)}, rerank, len(index))


def ground_truth_rows(index: GalleryIndex, text: str) -> np.ndarray:
    """Gallery images that have ``text`` among their captions (exact, case-insensitive)."""
    t = text.strip().lower()
    return np.array([i for i, it in enumerate(index.items) if any(c.strip().lower() == t for c in it.get("captions", []))], dtype=np.int64)


def build_faiss(index: GalleryIndex) -> CompressedScan:
    """The faiss index search uses for ``index`` (``pip install rsviewer[faiss]``): its
    compressed scan (8-bit codes, inner product), loaded or built; ``.fi`` is the faiss index."""
    if not faiss_available():
        raise QueryError("faiss is not installed: pip install faiss-cpu")
    return compressed_scan(index)
