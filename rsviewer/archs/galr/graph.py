"""GaLR's local branch: object graph, DREA (denoised representation + enhanced adjacency)
and the GCN (paper §III-B, eqs. 11–18).

Objects are :class:`Obj` records with the attributes the paper feeds the GCN: centre
position (normalised to [0, 1] by the image size, x = column, y = row), area (fraction
of the image), category and probability; plus the bounding box and which original
objects were merged into it (for display).

- :func:`d_A` — eq. 12, ``d_A(x, y) = exp(−‖x−y‖²)·(1 − ‖x−y‖²)``.
- :func:`drea_merge` — eqs. 13–16: two objects with ``d_A > š`` (critical similarity
  threshold, 0.8) *and* the same category are merged: average position, summed area,
  maximum probability. Repeated until no pair qualifies (closest pair first).
- :func:`drea_adjacency` — eqs. 17–18: objects ranked by area (m = 1 is the largest);
  ``d̂_A(m, n) = 𝔇·e^{1−√(mn)}·d_A(m, n)`` with boost factor 𝔇 = 1.15.
- :class:`GCN` — eq. 11, ``X' = σ(D̃^{-1/2} Ã D̃^{-1/2} X W)`` with ``Ã = A + I``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Obj:
    cx: float
    cy: float
    area: float
    prob: float
    category: int
    box: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # x1, y1, x2, y2 (normalised)
    merged_from: tuple[int, ...] = ()  # ids of the raw objects this one stands for
    name: str = ""  # category name for display
    extra: dict = field(default_factory=dict)  # source-specific (e.g. cluster id)

    def to_dict(self) -> dict:
        return {
            "centre": [round(self.cx, 4), round(self.cy, 4)],
            "box": [round(v, 4) for v in self.box],
            "area": round(self.area, 5),
            "category": int(self.category),
            "category_name": self.name,
            "confidence": round(self.prob, 4),
            "merged_from": list(self.merged_from),
            **self.extra,
        }


def d_A(x, y):
    """Eq. 12 on coordinates (arrays broadcast over the last axis of length 2)."""
    s = np.sum((np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)) ** 2, axis=-1)
    return np.exp(-s) * (1.0 - s)


def _pairwise_dA(objs: Sequence[Obj]) -> np.ndarray:
    p = np.array([[o.cx, o.cy] for o in objs], dtype=np.float64).reshape(-1, 2)
    return d_A(p[:, None, :], p[None, :, :])


def merge_pair(a: Obj, b: Obj) -> Obj:
    """Eqs. 14–16: average position, summed area (⊕), maximum probability."""
    box = (min(a.box[0], b.box[0]), min(a.box[1], b.box[1]), max(a.box[2], b.box[2]), max(a.box[3], b.box[3]))
    return replace(
        a,
        cx=(a.cx + b.cx) / 2.0,
        cy=(a.cy + b.cy) / 2.0,
        area=a.area + b.area,
        prob=max(a.prob, b.prob),
        box=box,
        merged_from=tuple(sorted(a.merged_from + b.merged_from)),
        extra={**b.extra, **a.extra},
    )


def drea_merge(objs: Sequence[Obj], threshold: float = 0.8) -> list[Obj]:
    """Eq. 13 filtration ``f(x, y) = 1[d_A > š]·1[cate_x = cate_y]``; qualifying pairs are
    merged (closest first, ties by index) until none is left. Deterministic."""
    out = [o if o.merged_from else replace(o, merged_from=(i,)) for i, o in enumerate(objs)]
    while len(out) > 1:
        d = _pairwise_dA(out)
        cats = np.array([o.category for o in out])
        ok = (d > threshold) & (cats[:, None] == cats[None, :])
        ok &= np.triu(np.ones_like(ok, dtype=bool), 1)
        if not ok.any():
            break
        cand = np.where(ok, d, -np.inf)
        i, j = np.unravel_index(int(np.argmax(cand)), cand.shape)  # first maximum: lowest (i, j)
        out[i] = merge_pair(out[i], out[j])
        del out[j]
    return out


def rank_by_area(objs: Sequence[Obj]) -> list[Obj]:
    """Eq. 17 ``R_area``: largest first (stable for equal areas)."""
    return sorted(objs, key=lambda o: -o.area)


def boost_factors(n: int, boost: float = 1.15) -> np.ndarray:
    """Eq. 18 gain ``𝔇·e^{1−√(mn)}`` for area ranks m, n = 1..n."""
    r = np.arange(1, n + 1, dtype=np.float64)
    return boost * np.exp(1.0 - np.sqrt(r[:, None] * r[None, :]))


def drea_adjacency(objs: Sequence[Obj], boost: Optional[float] = 1.15) -> np.ndarray:
    """Adjacency over ``objs`` (already ranked by area): ``A_mn = d_A`` (eq. 12), times the
    eq. 18 gain when ``boost`` is given. The diagonal is 0 (the GCN adds I, eq. 11).

    d_A is negative beyond distance 1 (opposite corners); those entries are clamped to 0
    so the degree matrix D̃ stays positive — "weaken distant relations as much as
    possible" taken literally."""
    n = len(objs)
    if n == 0:
        return np.zeros((0, 0), dtype=np.float32)
    a = _pairwise_dA(objs)
    if boost is not None:
        a = a * boost_factors(n, boost)
    np.fill_diagonal(a, 0.0)
    return np.clip(a, 0.0, None).astype(np.float32)


