"""LoRA (Hu et al. 2021) for the text encoder: W' = W + (α/r)·B·A, only A and B train.

CMER's semantic encoder is BERT with LoRA modules (paper §4.4.1). Here LoRA sits on the
chosen projections (default query and value) of the *upper* text layers; the lower
layers are frozen and their output is cached by the trainer.

``merge()`` folds the low-rank update into the frozen weight (inference without the
extra matmuls); ``unmerge()`` undoes it. Merged and unmerged outputs agree to float
rounding.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch
from torch import nn


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        if rank < 1:
            raise ValueError("LoRA rank must be ≥ 1")
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        # A: Kaiming-uniform (as in the reference implementation), B: zeros → starts as W
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some code reads .weight (dtype/device probes)
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def delta(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta().to(self.base.weight.dtype)
            self.merged = False


# target name → (parent module path, attribute) inside one encoder layer
BERT_TARGETS = {
    "query": ("attention.self", "query"),
    "key": ("attention.self", "key"),
    "value": ("attention.self", "value"),
    "attn_out": ("attention.output", "dense"),
    "ffn_in": ("intermediate", "dense"),
    "ffn_out": ("output", "dense"),
}
# transformers' CLIPEncoderLayer; the BERT names are aliases so one config fits both towers
CLIP_TARGETS = {
    "q_proj": ("self_attn", "q_proj"),
    "k_proj": ("self_attn", "k_proj"),
    "v_proj": ("self_attn", "v_proj"),
    "out_proj": ("self_attn", "out_proj"),
    "fc1": ("mlp", "fc1"),
    "fc2": ("mlp", "fc2"),
    "query": ("self_attn", "q_proj"),
    "key": ("self_attn", "k_proj"),
    "value": ("self_attn", "v_proj"),
    "attn_out": ("self_attn", "out_proj"),
    "ffn_in": ("mlp", "fc1"),
    "ffn_out": ("mlp", "fc2"),
}


def apply_lora(
    layers: Iterable[nn.Module], targets: Iterable[str], rank: int, alpha: float, where: Optional[dict] = None
) -> list[str]:
    """Wrap the ``nn.Linear`` children named in ``targets`` of every layer: by default a
    BERT layer's self-attention (``query``/``key``/``value``) or output (``attn_out``,
    ``ffn_in``, ``ffn_out``); ``where`` maps other layouts (``CLIP_TARGETS``).

    Returns the module paths (relative to each layer) that were wrapped.
    """
    where = BERT_TARGETS if where is None else where
    targets = list(targets)
    done: list[str] = []
    for t in targets:
        if t not in where:
            raise ValueError(f"unknown LoRA target {t!r}; choose from {', '.join(where)}")
    for layer in layers:
        for t in targets:
            parent_path, name = where[t]
            parent = layer.get_submodule(parent_path)
            lin = getattr(parent, name)
            if isinstance(lin, LoRALinear):
                continue
            if not isinstance(lin, nn.Linear):
                raise ValueError(f"LoRA target {t} is not a Linear layer in this text encoder")
            setattr(parent, name, LoRALinear(lin, rank, alpha))
            done.append(f"{parent_path}.{name}")
    return done
