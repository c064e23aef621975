"""The explain engine: (model, image, query, method) → :class:`Explanation`.

Every method produces a map on some grid of the *model input* (the image squashed to
``model.image_size`` or ``input_size``), then :func:`finish_map` rectifies it,
upsamples it bilinearly to the image's own resolution, optionally smooths it and
min–max scales it to [0, 1]. The quantity explained is always the retrieval
similarity of the pair (``model.score``), never a class logit.

No Qt here: the GUI calls :func:`explain` from a worker thread.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from ..archs.base import ExplainMaps, RetrievalModel, check_query
from ..data import load_image
from ..errors import NotAvailable, QueryError

METHODS = ("gradcam", "gradcam++", "scorecam", "rollout", "chefer", "maskclip", "surgery", "attention", "patch", "tokens", "words")
# what each method is called where people read it (the explain panel, reports)
METHOD_LABELS = {
    "gradcam": "Grad-CAM", "gradcam++": "Grad-CAM++", "scorecam": "Score-CAM", "rollout": "Attention rollout",
    "chefer": "Gradient-weighted attention (Chefer)", "maskclip": "Dense patch–text similarity (MaskCLIP)",
    "surgery": "CLIP Surgery (MaskCLIP, corrected)", "attention": "Attention", "patch": "Patch similarity",
    "tokens": "Semantic tokens", "words": "Word attention",
}
CAM_METHODS = ("gradcam", "gradcam++", "scorecam")
HEATMAP_METHODS = tuple(m for m in METHODS if m != "words")

# image maps of ``explain_maps`` that depend on the text (dropped for image queries)
TEXT_DEPENDENT_MAPS = ("cross/text", "similarity")
# preferred primary map of ``attention``, first present wins (SPEC §5 figures:
# GaLR MVSA mask, CMPAGL Gswin last-layer attention, CMER focus layer, MSSA PSCJA)
PRIMARY_ATTENTION = (
    "mvsa",
    "gswin/last",
    "focus/s32",
    "focus/s16",
    "focus/s8",
    "pscja/s16",
    "pscja/s8",
    "pscja/s32",
    "cross/text",
    "similarity",
)
# placeholder text for architectures whose explain_maps needs one when the query is an image
IMAGE_QUERY_TEXT = "an aerial image"


@dataclass
class Explanation:
    method: str
    text: Optional[str]
    image: Image.Image  # RGB input as given (original resolution)
    heatmap: Optional[np.ndarray]  # (H, W) float32 in [0, 1] at the image's resolution; None for "words"
    score: float  # the image–text (or image–image) similarity that was explained
    words: Optional[list[str]] = None  # word pieces of the query (no special tokens)
    word_weights: Optional[np.ndarray] = None  # (len(words),) or (n_rows, len(words))
    word_rows: Optional[list[str]] = None  # row names for 2-D word_weights
    grids: dict[str, np.ndarray] = field(default_factory=dict)  # name → (n, h, w) in [0, 1]
    grid_words: dict[str, list[list[str]]] = field(default_factory=dict)
    layer: Optional[str] = None
    info: dict = field(default_factory=dict)

    @property
    def query(self) -> str:
        """What was explained, for captions: the text or ``[image query]``."""
        return self.text if self.text is not None else str(self.info.get("query_image", "[image query]"))


# ---- queries and targets ---------------------------------------------------------------
class SimilarityTarget:
    """The image–text similarity as a differentiable target (pytorch-grad-cam style).

    ``target(image_states, model) -> (B,)``: the score of each image with the text(s).
    One text: every image against it. ``paired=True`` with B texts: image i against
    text i (the diagonal; used by the faithfulness evaluation). Pairwise
    architectures (MSSA) go through ``model.score`` like the others.
    """

    def __init__(self, text_states: dict[str, torch.Tensor], paired: bool = False):
        self.text_states = text_states
        self.paired = paired

    def __call__(self, image_states: dict[str, torch.Tensor], model: RetrievalModel) -> torch.Tensor:
        s = model.score(image_states, self.text_states)
        if self.paired:
            return torch.diagonal(s)
        return s[:, 0]


class ImageSimilarityTarget:
    """Cosine of each image's embedding with a query image's (image → image search)."""

    def __init__(self, image_states: dict[str, torch.Tensor]):
        self.image_states = image_states

    def __call__(self, image_states: dict[str, torch.Tensor], model: RetrievalModel) -> torch.Tensor:
        q = self.image_states["emb"].to(image_states["emb"].dtype)
        return (image_states["emb"] * q[:1]).sum(-1)


@dataclass
class Query:
    text: Optional[str]
    image: Optional[Image.Image]
    states: dict[str, torch.Tensor]
    target: Any  # SimilarityTarget | ImageSimilarityTarget

    @property
    def is_text(self) -> bool:
        return self.text is not None

    @property
    def emb(self) -> torch.Tensor:
        return self.states["emb"][0]


def as_rgb_image(image: Any) -> Image.Image:
    """PIL image or path → RGB PIL image (one-line :class:`ImageError` for bad files)."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, (str, Path)):
        return load_image(image)
    raise QueryError(f"image must be a PIL image or a path, not {type(image).__name__}")