def build_graph(
    objs: Sequence[Obj], max_objects: int, drea: bool = True, threshold: float = 0.8, boost: float = 1.15
) -> tuple[list[Obj], np.ndarray]:
    """Raw objects → (nodes ranked by area, at most ``max_objects``; adjacency).

    ``drea=False`` is the paper's "LF w/o DREA" ablation: no merging, plain d_A."""
    nodes = drea_merge(objs, threshold) if drea else [
        o if o.merged_from else replace(o, merged_from=(i,)) for i, o in enumerate(objs)
    ]
    nodes = rank_by_area(nodes)[:max_objects]
    return nodes, drea_adjacency(nodes, boost if drea else None)


def normalize_adjacency(adj: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``D̃^{-1/2}(A + I)D̃^{-1/2}`` per graph (B, N, N); padded nodes (mask 0) stay 0."""
    m = mask.to(adj.dtype)
    a = adj * m[:, :, None] * m[:, None, :] + torch.diag_embed(m)
    deg = a.sum(-1)
    dinv = deg.clamp_min(1e-6).rsqrt() * m
    return dinv[:, :, None] * a * dinv[:, None, :]


class GCN(nn.Module):
    """Eq. 11, three layers as in the released code (widths d → d → d/2 → d_out), then a
    readout to the embedding. Nodes arrive ranked by area, so the readout ``flatten``
    (the released code's: node slot × feature → linear) knows which object is the
    largest; ``mean`` is a permutation-invariant alternative."""

    def __init__(self, din: int, dout: int, max_objects: int, embed_dim: int, readout: str = "flatten"):
        super().__init__()
        self.w1 = nn.Linear(din, din, bias=False)
        self.w2 = nn.Linear(din, din // 2, bias=False)
        self.w3 = nn.Linear(din // 2, dout, bias=False)
        self.readout = readout
        if readout == "flatten":
            self.out = nn.Linear(max_objects * dout, embed_dim)
        elif readout == "mean":
            self.out = nn.Linear(dout, embed_dim)
        else:
            raise ValueError(f"unknown GCN readout {readout!r}; use flatten or mean")

    def forward(self, x: torch.Tensor, adj_norm: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.to(x.dtype)[:, :, None]
        for w in (self.w1, self.w2, self.w3):
            x = F.relu(adj_norm @ w(x)) * m
        if self.readout == "flatten":
            return self.out(x.flatten(1))
        return self.out(x.sum(1) / m.sum(1).clamp_min(1.0))
