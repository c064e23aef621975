"""The one interface every retrieval architecture implements (timm-style uniformity).

A model is split into a **frozen part** and a **trained head**, on both sides:

    pixels --image_features()--> feats --image_head()--> image embedding (B, D), unit norm
    texts  --tokenize()/text_features()--> feats --text_head()--> text embedding (B, D)

``image_features``/``text_features`` must be deterministic functions of frozen
weights: the trainer caches their output once (per image view / caption) so CPU
training takes minutes. End-to-end training (``train --end-to-end``) makes the towers
trainable (:meth:`RetrievalModel.tune_end_to_end`) and runs the same two functions with
gradient on every step's pixels and tokens, then the same ``training_loss``. An
architecture that cannot be cached at all sets ``cache_features = False`` and trains
end to end only.

Scoring is ``score(image_states, text_states) -> (Ni, Nt)``. For dual encoders the
states are the embeddings and the score is their dot product. Architectures whose
score needs the pair together (MSSA's IGTA makes the text vector depend on the image)
set ``pairwise = True`` and keep richer states; search then goes two-stage
(embedding candidates, pairwise rescoring), evaluation uses full pairwise scores.

Everything an architecture exposes for explanations goes through ``explain_maps``
(one documented structure, :class:`ExplainMaps`) and ``gradcam_layers``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import QueryError
from ..nets.text import MAX_QUERY_CHARS
from ..nets.weights import WeightsRef


@dataclass
class BaseConfig:
    """Hyper-parameters common to all architectures; each arch extends it."""

    image_backbone: str = "efficientnet-lite0"
    image_weights: Optional[str] = None  # None: packaged ImageNet weights; path; "random"
    text_weights: Optional[str] = None  # None: packaged MiniLM-L6; a local HF folder
    image_size: int = 256  # UCM tiles are 256 px; backbones are fully convolutional
    embed_dim: int = 256
    max_tokens: int = 40

    @classmethod
    def from_dict(cls, d: dict) -> "BaseConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown config keys for {cls.__qualname__}: {sorted(unknown)}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ExplainMaps:
    """What an architecture shows in its paper's figures, for one (image, text) pair.

    - ``image_maps``: name → (h, w) float array over the image grid (values ≥ 0; the
      explain engine normalises and upsamples), e.g. ``"mvsa"``, ``"gswin/last"``,
      ``"focus"``, ``"pscja/s16"``.
    - ``token_maps``: name → (n_tokens, h, w) (MSSA semantic tokens per scale).
    - ``token_words``: name → (n_tokens, n_words) attention of each semantic token over
      the words of the text (MSSA), aligned with ``words``.
    - ``word_weights``: name → (n_scales_or_1, n_words) (IGTA word attention).
    - ``words``: the word pieces of the text (special tokens removed).
    - ``extra``: anything else (e.g. GaLR's object graph: boxes, adjacency).
    """

    image_maps: dict[str, np.ndarray] = field(default_factory=dict)
    token_maps: dict[str, np.ndarray] = field(default_factory=dict)
    token_words: dict[str, np.ndarray] = field(default_factory=dict)
    word_weights: dict[str, np.ndarray] = field(default_factory=dict)
    words: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def check_query(text: str) -> str:
    """Refuse empty and absurdly long queries with one clear line."""
    if not isinstance(text, str) or not text.strip():
        raise QueryError("the query text is empty")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"the query is {len(text):,} characters long; the limit is {MAX_QUERY_CHARS:,}")
    return text.strip()



def make_head(din: int, dout: int, kind: str, hidden: int, dropout: float) -> nn.Module:
    """Projection head shared by the architectures: LayerNorm + Linear, or a 2-layer GELU MLP."""
    if kind == "linear":
        return nn.Sequential(nn.LayerNorm(din), nn.Linear(din, dout))
    if kind == "mlp":
        return nn.Sequential(
            nn.LayerNorm(din), nn.Linear(din, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dout)
        )
    raise ValueError(f"unknown head {kind!r}; use linear or mlp")


def backbone_cam_layers(bb: nn.Module, names: Sequence[str] = ("head", "s32", "s16")) -> dict[str, nn.Module]:
    """Grad-CAM preset layers of a backbone, in the order of ``names`` (first = preset),
    as ``{"backbone.<name>": module}``; the backbone's ``cam_layers()`` says which module
    plays each role. Backbones without it (ViT) give none."""
    table = bb.cam_layers() if callable(getattr(bb, "cam_layers", None)) else {}
    out: dict[str, nn.Module] = {}
    for n in names:
        if n in table:
            key, mod = table[n]
            out.setdefault(f"backbone.{key}", mod)
    return out


class RetrievalModel(nn.Module):
    """Base class; subclasses set ``arch``, ``Config`` and implement the abstract parts."""

    arch: ClassVar[str] = ""
    Config: ClassVar[type[BaseConfig]] = BaseConfig
    pairwise: ClassVar[bool] = False
    cache_features: ClassVar[bool] = True
    # Where a loaded model came from, set by ``checkpoint.load_model`` (absent on a model
    # built in memory, hence annotations only: ``getattr(model, "fingerprint", ...)`` keeps
    # working): its name, the rsviewer folder or foreign file/folder, the fingerprint that
    # indexes and caches are keyed on, and the model format it was opened as.
    name: str
    model_dir: Any
    fingerprint: str
    model_format: str

    @property
    def source(self) -> dict:
        """``{"name", "path", "fingerprint", "format"}`` of a loaded model (None values if built in memory)."""
        path = getattr(self, "model_dir", None)
        return {"name": getattr(self, "name", None), "path": str(path) if path is not None else None,
                "fingerprint": getattr(self, "fingerprint", None), "format": getattr(self, "model_format", None)}

    def __init__(self, cfg: BaseConfig, extra: Optional[dict] = None):
        """``extra``: JSON state that is not a tensor (e.g. GaLR's vocabulary), as returned
        by :meth:`extra_config` at save time; ``None`` for a fresh model."""
        super().__init__()
        self.cfg = cfg
        # module path -> WeightsRef of the frozen pretrained base loaded into it
        self.bases: dict[str, Optional[WeightsRef]] = {}
        # state-dict prefixes inside a base that are trained anyway (partial fine-tuning)
        self.finetuned: list[str] = []
        self.mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
        self.std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    # ---- geometry ---------------------------------------------------------------------
    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # ---- preprocessing -------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image], size: Optional[int] = None) -> torch.Tensor:
        """RGB PIL images → normalised (B, 3, S, S) float tensor (bicubic resize)."""
        s = size or self.image_size
        arrs = [
            np.asarray(im.convert("RGB").resize((s, s), Image.BICUBIC), dtype=np.float32) for im in images
        ]
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).div_(255.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def preprocess_array(self, batch: np.ndarray) -> torch.Tensor:
        """(B, S, S, 3) uint8 array already at model size → normalised tensor (fast path for tiles)."""
        x = torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # ---- the frozen / trained split -----------------------------------------------------
    def image_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def image_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def text_features(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def text_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    feature_version: ClassVar[str] = "1"  # bump when image/text_features change meaning
    # config fields that change the frozen features (others only change the heads)
    feature_keys: ClassVar[dict[str, tuple[str, ...]]] = {
        "image": ("image_backbone", "image_weights", "image_size"),
        "text": ("text_weights", "max_tokens"),
    }

    def feature_signature(self, side: str) -> dict:
        """What determines ``{side}_features`` output — the feature-cache key."""
        bases = {}
        for prefix, ref in self.bases.items():
            if f"{prefix}." in self.finetuned:  # tuned end to end: its trained values decide the features
                bases[prefix] = _tensor_digest(self.get_submodule(prefix))
            elif ref is not None:
                bases[prefix] = ref.sha256
            else:  # random/untrained base (tests): fingerprint the actual tensors
                mod = self.get_submodule(prefix)
                bases[prefix] = repr([round(float(p.double().sum()), 6) for p in mod.parameters()][:50])
        return {
            "class": f"{type(self).__module__}.{type(self).__name__}",
            "side": side,
            "version": self.feature_version,
            "cache_format": 2,  # 2: features computed in eval mode
            "normalize": [list(self.mean), list(self.std)] if side == "image" else None,
            "bases": bases,
            "config": {k: getattr(self.cfg, k) for k in self.feature_keys.get(side, ())},
        }

    # ---- uniform inference API --------------------------------------------------------
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.image_head(self.image_features(pixels))

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        texts = [check_query(t) for t in texts]
        tokens = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        return self.text_head(self.text_features(tokens))

    # States are what scoring needs per item. They default to the embeddings; pairwise
    # architectures override ``*_states_from`` and ``score``. The ``*_from`` forms take
    # frozen features, so evaluation during training runs on the feature cache.
    def image_states_from(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"emb": self.image_head(feats)}

    def text_states_from(self, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"emb": self.text_head(feats)}

    def image_states(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.image_states_from(self.image_features(pixels))

    def text_states(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        texts = [check_query(t) for t in texts]
        tokens = {k: v.to(self.device) for k, v in self.tokenize(texts).items()}
        return self.text_states_from(self.text_features(tokens))

    def score(self, image_states: dict[str, torch.Tensor], text_states: dict[str, torch.Tensor]) -> torch.Tensor:
        return image_states["emb"] @ text_states["emb"].T

    # ---- training ------------------------------------------------------------------------
    def training_loss(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Loss terms for one batch; ``"loss"`` is the total that is back-propagated.

        ``batch`` has ``image_feats`` and ``text_feats`` (dicts of (B, ...) tensors, the
        outputs of the frozen parts), ``image_index`` (B,), ``label_index`` (B,) (−1 if
        unknown), ``captions`` (list[str]) and ``step``/``epoch``.
        """
        raise NotImplementedError

    # ---- explanations ---------------------------------------------------------------------
    def gradcam_layers(self) -> dict[str, nn.Module]:
        """Candidate Grad-CAM target layers, first one is the preset."""
        return {}

    def explain_maps(self, pixels: torch.Tensor, text: str) -> ExplainMaps:
        """The architecture's own maps (attention, tokens, masks) for one pair."""
        return ExplainMaps()

    # ---- checkpoints ---------------------------------------------------------------------
    def extra_config(self) -> Optional[dict]:
        """Non-tensor state saved in config.json (e.g. a vocabulary); ``None`` if none."""
        return None

    def prepare_training(self, captions: Sequence[str], labels: Sequence[Optional[str]]) -> None:
        """Called once by the trainer before feature caching (e.g. build a vocabulary)."""

    def trained_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors to save: everything except frozen bases (minus fine-tuned parts)."""
        base_prefixes = tuple(p + "." for p in self.bases)
        keep = tuple(self.finetuned)
        out = {}
        for k, v in self.state_dict().items():
            if k.startswith(base_prefixes) and not k.startswith(keep):
                continue
            out[k] = v.detach().cpu().contiguous()
        return out

    # partial fine-tuning of the image backbone (``tune_backbone_from``); None = frozen
    image_split: Optional[str] = None

    def tune_backbone_from(self, tap: Optional[str]) -> Optional[str]:
        """Train the backbone layers past ``tap`` ("s8" | "s16"; falsy = keep it frozen):
        they join ``finetuned`` and learn at ``cfg.backbone_lr_scale`` × lr. Returns the tap,
        also kept as ``image_split``; the architecture's features/head do the split."""
        self.image_split = tap or None
        if self.image_split:
            if not hasattr(self.backbone, "prefixes_after"):
                raise ValueError(f"{self.cfg.image_backbone} cannot be partly fine-tuned (no stage split)")
            self.finetuned += [f"backbone.{p}" for p in self.backbone.prefixes_after(self.image_split)]
        return self.image_split

    def tune_end_to_end(self, image_from: str = "all", text_from: str = "all") -> dict[str, list[str]]:
        """Make the pretrained towers trainable for end-to-end training (train/end_to_end.py):
        ``image_from`` "all" | a backbone tap ("s8", "s16": the layers after it) | "none";
        ``text_from`` "all" (embeddings too) | a layer number N (layers N.. of the encoder) |
        "none". The prefixes join ``finetuned`` (saved in config.json, so the checkpoint
        carries the tuned tower weights); returns them by side (``{"image": [...], "text":
        [...]}``, the trainer gives each side its learning-rate multiplier)."""
        image: list[str] = []
        text: list[str] = []
        if "backbone" in self.bases and image_from not in ("none", ""):
            if image_from == "all":
                image.append("backbone.")
            elif hasattr(self.backbone, "prefixes_after"):
                image += [f"backbone.{p}" for p in self.backbone.prefixes_after(image_from)]
            else:
                raise ValueError(f"{self.cfg.image_backbone} cannot be fine-tuned from {image_from!r}; use all or none")
        if "text" in self.bases and text_from not in ("none", ""):
            if text_from == "all":
                text.append("text.")
            else:
                n = self.text.num_layers
                try:
                    first = int(text_from)
                except ValueError:
                    raise ValueError(f"text_from must be all, none or a layer number 0..{n - 1}, got {text_from!r}") from None
                if not 0 <= first < n:
                    raise ValueError(f"text_from must be a layer number 0..{n - 1}, got {first}")
                text += [f"text.bert.encoder.layer.{i}." for i in range(first, n)]
        self.finetuned = list(dict.fromkeys(self.finetuned + image + text))
        return {"image": image, "text": text}

    def lr_scales(self) -> dict[str, float]:
        """Learning-rate multipliers by parameter-name prefix (e.g. a fine-tuned backbone
        learns slower than the new heads); the trainer applies the first prefix that matches."""
        return {"backbone.": self.cfg.backbone_lr_scale} if self.image_split else {}

    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        trained = sum(v.numel() for v in self.trained_state_dict().values() if v.is_floating_point())
        return {"total": int(total), "trained": int(trained)}

    def freeze_bases(self) -> None:
        """requires_grad=False and eval() for frozen base parts (BN stats stay ImageNet's)."""
        for prefix in self.bases:
            mod = self.get_submodule(prefix)
            for name, p in mod.named_parameters():
                full = f"{prefix}.{name}"
                p.requires_grad_(any(full.startswith(f) for f in self.finetuned))

    def train(self, mode: bool = True):  # keep frozen bases in eval mode (BatchNorm, dropout)
        super().train(mode)
        for prefix in self.bases:
            self.get_submodule(prefix).eval()
        return self


def _tensor_digest(mod: nn.Module) -> str:
    """sha256 over a module's parameters and buffers (names, shapes and bytes)."""
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(mod.state_dict().items()):
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update(t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:24]


def l2n(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
