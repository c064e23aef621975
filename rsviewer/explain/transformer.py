"""Explanations for CLIP-style transformer image towers (SPEC §11; what users of
pytorch-grad-cam #460/#568 and open_clip #795/#269 ask for). The model provides
``vision_forward(pixels) -> (unit embedding, attentions, hidden states)`` and
``dense_features(pixels, surgery)`` (:class:`rsviewer.archs.clip.Clip`).

- ``rollout`` (in :mod:`.maps`): Abnar & Zuidema's attention rollout, text-independent.
- ``chefer``: Chefer et al. 2021, "Generic attention-model explainability": relevance
  R = I, and per block R ← R + E_h[(∇A ⊙ A)⁺] R, with ∇A the gradient of the image–text
  similarity; the map is the class token's row over the patches.
- ``maskclip``: dense patch–text cosine through the last block's value path (Zhou et al.
  2022, MaskCLIP): the class token's query–key mixing is what blurs CLIP's patch tokens.
- ``surgery``: CLIP Surgery (Li et al. 2023) style: v–v self-attention in the last block
  plus its residual, and the "feature surgery" that removes the redundant direction every
  patch shares (the embedding of an empty prompt), which fixes CLIP's opposite
  visualisation (background lit, object dark).
Grad-CAM on patch tokens is the ordinary ``gradcam`` with the token sequence reshaped to
its grid (:func:`.cam.to_bchw`), targeting the block before the last (``gradcam_layers``).
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import NotAvailable


def supports_vit(model) -> bool:
    fn = getattr(model, "has_class_token", None)
    return callable(getattr(model, "vision_forward", None)) and callable(fn) and bool(fn())


def supports_dense(model) -> bool:
    return callable(getattr(model, "dense_features", None)) and (supports_vit(model) or getattr(model, "kind", "") == "resnet")


def _grid(vec: torch.Tensor, pixels: torch.Tensor) -> np.ndarray:
    n = vec.shape[-1]
    s = int(round(n**0.5))
    if s * s != n:
        raise NotAvailable(f"{n} patch tokens do not form a square grid")
    return vec.reshape(s, s).detach().float().cpu().numpy()


def vit_rollout(model, pixels: torch.Tensor, head_fusion: str = "mean"):
    from .maps import rollout_matrix

    if not supports_vit(model):
        raise NotAvailable("rollout needs a vision transformer with a class token")
    with torch.no_grad():
        _, atts, _ = model.vision_forward(pixels[:1])
    if not atts:
        raise NotAvailable("this vision transformer returns no attention weights")
    r = rollout_matrix(atts, head_fusion)[0]
    return _grid(r[0, 1:], pixels), len(atts)


def chefer(model, pixels: torch.Tensor, query) -> tuple[np.ndarray, float, dict]:
    if not supports_vit(model):
        raise NotAvailable("gradient-weighted attention needs a vision transformer with a class token")
    with torch.enable_grad():
        # the tower is frozen (no parameter needs grad): let the graph start at the input
        emb, atts, _ = model.vision_forward(pixels[:1].detach().clone().requires_grad_(True))
        score = query.target({"emb": emb}, model)[0]
        if not atts or not score.requires_grad:
            raise NotAvailable("the similarity does not depend on the attention weights of this model")
        grads = torch.autograd.grad(score, atts)
    n = atts[0].shape[-1]
    r = torch.eye(n)
    for a, g in zip(atts, grads):
        cam = (g[0].float() * a[0].detach().float()).clamp_min(0).mean(0)  # (N, N)
        r = r + cam @ r
    grid = _grid(r[0, 1:], pixels)
    return grid, float(score.detach()), {"blocks": len(atts), "rule": "R += mean_h((grad*A)+) R", "from": "[CLS] row"}


@torch.no_grad()
def dense_similarity(model, pixels: torch.Tensor, query, surgery: bool) -> tuple[np.ndarray, dict]:
    if not supports_dense(model):
        raise NotAvailable(f"dense patch similarity needs a CLIP image tower; {model.arch} has none")
    dense = model.dense_features(pixels[:1], surgery=surgery)[0].float()  # (D, h, w)
    q = query.emb.float()
    info = {"grid": list(dense.shape[-2:])}
    if surgery:  # remove the direction every patch shares: an empty prompt's (text) or the patch mean (image)
        if query.is_text:
            tok = {k: v.to(model.device) for k, v in model.tokenize([""]).items()}
            r = model.text_states_from(model.text_features(tok))["emb"][0].float()
            info["redundant"] = "embedding of the empty prompt"
        else:
            r = torch.nn.functional.normalize(dense.flatten(1).mean(1), dim=0)
            info["redundant"] = "mean patch embedding"
        q = q - r
    sim = torch.einsum("d,dhw->hw", q, dense).cpu().numpy()
    info["cosine_range"] = [round(float(sim.min()), 5), round(float(sim.max()), 5)]
    return sim, info
