"""Per-query evaluation: where a model fails, query by query (issue 15).

``rsviewer eval`` reports R@K and mR; this module keeps what those averages are made of:

* text→image, one row per caption: the rank of its image, the top-1 image and its label;
* image→text, one row per image: the rank of its best caption, the top-1 caption and the
  label of the image that caption belongs to.

Ranks follow ``metrics.py`` exactly, so the rows average back to ``rsviewer eval``'s
numbers (same encoders, same reranker, same closed-form tie handling):

* ``rank``: 1-based position of the ground truth when ties break in its favour
  (1 + the number of items scoring strictly higher);
* ``ties``: other items tied with the ground truth (t2i: images; i2t: foreign captions
  tied with the image's best own caption); ``own_ties``: own captions tied there (i2t);
* ``hit@K``: the probability that the ground truth is within the top K under uniform
  random tie-breaking — t2i ``clip((K - rank + 1) / (ties + 1), 0, 1)``, i2t the chance
  that the first of ``own_ties`` own captions lands in the first ``K - rank + 1`` of the
  ``own_ties + ties`` tied slots. ``R@K = 100 * mean(hit@K)`` per direction is the value
  ``rsviewer eval`` prints; ``exp_rank`` is the expected 1-based rank.
* top-1 (``top1`` an image id; for i2t the image of the top-1 caption, which is
  ``top1_caption_index``/``top1_caption``): the best-scoring item; among items tied for first place the ground truth wins
  when it is one of them (so ``top1 == ground truth`` exactly when ``rank == 1``),
  otherwise the first in gallery order.

Duplicate captions: UCM repeats strings (391 distinct among 1,050 val captions), and
identical strings get identical embeddings, so no model can tell them apart. Captions
are grouped by their whitespace-normalised string (``dup_group``, ``dup_size``) and
:func:`caption_ceiling` scores the matrix of a model that is perfect except among
identical strings: the gallery's mR ceiling (73.05 on UCM val; SPEC §3 quotes 70.36 on
UCM test).

Two models: :func:`compare_table` puts the columns of two :class:`PerQuery` side by side
(``a_…``, ``b_…``) with ``rank_diff = b_exp_rank - a_exp_rank`` (> 0: model A ranks the
ground truth higher, "A wins").
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..archs.base import RetrievalModel
from ..data import Dataset, load_dataset
from ..errors import RsviewerError
from ..utils.atomic import atomic_file
from ..utils.progress import CancelToken, ProgressFn, check, report
from .evaluate import encode_images, encode_texts, similarity_matrix
from .index import GalleryIndex, check_model, state_tensors
from .metrics import (RetrievalInputError, _caption_image, _p_first_own_within, _tie_counts_i2t, _tie_counts_t2i,
                      as_sim_matrix, retrieval_metrics)
from .rerank import RERANK_METHODS
from .rerank import rerank as apply_rerank

__all__ = [
    "KS", "PerQuery", "Scores", "caption_ceiling", "caption_groups", "class_recall", "compare_table",
    "confusion", "per_query", "per_query_table", "score_dataset", "score_index", "write_table",
]

KS = (1, 5, 10)
#: the columns each model contributes (prefixed a_/b_ when two models are compared)
MODEL_COLUMNS = ("rank", "ties", "own_ties", "exp_rank") + tuple(f"hit@{k}" for k in KS) + (
    "top1", "top1_label", "top1_caption_index", "top1_caption")
SHARED_COLUMNS = ("direction", "query", "image", "label", "caption", "dup_group", "dup_size")
TABLE_MARK = "rsviewer-per-query/1"  # parquet metadata / CSV header check before an overwrite


@dataclass
class Scores:
    """A scored gallery: the raw matrix, the reranked pair, and what the rows are."""

    model: str
    rerank: str
    sim: np.ndarray  # (N images, M captions), before rerank
    sim_i2t: np.ndarray
    sim_t2i: np.ndarray
    captions: list[str]
    caption_image: np.ndarray  # (M,) image row of every caption
    ids: list[str]
    labels: list[Optional[str]]
    paths: list[str]

    def reranked(self, method: str) -> "Scores":
        """The same scores under another rerank (no re-encoding)."""
        s_i2t, s_t2i = _apply(self.sim, method)
        return Scores(self.model, method, self.sim, s_i2t, s_t2i, self.captions, self.caption_image, self.ids,
                      self.labels, self.paths)


def _apply(sim: np.ndarray, method: str) -> tuple[np.ndarray, np.ndarray]:
    if method not in RERANK_METHODS:
        raise RetrievalInputError(f"rerank must be one of {', '.join(RERANK_METHODS)}, got {method!r}")
    return (sim, sim) if method == "none" else apply_rerank(sim, method)


def _check_truth(n_images: int, captions: Sequence[str], caption_image: np.ndarray, where: str) -> None:
    if len(captions) == 0:
        raise RsviewerError(f"{where} has no captions: per-query evaluation needs ground truth")
    counts = np.bincount(caption_image, minlength=n_images)
    if (counts == 0).any():
        raise RsviewerError(f"{where}: {int((counts == 0).sum())} of {n_images} images have no caption; "
                            f"per-query evaluation needs captions for every image")


def _pairwise_sim(model, img, txt, progress, cancel, chunk: int = 32) -> np.ndarray:
    """``similarity_matrix`` in image chunks, with progress and cancel (the MSSA case:
    every pair is scored). The chunk equals ``similarity_matrix``'s, so the scores match."""
    if not model.pairwise:
        return similarity_matrix(model, img, txt)
    n = next(iter(img.values())).shape[0]
    rows = []
    for s in range(0, n, chunk):
        check(cancel)
        rows.append(similarity_matrix(model, {k: v[s : s + chunk] for k, v in img.items()}, txt, chunk))
        report(progress, min(n, s + chunk), n, "scoring every image-caption pair")
    return np.concatenate(rows)


