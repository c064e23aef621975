"""The multimodal encoder of CMPAGL (§III-D): the upper half of the BERT layers with
cross-attention to the image tokens inserted after each layer's self-attention
(ALBEF's fusion encoder), plus the ITM and MLM heads.

The BERT layers themselves stay where they are (``TextEncoder.bert.encoder.layer[i]``)
and are only *called* from here, so their tensors appear once in the state dict (as
fine-tuned parts of the text base); the new cross-attention sub-layers live here.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """BERT-style cross-attention sub-layer: text queries, image keys/values, post-LN residual."""

    def __init__(self, width: int, heads: int, eps: float = 1e-12, dropout: float = 0.1):
        super().__init__()
        self.heads = heads
        self.query = nn.Linear(width, width)
        self.key = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.keep_attention = False
        self.last_attention: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        b, l, c = x.shape
        d = c // self.heads
        q = self.query(x).view(b, l, self.heads, d).transpose(1, 2)
        k = self.key(img).view(b, img.shape[1], self.heads, d).transpose(1, 2)
        v = self.value(img).view(b, img.shape[1], self.heads, d).transpose(1, 2)
        if self.keep_attention:
            attn = ((q * d**-0.5) @ k.transpose(-2, -1)).softmax(-1)  # (B, h, L, Ni)
            self.last_attention = attn.detach()
            ctx = attn @ v
        else:
            ctx = F.scaled_dot_product_attention(q, k, v)
        ctx = ctx.transpose(1, 2).reshape(b, l, c)
        return self.norm(x + self.dropout(self.dense(ctx)))


class FusionEncoder(nn.Module):
    """Cross-attention sub-layers for BERT layers ``start..stop`` of a :class:`TextEncoder`."""

    def __init__(self, width: int, heads: int, n_layers: int, eps: float = 1e-12, dropout: float = 0.1):
        super().__init__()
        self.cross = nn.ModuleList(CrossAttention(width, heads, eps, dropout) for _ in range(n_layers))

    def forward(self, bert_layers, hidden: torch.Tensor, ext_mask: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        """``bert_layers``: the pretrained layers (one per cross sub-layer); ``ext_mask`` additive (B,1,1,L)."""
        for layer, cross in zip(bert_layers, self.cross):
            out = layer.attention(hidden, ext_mask)  # self-attention (+ its own residual/LN)
            h = out[0] if isinstance(out, tuple) else out
            h = cross(h, img)  # cross-attention to the image tokens
            hidden = layer.feed_forward_chunk(h)  # the layer's FFN (+ residual/LN)
        return hidden

    def set_keep_attention(self, on: bool) -> None:
        for c in self.cross:
            c.keep_attention = on
            if not on:
                c.last_attention = None


class MLMHead(nn.Module):
    """BERT's MLM head: dense → GELU → LN, decoder tied to the (frozen) word embeddings + bias.

    The packaged MiniLM has no pretrained MLM head, so this transform is new.
    """

    def __init__(self, width: int, vocab: int, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width, eps=eps)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, h: torch.Tensor, word_embeddings: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(F.gelu(self.dense(h))), word_embeddings, self.bias)
