"""Evaluation with the field's protocol (SPEC §3), optionally reranked (SPEC §4).

Image states are computed from each image alone and text states from each caption
alone; pairwise architectures then score every (image, caption) pair. Nothing about
an image's own captions enters its representation.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch

from ..archs.base import RetrievalModel
from ..data import Dataset, load_dataset, load_image
from ..runtime import resolve_runtime, towers
from ..runtime.towers import default_threads
from ..utils.device import CPU_MICRO_BATCH, autocast, micro_batch
from ..utils.progress import CancelToken, ProgressFn, check, report
from .metrics import retrieval_metrics
from .rerank import rerank as apply_rerank


def _cat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _check_batch(batch_size: int) -> None:
    if batch_size < 1:  # range(0, n, 0) would be a ValueError
        from ..errors import RsviewerError

        raise RsviewerError(f"batch size must be a positive integer, got {batch_size!r}")


@torch.no_grad()
def encode_images(
    model: RetrievalModel,
    paths: Sequence[os.PathLike | str],
    batch_size: int = 32,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    message: str = "encoding images",
    runtime: str = "torch",
    precision: str = "fp32",
) -> dict[str, torch.Tensor]:
    """Image states for every path (CPU tensors). ``runtime``: ``torch`` (evaluation's
    reference path), ``onnx`` or ``auto`` (:mod:`rsviewer.runtime`; index building uses it).
    ``precision``: ``fp32``, or ``int8`` for the quantized graphs (runtime/quantize.py)."""
    _check_batch(batch_size)
    device = model.device
    tw = _towers(model, runtime, precision)
    workers = tw.workers("image", model.image_size) if tw is not None and paths else 1
    if workers > 1:
        return _encode_images_in_workers(model, tw, paths, batch_size, progress, cancel, message, workers)
    parts = []
    for s in range(0, len(paths), batch_size):
        check(cancel)
        pixels = model.preprocess([load_image(p) for p in paths[s : s + batch_size]])
        step = micro_batch(device, len(pixels), CPU_MICRO_BATCH)  # read here: bench/index.py varies it
        for m in range(0, len(pixels), step):
            parts.append(_image_states(model, tw, pixels[m : m + step]))
        report(progress, min(s + batch_size, len(paths)), len(paths), message)
    return _cat(parts)


def _encode_images_in_workers(model, tw, paths, batch_size, progress, cancel, message, workers: int):
    """:func:`encode_images` with ``workers`` threads, each decoding, resizing and encoding one
    micro-batch at a time through the tower's 1-thread session (ORT and PIL release the GIL),
    so decoding overlaps encoding and no intra-op thread pool waits on the others."""
    step = micro_batch(model.device, batch_size, CPU_MICRO_BATCH)

    def one(chunk):
        return {k: v.float().cpu() for k, v in tw.image_states(model.preprocess([load_image(p) for p in chunk]),
                                                              threads=1).items()}

    parts = []
    with ThreadPoolExecutor(workers, thread_name_prefix="rsviewer-encode") as pool:
        for s in range(0, len(paths), batch_size):
            check(cancel)
            batch = paths[s : s + batch_size]
            parts += pool.map(one, [batch[m : m + step] for m in range(0, len(batch), step)])
            report(progress, min(s + batch_size, len(paths)), len(paths), message)
    return _cat(parts)


def _towers(model: RetrievalModel, runtime: str, precision: str):
    """The runtime's towers, or None for PyTorch (which runs float32 only)."""
    if precision == "fp32" and resolve_runtime(runtime, model) == "torch":
        return None
    return towers(model, runtime, precision)  # int8 in torch is refused there, in one line