def score_dataset(
    model: RetrievalModel,
    data: str | os.PathLike | Dataset,
    split: str = "val",
    rerank: str = "none",
    images: Optional[str] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    batch_size: int = 32,
) -> Scores:
    """Encode and score a dataset split exactly as ``retrieval.evaluate.evaluate`` does."""
    ds = data if isinstance(data, Dataset) else load_dataset(data, images=images)
    sub = ds.split(split)
    sub.check_images()
    captions, cap_image = sub.flat_captions()
    _check_truth(len(sub), captions, cap_image, f"{ds.name}/{split}")
    model.eval()
    img = encode_images(model, [it.image for it in sub.items], batch_size, progress, cancel)
    txt = encode_texts(model, captions, progress=progress, cancel=cancel)
    sim = _pairwise_sim(model, img, txt, progress, cancel)
    s_i2t, s_t2i = _apply(sim, rerank)
    return Scores(getattr(model, "name", model.arch), rerank, sim, s_i2t, s_t2i, captions, cap_image,
                  [it.id for it in sub.items], [it.label for it in sub.items], [str(it.image) for it in sub.items])


@torch.no_grad()
def score_index(
    model: RetrievalModel,
    index: GalleryIndex,
    rerank: str = "none",
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
) -> Scores:
    """Score a gallery index (the app's case): image states come from the index; caption
    states too for dual encoders, pairwise models encode the captions and score every pair."""
    check_model(index, model)
    captions = index.captions
    ci = np.asarray(index.caption_image, np.int64)
    _check_truth(len(index), captions, ci, "this gallery")
    img = state_tensors(index, np.arange(len(index)))
    if model.pairwise:
        model.eval()
        txt = encode_texts(model, captions, progress=progress, cancel=cancel)
        sim = _pairwise_sim(model, img, txt, progress, cancel)
    else:
        report(progress, 0, 1, "scoring")
        txt = {"emb": torch.from_numpy(np.array(index.caption_emb, np.float32))}
        sim = similarity_matrix(model, img, txt)
        report(progress, 1, 1, "scoring")
    check(cancel)
    s_i2t, s_t2i = _apply(sim, rerank)
    return Scores(getattr(model, "name", model.arch), rerank, sim, s_i2t, s_t2i, captions, ci,
                  [it["id"] for it in index.items], [it.get("label") for it in index.items],
                  [it["path"] for it in index.items])


