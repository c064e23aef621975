"""Grad-CAM, Grad-CAM++ and Score-CAM on the retrieval similarity, written by hand
(the ``grad-cam`` package pulls a CUDA torch; SPEC §10).

The target is a small callable in the style of pytorch-grad-cam: ``target(image_states,
model) -> (B,)`` (:class:`~rsviewer.explain.core.SimilarityTarget`,
:class:`~rsviewer.explain.core.ImageSimilarityTarget`); pairwise architectures score
through ``model.score``.

Gradients: a forward hook replaces the target layer's output by a fresh leaf tensor,
so back-propagation runs only through the layers *after* the target (the frozen
backbone below it is never differentiated) — this is what keeps one Grad-CAM map well
under a second on a CPU.
"""
from __future__ import annotations

import math
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import NotAvailable, QueryError
from ..utils.progress import CancelToken, ProgressFn, check, report


def to_bchw(t: torch.Tensor, name: str = "layer") -> torch.Tensor:
    """A layer output as (B, C, h, w): conv maps as they are; ViT token sequences
    (B, 1 + h·w, C) or (B, h·w, C) reshaped to their square grid."""
    if t.dim() == 4:
        return t
    if t.dim() == 3:
        b, n, c = t.shape
        for drop in (1, 0):
            s = int(round(math.sqrt(n - drop)))
            if s * s == n - drop and s > 0:
                return t[:, drop:].transpose(1, 2).reshape(b, c, s, s)
    raise NotAvailable(f"{name} gives a {tuple(t.shape)} tensor, not a spatial map (choose another layer)")


@contextmanager
def capture(module: nn.Module, leaf: bool) -> Iterator[list[torch.Tensor]]:
    """Record the outputs of ``module`` during a forward. With ``leaf`` each output is
    replaced by a leaf that requires grad (gradients stop there)."""
    outs: list[torch.Tensor] = []
    me = threading.get_ident()  # a forward of the same model in another thread is left alone

    def hook(mod, inp, out):
        if threading.get_ident() != me:
            return None
        t = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(t, torch.Tensor):
            return None
        if not leaf:
            outs.append(t.detach())
            return None
        lf = t.detach().requires_grad_(True)
        outs.append(lf)
        new = lf.clone()  # downstream in-place ops must not touch the leaf
        if isinstance(out, tuple):
            return (new, *out[1:])
        if isinstance(out, list):
            return [new, *out[1:]]
        return new

    h = module.register_forward_hook(hook)
    try:
        yield outs
    finally:
        h.remove()


Target = Callable[[dict, nn.Module], torch.Tensor]


def grad_cams(
    model: nn.Module,
    pixels: torch.Tensor,
    target: Target,
    module: nn.Module,
    variants: Sequence[str] = ("gradcam", "gradcam++"),
    layer_name: str = "layer",
    rectify_activations: bool | str = "auto",
) -> tuple[dict[str, torch.Tensor], torch.Tensor, tuple[int, ...]]:
    """Grad-CAM and/or Grad-CAM++ maps for a batch: ``({variant: (B, h, w)}, scores (B,),
    activation shape)``. Maps are *not* rectified or scaled (the caller does that).

    ``rectify_activations``: use max(A, 0) as the activations. ``"auto"`` does so for
    BatchNorm layers: the preset EfficientNet-Lite layer is the head BatchNorm, whose
    output goes through ReLU6, and the CAM formulas assume post-activation (≥ 0) maps
    (Grad-CAM++ degenerates on negative ones)."""
    with capture(module, leaf=True) as acts:
        with torch.enable_grad():
            states = model.image_states(pixels)
            score = target(states, model)
    if not acts:
        raise NotAvailable(f"{layer_name} was not run by this model's image path (choose another layer)")
    a = acts[-1]
    if not score.requires_grad:
        raise NotAvailable(f"the similarity does not depend on {layer_name} (choose another layer)")
    (g,) = torch.autograd.grad(score.sum(), a, allow_unused=True)
    if g is None:
        raise NotAvailable(f"the similarity does not depend on {layer_name} (choose another layer)")
    A = to_bchw(a.detach(), layer_name).float()
    G = to_bchw(g.detach(), layer_name).float()
    if rectify_activations == "auto":
        rectify_activations = isinstance(module, nn.modules.batchnorm._BatchNorm)
    if rectify_activations:
        A = A.clamp_min(0)
    out: dict[str, torch.Tensor] = {}
    if "gradcam" in variants:  # Selvaraju et al. 2017: channel weights = spatial mean of the gradient
        w = G.mean((2, 3), keepdim=True)
        out["gradcam"] = (w * A).sum(1)
    if "gradcam++" in variants:  # Chattopadhyay et al. 2018 (closed form with exp(score) ≈ 2nd/3rd powers)
        g2 = G.pow(2)
        g3 = g2 * G
        sum_a = A.sum((2, 3), keepdim=True)
        denom = 2 * g2 + sum_a * g3
        aij = g2 / torch.where(denom.abs() > 1e-12, denom, torch.ones_like(denom))
        aij = torch.where(G != 0, aij, torch.zeros_like(aij))
        w = (F.relu(G) * aij).sum((2, 3), keepdim=True)
        out["gradcam++"] = (w * A).sum(1)
    return out, score.detach(), tuple(A.shape[1:])