def _image_states(model: RetrievalModel, tw, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
    if tw is not None:
        st = tw.image_states(pixels)
    else:
        with autocast(model.device):
            st = model.image_states(pixels.to(model.device))
    return {k: v.float().cpu() for k, v in st.items()}


@torch.no_grad()
def encode_texts(
    model: RetrievalModel,
    texts: Sequence[str],
    batch_size: int = 32,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    runtime: str = "torch",
    precision: str = "fp32",
) -> dict[str, torch.Tensor]:
    """Text states of every caption (CPU tensors); ``runtime`` and ``precision`` as in
    :func:`encode_images`.

    Each distinct string is encoded once (UCM-Captions: 391 distinct among a val split's
    1,050 captions) and the strings go in order of length, so a batch is padded to
    captions of about its own length; the states are then put back in the given order.
    Identical captions get bit-identical states. 32 a batch: the demo index's 391
    distinct captions took 0.78 s in ONNX Runtime and 0.96 s in torch, against 1.0 and
    1.25 s in batches of 256 (docs/runtime.md)."""
    _check_batch(batch_size)
    device = model.device
    tw = _towers(model, runtime, precision)
    uniq, inverse = _distinct_by_length([t if t.strip() else "." for t in texts])
    workers = tw.workers("text") if tw is not None and len(uniq) > batch_size else 1

    def one(chunk):
        if tw is not None:  # batch work: all cores, as one session's threads or as workers
            st = tw.text_states(chunk, threads=1 if workers > 1 else default_threads())
        else:
            with autocast(device):
                st = model.text_states(chunk)
        return {k: v.float().cpu() for k, v in st.items()}

    parts = []
    with ThreadPoolExecutor(workers, thread_name_prefix="rsviewer-encode") as pool:
        run = pool.map if workers > 1 else map  # one worker: this thread (grad mode etc. are per thread)
        group = batch_size * workers  # one batch per worker between progress reports
        for s in range(0, len(uniq), group):
            check(cancel)
            parts += run(one, [uniq[b : b + batch_size] for b in range(s, min(s + group, len(uniq)), batch_size)])
            report(progress, min(s + group, len(uniq)), len(uniq), "encoding captions")
    if not parts:  # no captions: zero rows shaped like one caption's states
        with autocast(device):
            return {k: v[:0].float().cpu() for k, v in model.text_states(["."]).items()}
    idx = torch.as_tensor(inverse, dtype=torch.long)
    return {k: v[idx] for k, v in _cat(parts).items()}


def _distinct_by_length(texts: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The distinct strings, shortest first (ties in first-seen order), and for each
    input the position of its string among them."""
    first: dict[str, int] = {}
    for t in texts:
        first.setdefault(t, len(first))
    uniq = sorted(first, key=lambda t: (len(t), first[t]))
    pos = {t: i for i, t in enumerate(uniq)}
    return uniq, np.fromiter((pos[t] for t in texts), np.int64, len(texts))


@torch.no_grad()
def similarity_matrix(
    model: RetrievalModel, img: dict[str, torch.Tensor], txt: dict[str, torch.Tensor], chunk: int = 32
) -> np.ndarray:
    """(N_images, N_captions) scores; chunked over images for pairwise models."""
    device = model.device
    if not model.pairwise:
        return model.score(img, txt).float().numpy()
    n = next(iter(img.values())).shape[0]
    tdev = {k: v.to(device) for k, v in txt.items()}
    rows = []
    for s in range(0, n, chunk):
        with autocast(device):
            rows.append(model.score({k: v[s : s + chunk].to(device) for k, v in img.items()}, tdev).float().cpu())
    return torch.cat(rows).numpy()


def evaluate(
    model: RetrievalModel,
    data: str | os.PathLike | Dataset,
    split: str = "val",
    rerank: str = "none",
    images: Optional[str] = None,
    rerank_params: Optional[dict] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    batch_size: int = 32,
) -> dict:
    """The JSON result of ``rsviewer eval`` (recall values in percent)."""
    ds = data if isinstance(data, Dataset) else load_dataset(data, images=images)
    sub = ds.split(split)
    sub.check_images()
    captions, cap_image = sub.flat_captions()
    img = encode_images(model, [it.image for it in sub.items], batch_size, progress, cancel)
    txt = encode_texts(model, captions, progress=progress, cancel=cancel)
    sim = similarity_matrix(model, img, txt)
    if rerank == "none":
        s_i2t, s_t2i = sim, sim
    else:
        s_i2t, s_t2i = apply_rerank(sim, rerank, **(rerank_params or {}))
    m = retrieval_metrics(s_i2t, s_t2i, caption_image=cap_image)
    r = lambda d: {k: round(float(d[k]), 2) for k in ("R@1", "R@5", "R@10")}  # noqa: E731
    return {
        "model": getattr(model, "name", model.arch),
        "data": str(getattr(ds, "source", data)),
        "split": split,
        "n_images": len(sub),
        "n_captions": len(captions),
        "rerank": rerank,
        "i2t": r(m["i2t"]),
        "t2i": r(m["t2i"]),
        "mR": round(float(m["mR"]), 2),
    }


def evaluate_all_reranks(model, data, split="val", images=None, progress=None, cancel=None) -> dict[str, dict]:
    """none/MR/SMR from one encoding pass (used by the results table)."""
    ds = data if isinstance(data, Dataset) else load_dataset(data, images=images)
    sub = ds.split(split)
    sub.check_images()
    captions, cap_image = sub.flat_captions()
    img = encode_images(model, [it.image for it in sub.items], progress=progress, cancel=cancel)
    txt = encode_texts(model, captions, progress=progress, cancel=cancel)
    sim = similarity_matrix(model, img, txt)
    out = {}
    for method in ("none", "mr", "smr"):
        s_i2t, s_t2i = (sim, sim) if method == "none" else apply_rerank(sim, method)
        out[method] = retrieval_metrics(s_i2t, s_t2i, caption_image=cap_image)
    return out
