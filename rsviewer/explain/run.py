"""The entry points of the explain engine: which methods a model supports, and
:func:`explain` itself. They sit above both :mod:`.core` (shared definitions: methods,
targets, map helpers) and :mod:`.maps` (the per-method computations), so neither of
those imports the other back.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..archs.base import ExplainMaps, RetrievalModel
from ..errors import QueryError
from ..utils.progress import CancelToken, ProgressFn, check, report
from . import maps as M
from . import transformer as T
from .core import (
    CAM_METHODS,
    METHODS,
    Explanation,
    as_rgb_image,
    cam_layers,
    finish_map,
    has_image_attention,
    PROBED_METHODS,
    make_query,
    probe_error,
    probe_maps,
    word_embedding_layer,
)


def available_methods(model: RetrievalModel) -> list[str]:
    """The methods of :data:`METHODS` this model supports (in that order). Runs at most
    one small ``explain_maps`` probe per model (cached)."""
    out = []
    cams = bool(cam_layers(model))
    probe = None

    def pr() -> ExplainMaps:
        nonlocal probe
        if probe is None:
            probe = probe_maps(model)
        return probe

    for m in METHODS:
        if m in CAM_METHODS:
            ok = cams
        elif m == "rollout":
            ok = M.vit_backbone(model) is not None or T.supports_vit(model) or (
                has_image_attention(model) and bool(M.stage_attention_maps(pr().image_maps))
            )
        elif m == "chefer":
            ok = T.supports_vit(model)
        elif m in ("maskclip", "surgery"):
            ok = T.supports_dense(model) and (m == "maskclip" or T.supports_vit(model))
        elif m == "attention":
            ok = bool(pr().image_maps)
        elif m == "patch":
            ok = callable(getattr(model, "local_embeddings", None))
        elif m == "tokens":
            ok = bool(pr().token_words)
        else:  # words
            ok = bool(pr().word_weights) or word_embedding_layer(model) is not None
        if ok:
            out.append(m)
    return out


def broken_methods(model: RetrievalModel) -> dict[str, str]:
    """Methods missing from :func:`available_methods` because the architecture's
    ``explain_maps`` crashed (a bug, not "not supported"): method → the error."""
    available = available_methods(model)
    why = probe_error(model)
    if why is None:
        return {}
    return {m: f"explain_maps() failed: {why}" for m in PROBED_METHODS if m not in available}


# ---- the entry point ------------------------------------------------------------------------
def explain(
    model: RetrievalModel,
    image: Any,
    text: Optional[str] = None,
    method: str = "gradcam",
    layer: Optional[str] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    **opts,
) -> Explanation:
    """Explain the similarity of ``image`` with ``text`` (or ``query_image=``) by ``method``.

    Options (all optional): ``query_image`` (PIL image or path, instead of ``text``);
    ``input_size`` (run the model at this square size instead of ``model.image_size``;
    finer grids for large images); ``smooth`` (Gaussian sigma of the final map: a
    fraction of the shorter side if < 1, else pixels; default 0); Score-CAM:
    ``channels`` (top-k channels by mean activation, default 16), ``batch_size`` (16),
    ``weighting`` ("increase" | "softmax"), ``temperature``; rollout:
    ``head_fusion`` ("mean" | "max"); attention: ``map`` (name of the image map to show);
    tokens: ``top_words`` (3).
    """
    if method not in METHODS:
        raise QueryError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method in PROBED_METHODS:
        why = broken_methods(model).get(method)
        if why:  # a crash in the architecture's code: surfaced as the bug it is, never "not available"
            raise RuntimeError(f"{method} is broken for {model.arch}: {why}")
    t0 = time.perf_counter()
    check(cancel)
    img = as_rgb_image(image)
    query_image = opts.pop("query_image", None)
    if text is not None and query_image is not None:
        raise QueryError("give either a query text or a query image, not both")
    input_size = opts.pop("input_size", None)
    if input_size is not None:
        input_size = int(input_size)
        if not 32 <= input_size <= 4096:
            raise QueryError(f"input_size must be between 32 and 4096, not {input_size}")
    smooth = float(opts.pop("smooth", 0.0) or 0.0)
    was_training = model.training
    model.eval()
    try:
        report(progress, 0, 3, f"{method}: encoding the query")
        query = make_query(model, text, query_image, input_size)
        truncated = bool(text is not None and any(getattr(model, "last_truncated", None) or ()))
        check(cancel)
        pixels = model.preprocess([img], input_size).to(model.device)
        report(progress, 1, 3, f"{method}: computing")
        res = M.compute(model, pixels, query, method, layer=layer, progress=progress, cancel=cancel, **opts)
        check(cancel)
        size = img.size
        heatmap = None
        if res.grid is not None:
            heatmap = finish_map(res.grid, size, rectify=res.rectify, smooth=smooth)
        info = dict(res.info)
        info.update(
            {
                "seconds": round(time.perf_counter() - t0, 4),
                "input_size": int(pixels.shape[-1]),
                "model": getattr(model, "name", model.arch),
                "arch": model.arch,
                "query": "text" if query.is_text else "image",
            }
        )
        if res.grid is not None:
            info.setdefault("grid", list(np.asarray(res.grid).shape[-2:]))
        if smooth:
            info["smooth"] = smooth
        if truncated:  # a CLIP text tower has a fixed context (77 tokens): say what was explained
            info["truncated"] = f"query longer than the model's {getattr(model.cfg, 'max_tokens', '?')}-token context: cut (end token kept)"
        if query_image is not None and isinstance(query_image, (str, Path)):
            info["query_image"] = str(query_image)
        report(progress, 3, 3, f"{method}: done")
        return Explanation(
            method=method,
            text=query.text,
            image=img,
            heatmap=heatmap,
            score=float(res.score),
            words=res.words,
            word_weights=res.word_weights,
            word_rows=res.word_rows,
            grids=res.grids,
            grid_words=res.grid_words,
            layer=res.layer,
            info=info,
        )
    finally:
        model.train(was_training)
