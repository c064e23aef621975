"""The methods: one function per method, each returning a :class:`MapResult` on the
model's grid (the caller upsamples and scales). See docs/explain.md for what each map
means and where it is not available."""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..archs.base import ExplainMaps, RetrievalModel
from ..errors import NotAvailable, QueryError
from ..utils.progress import CancelToken, ProgressFn, check
from .cam import grad_cams, score_cam
from .core import (
    IMAGE_QUERY_TEXT,
    METHODS,
    PRIMARY_ATTENTION,
    TEXT_DEPENDENT_MAPS,
    Query,
    has_image_attention,
    normalise_grid,
    overrides,
    probe_maps,
    gradcam_layer_names,
    resolve_layer,
    word_embedding_layer,
)


@dataclass
class MapResult:
    grid: Optional[np.ndarray]  # (h, w) raw map on the model grid; None for words
    score: float
    rectify: bool = False  # ReLU before scaling (CAMs)
    layer: Optional[str] = None
    words: Optional[list[str]] = None
    word_weights: Optional[np.ndarray] = None
    word_rows: Optional[list[str]] = None
    grids: dict[str, np.ndarray] = field(default_factory=dict)
    grid_words: dict[str, list[list[str]]] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


KNOWN_OPTS = {
    "gradcam": {"rectify_activations"},
    "gradcam++": {"rectify_activations"},
    "scorecam": {"channels", "batch_size", "weighting", "temperature"},
    "rollout": {"head_fusion"},
    "chefer": set(),
    "maskclip": set(),
    "surgery": set(),
    "attention": {"map"},
    "patch": set(),
    "tokens": {"top_words"},
    "words": {"attribution", "steps"},
}


@torch.no_grad()
def query_score(model: RetrievalModel, pixels: torch.Tensor, query: Query) -> float:
    return float(query.target(model.image_states(pixels), model)[0])


def compute(
    model: RetrievalModel,
    pixels: torch.Tensor,
    query: Query,
    method: str,
    layer: Optional[str] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    **opts,
) -> MapResult:
    if method not in METHODS:
        raise QueryError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    ignored = sorted(set(opts) - KNOWN_OPTS[method])
    opts = {k: v for k, v in opts.items() if k in KNOWN_OPTS[method]}
    fn = {
        "gradcam": _cam,
        "gradcam++": _cam,
        "scorecam": _scorecam,
        "rollout": _rollout,
        "chefer": _chefer,
        "maskclip": _dense,
        "surgery": _dense,
        "attention": _attention,
        "patch": _patch,
        "tokens": _tokens,
        "words": _words,
    }[method]
    res = fn(model, pixels, query, method=method, layer=layer, progress=progress, cancel=cancel, **opts)
    if ignored:
        res.info["ignored_options"] = ignored
    return res


# ---- CAMs ---------------------------------------------------------------------------------
def _cam(model, pixels, query, method, layer, rectify_activations="auto", **_):
    name, module = resolve_layer(model, layer)
    cams, score, shape = grad_cams(model, pixels[:1], query.target, module, (method,), name, rectify_activations)
    return MapResult(
        grid=cams[method][0].cpu().numpy(),
        score=float(score[0]),
        rectify=True,
        layer=name,
        info={"target": _target_name(query), "layer_shape": list(shape), "layers": gradcam_layer_names(model)},
    )


def _scorecam(model, pixels, query, method, layer, progress=None, cancel=None, **opts):
    name, module = resolve_layer(model, layer)
    cam, score, info = score_cam(
        model,
        pixels[:1],
        query.target,
        module,
        channels=int(opts.get("channels", 16)),
        batch_size=int(opts.get("batch_size", 16)),
        weighting=str(opts.get("weighting", "softmax")),
        temperature=float(opts.get("temperature", 0.05)),
        layer_name=name,
        progress=progress,
        cancel=cancel,
    )
    info.update({"target": _target_name(query), "layers": gradcam_layer_names(model)})
    return MapResult(grid=cam.cpu().numpy(), score=score, rectify=True, layer=name, info=info)


def _target_name(query: Query) -> str:
    return "image-text similarity" if query.is_text else "image-image similarity (query image)"


# ---- rollout ----------------------------------------------------------------------------------
def vit_backbone(model: RetrievalModel):
    from ..nets.vit import HFViT

    bb = getattr(model, "backbone", None)
    if bb is not None and (hasattr(bb, "set_keep_attention") or isinstance(bb, HFViT)):
        return bb
    return None


_STAGE = re.compile(r"^(gswin|focus|attn|attention)/(stage\d+|s\d+)$")


