"""Zero-shot scene classification with a retrieval model (CLIP-style prompting).

Class names come from sub-folder names (``images/tenniscourt/*.jpg``). Names glued
together as in UC Merced ("storagetanks", "baseballdiamond") are split into words with
the text encoder's own vocabulary; each class is embedded as the mean of several prompt
templates, and each image takes the class with the highest cosine.
"""
from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np
import torch

from ..archs.base import RetrievalModel
from ..data import Dataset, load_dataset
from ..errors import DatasetError
from ..runtime import towers
from ..runtime.towers import default_threads
from ..utils.progress import CancelToken, ProgressFn
from .evaluate import encode_images

TEMPLATES = (
    "an aerial image of {}.",
    "a remote sensing image of {}.",
    "a satellite photo of {}.",
    "there is a {} in the image.",
    "{}",
)


def split_words(name: str, vocab: Optional[frozenset] = None) -> str:
    """'storagetanks' → 'storage tanks'; 'dense_residential' → 'dense residential'."""
    name = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    parts = re.split(r"[\s_\-]+", name.strip().lower())
    if vocab is None:
        return " ".join(p for p in parts if p)
    out = []
    for p in parts:
        if not p:
            continue
        if p in vocab or len(p) < 5:
            out.append(p)
            continue
        # fewest-words segmentation into vocabulary words of ≥ 3 letters (else keep as is)
        n = len(p)
        best: list[Optional[list[str]]] = [None] * (n + 1)
        best[0] = []
        for i in range(1, n + 1):
            for j in range(max(0, i - 20), i):
                w = p[j:i]
                if best[j] is not None and w in vocab and len(w) >= 3:
                    cand = best[j] + [w]
                    if best[i] is None or len(cand) < len(best[i]):
                        best[i] = cand
        out.extend(best[n] if best[n] else [p])
    return " ".join(out)


def class_prompts(model: RetrievalModel, names: list[str]) -> dict[str, str]:
    vocab = None
    tok = getattr(getattr(model, "text", None), "tokenizer", None)
    if tok is not None and hasattr(tok, "get_vocab"):
        vocab = frozenset(w for w in tok.get_vocab() if w.isalpha() and w.islower())
    return {n: split_words(n, vocab) for n in names}


@torch.no_grad()
def class_embeddings(model: RetrievalModel, names: list[str], templates=TEMPLATES, runtime: str = "auto") -> torch.Tensor:
    words = class_prompts(model, names)
    tw = towers(model, runtime)
    embs = []
    for n in names:
        e = tw.text_states([t.format(words[n]) for t in templates], threads=default_threads())["emb"].float()
        embs.append(torch.nn.functional.normalize(e.mean(0), dim=-1))
    return torch.stack(embs).cpu()


def classify(
    model: RetrievalModel,
    images: str | os.PathLike | Dataset,
    classes: Optional[list[str]] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    runtime: str = "auto",
) -> dict:
    """``{"accuracy", "n", "per_class": {name: accuracy}, "classes", "prompts", "predictions"}``.
    ``runtime``: ``auto`` | ``onnx`` | ``torch`` for the frozen towers."""
    ds = images if isinstance(images, Dataset) else load_dataset(images)
    labels = [it.label for it in ds.items]
    names = classes or sorted({l for l in labels if l})
    if not names:
        raise DatasetError(f"{ds.name}: put the images in one sub-folder per class (the folder names are the classes)")
    if len(names) < 2:
        raise DatasetError(f"{ds.name}: zero-shot classification needs at least 2 classes, found {names}")
    ds.check_images()
    img = encode_images(model, [it.image for it in ds.items], progress=progress, cancel=cancel, message="classifying",
                        runtime=runtime)["emb"]
    cls = class_embeddings(model, names, runtime=runtime)
    scores = img @ cls.T
    pred = scores.argmax(1).numpy()
    # CLIP-family models calibrate cosines themselves: softmax at their logit scale, or SigLIP's sigmoid + bias
    calibrate = getattr(model, "calibrate", None)
    probs = calibrate(scores).numpy() if callable(calibrate) else None
    y = np.array([names.index(l) if l in names else -1 for l in labels])
    known = y >= 0
    per_class = {}
    for c, n in enumerate(names):
        m = y == c
        if m.any():
            per_class[n] = round(float((pred[m] == c).mean() * 100), 2)
    return {
        "accuracy": round(float((pred[known] == y[known]).mean() * 100), 2) if known.any() else None,
        "n": int(len(ds)),
        "per_class": per_class,
        "classes": names,
        "prompts": class_prompts(model, names),
        "predictions": [
            {"id": it.id, "label": it.label, "predicted": names[p],
             **({"probability": round(float(probs[i, p]), 5)} if probs is not None else {})}
            for i, (it, p) in enumerate(zip(ds.items, pred))
        ],
        "calibration": getattr(model, "calibration_name", None) if probs is not None else None,
    }
