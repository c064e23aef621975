"""MSSA building blocks (Remote Sens. 2025, 17, 3341, §3–§4), written for (B, tokens, C).

The paper's text has no equation numbers, so comments cite the section and the
equation by its left-hand side (e.g. "§4.3.1 R_k = ReverseShuffle(A_window(...))").

- window partition / :func:`region_shuffle` / :func:`region_unshuffle` / :func:`proxy_windows`
  — the geometry of WRGPA (§4.3.1 (1));
- :class:`WRGPA` — Window → Region (window shuffle inside each of the 4 quadrants) →
  Global (4 proxy windows at the map centre) attention;
- :class:`SCA` — segmented channel attention in G groups (§4.3.1 (2));
- :class:`WRGPABlock`, :class:`SCABlock`, :class:`PSCJA` (§4.3.1 (3));
- :class:`CrossAttention` — A_cross of §3 with optional key masks and attention output
  (IGTA, CMSE image side, MSFM);
- :class:`TokenCrossAttention` — CMSE's learnable semantic tokens attending to a token
  sequence, with an exact *pooled* fast path used by pairwise scoring.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

NEG = -1e4  # additive mask value (finite: fully masked rows stay finite)


# ----------------------------------------------------------------------------------------
# geometry: windows, regions (quadrants), window shuffle, proxy windows
# ----------------------------------------------------------------------------------------
def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) → (B, nh, nw, ws·ws, C); tokens of a window in row-major order."""
    b, h, w, c = x.shape
    nh, nw = h // ws, w // ws
    x = x.reshape(b, nh, ws, nw, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, nh, nw, ws * ws, c)


