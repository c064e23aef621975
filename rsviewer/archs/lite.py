"""``lite`` — the default model: a dual encoder small enough for a 2-core CPU.

Image: EfficientNet-Lite (frozen, ImageNet) → multi-scale pooling (mean and max of the
stride-32 head map, mean of the stride-16 map) → MLP → unit vector.
Text: MiniLM-L6 (frozen lower layers; the top ``text_train_layers`` fine-tuned) → masked
mean pooling → MLP → unit vector. Score = cosine.

What improves on a linear probe (each measured on UCM val, see docs/results.md):
- an MLP head instead of a linear one;
- pooling over two scales, with max pooling for small objects (planes, tanks);
- dihedral augmentation (8 cached views of every training image);
- label-aware soft InfoNCE targets (``label_alpha``): UCM captions are templated and
  repeat across images of a class, so identical captions are never pushed apart;
- InfoNCE plus the VSE++ hardest-negative triplet (``loss="both"``);
- an exponential moving average of the trained weights (trainer ``--ema``);
- optionally fine-tuning the top MiniLM layers.

For explanations the model also gives *local* embeddings: the same head applied to
every position of the feature grid (``local_embeddings``), i.e. patch similarity.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nets.factory import create_backbone
from ..nets.text import TextEncoder
from ..train.losses import contrastive_loss
from .base import BaseConfig, RetrievalModel, backbone_cam_layers, l2n, make_head
from .registry import register


@dataclass
class LiteConfig(BaseConfig):
    pool: str = "mean_max_s16"  # "mean" (s32 mean only) | "mean_max" | "mean_max_s16"
    head: str = "mlp"  # "linear" | "mlp"
    hidden: int = 1024
    dropout: float = 0.2
    text_train_layers: int = 0  # top MiniLM layers fine-tuned (0: frozen text encoder)
    # partial fine-tuning of the image backbone: "" = frozen; "s16" = train everything past
    # the stride-16 map (EfficientNet-Lite's stride-32 stage + head conv; ResNet's layer4);
    # "s8" = also the stride-16 stage. The frozen part's output is what the trainer caches.
    image_train_from: str = ""
    backbone_lr_scale: float = 0.1  # learning-rate multiplier of the fine-tuned backbone layers
    loss: str = "both"  # "infonce" | "triplet" | "both" (InfoNCE + hardest-negative triplet)
    label_alpha: float = 0.5  # weight of same-scene-label soft positives in InfoNCE
    margin: float = 0.2  # triplet margin
    temperature: float = 0.05  # initial; learned
    # a CLIP checkpoint (OpenAI/open_clip ViT file): its frozen image and text embeddings
    # replace EfficientNet-Lite and MiniLM, and the MLP heads train on them (cached)
    clip: str = ""


@register
class Lite(RetrievalModel):
    arch = "lite"
    Config = LiteConfig
    # the recipe of models/default, chosen on UCM val (docs/results.md): with the weight EMA
    # val mR stays within ~0.5 of its best from epoch 6 on, so 15 epochs are plenty
    train_defaults = {"epochs": 15, "views": 8, "ema": 0.98}
    feature_keys = {
        "image": ("image_backbone", "image_weights", "image_size", "pool", "image_train_from", "clip"),
        "text": ("text_weights", "max_tokens", "text_train_layers", "clip"),
    }
    def __init__(self, cfg: LiteConfig, extra=None):
        super().__init__(cfg, extra)
        self.clip = None  # the frozen CLIP towers (ClipBranch) when cfg.clip is set
        if cfg.clip:
            self._init_clip(cfg)
            return
        self.backbone, bref = create_backbone(cfg.image_backbone, cfg.image_weights)
        self.text = TextEncoder(cfg.text_weights, cfg.max_tokens)
        self.bases = {"backbone": bref, "text": self.text.weights_ref}
        self.mean, self.std = self.backbone.mean, self.backbone.std
        n_text = self.text.num_layers
        k = max(0, min(cfg.text_train_layers, n_text))
        self.text_prefix = n_text - k
        self.finetuned = [f"text.bert.encoder.layer.{i}." for i in range(self.text_prefix, n_text)]
        self.tune_backbone_from(cfg.image_train_from)
        c32 = self.backbone.num_features
        c16 = self.backbone.feature_info[1].channels
        din = {"mean": c32, "mean_max": 2 * c32, "mean_max_s16": 2 * c32 + c16}.get(cfg.pool)
        if din is None:
            raise ValueError(f"unknown pool {cfg.pool!r}")
        self.image_proj = make_head(din, cfg.embed_dim, cfg.head, cfg.hidden, cfg.dropout)
        self.text_proj = make_head(self.text.width, cfg.embed_dim, cfg.head, cfg.hidden, cfg.dropout)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)))

    def _init_clip(self, cfg: LiteConfig) -> None:
        """Heads over a frozen CLIP: the published embeddings are the cached features."""
        from .clip_branch import ClipBranch  # the frozen CLIP towers, shared with cmer

        if cfg.image_train_from or cfg.text_train_layers:
            raise ValueError("lite over a CLIP trains heads on its frozen embeddings: leave image_train_from "
                             "and text_train_layers unset (fine-tune the CLIP with --arch clip --end-to-end)")
        self.clip = ClipBranch(cfg.clip, "none", 0, (), 8, 16.0)
        self.clip.adopt(self)
        self.backbone = None
        self.finetuned = []
        d = int(self.clip.clip_cfg.embed_dim)
        self.image_proj = make_head(d, cfg.embed_dim, cfg.head, cfg.hidden, cfg.dropout)
        self.text_proj = make_head(d, cfg.embed_dim, cfg.head, cfg.hidden, cfg.dropout)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature)))

    def tune_end_to_end(self, image_from: str = "all", text_from: str = "all") -> dict[str, list[str]]:
        if self.clip is not None:
            raise ValueError("lite over a CLIP trains heads on its frozen embeddings; to fine-tune the CLIP "
                             "itself use --arch clip --end-to-end")
        return super().tune_end_to_end(image_from, text_from)

    # ---- image ----------------------------------------------------------------------------
    def feature_maps(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.backbone.forward_features(pixels)

    def pool(self, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        s32 = maps["s32"]
        parts = [s32.mean((2, 3))]
        if self.cfg.pool in ("mean_max", "mean_max_s16"):
            parts.append(s32.amax((2, 3)))
        if self.cfg.pool == "mean_max_s16":
            parts.append(maps["s16"].mean((2, 3)))
        return torch.cat(parts, 1)

    def image_features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.clip is not None:
            return {"pooled": self.clip.image_features(pixels)["pooled"]}
        if self.image_split:  # frozen part only: the map the fine-tuned layers start from
            maps = self.backbone.forward_features(pixels, upto=self.image_split)
            keep = {self.image_split} | ({"s16"} & set(maps) if self.cfg.pool == "mean_max_s16" else set())
            return {k: maps[k] for k in keep}
        return {"pooled": self.pool(self.feature_maps(pixels))}

    def image_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.clip is not None:
            return l2n(self.image_proj(feats["pooled"].float()))
        if self.image_split:
            maps = {**feats, **self.backbone.forward_from(feats[self.image_split].float(), self.image_split)}
            return l2n(self.image_proj(self.pool({k: v.float() for k, v in maps.items()})))
        return l2n(self.image_proj(feats["pooled"]))

    def local_embeddings(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w): the head applied at every stride-32 position (patch similarity).

        Each position gets its own features in every pooled slot (mean and max of one
        location are that location), so these are the embeddings of single cells.
        """
        if self.clip is not None:  # the last block's patch tokens through CLIP's projection, then the head
            out = self.clip.vision(pixel_values=pixels, output_hidden_states=True)
            emb = self.clip.dense_embeddings(self.clip.grid(out.hidden_states[-1]))
            b, d, h, w = emb.shape
            x = l2n(self.image_proj(emb.permute(0, 2, 3, 1).reshape(-1, d)))
            return x.reshape(b, h, w, -1).permute(0, 3, 1, 2)
        maps = self.feature_maps(pixels)
        s32 = maps["s32"]
        parts = [s32]
        if self.cfg.pool in ("mean_max", "mean_max_s16"):
            parts.append(s32)
        if self.cfg.pool == "mean_max_s16":
            parts.append(F.adaptive_avg_pool2d(maps["s16"], s32.shape[-2:]))
        x = torch.cat(parts, 1)
        b, c, h, w = x.shape
        emb = l2n(self.image_proj(x.permute(0, 2, 3, 1).reshape(-1, c)))
        return emb.reshape(b, h, w, -1).permute(0, 3, 1, 2)

    # ---- text -----------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        return (self.clip or self.text).tokenize(texts)

    def text_features(self, tokens: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.clip is not None:  # CLIP's text embedding
            return self.clip.text_features(tokens)
        # fully frozen: the sentence vector is cached; otherwise the frozen prefix's token states
        return self.text.prefix_features(tokens, self.text_prefix)

    def text_head(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.clip is not None:
            return l2n(self.text_proj(feats["pooled"].float()))
        return l2n(self.text_proj(self.text.pooled_from(feats, self.text_prefix)))

    # ---- training ---------------------------------------------------------------------------
    def training_loss(self, batch):
        img = self.image_head(batch["image_feats"])
        txt = self.text_head(batch["text_feats"])
        scale = self.logit_scale.exp().clamp(max=100.0)
        return contrastive_loss(img, txt, batch, self.cfg.loss, scale, self.cfg.label_alpha, self.cfg.margin)

    # ---- explanations ---------------------------------------------------------------------
    def gradcam_layers(self) -> dict[str, nn.Module]:
        if self.clip is not None:  # as the clip arch: the block before the last is the preset (the last
            blocks = self.clip.vision.encoder.layers  # block's patch tokens get no gradient via the class token)
            order = [i for i in (len(blocks) - 2, len(blocks) - 1) if i >= 0]
            return {f"clip.tower.clip.vision_model.encoder.layers.{i}": blocks[i] for i in order}
        return backbone_cam_layers(self.backbone, ("head", "s32", "s16"))