def stage_attention_maps(image_maps: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """Per-stage *received attention* maps of an architecture's own transformer stack
    (``gswin/stageK``, ``focus/sN``), finest grid first."""
    found = [(k, np.asarray(v, dtype=np.float32)) for k, v in image_maps.items() if _STAGE.match(k)]
    return sorted(found, key=lambda kv: -kv[1].size)


@torch.no_grad()
def vit_attentions(bb, pixels: torch.Tensor) -> list[torch.Tensor]:
    from ..nets.vit import HFViT

    if isinstance(bb, HFViT):
        out = bb.model(pixel_values=pixels, output_attentions=True, interpolate_pos_encoding=True)
        atts = [a for a in (out.attentions or ()) if a is not None]
        if not atts:
            raise NotAvailable("this Hugging Face ViT returns no attention weights (load it with attn_implementation='eager')")
        return atts
    bb.set_keep_attention(True)
    try:
        bb.forward_features(pixels)
        atts = list(bb.attentions())
    finally:
        bb.set_keep_attention(False)
        for blk in getattr(bb, "blocks", []):
            blk.attn.last_attention = None
    return atts


def rollout_matrix(atts: list[torch.Tensor], head_fusion: str = "mean") -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): Π_l norm(A_l + I), heads fused by mean/max."""
    r = None
    for a in atts:
        a = a.float()
        a = a.mean(1) if head_fusion == "mean" else a.amax(1)  # (B, N, N)
        eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
        a = a + eye
        a = a / a.sum(-1, keepdim=True)
        r = a if r is None else a @ r
    return r


def _rollout(model, pixels, query, method, layer, head_fusion="mean", **_):
    if head_fusion not in ("mean", "max"):
        raise QueryError(f"head_fusion must be 'mean' or 'max', not {head_fusion!r}")
    bb = vit_backbone(model)
    score = query_score(model, pixels, query)
    from . import transformer as T

    if bb is None and T.supports_vit(model):  # a CLIP tower (transformers' vision model)
        grid, n = T.vit_rollout(model, pixels, head_fusion)
        return MapResult(grid=grid, score=score, info={"source": "CLIP vision transformer", "blocks": n,
                                                       "head_fusion": head_fusion, "from": "[CLS] row",
                                                       "note": "attention rollout does not depend on the query"})
    if bb is not None:
        atts = vit_attentions(bb, pixels[:1])
        r = rollout_matrix(atts, head_fusion)[0]  # (N, N)
        n = r.shape[-1] - 1
        s = int(round(n**0.5))
        h = pixels.shape[-2] // getattr(bb, "patch", 16)
        w = pixels.shape[-1] // getattr(bb, "patch", 16)
        if h * w != n:
            h = w = s
        grid = r[0, 1:].reshape(h, w).cpu().numpy()
        return MapResult(
            grid=grid,
            score=score,
            info={"source": "ViT backbone", "blocks": len(atts), "head_fusion": head_fusion, "from": "[CLS] row"},
        )
    if not has_image_attention(model):
        raise NotAvailable(f"rollout needs a transformer stack; {model.arch} with {_backbone_name(model)} has none")
    ex = model.explain_maps(pixels[:1], query.text or IMAGE_QUERY_TEXT)
    stages = stage_attention_maps(ex.image_maps)
    if not stages:
        raise NotAvailable(f"{model.arch}'s explain_maps gives no per-stage attention maps to roll out")
    fine = stages[0][1].shape
    acc = np.ones(fine, dtype=np.float32)
    for _, m in stages:
        m = np.maximum(m, 0)
        m = m / max(float(m.mean()), 1e-12)  # received attention, mean 1
        m = 0.5 * (m + 1.0)  # + identity (the residual path), as in rollout
        t = torch.from_numpy(m)[None, None]
        acc *= F.interpolate(t, size=fine, mode="bilinear", align_corners=False)[0, 0].numpy()
    return MapResult(
        grid=acc,
        score=score,
        info={
            "source": f"{model.arch} attention stages",
            "stages": [k for k, _ in stages],
            "note": "hierarchical rollout: product over stages of each position's received "
            "attention (mean 1, plus identity), coarse stages upsampled to the finest grid",
        },
    )


def _chefer(model, pixels, query, method, layer, **_):
    from . import transformer as T

    grid, score, info = T.chefer(model, pixels, query)
    info["target"] = _target_name(query)
    return MapResult(grid=grid, score=score, info=info)


def _dense(model, pixels, query, method, layer, **_):
    from . import transformer as T

    sim, info = T.dense_similarity(model, pixels, query, surgery=(method == "surgery"))
    info["note"] = ("patch–query cosine through the last block's value path (MaskCLIP)" if method == "maskclip" else
                    "CLIP Surgery: v–v attention in the last block, redundant direction removed")
    return MapResult(grid=sim, score=query_score(model, pixels, query), info=info)


def _backbone_name(model) -> str:
    return getattr(getattr(model, "cfg", None), "image_backbone", "its backbone")


# ---- the architecture's own maps ----------------------------------------------------------------
def _explain_maps(model: RetrievalModel, pixels: torch.Tensor, query: Query) -> ExplainMaps:
    if not overrides(model, "explain_maps"):
        raise NotAvailable(f"{model.arch} exposes no attention maps of its own (explain_maps)")
    with torch.no_grad():
        ex = model.explain_maps(pixels[:1], query.text or IMAGE_QUERY_TEXT)
    if not query.is_text:  # text-conditioned maps would explain the placeholder text
        ex.image_maps = {k: v for k, v in ex.image_maps.items() if k not in TEXT_DEPENDENT_MAPS}
        ex.token_maps = {}
        ex.token_words = {}
        ex.word_weights = {}
    return ex


def _small_extra(extra: dict) -> dict:
    out = {}
    for k, v in (extra or {}).items():
        try:
            s = json.dumps(v)
        except (TypeError, ValueError):
            continue
        if len(s) <= 20000:
            out[k] = v
    return out


def _attention(model, pixels, query, method, layer, map=None, **_):  # noqa: A002 — option name
    ex = _explain_maps(model, pixels, query)
    maps = {k: np.asarray(v, dtype=np.float32) for k, v in ex.image_maps.items()}
    if not maps:
        raise NotAvailable(f"{model.arch} exposes no image attention maps for this query")
    if map is not None:
        if map not in maps:
            raise QueryError(f"unknown map {map!r}; {model.arch} gives: {', '.join(maps)}")
        name = map
    else:
        name = next((k for k in PRIMARY_ATTENTION if k in maps), next(iter(maps)))
    grids = {k: normalise_grid(v) for k, v in maps.items()}
    grid_words: dict[str, list[list[str]]] = {}
    for k, v in ex.token_maps.items():
        if k in ex.token_words:
            continue  # semantic tokens: the "tokens" method
        v = np.asarray(v, dtype=np.float32)
        grids[k] = normalise_grid(v)
        if ex.words and len(ex.words) == len(v):
            grid_words[k] = [[w] for w in ex.words]
    return MapResult(
        grid=np.maximum(maps[name], 0),
        score=query_score(model, pixels, query),
        layer=name,
        grids=grids,
        grid_words=grid_words,
        info={"map": name, "maps": list(maps), "extra": _small_extra(ex.extra)},
    )


def _tokens(model, pixels, query, method, layer, top_words=3, **_):
    if not query.is_text:
        raise NotAvailable("semantic-token maps need a text query (their words come from it)")
    if not probe_maps(model).token_words:
        raise NotAvailable(f"semantic-token maps are MSSA's CMSE tokens; {model.arch} has none")
    ex = _explain_maps(model, pixels, query)
    names = [k for k in ex.token_maps if k in ex.token_words]
    if not names:
        raise NotAvailable(f"{model.arch} gave no semantic-token maps for this query")
    grids, grid_words, raw = {}, {}, []
    words = list(ex.words)
    for k in names:
        tm = np.asarray(ex.token_maps[k], dtype=np.float32)  # (T, h, w)
        grids[k] = normalise_grid(tm)
        tw = np.asarray(ex.token_words[k], dtype=np.float32)  # (T, n_words)
        grid_words[k] = [_top_words(row, words, int(top_words)) for row in tw]
        raw.append(tm)
    fine = max((r.shape[-2:] for r in raw), key=lambda s: s[0] * s[1])
    acc = np.zeros(fine, dtype=np.float32)
    for tm in raw:  # attention received per position (mean over tokens), mean 1 per scale
        m = tm.mean(0)
        m = m / max(float(m.mean()), 1e-12)
        acc += F.interpolate(torch.from_numpy(m)[None, None], size=fine, mode="bilinear", align_corners=False)[0, 0].numpy()
    acc /= len(raw)
    return MapResult(
        grid=acc,
        score=query_score(model, pixels, query),
        words=words,
        grids=grids,
        grid_words=grid_words,
        info={
            "scales": names,
            "tokens_per_scale": [int(grids[k].shape[0]) for k in names],
            "note": "heatmap = attention received per position, mean over the semantic tokens and the scales",
            "extra": _small_extra(ex.extra),
        },
    )


def _top_words(row: np.ndarray, words: list[str], k: int) -> list[str]:
    out: list[str] = []
    for j in np.argsort(-row, kind="stable"):
        if j >= len(words):
            continue
        w = words[j]
        if w not in out and any(ch.isalnum() for ch in w):
            out.append(w)
        if len(out) >= k:
            break
    return out


# ---- patch similarity -----------------------------------------------------------------------------
def _patch(model, pixels, query, method, layer, **_):
    fn = getattr(model, "local_embeddings", None)
    if not callable(fn):
        raise NotAvailable(f"patch similarity needs projected local features; {model.arch} has no local_embeddings")
    with torch.no_grad():
        loc = fn(pixels[:1])[0].float()  # (D, h, w)
        q = query.emb.float()
        if q.shape[0] != loc.shape[0]:
            raise NotAvailable(f"{model.arch}'s local embeddings ({loc.shape[0]}-d) do not match its query vector ({q.shape[0]}-d)")
        sim = torch.einsum("d,dhw->hw", q, loc).cpu().numpy()
    h, w = sim.shape
    stride = pixels.shape[-1] / w
    return MapResult(
        grid=sim,
        score=query_score(model, pixels, query),
        info={
            "note": f"patch similarity on the stride-{stride:g} grid ({h}×{w})",
            "cosine_range": [round(float(sim.min()), 5), round(float(sim.max()), 5)],
            "peak_cosine": round(float(sim.max()), 5),
        },
    )


# ---- words ----------------------------------------------------------------------------------------
def _words(model, pixels, query, method, layer, attribution=None, steps=32, **_):
    if not query.is_text:
        raise NotAvailable("word attention needs a text query")
    probe = probe_maps(model)
    if probe.word_weights and attribution is None:
        ex = _explain_maps(model, pixels, query)
        name = "igta" if "igta" in ex.word_weights else next(iter(ex.word_weights))
        ww = np.asarray(ex.word_weights[name], dtype=np.float32)
        rows = None
        if ww.ndim == 2 and ww.shape[0] == 1:
            ww = ww[0]
        elif ww.ndim == 2:
            scales = (ex.extra or {}).get("text_scales", {})
            if isinstance(scales, dict) and len(scales) == ww.shape[0]:
                rows = [f"text {v} · image {k}" for k, v in scales.items()]
            else:
                rows = [f"row {i}" for i in range(ww.shape[0])]
        return MapResult(
            grid=None,
            score=query_score(model, pixels, query),
            layer=name,
            words=list(ex.words),
            word_weights=ww,
            word_rows=rows,
            info={"source": f"{model.arch} explain_maps word_weights[{name!r}]", "rows": rows},
        )
    return _word_attribution(model, pixels, query, attribution or "ig", int(steps))


def _word_attribution(model, pixels, query, attribution: str = "ig", steps: int = 32) -> MapResult:
    """Attribution of the similarity to each word's input embedding.

    ``"ig"`` (default): integrated gradients (Sundararajan et al. 2017) from a baseline
    where every word's embedding is the [PAD] embedding (special tokens keep theirs) —
    (x − x′)·∫∇ along the straight path, ``steps`` midpoints in one batch; the
    attributions sum to s(x) − s(x′). ``"gxi"``: plain gradient × input (one backward;
    on MiniLM it often contradicts word occlusion, see docs/explain.md).
    """
    if attribution not in ("ig", "gxi"):
        raise QueryError(f"attribution must be 'ig' or 'gxi', not {attribution!r}")
    emb_layer = word_embedding_layer(model)
    if emb_layer is None:
        raise NotAvailable(f"{model.arch} has no word-embedding layer to attribute the query to")
    text = query.text
    tokens = {k: v.to(model.device) for k, v in model.tokenize([text]).items()}
    positions, words = _word_positions(model, tokens, text)
    ids_key = "input_ids" if "input_ids" in tokens else "ids"
    ids = tokens[ids_key]
    with torch.no_grad():
        x = emb_layer(ids).detach().float()  # (1, L, E)
        pad_id = _pad_id(model)
        x0 = x.clone()
        if positions:
            x0[0, positions] = emb_layer(torch.full((1, 1), pad_id, dtype=ids.dtype, device=ids.device))[0, 0].float()
        istates = model.image_states(pixels[:1])
    n = max(1, int(steps)) if attribution == "ig" else 1
    alphas = ((torch.arange(n, dtype=x.dtype, device=x.device) + 0.5) / n) if attribution == "ig" else torch.ones(1)
    path = (x0 + alphas[:, None, None] * (x - x0)).requires_grad_(True)  # (n, L, E)
    batch = {k: v.expand(n, *v.shape[1:]) if v.dim() > 1 else v.expand(n) for k, v in tokens.items()}
    me = threading.get_ident()
    h = emb_layer.register_forward_hook(lambda mod, inp, out: path.to(out.dtype) if threading.get_ident() == me else None)
    try:
        with torch.enable_grad():
            tstates = model.text_states_from(model.text_features(batch))
            scores = model.score(istates, tstates)[0]  # (n,)
    finally:
        h.remove()
    if not scores.requires_grad:
        raise NotAvailable(f"{model.arch}'s similarity does not depend on its word embeddings")
    (g,) = torch.autograd.grad(scores.sum(), path, allow_unused=True)
    if g is None:
        raise NotAvailable(f"{model.arch}'s similarity does not depend on its word embeddings")
    if attribution == "ig":
        attr_t = ((x - x0)[0] * g.mean(0)).sum(-1)
    else:
        attr_t = (x[0] * g[0]).sum(-1)
    attr = attr_t.float().cpu().numpy()[positions]
    with torch.no_grad():
        score = float(query.target(istates, model)[0])
    info = {
        "source": "integrated gradients on the word embeddings" if attribution == "ig" else "gradient × input on the word embeddings",
        "attribution": attribution,
    }
    if attribution == "ig":
        with torch.no_grad():
            hb = emb_layer.register_forward_hook(lambda mod, inp, out: x0.to(out.dtype) if threading.get_ident() == me else None)
            try:
                s0 = float(model.score(istates, model.text_states_from(model.text_features(tokens)))[0, 0])
            finally:
                hb.remove()
        info.update({"steps": n, "baseline": "[PAD] embedding at every word", "baseline_score": round(s0, 5),
                     "completeness": [round(float(attr.sum()), 5), round(score - s0, 5)]})
    scale = float(np.abs(attr).max()) if attr.size else 0.0
    signed = attr / scale if scale > 0 else np.zeros_like(attr)
    merged_words, merged = _merge_pieces(words, signed)
    mscale = float(np.abs(merged).max()) if merged.size else 0.0
    info.update(
        {
            "signed_word_weights": [round(float(v), 5) for v in signed],
            "raw_attributions": [round(float(v), 6) for v in attr],
            "merged_words": merged_words,
            "merged_weights": [round(float(v / mscale) if mscale > 0 else 0.0, 5) for v in merged],
            "note": "word_weights = positive part of the signed attribution, scaled by the largest |attribution|",
        }
    )
    return MapResult(
        grid=None,
        score=score,
        words=words,
        word_weights=np.clip(signed, 0.0, 1.0).astype(np.float32),
        info=info,
    )


def _pad_id(model) -> int:
    tok = getattr(getattr(model, "text", None), "tokenizer", None)
    pid = getattr(tok, "pad_token_id", None)
    return int(pid) if pid is not None else 0


def _word_positions(model, tokens: dict, text: str) -> tuple[list[int], list[str]]:
    """Positions of the query's words in the token sequence and their display strings."""
    tok = getattr(getattr(model, "text", None), "tokenizer", None)
    if "input_ids" in tokens and tok is not None:
        ids = tokens["input_ids"][0].tolist()
        mask = tokens.get("attention_mask", torch.ones_like(tokens["input_ids"]))[0].tolist()
        special = set(tok.all_special_ids)
        pos = [j for j, (t, m) in enumerate(zip(ids, mask)) if m and t not in special]
        return pos, tok.convert_ids_to_tokens([ids[j] for j in pos])
    if "ids" in tokens:  # word-level vocabulary (GaLR)
        n = int(tokens["lengths"][0]) if "lengths" in tokens else int((tokens["ids"][0] != 0).sum())
        from ..archs.galr.vocab import split_words

        words = split_words(text)[:n]
        vocab = getattr(model, "vocab", None)
        if len(words) != n:
            ids = tokens["ids"][0, :n].tolist()
            words = vocab.decode(ids) if vocab is not None else [str(i) for i in ids]
        elif vocab is not None:
            words = [w if w in vocab.stoi else f"{w} (unknown)" for w in words]
        return list(range(n)), words
    raise NotAvailable(f"cannot tell which tokens of {model.arch} are words")


def _merge_pieces(words: list[str], weights: np.ndarray) -> tuple[list[str], np.ndarray]:
    """WordPiece "##" continuations joined to their word; weights summed."""
    out_w: list[str] = []
    out_v: list[float] = []
    for w, v in zip(words, weights):
        if w.startswith("##") and out_w:
            out_w[-1] += w[2:]
            out_v[-1] += float(v)
        else:
            out_w.append(w)
            out_v.append(float(v))
    return out_w, np.asarray(out_v, dtype=np.float32)