@torch.no_grad()
def make_query(model: RetrievalModel, text: Optional[str] = None, query_image: Any = None, input_size: Optional[int] = None) -> Query:
    """Encode the query once (no gradient) and wrap it in its target."""
    if (text is None) == (query_image is None):
        raise QueryError("give either a query text or a query image")
    dev = model.device
    if text is not None:
        text = check_query(text)
        states = {k: v.to(dev) for k, v in model.text_states([text]).items()}
        return Query(text, None, states, SimilarityTarget(states))
    qimg = as_rgb_image(query_image)
    states = {k: v.to(dev) for k, v in model.image_states(model.preprocess([qimg], input_size).to(dev)).items()}
    return Query(None, qimg, states, ImageSimilarityTarget(states))


# ---- maps ------------------------------------------------------------------------------
def upsample(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(h, w) map → (H, W) for ``size = (W, H)``, bilinear (half-pixel centres, like
    ``F.interpolate(align_corners=False)``)."""
    import cv2

    g = np.asarray(grid, dtype=np.float32)
    w, h = int(size[0]), int(size[1])
    if g.shape == (h, w):
        return g.copy()
    return cv2.resize(g, (w, h), interpolation=cv2.INTER_LINEAR)


def minmax(x: np.ndarray) -> np.ndarray:
    """Scale to [0, 1]; a constant map becomes all zeros (nothing stands out)."""
    x = np.nan_to_num(np.asarray(x, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(x.min()) if x.size else 0.0, float(x.max()) if x.size else 0.0
    if hi - lo <= 1e-12 * max(1.0, abs(hi)):
        return np.zeros_like(x, dtype=np.float32)
    return ((x - lo) / (hi - lo)).astype(np.float32)


def smooth_map(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian smoothing, ``sigma`` in output pixels (0: none)."""
    if not sigma or sigma <= 0:
        return x
    import cv2

    return cv2.GaussianBlur(x, (0, 0), sigmaX=float(sigma), borderType=cv2.BORDER_REFLECT)


def finish_map(grid: np.ndarray, size: tuple[int, int], rectify: bool = False, smooth: float = 0.0) -> np.ndarray:
    """Grid map → (H, W) float32 in [0, 1]: optional ReLU, bilinear upsampling, optional
    Gaussian smoothing (``smooth`` = sigma as a fraction of the shorter side when < 1,
    else pixels), min–max scaling."""
    g = np.asarray(grid, dtype=np.float32)
    if rectify:
        g = np.maximum(g, 0.0)
    out = upsample(g, size)
    if smooth and smooth > 0:
        sigma = smooth * min(size) if smooth < 1 else smooth
        out = smooth_map(out, sigma)
    return minmax(out)


def normalise_grid(stack: np.ndarray) -> np.ndarray:
    """(n, h, w) → each map min–max scaled to [0, 1] (float32)."""
    stack = np.asarray(stack, dtype=np.float32)
    if stack.ndim == 2:
        stack = stack[None]
    return np.stack([minmax(m) for m in stack]) if len(stack) else stack


def map_stats(heatmap: np.ndarray) -> dict:
    """Statistics of a [0, 1] map: min/max/mean, peak (x, y) in image pixels, the peak
    as a fraction of the size, normalised Shannon entropy of the map taken as a
    distribution (1 = uniform, 0 = one pixel) and the share of the mass in the top 10 %
    of pixels."""
    h = np.asarray(heatmap, dtype=np.float64)
    H, W = h.shape
    iy, ix = np.unravel_index(int(np.argmax(h)), h.shape)
    total = h.sum()
    if total > 0 and h.size > 1:
        p = h.ravel() / total
        nz = p[p > 0]
        entropy = float(-(nz * np.log(nz)).sum() / np.log(p.size))
        k = max(1, int(round(0.1 * p.size)))
        top10 = float(np.partition(p, p.size - k)[-k:].sum())
    else:
        entropy, top10 = 0.0, 0.0
    return {
        "min": float(h.min()),
        "max": float(h.max()),
        "mean": float(h.mean()),
        "peak": [int(ix), int(iy)],
        "peak_fraction": [round((ix + 0.5) / W, 4), round((iy + 0.5) / H, 4)],
        "entropy": round(entropy, 4),
        "top10_mass": round(top10, 4),
        "size": [int(W), int(H)],
    }


# ---- capabilities ------------------------------------------------------------------------
def cam_layers(model: RetrievalModel) -> dict[str, torch.nn.Module]:
    """``model.gradcam_layers()``; for a ViT backbone whose architecture lists none, the
    backbone's final LayerNorm (the token grid every head reads)."""
    layers = dict(model.gradcam_layers())
    if layers:
        return layers
    from ..nets.vit import HFViT

    bb = getattr(model, "backbone", None)
    if bb is not None and hasattr(bb, "set_keep_attention") and hasattr(bb, "norm"):
        layers["backbone.norm"] = bb.norm
        layers[f"backbone.blocks.{len(bb.blocks) - 1}"] = bb.blocks[-1]
    elif isinstance(bb, HFViT):
        layers["backbone.model.layernorm"] = bb.model.layernorm
    return layers


def gradcam_layer_names(model: RetrievalModel) -> list[str]:
    """Grad-CAM target layers the architecture offers (``gradcam_layers()``); the first is
    the preset."""
    return list(cam_layers(model).keys())


def resolve_layer(model: RetrievalModel, layer: Optional[str]) -> tuple[str, torch.nn.Module]:
    layers = cam_layers(model)
    if layer is not None and layer in layers:
        return layer, layers[layer]
    if layer is not None:
        try:  # any module path of the model, e.g. "backbone._blocks.10"
            return layer, model.get_submodule(layer)
        except AttributeError:
            presets = f"; presets: {', '.join(layers)}" if layers else ""
            raise QueryError(f"unknown layer {layer!r}{presets}") from None
    if not layers:
        raise NotAvailable(f"{model.arch} offers no Grad-CAM layer (gradcam_layers() is empty)")
    name = next(iter(layers))
    return name, layers[name]


def overrides(model: RetrievalModel, name: str) -> bool:
    return getattr(type(model), name, None) is not getattr(RetrievalModel, name)


def has_image_attention(model: RetrievalModel) -> bool:
    """Image-side modules that can keep their attention (ViT blocks, Gswin, focus layers)."""
    from ..nets.vit import HFViT

    bb = getattr(model, "backbone", None)
    if bb is not None and (hasattr(bb, "set_keep_attention") or isinstance(bb, HFViT)):
        return True
    text = getattr(model, "text", None)
    text_mods = set(map(id, text.modules())) if isinstance(text, torch.nn.Module) else set()
    for name, m in model.named_modules():
        if id(m) in text_mods or name.startswith(("text.", "fusion.", "momentum")):
            continue
        if hasattr(m, "keep_attention"):
            return True
    return False


_PROBES: "weakref.WeakKeyDictionary[RetrievalModel, ExplainMaps]" = weakref.WeakKeyDictionary()
_PROBE_ERRORS: "weakref.WeakKeyDictionary[RetrievalModel, str]" = weakref.WeakKeyDictionary()
log = logging.getLogger("rsviewer.explain")
# the methods whose availability comes from the explain_maps probe
PROBED_METHODS = ("rollout", "attention", "tokens", "words")


def probe_maps(model: RetrievalModel) -> ExplainMaps:
    """What ``explain_maps`` returns (keys and shapes), from one small cached call on a
    fixed noise image; empty for architectures that do not override it."""
    if not overrides(model, "explain_maps"):
        return ExplainMaps()
    if model in _PROBES:
        return _PROBES[model]
    g = np.random.default_rng(0)
    s = model.image_size
    img = Image.fromarray(g.integers(0, 256, (s, s, 3), dtype=np.uint8))
    try:
        with torch.no_grad():
            ex = model.explain_maps(model.preprocess([img]).to(model.device), "a tennis court")
    except (NotAvailable, NotImplementedError):  # the architecture says "no maps": not a failure
        ex = ExplainMaps()
    except Exception as e:  # noqa: BLE001 — a crash is a bug: remembered, logged, listed as broken
        _PROBE_ERRORS[model] = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        log.warning("explain_maps() of %s failed on the probe image: %s", model.arch, _PROBE_ERRORS[model])
        log.debug("explain_maps() probe traceback", exc_info=True)
        ex = ExplainMaps()
    _PROBES[model] = ex
    return ex


def probe_error(model: RetrievalModel) -> Optional[str]:
    """Why the ``explain_maps`` probe of ``model`` crashed (``None`` if it did not, or has not run)."""
    return _PROBE_ERRORS.get(model)


def word_embedding_layer(model: RetrievalModel) -> Optional[torch.nn.Module]:
    """The text encoder's input word-embedding layer (for gradient × input)."""
    fn = getattr(model, "word_embedding_layer", None)
    if callable(fn):
        return fn()
    text = getattr(model, "text", None)
    bert = getattr(text, "bert", None)
    emb = getattr(getattr(bert, "embeddings", None), "word_embeddings", None)
    if isinstance(emb, torch.nn.Module):
        return emb
    for name in ("embedding", "embed"):  # archs/clip.TextInfo (CLIP towers), GaLR's own embedding
        emb = getattr(text, name, None)
        if isinstance(emb, torch.nn.Embedding):
            return emb
    return None
