"""The Focus-Adapter side branch of CMER (paper §3.2, eqs. 10–13).

    h_d  = v_d·W_down + f_{d−1} + b                      (10)  v_d: frozen stage output
    head_i = RegionAttention_i(r_1 … r_N)                (11)  regions = focus fields of h_d
    f̃_d = [head_0 … head_H]·W_o + h_d                    (12)
    f_d  = f̃_d·W_d + f̃_d                                 (13)

Indexing: the paper writes ``f_d`` in eq. 10 and ``h_{d−1}`` in eq. 12, which read
literally would make ``h_d`` depend on itself. We read it the way side-branch
("ladder") tuning works and the way the figure draws it: the adapter of stage ``d``
takes the frozen stage output ``v_d`` plus the *previous* adapter's output
``f_{d−1}`` (``f_0 = 0``), and the focus layer's residual is its own input ``h_d``.
Gradients never enter the frozen backbone — that is the memory saving the paper is
about (eqs. 7–9), and here it is what lets the backbone's stage outputs be cached.

Substitutions for a CNN backbone (the paper uses CLIP ViT blocks of one width):
- one adapter per stage tap (s8, s16, s32) instead of one per ViT block;
- ``W_down`` is per stage (the stages have 40/112/320 channels) instead of shared;
- ``f_{d−1}`` is brought to the next stage's grid by a fixed average pooling;
- a pre-attention LayerNorm (standard transformer practice; the frozen BN-ed maps have
  very different scales per stage).

The focus layer is multi-head self-attention restricted to non-overlapping
``field × field`` windows of the grid ("focus fields", paper Fig. 3). The paper's best
setting: hidden 192 = 6 heads × 32, field 2.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def to_windows(x: torch.Tensor, field: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """(B, C, H, W) → windows (B·nW, field², C), key-valid mask (B·nW, field²), padded (Hp, Wp).

    The grid is zero-padded to a multiple of ``field``; padded cells are masked out as keys.
    """
    b, c, h, w = x.shape
    hp, wp = -(-h // field) * field, -(-w // field) * field
    valid = torch.ones(1, 1, h, w, dtype=x.dtype, device=x.device)
    if (hp, wp) != (h, w):
        x = F.pad(x, (0, wp - w, 0, hp - h))
        valid = F.pad(valid, (0, wp - w, 0, hp - h))
    nh, nw = hp // field, wp // field

    def split(t: torch.Tensor) -> torch.Tensor:
        bb, cc = t.shape[:2]
        t = t.reshape(bb, cc, nh, field, nw, field).permute(0, 2, 4, 3, 5, 1)
        return t.reshape(bb * nh * nw, field * field, cc)

    win = split(x)
    mask = split(valid)[..., 0] > 0  # (nW, f²)
    mask = mask.repeat(b, 1)
    return win, mask, (hp, wp)


def from_windows(win: torch.Tensor, b: int, hp: int, wp: int, field: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`to_windows`: (B·nW, field², C) → (B, C, h, w)."""
    c = win.shape[-1]
    nh, nw = hp // field, wp // field
    x = win.reshape(b, nh, nw, field, field, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, hp, wp)
    return x[:, :, :h, :w]



def pool_to(x: torch.Tensor, size) -> torch.Tensor:
    """``adaptive_avg_pool2d(x, size)``; as a plain average pool when the sizes divide (the
    same numbers, and a graph the ONNX exporter can trace)."""
    (H, W), (h, w) = x.shape[-2:], (int(size[0]), int(size[1]))
    if H % h == 0 and W % w == 0:
        return F.avg_pool2d(x, (int(H) // h, int(W) // w))
    return F.adaptive_avg_pool2d(x, (h, w))

class FocusLayer(nn.Module):
    """Region (focus-field) multi-head attention, eqs. 11–12 without the residual.

    ``forward(h)`` maps (B, C, H, W) → (B, C, H, W). With ``keep_attention`` the
    attention probabilities (B·nW, heads, f², f²) of the last call are kept in
    ``last_attention`` (for the explain maps).
    """

    def __init__(self, dim: int = 192, heads: int = 6, field: int = 2):
        super().__init__()
        if dim % heads:
            raise ValueError(f"focus layer: hidden {dim} is not divisible by {heads} heads")
        if field < 1:
            raise ValueError("focus field must be ≥ 1")
        self.dim, self.heads, self.field = dim, heads, field
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)  # W_i, b_i of eq. 11, all heads at once
        self.proj = nn.Linear(dim, dim)  # mixes the concatenated heads (eq. 12)
        self.keep_attention = False
        self.last_attention: Optional[torch.Tensor] = None
        self.last_valid: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        f = self.field
        win, valid, (hp, wp) = to_windows(x, f)  # (B·nW, f², C)
        n = win.shape[0]
        qkv = self.qkv(self.norm(win)).reshape(n, f * f, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B·nW, heads, f², d)
        bias = torch.zeros(n, 1, 1, f * f, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(~valid[:, None, None, :], float("-inf"))
        if self.keep_attention:
            attn = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + bias).softmax(-1)
            self.last_attention = attn.detach()
            self.last_valid = valid
            out = attn @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        out = self.proj(out.transpose(1, 2).reshape(n, f * f, c))
        return from_windows(out, b, hp, wp, f, h, w)

    def attention_mass(self, b: int, h: int, w: int) -> torch.Tensor:
        """(B, h, w): attention each cell *receives* from the queries of its focus field,
        averaged over heads (a cell's share of its region's attention; mean 1)."""
        if self.last_attention is None:
            raise RuntimeError("call forward with keep_attention=True first")
        f = self.field
        valid = self.last_valid.to(self.last_attention.dtype)  # (B·nW, f²)
        mass = (self.last_attention.mean(1) * valid[:, :, None]).sum(1)  # sum over real queries
        mass = mass * valid  # padded cells receive nothing
        hp, wp = -(-h // f) * f, -(-w // f) * f
        return from_windows(mass[..., None], b, hp, wp, f, h, w)[:, 0]


class FocusAdapter(nn.Module):
    """One adapter of the side branch (eqs. 10–13), on (B, C, H, W) maps."""

    def __init__(self, in_channels: Optional[int], dim: int = 192, heads: int = 6, field: int = 2):
        super().__init__()
        # W_down and b of eq. 10 (1×1 = per position); ``in_channels=None``: the caller
        # applies one W_down shared by all adapters (ViT blocks have one width, as the paper)
        self.down = nn.Conv2d(in_channels, dim, 1) if in_channels else nn.Identity()
        self.focus = FocusLayer(dim, heads, field)
        self.w = nn.Conv2d(dim, dim, 1)  # W_d of eq. 13

    def forward(self, v: torch.Tensor, f_prev: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.down(v)  # v_d·W_down + b
        if f_prev is not None:  # + f_{d−1}, brought to this stage's grid (fixed pooling)
            if f_prev.shape[-2:] != h.shape[-2:]:
                f_prev = pool_to(f_prev, h.shape[-2:])
            h = h + f_prev
        ft = self.focus(h) + h  # eq. 12
        return self.w(ft) + ft  # eq. 13
