"""ViT-B/16 (Dosovitskiy et al. 2021) with timm's parameter naming, for user-supplied weights.

Two ways to bring weights (none ship; nothing downloads):
- a ``.pth``/``.safetensors`` state dict in timm naming (``patch_embed.proj``,
  ``blocks.N.attn.qkv``, ...), loaded into :class:`ViT`;
- a local Hugging Face folder (``google/vit-base-patch16-224`` layout), wrapped by
  :class:`HFViT` through ``transformers.ViTModel``.

Multi-scale maps (a "simple feature pyramid", as in ViTDet): ``s16`` is the token grid
of the last block, ``s8`` a 2× upsampling of a middle block's grid, ``s32`` a 2×2
average of ``s16``. Attention probabilities of every block are kept when
``keep_attention`` is set, for attention rollout.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .efficientnet_lite import StageInfo

IMAGENET_MEAN = (0.5, 0.5, 0.5)  # timm/augreg ViTs use 0.5/0.5
IMAGENET_STD = (0.5, 0.5, 0.5)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.keep_attention = False
        self.last_attention: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.keep_attention:
            attn = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)
            attn = attn.softmax(-1)
            self.last_attention = attn
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, dim * 4)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, patch)

    def forward(self, x):
        return self.proj(x)


def _grid_tokens(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, h, w)


class ViT(nn.Module):
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, variant: str = "vit-b16", num_classes: int = 1000, img_size: int = 224):
        super().__init__()
        if variant != "vit-b16":
            raise ValueError(f"unknown ViT {variant!r}; only vit-b16 is provided")
        dim, depth, heads, patch = 768, 12, 12, 16
        self.variant = variant
        self.patch = patch
        self.native_resolution = img_size
        self.patch_embed = PatchEmbed(patch, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, (img_size // patch) ** 2 + 1, dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.head = nn.Linear(dim, num_classes)
        self.num_features = dim
        self.feature_info = [StageInfo(8, depth // 2 - 1, dim), StageInfo(16, depth - 1, dim), StageInfo(32, depth - 1, dim)]

    def set_keep_attention(self, on: bool) -> None:
        for b in self.blocks:
            b.attn.keep_attention = on

    def attentions(self) -> list[torch.Tensor]:
        return [b.attn.last_attention for b in self.blocks if b.attn.last_attention is not None]

    def _pos(self, h: int, w: int) -> torch.Tensor:
        cls_pos, grid = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        n = int(math.sqrt(grid.shape[1]))
        if n * n == h * w and n == h:
            return self.pos_embed
        grid = grid.reshape(1, n, n, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
        return torch.cat([cls_pos, grid.flatten(2).transpose(1, 2)], 1)

    def forward_tokens(self, x: torch.Tensor, keep: int | None = None):
        p = self.patch_embed(x)
        h, w = p.shape[-2:]
        t = torch.cat([self.cls_token.expand(p.shape[0], -1, -1), p.flatten(2).transpose(1, 2)], 1)
        t = t + self._pos(h, w)
        mid = None
        for i, blk in enumerate(self.blocks):
            t = blk(t)
            if i == self.feature_info[0].block_index:
                mid = t
        return self.norm(t), mid, (h, w)

    def forward_features(self, x: torch.Tensor, head: bool = True) -> dict[str, torch.Tensor]:
        t, mid, (h, w) = self.forward_tokens(x)
        s16 = _grid_tokens(t[:, 1:], h, w)
        s8 = F.interpolate(_grid_tokens(mid[:, 1:], h, w), scale_factor=2, mode="bilinear", align_corners=False)
        s32 = F.avg_pool2d(s16, 2, ceil_mode=True)
        return {"s8": s8, "s16": s16, "s32": s32, "cls": t[:, 0]}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)["cls"])


class HFViT(nn.Module):
    """A local Hugging Face ViT folder behind the same ``forward_features`` interface."""

    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, folder: str):
        super().__init__()
        from transformers import ViTModel

        self.model = ViTModel.from_pretrained(folder, local_files_only=True, add_pooling_layer=False)
        cfg = self.model.config
        self.variant = "vit-hf"
        self.native_resolution = int(cfg.image_size)
        self.patch = int(cfg.patch_size)
        dim = int(cfg.hidden_size)
        depth = int(cfg.num_hidden_layers)
        self.num_features = dim
        self.feature_info = [StageInfo(8, depth // 2 - 1, dim), StageInfo(16, depth - 1, dim), StageInfo(32, depth - 1, dim)]
        mean = getattr(cfg, "image_mean", None)
        if mean:
            self.mean, self.std = tuple(mean), tuple(cfg.image_std)

    def forward_features(self, x: torch.Tensor, head: bool = True) -> dict[str, torch.Tensor]:
        out = self.model(pixel_values=x, output_hidden_states=True, interpolate_pos_encoding=True)
        h, w = x.shape[-2] // self.patch, x.shape[-1] // self.patch
        t = out.last_hidden_state
        mid = out.hidden_states[self.feature_info[0].block_index + 1]
        s16 = _grid_tokens(t[:, 1:], h, w)
        s8 = F.interpolate(_grid_tokens(mid[:, 1:], h, w), scale_factor=2, mode="bilinear", align_corners=False)
        return {"s8": s8, "s16": s16, "s32": F.avg_pool2d(s16, 2, ceil_mode=True), "cls": t[:, 0]}
