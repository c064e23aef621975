"""Query a gallery index: text → images, image → images, image → captions.

Exact top-K: one matrix–vector product over the (memory-mapped) embeddings, chunked so
the temporary score vector stays small, and ``argpartition``. On this project's 2-core
CPU a 1M × 256 gallery answers in well under 100 ms (``bench/query.py``); galleries of
many millions can use the optional faiss extra (``build_faiss``).

Pairwise models (MSSA) search in two stages: candidates from the image-independent
embeddings, then full pairwise scoring of the top ``candidates`` images.

Reranking one query (MR/SMR, SPEC §4) needs reverse search: each candidate image is
scored against every gallery caption *and* the query, and the reranker runs on that
(candidates × (captions + 1)) matrix. This is exact for SMR; for MR the significance
term sums over the candidate images rather than the whole gallery.
"""
from __future__ import annotations

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
from .index import GalleryIndex, check_model, state_tensors
from .rerank import rerank as apply_rerank

CHUNK = 1 << 18  # rows per matmul chunk (256k × D floats)


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


def _hits(index: GalleryIndex, rows: np.ndarray, scores: np.ndarray) -> list[Hit]:
    out = []
    for r, (i, s) in enumerate(zip(rows.tolist(), scores.tolist())):
        it = index.items[i]
        out.append(Hit(r + 1, i, float(s), it["id"], it["path"], it.get("label"), list(it.get("captions", []))))
    return out


def _label_mask(index: GalleryIndex, labels: Optional[Sequence[str]]) -> Optional[np.ndarray]:
    if not labels:
        return None
    wanted = set(labels)
    return np.array([it.get("label") in wanted for it in index.items], dtype=bool)


@torch.no_grad()
def encode_query_text(model: RetrievalModel, text: str) -> dict[str, torch.Tensor]:
    with torch.no_grad(), autocast(model.device):
        return {k: v.float().cpu() for k, v in model.text_states([text]).items()}


@torch.no_grad()
def encode_query_image(model: RetrievalModel, image: str | Path | Image.Image) -> dict[str, torch.Tensor]:
    if not isinstance(image, Image.Image):
        image = load_image(image)
    pixels = model.preprocess([image]).to(model.device)
    with torch.no_grad(), autocast(model.device):
        return {k: v.float().cpu() for k, v in model.image_states(pixels).items()}


def search_text(
    model: RetrievalModel,
    index: GalleryIndex,
    text: str,
    k: int = 10,
    rerank: str = "none",
    labels: Optional[Sequence[str]] = None,
    candidates: int = 50,
) -> SearchResult:
    """Top-``k`` gallery images for a text query."""
    check_model(index, model)
    t0 = time.perf_counter()
    q = encode_query_text(model, text)
    t1 = time.perf_counter()
    allowed = _label_mask(index, labels)
    n_first = max(k, candidates if (model.pairwise or rerank != "none") else k)
    rows, scores = topk(index.image_emb, q["emb"].numpy()[0], n_first, allowed)
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
) -> SearchResult:
    """Top-``k`` gallery images (``target="images"``) or captions (``"captions"``) for an image."""
    check_model(index, model)
    name = image if not isinstance(image, Image.Image) else "<image>"
    t0 = time.perf_counter()
    q = encode_query_image(model, image)
    qv = q["emb"].numpy()[0]
    t1 = time.perf_counter()
    if target == "images":
        rows, scores = topk(index.image_emb, qv, k, _label_mask(index, labels))
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


def build_faiss(index: GalleryIndex):  # pragma: no cover - optional extra
    """An exact inner-product faiss index over the image embeddings (``pip install rsviewer[faiss]``)."""
    try:
        import faiss
    except ImportError:
        raise QueryError("faiss is not installed: pip install faiss-cpu") from None
    fi = faiss.IndexFlatIP(index.image_emb.shape[1])
    fi.add(np.ascontiguousarray(index.image_emb, dtype=np.float32))
    return fi
