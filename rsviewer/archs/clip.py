"""``clip`` — the field's own models (SPEC §11): OpenAI/open_clip-layout checkpoints
(RemoteCLIP, GeoRSCLIP, SkyCLIP; ViT and ModifiedResNet) and any Hugging Face dual
encoder folder, behind the one :class:`RetrievalModel` interface.

The foreign weights are a frozen base referenced by path and sha256 (never copied);
the model has no trained tensors of its own. Preprocessing is the model's own: resize
of the short side and centre crop (or a squash), its mean/std, its interpolation.
Scores are cosines; ``calibrate`` turns them into the model's own probabilities
(softmax at its logit scale, or SigLIP's sigmoid with its bias).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import ModelError
from ..nets.weights import WeightsRef
from .base import BaseConfig, RetrievalModel, l2n
from .registry import register

INTERP = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "lanczos": Image.LANCZOS}


def trim_pads(ids: torch.Tensor) -> torch.Tensor:
    """Cut the padding after the batch's last end token. Under the causal mask nothing after
    a sequence's end token reaches its pooled state, so the embeddings are unchanged; a short
    query runs ~8 positions instead of 77 (about 5x less text compute)."""
    from ..nets.clip.tokenizer import EOT

    if ids.numel() == 0:
        return ids
    is_end = ids == EOT
    last = int(torch.where(is_end.any(1), is_end.int().argmax(1), ids.shape[1] - 1).max())
    return ids[:, : last + 1].contiguous()


@dataclass
class ClipConfig(BaseConfig):
    image_backbone: str = "clip"
    layout: str = "openai-vit"  # "openai-vit" | "openai-rn" | "hf"
    weights: str = ""  # the foreign file or folder (absolute path)
    sha256: str = ""  # when set (imported models) the weights must have this hash
    model: dict = field(default_factory=dict)  # the inferred tower configuration (openai layouts)
    overrides: dict = field(default_factory=dict)  # --set values applied on top of the inference
    resize: str = "shortest"  # "shortest" (short side, then centre crop) | "squash"
    resize_size: int = 224
    interpolation: str = "bicubic"
    mean: list = field(default_factory=lambda: [0.48145466, 0.4578275, 0.40821073])
    std: list = field(default_factory=lambda: [0.26862954, 0.26130258, 0.27577711])
    caption_prefix: str = ""  # e.g. SkyCLIP's "a satellite image. "
    # trained heads on the frozen CLIP embeddings (``rsviewer train --arch clip``): "none"
    # (the model as published) | "linear" | "mlp" — residual adapters whose last layer
    # starts at zero, so training starts from the published model (CLIP-Adapter style)
    head: str = "none"
    hidden: int = 512
    dropout: float = 0.1
    loss: str = "both"  # infonce | triplet | both (rsviewer.train.losses)
    label_alpha: float = 0.5
    margin: float = 0.2
    temperature: float = 0.05
    image_size: int = 224
    embed_dim: int = 512
    max_tokens: int = 77


@register
class Clip(RetrievalModel):
    arch = "clip"
    Config = ClipConfig
    train_defaults = {"epochs": 10, "views": 2}
    feature_keys = {
        "image": ("layout", "weights", "sha256", "model", "overrides", "resize", "resize_size", "interpolation", "image_size"),
        "text": ("layout", "weights", "sha256", "model", "overrides", "caption_prefix", "max_tokens"),
    }

    def __init__(self, cfg: ClipConfig, extra=None):
        super().__init__(cfg, extra)
        from ..nets.clip.hashing import sha256_cached

        if not cfg.weights:
            raise ModelError("a clip model needs weights: --set weights=PATH (an OpenAI/open_clip file or a Hugging Face folder)")
        path = Path(cfg.weights).expanduser()
        cfg.weights = str(path.resolve())
        if not path.exists():
            raise ModelError(f"the weights {path} this model refers to are missing")
        if not cfg.model:  # built from hyper-parameters (rsviewer train --arch clip): infer the rest
            inferred, _ = config_for(path, cfg.overrides, cfg.caption_prefix or None)
            for f in ("layout", "model", "resize", "resize_size", "interpolation", "mean", "std",
                      "caption_prefix", "image_size", "embed_dim", "max_tokens"):
                setattr(cfg, f, getattr(inferred, f))
        digest = sha256_cached(path)
        if cfg.sha256 and digest != cfg.sha256:
            raise ModelError(f"{path} changed since it was imported (sha256 {digest[:12]}…, expected {cfg.sha256[:12]}…); re-import it")
        self.tower = build_tower(cfg, path)
        self.bases = {"tower": WeightsRef(path=str(path.resolve()), sha256=digest)}
        self.mean, self.std = tuple(cfg.mean), tuple(cfg.std)
        self.weights_sha256 = digest
        # the numbers this model gives depend on the bytes and on the settings (activation ...)
        self.tower_fingerprint = hashlib.sha256((digest + json.dumps(cfg.to_dict(), sort_keys=True)).encode()).hexdigest()[:16]
        self.last_truncated: list[bool] = []
        if self.tower.kind == "hf":
            self.text = TextInfo(self.tower.tokenizer, _hf_word_embeddings(self.tower.model))
        else:
            from ..nets.clip.tokenizer import get_tokenizer

            self.clip_tokenizer = get_tokenizer(int(cfg.model.get("context_length", cfg.max_tokens)))
            self.text = TextInfo(HFStyleTokenizer(self.clip_tokenizer), self._token_embedding())
        if cfg.head != "none":
            self.image_adapter = _adapter(cfg.embed_dim, cfg.head, cfg.hidden, cfg.dropout)
            self.text_adapter = _adapter(cfg.embed_dim, cfg.head, cfg.hidden, cfg.dropout)
            self.train_logit_scale = nn.Parameter(torch.tensor(float(np.log(1.0 / cfg.temperature))))
        self.freeze_bases()

    # ---- helpers ----------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.tower.kind

    def _token_embedding(self) -> nn.Embedding:
        t = self.tower
        tm = t.clip.text_model if t.kind == "vit" else t.text.text_model
        return tm.embeddings.token_embedding

    def logit_scale_bias(self) -> tuple[float, float]:
        t = self.tower
        if t.kind == "hf":
            return t.logit_scale_bias()
        ls = t.clip.logit_scale if t.kind == "vit" else t.logit_scale
        return float(ls.exp().clamp(max=100.0)), 0.0

    @property
    def sigmoid_scores(self) -> bool:
        return self.tower.kind == "hf" and self.tower.sigmoid

    @property
    def calibration_name(self) -> str:
        s, b = self.logit_scale_bias()
        return f"sigmoid({s:.3g}·cos {b:+.3g})" if self.sigmoid_scores else f"softmax({s:.3g}·cos) over the classes"

    def calibrate(self, cos: torch.Tensor) -> torch.Tensor:
        """Cosines (N, C) → the model's own probabilities: softmax over the C classes at
        its logit scale (CLIP), or independent sigmoid(scale·cos + bias) (SigLIP)."""
        s, b = self.logit_scale_bias()
        if self.sigmoid_scores:
            return torch.sigmoid(cos * s + b)
        return torch.softmax(cos * s, -1)

    # ---- preprocessing ------------------------------------------------------------------------
    def preprocess(self, images: Sequence[Image.Image], size: Optional[int] = None) -> torch.Tensor:
        """The model's own: short side to ``resize_size`` then centre crop (or a squash)."""
        s = int(size or self.image_size)
        rs = int(round(self.cfg.resize_size * s / self.image_size))
        interp = INTERP.get(self.cfg.interpolation, Image.BICUBIC)
        arrs = []
        for im in images:
            im = im.convert("RGB")
            if self.cfg.resize == "shortest":
                w, h = im.size
                if w <= h:
                    nw, nh = rs, int(rs * h / w)
                else:
                    nw, nh = int(rs * w / h), rs
                im = im.resize((nw, nh), interp)
                left, top = int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))
                im = im.crop((left, top, left + s, top + s))
            else:
                im = im.resize((s, s), interp)
            arrs.append(np.asarray(im, dtype=np.float32))
        x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2).div_(255.0)
        return (x - torch.tensor(self.mean).view(1, 3, 1, 1)) / torch.tensor(self.std).view(1, 3, 1, 1)

    # ---- the towers -----------------------------------------------------------------------------
    # OpenAI-layout towers take ids only: the causal mask already hides the pads from the end
    # token (so a mask input would be unused, and the ONNX exporter drops unused inputs).
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        texts = [self.cfg.caption_prefix + t for t in texts]
        if self.tower.kind == "hf":
            tok, self.last_truncated = self.tower.tokenize(texts)
            return tok
        ids, self.last_truncated = self.clip_tokenizer(texts)
        return {"input_ids": trim_pads(ids)}

    def image_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        t = self.tower
        if t.kind == "vit":
            from ..nets.clip.hf import features

            return {"pooled": features(t.clip.get_image_features(pixel_values=pixels))}
        if t.kind == "resnet":
            return {"pooled": t.visual(pixels.to(next(t.visual.parameters()).dtype))}
        return {"pooled": t.encode_image(pixels)}

    def image_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        x = l2n(feats["pooled"].float())
        return l2n(x + self.image_adapter(x)) if self.cfg.head != "none" else x

    def text_features(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from ..nets.clip.hf import features

        t = self.tower
        if t.kind == "hf":
            return {"pooled": t.encode_text(tokens)}
        # no padding mask, as OpenAI: the causal mask already hides the pads from the end token
        ids = tokens["input_ids"]
        if t.kind == "vit":
            return {"pooled": features(t.clip.get_text_features(input_ids=ids))}
        return {"pooled": t.text(input_ids=ids).text_embeds}

    def text_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        x = l2n(feats["pooled"].float())
        return l2n(x + self.text_adapter(x)) if self.cfg.head != "none" else x

    # ---- end-to-end fine-tuning (rsviewer train --arch clip --end-to-end) -----------------------
    def _tower_parts(self) -> dict[str, list[str]]:
        """State-dict prefixes of the tower's image side, text side and its logit scale."""
        t = self.tower
        if t.kind == "resnet":
            root, names = "tower", ["visual", "text"]
        else:
            root = "tower.clip" if t.kind == "vit" else "tower.model"
            names = [n for n, _ in self.get_submodule(root).named_children()]
        owner = self.get_submodule(root)
        return {
            "image": [f"{root}.{n}." for n in names if "vision" in n or "visual" in n],
            "text": [f"{root}.{n}." for n in names if "text" in n],
            "scale": [f"{root}.logit_scale"] if isinstance(getattr(owner, "logit_scale", None), nn.Parameter) else [],
        }

    def tune_end_to_end(self, image_from: str = "all", text_from: str = "all") -> dict[str, list[str]]:
        """Fine-tune the CLIP towers (each side whole, as RemoteCLIP/GeoRSCLIP were trained);
        without adapters (``head`` none) the tower's own logit scale learns as well."""
        for side, v in (("image_from", image_from), ("text_from", text_from)):
            if v not in ("all", "none", ""):
                raise ValueError(f"a CLIP tower is fine-tuned whole per side: {side} all or none, got {v!r}")
        parts = self._tower_parts()
        tuned = {"image": parts["image"] if image_from == "all" else [], "text": parts["text"] if text_from == "all" else []}
        if (tuned["image"] or tuned["text"]) and self.cfg.head == "none":
            tuned["scale"] = parts["scale"]  # a scalar: it learns at the full rate
        self.finetuned = list(dict.fromkeys(self.finetuned + [p for v in tuned.values() for p in v]))
        return tuned

    def _training_scale(self) -> torch.Tensor:
        if self.cfg.head != "none":
            return self.train_logit_scale
        name = next(iter(self._tower_parts()["scale"]), None)
        own = self.get_parameter(name) if name else None
        if own is None or not own.requires_grad:
            raise ModelError("this clip model has no trained head; train with --set head=linear or head=mlp, "
                             "or fine-tune its towers with --end-to-end")
        return own

    def training_loss(self, batch):
        from ..train.losses import contrastive_loss

        scale = self._training_scale().exp().clamp(max=100.0)
        img, txt = self.image_head(batch["image_feats"]), self.text_head(batch["text_feats"])
        return contrastive_loss(img, txt, batch, self.cfg.loss, scale, self.cfg.label_alpha, self.cfg.margin)

    # ---- explanations ------------------------------------------------------------------------------
    def vision_tower(self):
        """transformers' vision transformer (CLIP ViT / HF vision_model) or None (ResNet)."""
        t = self.tower
        if t.kind == "vit":
            return t.clip.vision_model
        if t.kind == "hf":
            return t.vision_model()
        return None

    def has_class_token(self) -> bool:
        vm = self.vision_tower()
        return vm is not None and hasattr(getattr(vm, "embeddings", None), "class_embedding")

    def gradcam_layers(self) -> dict[str, nn.Module]:
        if self.tower.kind == "resnet":
            return {"tower.visual.layer4": self.tower.visual.layer4, "tower.visual.layer3": self.tower.visual.layer3}
        vm = self.vision_tower()
        layers = getattr(getattr(vm, "encoder", None), "layers", None)
        if layers is None or len(layers) < 1:
            return {}
        prefix = "tower.clip.vision_model" if self.tower.kind == "vit" else "tower.model.vision_model"
        n = len(layers)
        # the block before the last is the preset: the last block's patch tokens reach the
        # pooled (class-token) output only through their keys/values, so with a class token
        # their gradient says little (pytorch-grad-cam #460)
        out = {}
        if n >= 2:
            out[f"{prefix}.encoder.layers.{n - 2}"] = layers[n - 2]
        out[f"{prefix}.encoder.layers.{n - 1}"] = layers[n - 1]
        return out

    def vision_forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """(unit image embedding (B, D), attention probabilities per block (B, H, N, N),
        hidden states: embeddings output then each block's output). Differentiable."""
        vm = self.vision_tower()
        if vm is None:
            raise ModelError("this model's image tower is not a transformer")
        out = vm(pixel_values=pixels, output_attentions=True, output_hidden_states=True)
        atts = [a for a in (out.attentions or ()) if a is not None]
        pooled = out.pooler_output
        proj = self._visual_projection()
        emb = proj(pooled) if proj is not None else pooled
        return l2n(emb.float()), atts, list(out.hidden_states)

    def _visual_projection(self):
        t = self.tower
        if t.kind == "vit":
            return t.clip.visual_projection
        return getattr(t.model, "visual_projection", None)

    def dense_features(self, pixels: torch.Tensor, surgery: bool = False) -> torch.Tensor:
        """(B, D, h, w) unit patch embeddings through the last block's value path (MaskCLIP:
        ln_1 → v → out_proj, the query–key mixing and the MLP dropped, then ln_post and the
        projection). ``surgery``: CLIP Surgery's v–v attention instead (softmax(v·vᵀ) v)."""
        if self.tower.kind == "resnet":
            v = self.tower.visual
            trunk = v.trunk(pixels)
            d = v.attnpool.dense(trunk)  # (B, hw, D)
            b, _, h, w = trunk.shape
            return l2n(d.float()).transpose(1, 2).reshape(b, -1, h, w)
        vm = self.vision_tower()
        proj = self._visual_projection()
        if vm is None or proj is None or not self.has_class_token():
            raise ModelError("dense patch features need a CLIP vision transformer with a class token")
        out = vm(pixel_values=pixels, output_hidden_states=True)
        x = out.hidden_states[-2]  # input of the last block
        blk = vm.encoder.layers[-1]
        y = blk.layer_norm1(x)
        at = blk.self_attn
        v = at.v_proj(y)
        if surgery:
            b, n, c = v.shape
            hd = at.num_heads if hasattr(at, "num_heads") else getattr(at.config, "num_attention_heads")
            vh = v.reshape(b, n, hd, c // hd).transpose(1, 2)
            a = torch.softmax(vh @ vh.transpose(-1, -2) * (c // hd) ** -0.5, -1)
            v = (a @ vh).transpose(1, 2).reshape(b, n, c)
        z = at.out_proj(v)
        if surgery:
            z = z + x  # CLIP Surgery keeps the residual of its dual path
        z = proj(vm.post_layernorm(z[:, 1:]))
        b, n, d = z.shape
        g = int(round(n**0.5))
        return l2n(z.float()).transpose(1, 2).reshape(b, d, g, g)

    def explain_maps(self, pixels: torch.Tensor, text: str):
        from .base import ExplainMaps

        if self.tower.kind != "resnet":
            return ExplainMaps()
        ap = self.tower.visual.attnpool
        ap.keep_attention = True
        try:
            self.tower.visual(pixels[:1])
            att = ap.last_attention[0, :, 1:].mean(0)  # (h·w,) the mean-token query over positions
        finally:
            ap.keep_attention = False
            ap.last_attention = None
        dense = self.dense_features(pixels[:1])[0]
        temb = self.encode_text([text])[0].float()
        h, w = dense.shape[-2:]
        sim = torch.einsum("d,dhw->hw", temb, dense)
        return ExplainMaps(image_maps={"attnpool": att.reshape(h, w).cpu().numpy(), "similarity": sim.cpu().numpy()})

    def feature_signature(self, side: str) -> dict:
        sig = super().feature_signature(side)
        sig["bases"] = {"tower": self.tower_fingerprint}
        return sig


def _adapter(dim: int, kind: str, hidden: int, dropout: float) -> nn.Module:
    if kind == "linear":
        last = nn.Linear(dim, dim)
        mods = [last]
    elif kind == "mlp":
        last = nn.Linear(hidden, dim)
        mods = [nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), last]
    else:
        raise ValueError(f"head must be none, linear or mlp, not {kind!r}")
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*mods)


class TextInfo:
    """What the explain engine and classify read from ``model.text``: a tokenizer with the
    usual HF attributes and the word-embedding layer (not a module: no parameters here)."""

    def __init__(self, tokenizer, embedding):
        self.tokenizer = tokenizer
        self.embedding = embedding


class HFStyleTokenizer:
    """The HF tokenizer attributes the explain engine reads, over our CLIP tokenizer."""

    def __init__(self, tok):
        self.tok = tok
        self.pad_token_id = 0
        self.all_special_ids = [tok.sot, tok.eot]
        self.all_special_tokens = [tok.decoder[tok.sot], tok.decoder[tok.eot]]

    def convert_ids_to_tokens(self, ids):
        return [self.tok.decoder[int(i)].replace("</w>", "") for i in ids]

    def get_vocab(self):
        return {k.replace("</w>", ""): v for k, v in self.tok.encoder.items()}


def _hf_word_embeddings(model: nn.Module) -> Optional[nn.Module]:
    """The text tower's input word embeddings of a HF dual encoder (for word attributions)."""
    for owner in (getattr(model, "text_model", None), model):
        try:
            emb = owner.get_input_embeddings() if owner is not None else None
        except (NotImplementedError, AttributeError):
            emb = None
        if isinstance(emb, nn.Embedding):
            return emb
    return None


def build_tower(cfg: ClipConfig, path: Path) -> nn.Module:
    """The CLIP of ``path`` in its format's tower (Hugging Face folder, or OpenAI/open_clip
    state dict); shared by the ``clip`` architecture and the CLIP branch of cmer and lite."""
    if cfg.layout == "hf":
        from ..nets.clip.hf import HFDualEncoder

        return HFDualEncoder(path)
    from ..nets.clip.openai import build_tower as build_openai_tower, read_state_dict

    sd = read_state_dict(path)
    model_cfg = cfg.model
    if not model_cfg:
        from ..nets.clip.openai import infer_config

        model_cfg = infer_config(sd, path.name, cfg.overrides)
    return build_openai_tower(model_cfg, sd, path.name)


def config_for(path: str | Path, overrides: Optional[dict] = None, caption_prefix: Optional[str] = None) -> tuple[ClipConfig, str]:
    """The ``clip`` configuration of a foreign file/folder (inferred) and a one-line
    description of what was inferred."""
    p = Path(path).expanduser().resolve()
    overrides = dict(overrides or {})
    prefix = caption_prefix
    if prefix is None:
        prefix = overrides.pop("caption_prefix", None)
    if prefix is None:
        prefix = "a satellite image. " if "skyclip" in p.name.lower() else ""
    pre_keys = {"resize", "resize_size", "interpolation", "image_size"}
    pre_over = {k: overrides.pop(k) for k in list(overrides) if k in pre_keys}
    if p.is_dir():
        from ..nets.clip.hf import HFDualEncoder, preprocessing

        if overrides:
            raise ModelError(f"--set {', '.join(overrides)}: a Hugging Face folder takes its settings from its own config")
        enc = HFDualEncoder(p)
        pre = preprocessing(p)
        cfg = ClipConfig(layout="hf", weights=str(p), model={"layout": "hf", "model_type": enc.model_type}, resize=pre["resize"], resize_size=pre["resize_size"],
                         interpolation=pre["interpolation"], mean=pre["mean"], std=pre["std"], image_size=pre["image_size"],
                         embed_dim=enc.embed_dim, max_tokens=enc.context, caption_prefix=prefix)
        desc = (f"{enc.model_type} ({type(enc.model).__name__}): {pre['image_size']} px, {pre['resize']} resize "
                f"{pre['interpolation']}, context {enc.context}, embed {enc.embed_dim}"
                + ("; SigLIP sigmoid scores" if enc.sigmoid else ""))
    else:
        from ..nets.clip.openai import MEAN, STD, describe, infer_config, read_state_dict

        sd = read_state_dict(p)
        mc = infer_config(sd, p.name, overrides)
        cfg = ClipConfig(layout=mc["layout"], weights=str(p), model=mc, overrides=overrides, image_size=mc["image_size"],
                         resize_size=mc["image_size"], embed_dim=mc["embed_dim"], max_tokens=mc["context_length"],
                         mean=list(MEAN), std=list(STD), caption_prefix=prefix)
        desc = describe(mc)
    for k, v in pre_over.items():
        setattr(cfg, k, type(getattr(cfg, k))(v))
    if prefix:
        desc += f"; caption prefix {prefix!r}"
    return cfg, desc