def window_merge(w: torch.Tensor, ws: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B, nh, nw, ws·ws, C) → (B, H, W, C)."""
    b, nh, nw, m, c = w.shape
    x = w.reshape(b, nh, nw, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, nh * ws, nw * ws, c)


def region_shuffle(w: torch.Tensor) -> torch.Tensor:
    """Window Shuffle of §4.3.1 (Region-Attention), inside each of the 4 quadrants.

    ``w``: (B, nh, nw, M, C) windows with even nh, nw; each quadrant R_k holds
    N_k = (nh/2)(nw/2) windows W_i^(k) (row-major inside the quadrant) and M must be a
    multiple of N_k. Each window's M tokens are cut into N_k consecutive parts
    W_i^(k,j) (M/N_k tokens each) and shuffled window j of quadrant k is
    Ŵ_j^k = Concat(W_1^(k,j), …, W_{N_k}^(k,j)): part j of *every* window of the quadrant.

    Returns (B, 4, N_k, M, C): quadrants in row-major order (top-left, top-right,
    bottom-left, bottom-right), then shuffled windows j.
    """
    b, nh, nw, m, c = w.shape
    if nh % 2 or nw % 2:
        raise ValueError(f"region shuffle needs an even window grid, got {nh}x{nw}")
    rh, rw = nh // 2, nw // 2
    nk = rh * rw
    if m % nk:
        raise ValueError(f"window of {m} tokens cannot be cut into {nk} equal parts")
    x = w.reshape(b, 2, rh, 2, rw, m, c).permute(0, 1, 3, 2, 4, 5, 6)  # (B, 2, 2, rh, rw, M, C)
    x = x.reshape(b, 4, nk, nk, m // nk, c)  # (B, k, i: window in quadrant, j: part, t, C)
    x = x.transpose(2, 3)  # (B, k, j, i, t, C): shuffled window j gathers part j of every window i
    return x.reshape(b, 4, nk, m, c)


def region_unshuffle(s: torch.Tensor, nh: int, nw: int) -> torch.Tensor:
    """Reverse Shuffle: (B, 4, N_k, M, C) → (B, nh, nw, M, C), the inverse of :func:`region_shuffle`."""
    b, _, nk, m, c = s.shape
    rh, rw = nh // 2, nw // 2
    x = s.reshape(b, 4, nk, nk, m // nk, c).transpose(2, 3)  # back to (B, k, i, j, t, C)
    x = x.reshape(b, 2, 2, rh, rw, m, c).permute(0, 1, 3, 2, 4, 5, 6)
    return x.reshape(b, nh, nw, m, c)


def proxy_windows(nh: int, nw: int) -> list[tuple[int, int]]:
    """The 4 proxy windows of Global-Attention (§4.3.1): in each quadrant, the window
    that touches the centre of the feature map (top-left, top-right, bottom-left, bottom-right)."""
    if nh < 2 or nw < 2 or nh % 2 or nw % 2:
        raise ValueError(f"proxy windows need an even window grid of at least 2x2, got {nh}x{nw}")
    ch, cw = nh // 2, nw // 2
    return [(ch - 1, cw - 1), (ch - 1, cw), (ch, cw - 1), (ch, cw)]


# ----------------------------------------------------------------------------------------
# attention primitives
# ----------------------------------------------------------------------------------------
class SelfAttention(nn.Module):
    """Multi-head self-attention over (N, M, C) token sets (A_self / A_window of §3)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        n, m, c = x.shape
        q, k, v = self.qkv(x).reshape(n, m, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = None
        if key_mask is not None:  # (N, M) bool, True = real token
            bias = torch.zeros(n, 1, 1, m, dtype=x.dtype, device=x.device).masked_fill(~key_mask[:, None, None, :], NEG)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.proj(out.transpose(1, 2).reshape(n, m, c))


class CrossAttention(nn.Module):
    """A_cross(X_a, X_b) = Softmax(Q_a K_b^T / √d_k) V_b (§3), multi-head, with output projection.

    ``attn_dim`` is the width of Q/K/V (default the query width); ``out`` maps back to
    ``dim_q``. ``forward(..., need_weights=True)`` also returns the head-averaged weights.
    """

    def __init__(self, dim_q: int, dim_kv: int, heads: int, attn_dim: Optional[int] = None, zero_out: bool = False):
        super().__init__()
        attn_dim = attn_dim or dim_q
        if attn_dim % heads:
            raise ValueError(f"attention width {attn_dim} is not divisible by {heads} heads")
        self.heads, self.attn_dim = heads, attn_dim
        self.q = nn.Linear(dim_q, attn_dim)
        self.k = nn.Linear(dim_kv, attn_dim)
        self.v = nn.Linear(dim_kv, attn_dim)
        self.out = nn.Linear(attn_dim, dim_q)
        if zero_out:  # the block starts as the identity (residual branch = 0)
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        """(..., N, attn_dim) → (..., heads, N, d_h)."""
        *lead, n, _ = x.shape
        return x.reshape(*lead, n, self.heads, self.attn_dim // self.heads).transpose(-3, -2)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(..., heads, N, d_h) → (..., N, attn_dim)."""
        *lead, h, n, d = x.shape
        return x.transpose(-3, -2).reshape(*lead, n, h * d)

    def forward(
        self,
        xa: torch.Tensor,
        xb: torch.Tensor,
        key_mask: Optional[torch.Tensor] = None,
        need_weights: bool = False,
    ):
        q, k, v = self.split(self.q(xa)), self.split(self.k(xb)), self.split(self.v(xb))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (..., h, Na, Nb)
        if key_mask is not None:  # (..., Nb) bool
            logits = logits.masked_fill(~key_mask[..., None, None, :], NEG)
        attn = logits.softmax(-1)
        out = self.out(self.merge(attn @ v))
        if need_weights:
            return out, attn.mean(-3)
        return out


class TokenCrossAttention(nn.Module):
    """CMSE (§4.3.3): ``n_tokens`` learnable semantic tokens as queries over a token sequence,
    X̃ = A_cross(X̄, X*).

    ``forward`` returns the (B, n_tokens, dim) semantic representation (and the
    head-averaged attention over the sequence). :meth:`pooled` returns its mean over
    the n_tokens — what MSFM's pooling uses — computed *exactly* through linearity
    (the keys are never projected: q̃ = W_k^T q per head; values and output projections
    are applied after averaging), which makes pairwise scoring of IGTA-dependent text
    sequences cheap.
    """

    def __init__(self, dim: int, n_tokens: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.tokens = nn.Parameter(torch.randn(n_tokens, dim) * 0.02)
        self.att = CrossAttention(dim, dim, heads)
        self.n_tokens, self.heads = n_tokens, heads

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None, need_weights: bool = False):
        lead = x.shape[:-2]
        q = self.tokens.expand(*lead, *self.tokens.shape)
        return self.att(q, x, key_mask, need_weights=need_weights)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """(..., L, D) → (..., heads, n_tokens, L) attention logits without projecting the keys."""
        a = self.att
        dh = a.attn_dim // self.heads
        q = a.split(a.q(self.tokens))  # (h, T, dh)
        wk = a.k.weight.reshape(self.heads, dh, -1)  # (h, dh, D)
        qk = (q @ wk) / math.sqrt(dh)  # (h, T, D); the k bias adds a per-query constant (cancels)
        return torch.einsum("htd,...ld->...htl", qk, x)

    def pooled(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """mean_t A_cross(X̄, X)_t — equal to ``forward(x).mean(-2)`` — as (..., dim)."""
        a = self.att
        logits = self._logits(x)
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[..., None, None, :], NEG)
        abar = logits.softmax(-1).mean(-2)  # (..., h, L)
        ctx = abar @ x  # (..., h, D): head-wise attention-weighted input
        dh = a.attn_dim // self.heads
        wv = a.v.weight.reshape(self.heads, dh, -1)  # (h, dh, D)
        vh = torch.einsum("...hd,hed->...he", ctx, wv) + a.v.bias.reshape(self.heads, dh)
        return a.out(vh.reshape(*vh.shape[:-2], a.attn_dim))


class Mlp(nn.Module):
    def __init__(self, dim: int, ratio: float, dropout: float = 0.0):
        super().__init__()
        hidden = max(1, int(round(dim * ratio)))
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


# ----------------------------------------------------------------------------------------
# WRGPA (§4.3.1 (1))
# ----------------------------------------------------------------------------------------
class WRGPA(nn.Module):
    """Window-Region-Global Progressive Attention on a (B, H, W, C) map.

    I' = Global-Attention(Region-Attention(Window-Attention(I)))  (§4.3.1, WRGPA)

    - Window: W'_i = A_window(W_i) inside non-overlapping ws×ws windows;
    - Region: R'_k = ReverseShuffle(A_window(WindowShuffle(R_k))), k = 1..4 quadrants;
    - Global: P'_i = A_cross(P_i, {P_j}_{j≠i}) for the 4 proxy windows at the map centre.

    Deviation (documented): each stage is added to its input (x + stage(x)) instead of
    replacing it — with a plain composition the global stage would overwrite the 4 proxy
    windows by their neighbours' content. Maps whose size is not a multiple of the window
    grid are zero-padded and the padded tokens are masked out of every attention (also
    used when a window's M tokens do not split into N_k equal parts: the paper's own
    7×7 windows with 4 windows per quadrant give 49 tokens into 4 parts, so M is padded).
    A map that fits in one window gets window attention only (no quadrants exist).
    """

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.window = int(window)
        self.win = SelfAttention(dim, heads)
        self.reg = SelfAttention(dim, heads)
        self.glob = CrossAttention(dim, dim, heads)

    def geometry(self, h: int, w: int) -> tuple[int, int, bool]:
        """(nh, nw, progressive): the window grid after padding and whether region/global run."""
        ws = self.window
        nh, nw = -(-h // ws), -(-w // ws)
        if nh == 1 and nw == 1:
            return 1, 1, False
        nh, nw = nh + nh % 2, nw + nw % 2
        return nh, nw, True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        ws = self.window
        nh, nw, progressive = self.geometry(h, w)
        hp, wp = nh * ws, nw * ws
        valid = None
        if (hp, wp) != (h, w):
            x = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))
            valid = torch.zeros(b, hp, wp, 1, dtype=torch.bool, device=x.device)
            valid[:, :h, :w] = True
        win = window_partition(x, ws)  # (B, nh, nw, M, C)
        m = ws * ws
        vwin = window_partition(valid, ws).squeeze(-1) if valid is not None else None  # (B, nh, nw, M)

        # Window-Attention
        flat = win.reshape(-1, m, c)
        win = win + self.win(flat, None if vwin is None else vwin.reshape(-1, m)).reshape(win.shape)
        if progressive:
            # Region-Attention: shuffle inside each quadrant, attend, reverse shuffle
            nk = (nh // 2) * (nw // 2)
            mp = -(-m // nk) * nk
            wq, vq = win, vwin
            if mp != m:  # pad the token axis so M splits into N_k equal parts
                wq = F.pad(win, (0, 0, 0, mp - m))
                base = vwin if vwin is not None else torch.ones(b, nh, nw, m, dtype=torch.bool, device=x.device)
                vq = F.pad(base, (0, mp - m), value=False)
            s = region_shuffle(wq)  # (B, 4, N_k, M', C)
            vs = region_shuffle(vq.unsqueeze(-1)).squeeze(-1) if vq is not None else None
            upd = self.reg(s.reshape(-1, mp, c), None if vs is None else vs.reshape(-1, mp))
            s = s + upd.reshape(s.shape)
            win = region_unshuffle(s, nh, nw)[..., :m, :]

            # Global-Attention among the 4 proxy windows
            idx = proxy_windows(nh, nw)
            rows = torch.tensor([r for r, _ in idx], device=x.device)
            cols = torch.tensor([q for _, q in idx], device=x.device)
            p = win[:, rows, cols]  # (B, 4, M, C)
            others = torch.tensor([[j for j in range(4) if j != i] for i in range(4)], device=x.device)
            kv = p[:, others].reshape(b, 4, 3 * m, c)  # (B, 4, 3M, C): the other three proxies
            kmask = None
            if vwin is not None:
                pv = vwin[:, rows, cols]  # (B, 4, M)
                kmask = pv[:, others].reshape(b, 4, 3 * m)
            p = p + self.glob(p, kv, kmask)
            win = win.clone()
            win[:, rows, cols] = p
        out = window_merge(win, ws)
        return out[:, :h, :w]


# ----------------------------------------------------------------------------------------
# SCA (§4.3.1 (2))
# ----------------------------------------------------------------------------------------
class SCA(nn.Module):
    """Segmented Channel Attention: channels cut into G groups, channel attention per group.

    G_1..G_G = Segment(I);  G'_i = A_channel(G_i);  I* = Concat(G'_1..G'_G)  (§4.3.1 SCA)
    A_channel(X) = (Softmax(K^T V / d) Q^T)^T  (§3): a C_g×C_g channel affinity applied to Q.

    K and V are L2-normalised over the tokens and the softmax gets a learnable
    temperature per group (as in XCiT's cross-covariance attention), because raw K^T V
    sums grow with the token count (1,024 at 1/8) and would saturate the softmax.
    """

    def __init__(self, dim: int, groups: int):
        super().__init__()
        if dim % groups:
            raise ValueError(f"width {dim} is not divisible into {groups} SCA groups")
        self.groups = groups
        self.qkv = nn.Linear(dim, 3 * dim)
        self.temperature = nn.Parameter(torch.ones(groups, 1, 1))
        self.proj = nn.Linear(dim, dim)

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) → (B, G, N, C/G): non-overlapping, equidistant channel groups."""
        b, n, c = x.shape
        return x.reshape(b, n, self.groups, c // self.groups).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)
        q = self.segment(q)
        k = F.normalize(self.segment(k), dim=-2)
        v = F.normalize(self.segment(v), dim=-2)
        a = (k.transpose(-1, -2) @ v * self.temperature).softmax(-1)  # (B, G, C_g, C_g)
        out = (a @ q.transpose(-1, -2)).transpose(-1, -2)  # (Softmax(K^T V) Q^T)^T: (B, G, N, C_g)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))  # Concat over groups


# ----------------------------------------------------------------------------------------
# PSCJA (§4.3.1 (3))
# ----------------------------------------------------------------------------------------
class WRGPABlock(nn.Module):
    """ẑ^l = WRGPA(LN(z^{l-1})) + z^{l-1};  z^l = MLP(LN(ẑ^l)) + ẑ^l."""

    def __init__(self, dim: int, heads: int, window: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = WRGPA(dim, heads, window)
        self.mlp = Mlp(dim, mlp_ratio, dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        z = self.attn(self.norm1(z)) + z
        return self.mlp(self.norm2(z)) + z


class SCABlock(nn.Module):
    """ẑ^{l+1} = SCA(LN(z^l)) + z^l;  z^{l+1} = MLP(LN(ẑ^{l+1})) + ẑ^{l+1} + z^l (the paper's extra skip)."""

    def __init__(self, dim: int, groups: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SCA(dim, groups)
        self.mlp = Mlp(dim, mlp_ratio, dropout)

    def forward(self, z: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        b, h, w, c = z.shape
        t = z.reshape(b, h * w, c)
        zh = self.attn(self.norm1(t)) + t
        out = self.mlp(self.norm2(zh)) + zh + t
        return out.reshape(b, h, w, c)


class PSCJA(nn.Module):
    """I*_m = PSCJA(I_m) = SCA-Block(WRGPA-Block(I_m)), repeated ``depth`` times."""

    def __init__(self, dim: int, heads: int, window: int, groups: int, mlp_ratio: float, dropout: float, depth: int = 1):
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            self.blocks.append(WRGPABlock(dim, heads, window, mlp_ratio, dropout))
            self.blocks.append(SCABlock(dim, groups, mlp_ratio, dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for blk in self.blocks:
            x = blk(x)
        return x


def masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor], dim: int = -2) -> torch.Tensor:
    """Mean over ``dim`` of (..., N, C) counting only ``mask`` (..., N) True tokens."""
    if mask is None:
        return x.mean(dim)
    m = mask.to(x.dtype).unsqueeze(-1)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def pool_tokens(x: torch.Tensor, mask: torch.Tensor, stride: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Text down-sampling (§4.1): masked average of every ``stride`` consecutive tokens.

    (B, L, C), (B, L) bool → (B, ceil(L/stride), C), (B, ceil(L/stride)); a pooled token is
    valid when any of its tokens is.
    """
    b, n, c = x.shape
    pad = (-n) % stride
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
        mask = F.pad(mask, (0, pad), value=False)
    m = mask.reshape(b, -1, stride).to(x.dtype)
    s = (x.reshape(b, -1, stride, c) * m.unsqueeze(-1)).sum(2)
    cnt = m.sum(2)
    return s / cnt.clamp_min(1.0).unsqueeze(-1), cnt > 0


def shuffle_positions(nh: int, nw: int, ws: int) -> torch.Tensor:
    """(4, N_k, M, 2) map positions (row, col) that shuffled window j of quadrant k holds —
    used by tests and to document the shuffle on a hand-made map."""
    ii, jj = torch.meshgrid(torch.arange(nh * ws), torch.arange(nw * ws), indexing="ij")
    pos = torch.stack([ii, jj], -1)[None].float()  # (1, H, W, 2)
    return region_shuffle(window_partition(pos, ws))[0].long()


__all__: Sequence[str] = [
    "window_partition", "window_merge", "region_shuffle", "region_unshuffle", "proxy_windows",
    "SelfAttention", "CrossAttention", "TokenCrossAttention", "Mlp", "WRGPA", "SCA",
    "WRGPABlock", "SCABlock", "PSCJA", "masked_mean", "pool_tokens", "shuffle_positions",
]
