"""Recall@K metrics for image-text retrieval (SPEC §3).

The protocol is the one of the GaLR / AMFMN / MSSA evaluation code: a similarity matrix
``sim`` of N images (rows) x M captions (columns); caption ``c`` belongs to image
``caption_image[c]`` (default: captions 5i..5i+4 belong to image i).

* image->text: the rank of image i is the best (lowest) 0-based position of any of its
  own captions among all M captions; R@K = % of images with rank < K.
* text->image: the rank of caption c is the 0-based position of its own image among all
  N images; R@K = % of captions with rank < K.
* mR = mean of all R@K of both directions (the six of K = 1, 5, 10 by default).

Ties. Identical caption strings get identical embeddings, hence identical scores, and
UCM repeats strings a lot (391 distinct among the 1,050 val captions). How ties are
broken therefore moves the numbers by many points:
- "optimistic" (count only strictly higher scores) lets a model that cannot tell
  identical strings apart score 100 — it would make the metric meaningless;
- the field's code takes an ``argsort`` position, i.e. breaks ties by the sort
  algorithm and item order — arbitrary;
- SPEC §3's ceiling (a model perfect except among identical strings scores mR 70.36 on
  UCM test) is the *expected* score under uniform random tie-breaking.
``retrieval_metrics`` therefore reports, by default (``ties="random"``), the exact
expected R@K under uniform random tie-breaking — computed in closed form, no sampling,
so it is deterministic. ``ties="optimistic"`` keeps the strictly-greater rule.
``ranks_i2t``/``ranks_t2i`` return the strictly-greater (optimistic) integer ranks;
the rerankers use that rule for positions.

Ranks are computed by comparing each row (column) against the score of its own
item, ``(sim > own[:, None]).sum(1)``, in chunks, so memory stays at a few tens of MB
and a 2,000 x 10,000 matrix is evaluated in tens of milliseconds.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from rsviewer.errors import RsviewerError

__all__ = [
    "RetrievalInputError",
    "as_sim_matrix",
    "default_caption_image",
    "ranks_i2t",
    "ranks_t2i",
    "recall_at",
    "retrieval_metrics",
]

# Elements of the boolean temporary per chunk (~16 MB).
_CHUNK_ELEMS = 1 << 24


class RetrievalInputError(RsviewerError, ValueError):
    """A similarity matrix, caption map or parameter that cannot be used.

    A ``ValueError`` for library callers and an ``RsviewerError`` so the CLI prints
    it as one line.
    """


def as_sim_matrix(sim, name: str = "sim") -> np.ndarray:
    """Return ``sim`` as a finite 2-D float array (no copy when already float).

    Non-finite scores are rejected: NaN compares False with everything and would
    silently give a wrong rank.
    """
    try:
        arr = np.asarray(sim)
    except Exception as exc:  # e.g. a ragged list
        raise RetrievalInputError(f"{name}: cannot convert to an array ({exc})") from None
    if arr.ndim != 2:
        raise RetrievalInputError(f"{name} must be a 2-D matrix (images x captions), got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise RetrievalInputError(f"{name} is empty (shape {arr.shape})")
    if arr.dtype.kind not in "fiub":
        raise RetrievalInputError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.dtype.kind != "f":
        arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise RetrievalInputError(f"{name} contains NaN or infinite scores")
    return arr


def default_caption_image(n_images: int, n_captions: int) -> np.ndarray:
    """Captions 5i..5i+4 belong to image i (the field's layout); needs M == 5N."""
    if n_captions != 5 * n_images:
        raise RetrievalInputError(
            f"without caption_image the matrix must have 5 captions per image "
            f"(M == 5N), got N={n_images} images and M={n_captions} captions; "
            f"pass caption_image (the image index of every caption)"
        )
    return np.arange(n_captions) // 5


def _caption_image(n_images: int, n_captions: int, caption_image) -> np.ndarray:
    if caption_image is None:
        return default_caption_image(n_images, n_captions)
    ci = np.asarray(caption_image)
    if ci.ndim != 1 or ci.shape[0] != n_captions:
        raise RetrievalInputError(
            f"caption_image must have one entry per caption ({n_captions}), got shape {ci.shape}"
        )
    if ci.dtype.kind == "f":
        if not np.all(np.isfinite(ci)) or not np.all(ci == np.round(ci)):
            raise RetrievalInputError("caption_image must hold integer image indices")
        ci = ci.astype(np.int64)
    elif ci.dtype.kind not in "iu":
        raise RetrievalInputError(f"caption_image must hold integer image indices, got dtype {ci.dtype}")
    ci = ci.astype(np.int64, copy=False)
    if ci.size and (ci.min() < 0 or ci.max() >= n_images):
        raise RetrievalInputError(
            f"caption_image values must lie in [0, {n_images - 1}], got [{ci.min()}, {ci.max()}]"
        )
    return ci


def _chunk(n_other: int) -> int:
    return max(1, _CHUNK_ELEMS // max(1, n_other))


def ranks_i2t(sim, caption_image=None) -> np.ndarray:
    """0-based image->text rank of every image (length N).

    The best position of any own caption equals the number of captions scoring
    strictly higher than the image's *best-scoring* own caption, so one comparison
    per row suffices.
    """
    s = as_sim_matrix(sim)
    n, m = s.shape
    ci = _caption_image(n, m, caption_image)
    counts = np.bincount(ci, minlength=n)
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)
        raise RetrievalInputError(
            f"{missing.size} image(s) have no caption (first: {missing[0]}); "
            f"their image->text rank is undefined"
        )
    own_scores = s[ci, np.arange(m)]
    own_best = np.full(n, -np.inf, dtype=np.float64)
    np.maximum.at(own_best, ci, own_scores)
    ranks = np.empty(n, dtype=np.int64)
    step = _chunk(m)
    for a in range(0, n, step):
        b = min(n, a + step)
        ranks[a:b] = (s[a:b] > own_best[a:b, None]).sum(axis=1)
    return ranks


def ranks_t2i(sim, caption_image=None) -> np.ndarray:
    """0-based text->image rank of every caption (length M)."""
    s = as_sim_matrix(sim)
    n, m = s.shape
    ci = _caption_image(n, m, caption_image)
    own = s[ci, np.arange(m)]
    ranks = np.empty(m, dtype=np.int64)
    step = _chunk(n)
    for a in range(0, m, step):
        b = min(m, a + step)
        ranks[a:b] = (s[:, a:b] > own[None, a:b]).sum(axis=0)
    return ranks


def _tie_counts_i2t(s: np.ndarray, ci: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: g = captions strictly above its best own caption, a = own captions tied
    at that best score, b = foreign captions tied at it."""
    n, m = s.shape
    own_scores = s[ci, np.arange(m)]
    own_best = np.full(n, -np.inf, dtype=np.float64)
    np.maximum.at(own_best, ci, own_scores)
    a = np.bincount(ci, weights=(own_scores == own_best[ci]).astype(np.float64), minlength=n).astype(np.int64)
    g = np.empty(n, dtype=np.int64)
    eq = np.empty(n, dtype=np.int64)
    step = _chunk(m)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        g[lo:hi] = (s[lo:hi] > own_best[lo:hi, None]).sum(axis=1)
        eq[lo:hi] = (s[lo:hi] == own_best[lo:hi, None]).sum(axis=1)
    return g, a, eq - a


def _tie_counts_t2i(s: np.ndarray, ci: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per caption: g = images strictly above its own image, t = other images tied with it."""
    n, m = s.shape
    own = s[ci, np.arange(m)]
    g = np.empty(m, dtype=np.int64)
    t = np.empty(m, dtype=np.int64)
    step = _chunk(n)
    for lo in range(0, m, step):
        hi = min(m, lo + step)
        g[lo:hi] = (s[:, lo:hi] > own[None, lo:hi]).sum(axis=0)
        t[lo:hi] = (s[:, lo:hi] == own[None, lo:hi]).sum(axis=0) - 1
    return g, t


def _p_first_own_within(a: np.ndarray, b: np.ndarray, d: np.ndarray) -> np.ndarray:
    """P(the first of ``a`` own items lands in the first ``d`` slots of a random order of
    a + b tied items) = 1 − C(a+b−d, a) / C(a+b, a)."""
    n = a + b
    d = np.clip(d, 0, None)
    miss = np.ones(a.shape, dtype=np.float64)
    for t in range(int(a.max()) if a.size else 0):
        active = t < a
        num = np.clip(n - d - t, 0, None).astype(np.float64)
        den = np.maximum(n - t, 1).astype(np.float64)
        miss = np.where(active, miss * num / den, miss)
    p = 1.0 - miss
    return np.where(d <= 0, 0.0, np.where(d > b, 1.0, p))


def _expected_summary_i2t(s, ci, ks) -> dict:
    g, a, b = _tie_counts_i2t(s, ci)
    out = {f"R@{k}": float(100.0 * _p_first_own_within(a, b, k - g).mean()) for k in ks}
    exp_rank = g + b / (a + 1.0)  # expected 0-based position of the first own caption
    out["medR"] = float(np.floor(np.median(exp_rank)) + 1)
    out["meanR"] = float(exp_rank.mean() + 1)
    return out


def _expected_summary_t2i(s, ci, ks) -> dict:
    g, t = _tie_counts_t2i(s, ci)
    out = {f"R@{k}": float(100.0 * np.clip((k - g) / (t + 1.0), 0.0, 1.0).mean()) for k in ks}
    exp_rank = g + t / 2.0
    out["medR"] = float(np.floor(np.median(exp_rank)) + 1)
    out["meanR"] = float(exp_rank.mean() + 1)
    return out


def recall_at(ranks: np.ndarray, k: int) -> float:
    """Percentage of queries whose 0-based rank is < k."""
    ranks = np.asarray(ranks)
    return float(100.0 * np.count_nonzero(ranks < k) / ranks.size)


def _summary(ranks: np.ndarray, ks: tuple[int, ...]) -> dict:
    out = {f"R@{k}": recall_at(ranks, k) for k in ks}
    # 1-based, as the field's code reports them: floor(median) + 1 and mean + 1.
    out["medR"] = float(np.floor(np.median(ranks)) + 1)
    out["meanR"] = float(ranks.mean() + 1)
    return out


def retrieval_metrics(
    sim_i2t,
    sim_t2i=None,
    caption_image=None,
    ks: Iterable[int] = (1, 5, 10),
    ties: str = "random",
) -> dict:
    """R@K, medR, meanR per direction and mR, all in percent (floats, unrounded).

    The i2t ranking uses the rows of ``sim_i2t`` and the t2i ranking the columns of
    ``sim_t2i`` (default: ``sim_i2t``). Two matrices because a reranker rewrites each
    direction separately (``rerank.rerank`` returns exactly this pair).

    Returns ``{"i2t": {"R@1", "R@5", "R@10", "medR", "meanR"}, "t2i": {...},
    "mR": float}``; mR is the mean of all R@K of both directions.

    ``ties``: "random" (default) — expected values under uniform random tie-breaking
    (see the module docstring); "optimistic" — ties never count against the query.
    """
    if ties not in ("random", "optimistic"):
        raise RetrievalInputError(f"ties must be 'random' or 'optimistic', got {ties!r}")
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or int(k) != k or k < 1 for k in ks):
        raise RetrievalInputError(f"ks must be positive integers, got {ks!r}")
    ks = tuple(int(k) for k in ks)
    a = as_sim_matrix(sim_i2t, "sim_i2t")
    b = a if sim_t2i is None else as_sim_matrix(sim_t2i, "sim_t2i")
    if a.shape != b.shape:
        raise RetrievalInputError(f"sim_i2t {a.shape} and sim_t2i {b.shape} must have the same shape")
    n, m = a.shape
    ci = _caption_image(n, m, caption_image)
    if ties == "random":
        i2t = _expected_summary_i2t(a, ci, ks)
        t2i = _expected_summary_t2i(b, ci, ks)
    else:
        i2t = _summary(ranks_i2t(a, ci), ks)
        t2i = _summary(ranks_t2i(b, ci), ks)
    mr = float(np.mean([i2t[f"R@{k}"] for k in ks] + [t2i[f"R@{k}"] for k in ks]))
    return {"i2t": i2t, "t2i": t2i, "mR": mr}