@torch.no_grad()
def score_cam(
    model: nn.Module,
    pixels: torch.Tensor,
    target: Target,
    module: nn.Module,
    channels: int = 16,
    batch_size: int = 16,
    weighting: str = "softmax",
    temperature: float = 0.05,
    layer_name: str = "layer",
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
) -> tuple[torch.Tensor, float, dict]:
    """Score-CAM (Wang et al. 2020) for one image, gradient-free: each of the ``channels``
    most active channels of the layer (by mean activation), upsampled and min–max scaled,
    masks the (normalised) input — masked-out pixels become the dataset mean colour —
    and the masked images are re-scored in batches. Channel weights: ``"softmax"``
    (default) = softmax of the similarities at ``temperature`` (0.05, the usual
    contrastive temperature; pytorch-grad-cam's softmax over a logit); ``"increase"`` =
    the rise of the similarity over the all-masked image, rectified and normalised
    (Score-CAM's "increase of confidence"). On 30 UCM val images with the default model
    the two were within one standard error, the softmax slightly ahead (docs/explain.md). Returns ``(map (h, w), score, info)``."""
    if weighting not in ("increase", "softmax"):
        raise QueryError(f"weighting must be 'increase' or 'softmax', not {weighting!r}")
    with capture(module, leaf=False) as acts:
        score = float(target(model.image_states(pixels[:1]), model)[0])
    if not acts:
        raise NotAvailable(f"{layer_name} was not run by this model's image path (choose another layer)")
    raw = to_bchw(acts[-1], layer_name)[0].float()  # (C, h, w)
    # pre-activation (BatchNorm) layer: rectify as in grad_cams, unless nothing is left
    cands = [raw.clamp_min(0), raw] if isinstance(module, nn.modules.batchnorm._BatchNorm) else [raw]
    c = raw.shape[0]
    k = max(1, min(int(channels), c))
    for A in cands:
        flat = A.flatten(1)
        spread = flat.amax(1) - flat.amin(1)
        rank = A.mean((1, 2)).masked_fill(spread <= 1e-8, float("-inf"))  # constant channels mask nothing
        sel = rank.argsort(descending=True)[:k]
        sel = sel[torch.isfinite(rank[sel])]
        if len(sel):
            break
    if len(sel) == 0:  # no channel varies over this image: nothing to localise
        info = {"channels": 0, "of_channels": int(c), "note": f"no channel of {layer_name} varies over the image; flat map"}
        return torch.zeros(raw.shape[-2:]), score, info
    up = F.interpolate(A[sel][None], size=pixels.shape[-2:], mode="bilinear", align_corners=False)[0]
    lo = up.flatten(1).amin(1)[:, None, None]
    hi = up.flatten(1).amax(1)[:, None, None]
    masks = (up - lo) / (hi - lo).clamp_min(1e-12)  # (k, S, S) in [0, 1]
    x = pixels[:1]
    blank = float(target(model.image_states(torch.zeros_like(x)), model)[0]) if weighting == "increase" else None
    scores = []
    n = len(sel)
    for s in range(0, n, batch_size):
        check(cancel)
        m = masks[s : s + batch_size, None].to(x.dtype)
        scores.append(target(model.image_states(x * m), model).float().cpu())
        report(progress, min(s + batch_size, n), n, "score-cam: scoring masked images")
    sc = torch.cat(scores)
    if weighting == "increase":
        w = F.relu(sc - blank)
        if float(w.sum()) <= 0:  # no mask beats the blank image: fall back to the softmax
            w = torch.softmax(sc / temperature, 0)
        else:
            w = w / w.sum()
    else:
        w = torch.softmax(sc / temperature, 0)
    cam = (w.to(A.dtype)[:, None, None] * A[sel]).sum(0)
    info = {
        "channels": int(n),
        "of_channels": int(c),
        "weighting": weighting,
        "masked_score_range": [round(float(sc.min()), 5), round(float(sc.max()), 5)],
    }
    if weighting == "softmax":
        info["temperature"] = temperature
    else:
        info["blank_score"] = round(blank, 5)
    return cam, score, info