def trained_splits(model) -> set[str]:
    """The dataset splits a model's training saw, from its ``metrics.json`` (``train_split``,
    e.g. ``train+val`` for a model retrained after cross-validation). Empty when unknown."""
    folder = getattr(model, "model_dir", None)
    try:
        meta = json.loads((Path(folder) / "metrics.json").read_text(encoding="utf-8")) if folder else {}
    except (OSError, ValueError):
        return set()
    split = str(meta.get("train_split") or "")
    return {s for s in split.split("+") if s} | ({"val"} if meta.get("saw_val") else set())


def seen_in_training(model, splits: Sequence[Optional[str]]) -> list[str]:
    """The splits among a gallery's (its items' ``split`` tags) that the model trained on: a
    metric there is not a held-out figure (the shipped default trained on train+val, and the
    demo gallery is UCM val). Matching is by split name, so it warns, it does not prove."""
    seen = trained_splits(model)
    return sorted({s for s in splits if s} & seen)


# --------------------------------------------------------------------------- duplicates
def _norm(text: str) -> str:
    return " ".join(text.split())


def caption_groups(captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(group id, group size) of every caption; identical (whitespace-normalised) strings
    share a group. Ids number the distinct strings in order of first appearance."""
    first: dict[str, int] = {}
    gid = np.array([first.setdefault(_norm(c), len(first)) for c in captions], np.int64)
    size = np.bincount(gid, minlength=len(first))
    return gid, size[gid]


def caption_ceiling(captions: Sequence[str], caption_image, n_images: int, ks=KS) -> dict:
    """The metrics of a model perfect except among identical strings: score 1 for every
    (image, caption) pair whose string is one of the image's own, 0 otherwise; ties are
    handled as in ``retrieval_metrics`` (expected value). Returns its dict plus
    ``n_distinct``."""
    ci = _caption_image(n_images, len(captions), caption_image)
    gid, _ = caption_groups(captions)
    has = np.zeros((n_images, int(gid.max()) + 1), bool)
    has[ci, gid] = True
    out = retrieval_metrics(has[:, gid].astype(np.float32), caption_image=ci, ks=ks)
    out["n_distinct"] = int(gid.max()) + 1
    return out


# --------------------------------------------------------------------------- per query
def _top1(s: np.ndarray, gt_best: np.ndarray, axis: int) -> np.ndarray:
    """Index of the best item per query along ``axis``; the ground truth wins a tie for first."""
    arg = s.argmax(axis=axis)
    top = s.max(axis=axis)
    return np.where(gt_best >= top, -1, arg)  # -1: the ground truth itself (filled in by the caller)


def _t2i_rows(s: np.ndarray, ci: np.ndarray) -> dict[str, np.ndarray]:
    m = s.shape[1]
    g, t = _tie_counts_t2i(s, ci)
    own = s[ci, np.arange(m)]
    top = _top1(s, own, axis=0)
    top = np.where(top < 0, ci, top)
    out = {"rank": g + 1, "ties": t, "own_ties": np.ones(m, np.int64), "exp_rank": g + t / 2.0 + 1}
    for k in KS:
        out[f"hit@{k}"] = np.clip((k - g) / (t + 1.0), 0.0, 1.0)
    out["top1"] = top
    return out


def _i2t_rows(s: np.ndarray, ci: np.ndarray) -> dict[str, np.ndarray]:
    n, m = s.shape
    g, a, b = _tie_counts_i2t(s, ci)
    own_scores = s[ci, np.arange(m)]
    order = np.lexsort((-own_scores, ci))  # by image, best own caption first
    first = np.searchsorted(ci[order], np.arange(n))
    best_own = order[first]  # the image's best-scoring own caption
    top = _top1(s, s[np.arange(n), best_own], axis=1)
    top = np.where(top < 0, best_own, top)
    out = {"rank": g + 1, "ties": b, "own_ties": a, "exp_rank": g + b / (a + 1.0) + 1}
    for k in KS:
        out[f"hit@{k}"] = _p_first_own_within(a, b, k - g)
    out["top1"] = top
    out["best_caption"] = best_own
    return out


@dataclass
class PerQuery:
    """Per-query results of one model on one gallery (see the module docstring)."""

    model: str
    rerank: str
    t2i: dict[str, np.ndarray]  # per caption: rank, ties, own_ties, exp_rank, hit@K, top1 (image row)
    i2t: dict[str, np.ndarray]  # per image: the same, top1 = caption index, best_caption
    metrics: dict  # retrieval_metrics of the same matrices (unrounded)
    ceiling: dict  # caption_ceiling of the gallery
    captions: list[str]
    caption_image: np.ndarray
    ids: list[str]
    labels: list[Optional[str]]
    paths: list[str]
    dup_group: np.ndarray = field(default=None)  # per caption
    dup_size: np.ndarray = field(default=None)

    def recall(self, direction: str, k: int) -> float:
        """R@K in percent recomputed from the rows (equals ``metrics``)."""
        return float(100.0 * np.mean(getattr(self, direction)[f"hit@{k}"]))


def per_query(scores: Scores) -> PerQuery:
    """Ranks of every caption and every image for a scored gallery."""
    a = as_sim_matrix(scores.sim_i2t, "sim_i2t")
    b = as_sim_matrix(scores.sim_t2i, "sim_t2i")
    ci = _caption_image(a.shape[0], a.shape[1], scores.caption_image)
    gid, gsize = caption_groups(scores.captions)
    return PerQuery(scores.model, scores.rerank, _t2i_rows(b, ci), _i2t_rows(a, ci),
                    retrieval_metrics(a, b, caption_image=ci, ks=KS),
                    caption_ceiling(scores.captions, ci, a.shape[0]), list(scores.captions), ci,
                    list(scores.ids), list(scores.labels), list(scores.paths), gid, gsize)


# --------------------------------------------------------------------------- tables
def _label(x) -> str:
    return x if x else ""


def _shared(pq: PerQuery) -> dict[str, list]:
    """The query-describing columns, t2i rows (captions) then i2t rows (images)."""
    m, n = len(pq.captions), len(pq.ids)
    ci, best = pq.caption_image, pq.i2t["best_caption"]
    return {
        "direction": ["t2i"] * m + ["i2t"] * n,
        "query": list(range(m)) + list(range(n)),
        "image": [pq.ids[i] for i in ci] + list(pq.ids),
        "label": [_label(pq.labels[i]) for i in ci] + [_label(x) for x in pq.labels],
        "caption": list(pq.captions) + [pq.captions[c] for c in best],
        "dup_group": pq.dup_group.tolist() + pq.dup_group[best].tolist(),
        "dup_size": pq.dup_size.tolist() + pq.dup_size[best].tolist(),
    }


def _model_columns(pq: PerQuery) -> dict[str, list]:
    t, i = pq.t2i, pq.i2t
    out = {c: np.concatenate([t[c], i[c]]).tolist() for c in ("rank", "ties", "own_ties", "exp_rank")}
    for k in KS:
        out[f"hit@{k}"] = np.concatenate([t[f"hit@{k}"], i[f"hit@{k}"]]).tolist()
    ci = pq.caption_image
    # top1: the image of the top-1 result (i2t: the image the top-1 caption belongs to)
    out["top1"] = [pq.ids[r] for r in t["top1"]] + [pq.ids[ci[c]] for c in i["top1"]]
    out["top1_label"] = ([_label(pq.labels[r]) for r in t["top1"]] +
                         [_label(pq.labels[ci[c]]) for c in i["top1"]])
    out["top1_caption_index"] = [-1] * len(t["top1"]) + [int(c) for c in i["top1"]]
    out["top1_caption"] = [""] * len(t["top1"]) + [pq.captions[c] for c in i["top1"]]
    return out


def per_query_table(pq: PerQuery) -> dict[str, list]:
    """One long table (columns as lists): a row per caption (``direction`` t2i) and per
    image (i2t); see the module docstring for the columns."""
    return {**_shared(pq), **_model_columns(pq)}


def _same_gallery(a: PerQuery, b: PerQuery) -> None:
    if a.ids != b.ids or a.captions != b.captions or not np.array_equal(a.caption_image, b.caption_image):
        raise RsviewerError("the two per-query results are not on the same gallery (images or captions differ)")


def compare_table(a: PerQuery, b: PerQuery) -> dict[str, list]:
    """Two models side by side: shared columns, ``a_*``, ``b_*`` and ``rank_diff``
    (= b_exp_rank − a_exp_rank; > 0 means A ranks the ground truth higher)."""
    _same_gallery(a, b)
    ca, cb = _model_columns(a), _model_columns(b)
    out = _shared(a)
    out.update({f"a_{k}": v for k, v in ca.items()})
    out.update({f"b_{k}": v for k, v in cb.items()})
    out["rank_diff"] = (np.asarray(cb["exp_rank"]) - np.asarray(ca["exp_rank"])).tolist()
    return out


def rank_diff(a: PerQuery, b: PerQuery, direction: str) -> np.ndarray:
    """``b.exp_rank − a.exp_rank`` for one direction (> 0: A better)."""
    _same_gallery(a, b)
    return getattr(b, direction)["exp_rank"] - getattr(a, direction)["exp_rank"]


# --------------------------------------------------------------------------- aggregates
def query_labels(pq: PerQuery, direction: str) -> list[str]:
    """Ground-truth scene label of every query of one direction."""
    if direction == "t2i":
        return [_label(pq.labels[i]) for i in pq.caption_image]
    return [_label(x) for x in pq.labels]


def top1_labels(pq: PerQuery, direction: str) -> list[str]:
    top = getattr(pq, direction)["top1"]
    if direction == "t2i":
        return [_label(pq.labels[r]) for r in top]
    return [_label(pq.labels[pq.caption_image[c]]) for c in top]


def class_recall(pq: PerQuery, direction: str, k: int) -> dict[str, float]:
    """R@K in percent per ground-truth scene label (sorted by label)."""
    labels = np.array(query_labels(pq, direction), dtype=object)
    hits = getattr(pq, direction)[f"hit@{k}"]
    return {lab: float(100.0 * hits[labels == lab].mean()) for lab in sorted(set(labels.tolist()))}


def confusion(pq: PerQuery, direction: str) -> tuple[list[str], np.ndarray]:
    """Scene labels and the (ground truth × top-1) count matrix of one direction."""
    gt, top = query_labels(pq, direction), top1_labels(pq, direction)
    names = sorted(set(gt) | set(top))
    pos = {n: i for i, n in enumerate(names)}
    mat = np.zeros((len(names), len(names)), np.int64)
    np.add.at(mat, ([pos[x] for x in gt], [pos[x] for x in top]), 1)
    return names, mat


# --------------------------------------------------------------------------- files
def _guard(path: Path) -> None:
    """Overwrite only a file this module wrote (never a user's file of the same name)."""
    if path.is_dir():
        raise RsviewerError(f"{path} is a folder; give a file name ending in .csv or .parquet")
    if not path.exists():
        return
    ours = False
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq

            meta = pq.read_schema(path).metadata or {}
            ours = meta.get(b"format") == TABLE_MARK.encode()
        else:
            with open(path, encoding="utf-8") as fh:
                ours = fh.readline().startswith("direction,query,")
    except Exception:  # noqa: BLE001 - unreadable means not ours
        ours = False
    if not ours:
        raise RsviewerError(f"{path} exists and was not written by rsviewer eval --per-query; "
                            f"choose another name or remove it")


def write_table(table: dict[str, list], path: str | os.PathLike, meta: Optional[dict] = None) -> Path:
    """Write a table (columns as lists) as CSV or Parquet (by suffix), atomically."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".parquet"):
        raise RsviewerError(f"{path.name}: the per-query table is written as .csv or .parquet")
    _guard(path)
    cols = list(table)
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        t = pa.table(table)
        t = t.replace_schema_metadata({"format": TABLE_MARK, **{k: json.dumps(v) for k, v in (meta or {}).items()}})
        with atomic_file(path, "wb") as fh:
            pq.write_table(t, fh)
        return path
    with atomic_file(path, "w") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(cols)
        for row in zip(*(table[c] for c in cols)):
            w.writerow([repr(v) if isinstance(v, float) else v for v in row])
    return path
