"""The Gswin transformer of CMPAGL (Sun et al., TGRS 2024, §III-B) in plain PyTorch.

Pieces, with the paper's equations:

- window partition / reverse and the shifted-window attention mask (Swin, which
  Gswin builds on: local windows of ``window`` × ``window`` tokens, shift = window // 2);
- :class:`WindowAttention` — LW-MSA / SLW-MSA, multi-head self-attention inside each
  (shifted) local window with a relative position bias;
- :class:`GlobalWindowGenerator` — GWG (Fig. 2a, eqs. 4–5): ``x1 = Conv3×3(GELU(Conv3×3(
  Conv1×1(F))))``, ``x = Concat(x1, Conv1×1(F))``, ``F_w = Pool(Conv1×1(x) + F)``,
  stacked until the map has the local window's size, so the global window has
  exactly the shape of a local window;
- :class:`GlobalLocalCrossAttention` — GLW-CA: the tokens of every local window
  (queries) attend to the *same* global window (keys/values) of their image;
- :class:`GswinBlock` — eq. 6: ``F_L = LW-MSA(F)``, ``F_SL = SLW-MSA(F_L)``,
  ``F_GL = GLW-CA(F_L, F_W) + GLW-CA(F_SL, F_W)``;
- :class:`PatchMerging` — eq. 2's PM (2×2 neighbours concatenated, LN, linear 4C → 2C);
- :class:`Gswin` — stages of Gswin blocks separated by patch merging.

Where the paper leaves a detail open we follow Swin/GCViT and say so next to the code
(pre-LayerNorm residual sub-layers, one MLP per block, relative position bias, one GWG per stage shared
by the stage's blocks as GCViT's global-query generator is).

Attention weights of the last forward are kept on request (``keep_attention``) for the
paper's attention figure (Fig. 7: "attention weights from the last layer of the Gswin
block").
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


# ---- windows ------------------------------------------------------------------------
def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) → (B·nW, ws·ws, C); H and W must be multiples of ``ws``."""
    b, h, w, c = x.shape
    x = x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def window_reverse(windows: torch.Tensor, ws: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B·nW, ws·ws, C) → (B, H, W, C)."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // ws) * (w // ws))
    x = windows.view(b, h // ws, w // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


@lru_cache(maxsize=64)
def _shift_mask_cpu(h: int, w: int, ws: int, shift: int) -> torch.Tensor:
    region = torch.zeros(1, h, w, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            region[:, hs, wsl, :] = cnt
            cnt += 1
    win = window_partition(region, ws).squeeze(-1)  # (nW, N)
    return win[:, None, :] != win[:, :, None]  # True = blocked


def shifted_window_mask(h: int, w: int, ws: int, shift: int, device=None) -> torch.Tensor:
    """(nW, N, N) bool, True where attention is blocked in the cyclically shifted map.

    After ``torch.roll(x, (-shift, -shift))`` the last window row/column holds tokens
    that wrapped around the border; tokens may attend only to tokens of their own
    (non-wrapped) region, exactly as in Swin.
    """
    return _shift_mask_cpu(h, w, ws, shift).to(device)


@lru_cache(maxsize=64)
def relative_position_index(ws: int, window: int) -> torch.Tensor:
    """(ws², ws²) indices into a ((2·window−1)², heads) bias table (``ws`` ≤ ``window``)."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)
    return rel[0] * (2 * window - 1) + rel[1]


def effective_window(h: int, w: int, window: int) -> int:
    """Swin's rule: a map no larger than the window is one window (and is not shifted)."""
    return min(window, h, w)


def pad_to_windows(x: torch.Tensor, ws: int) -> torch.Tensor:
    """Zero-pad (B, H, W, C) at the bottom/right to multiples of ``ws`` (Swin)."""
    h, w = x.shape[1:3]
    ph, pw = (-h) % ws, (-w) % ws
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    return x


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    if p <= 0 or not training:
        return x
    keep = torch.empty((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device, dtype=x.dtype).bernoulli_(1 - p)
    return x * keep / (1 - p)


class Mlp(nn.Sequential):
    def __init__(self, dim: int, ratio: float):
        hidden = max(1, int(dim * ratio))
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


# ---- attention ------------------------------------------------------------------------
class _RelBias(nn.Module):
    def __init__(self, heads: int, window: int):
        super().__init__()
        self.window = window
        self.table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.table, std=0.02)

    def forward(self, ws: int) -> torch.Tensor:  # (heads, N, N)
        idx = relative_position_index(ws, self.window).to(self.table.device)
        return self.table[idx.reshape(-1)].reshape(ws * ws, ws * ws, -1).permute(2, 0, 1)


def _attend(q, k, v, bias: torch.Tensor, keep: bool):
    """Softmax attention; returns (output, weights or None). Shapes broadcast over leading dims."""
    if keep:
        attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1) + bias
        attn = attn.softmax(-1)
        return attn @ v, attn
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype)), None


class WindowAttention(nn.Module):
    """LW-MSA / SLW-MSA: self-attention inside each local window (relative position bias)."""

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias = _RelBias(heads, window)
        self.keep_attention = False
        self.last_attention: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, ws: int, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` (B·nW, N, C) windows; ``mask`` (nW, N, N) bool (True = blocked) or None."""
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # (B·nW, heads, N, d)
        bias = self.bias(ws)[None]  # (1, heads, N, N)
        if mask is not None:  # shifted windows: (B, nW, heads, N, N) views, mask broadcast over B and heads
            nw = mask.shape[0]
            shape5 = (bw // nw, nw, self.heads, n, -1)
            q, k, v = q.reshape(shape5), k.reshape(shape5), v.reshape(shape5)
            bias = bias[:, None] + mask[None, :, None].to(bias.dtype) * -100.0  # (1, nW, heads, N, N)
        out, attn = _attend(q, k, v, bias, self.keep_attention)
        if mask is not None:
            out = out.reshape(bw, self.heads, n, -1)
            attn = attn.reshape(bw, self.heads, n, n) if attn is not None else None
        self.last_attention = attn.detach() if attn is not None else None
        return self.proj(out.transpose(1, 2).reshape(bw, n, c))


class GlobalLocalCrossAttention(nn.Module):
    """GLW-CA: queries from each local window, keys/values from the image's global window.

    Every local window of an image attends to the same global window ``F_w`` (Fig. 2b);
    the global window has the local window's shape, so the relative position bias of
    the local attention applies (GCViT's global query attention does the same).
    """

    def __init__(self, dim: int, heads: int, window: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.bias = _RelBias(heads, window)
        self.keep_attention = False
        self.last_attention: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, g: torch.Tensor, ws: int) -> torch.Tensor:
        """``x`` (B·nW, N, C) local windows, ``g`` (B, N, C) global windows → (B·nW, N, C)."""
        bw, n, c = x.shape
        b = g.shape[0]
        nw = bw // b
        d = c // self.heads
        q = self.q(x).reshape(b, nw, n, self.heads, d).permute(0, 1, 3, 2, 4)  # (B, nW, h, N, d)
        kv = self.kv(g).reshape(b, 1, n, 2, self.heads, d).permute(3, 0, 1, 4, 2, 5)  # (2, B, 1, h, N, d)
        k, v = kv[0].expand(-1, nw, -1, -1, -1), kv[1].expand(-1, nw, -1, -1, -1)
        out, attn = _attend(q, k, v, self.bias(ws)[None, None], self.keep_attention)
        self.last_attention = attn.detach() if attn is not None else None  # (B, nW, h, N, N)
        return self.proj(out.permute(0, 1, 3, 2, 4).reshape(bw, n, c))


# ---- GWG ------------------------------------------------------------------------------
class GWGLayer(nn.Module):
    """One GWG block (Fig. 2a): eq. 4 then eq. 5 (pooling halves H and W)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1x1_1 = nn.Conv2d(dim, dim, 1)
        self.conv3x3_1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv3x3_2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv1x1_2 = nn.Conv2d(dim, dim, 1)
        self.conv1x1_3 = nn.Conv2d(2 * dim, dim, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, C, ⌈H/2⌉, ⌈W/2⌉)
        x1 = self.conv3x3_2(F.gelu(self.conv3x3_1(self.conv1x1_1(f))))  # eq. 4, upper path
        x = torch.cat([x1, self.conv1x1_2(f)], 1)  # eq. 4, concat with the 1×1 path
        return F.avg_pool2d(self.conv1x1_3(x) + f, 2, ceil_mode=True)  # eq. 5


def gwg_layers_needed(size: int, window: int) -> int:
    """N_GWG: halvings that bring ``size`` down to the window (0 if it already fits)."""
    n = 0
    while size > window:
        size = math.ceil(size / 2)
        n += 1
    return n


class GlobalWindowGenerator(nn.Module):
    """GWG: ``N_GWG`` stacked :class:`GWGLayer` s, output (B, C, ws, ws) = a local window's shape.

    ``N_GWG`` is set from the stage's nominal resolution; at run time the layers apply
    while the map is larger than the window, and an adaptive average pool takes any
    remainder (a resolution that is not ``window``·2^k, or larger than planned) to
    exactly ``ws`` × ``ws`` — the property the cross-attention needs.
    """

    def __init__(self, dim: int, resolution: int, window: int):
        super().__init__()
        self.window = window
        self.layers = nn.ModuleList(GWGLayer(dim) for _ in range(gwg_layers_needed(resolution, window)))

    def forward(self, f: torch.Tensor, ws: Optional[int] = None) -> torch.Tensor:
        ws = ws or effective_window(f.shape[-2], f.shape[-1], self.window)
        for layer in self.layers:
            if max(f.shape[-2:]) <= ws:
                break
            f = layer(f)
        if tuple(f.shape[-2:]) != (ws, ws):
            f = F.adaptive_avg_pool2d(f, ws)
        return f


# ---- the block ------------------------------------------------------------------------------
class GswinBlock(nn.Module):
    """Eq. 6 with pre-LayerNorm residual sub-layers and one MLP, as a transformer block:

    - ``F_L  = F + LW-MSA(LN F)``                       (local windows)
    - ``F_SL = F_L + SLW-MSA(LN F_L)``                  (shifted local windows)
    - ``F_GL = ½[(F_L + GLW-CA(LN F_L, LN F_W)) + (F_SL + GLW-CA(LN F_SL, LN F_W))]``
    - ``out  = F_GL + MLP(LN F_GL)``

    Eq. 6 sums the two branches; the ½ (which the next LayerNorm cancels anyway) keeps
    the residual stream from doubling at every block. The two GLW-CA are separate
    modules (the paper's upper and lower branches). ``use_shift=False`` /
    ``use_global=False`` give the paper's ablations (Tables III–IV: "w/o SLW", "w/o GW").
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        window: int,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.0,
        use_shift: bool = True,
        use_global: bool = True,
    ):
        super().__init__()
        self.window = window
        self.use_shift = use_shift
        self.use_global = use_global
        self.drop_path = drop_path
        self.norm_l = nn.LayerNorm(dim)
        self.attn_l = WindowAttention(dim, heads, window)
        if use_shift:
            self.norm_s = nn.LayerNorm(dim)
            self.attn_s = WindowAttention(dim, heads, window)
        if use_global:
            self.norm_g = nn.LayerNorm(dim)  # the global window
            self.norm_ca1 = nn.LayerNorm(dim)
            self.ca1 = GlobalLocalCrossAttention(dim, heads, window)
            if use_shift:
                self.norm_ca2 = nn.LayerNorm(dim)
                self.ca2 = GlobalLocalCrossAttention(dim, heads, window)
        self.norm_o = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def _dp(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_path, self.training)

    def forward(self, x: torch.Tensor, gwin: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` (B, H, W, C); ``gwin`` (B, ws, ws, C) the stage's global window."""
        b, h, w, c = x.shape
        ws = effective_window(h, w, self.window)
        shift = ws // 2 if (self.use_shift and min(h, w) > ws) else 0

        # F_L = LW-MSA(F)
        xp = pad_to_windows(self.norm_l(x), ws)
        hp, wp = xp.shape[1:3]
        a = window_reverse(self.attn_l(window_partition(xp, ws), ws), ws, hp, wp)[:, :h, :w]
        f_l = x + self._dp(a)

        # F_SL = SLW-MSA(F_L)
        f_sl = None
        if self.use_shift:
            y = pad_to_windows(self.norm_s(f_l), ws)
            mask = None
            if shift:
                y = torch.roll(y, (-shift, -shift), dims=(1, 2))
                mask = shifted_window_mask(hp, wp, ws, shift, y.device)
            a = window_reverse(self.attn_s(window_partition(y, ws), ws, mask), ws, hp, wp)
            if shift:
                a = torch.roll(a, (shift, shift), dims=(1, 2))
            f_sl = f_l + self._dp(a[:, :h, :w])

        if self.use_global and gwin is not None:
            # F_GL = GLW-CA(F_L, F_W) + GLW-CA(F_SL, F_W)
            g = self.norm_g(gwin).reshape(b, ws * ws, c)

            def glw(f: torch.Tensor, norm: nn.Module, ca: GlobalLocalCrossAttention) -> torch.Tensor:
                fp = pad_to_windows(norm(f), ws)
                o = window_reverse(ca(window_partition(fp, ws), g, ws), ws, hp, wp)[:, :h, :w]
                return f + self._dp(o)

            out = glw(f_l, self.norm_ca1, self.ca1)
            if f_sl is not None:
                out = 0.5 * (out + glw(f_sl, self.norm_ca2, self.ca2))
        else:
            out = f_sl if f_sl is not None else f_l
        return out + self._dp(self.mlp(self.norm_o(out)))

    def set_keep_attention(self, on: bool) -> None:
        for m in self.modules():
            if isinstance(m, (WindowAttention, GlobalLocalCrossAttention)):
                m.keep_attention = on
                if not on:
                    m.last_attention = None


class PatchMerging(nn.Module):
    """PM of eq. 2: 2×2 neighbourhoods concatenated (4C), LayerNorm, linear to ``out_dim``."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C) → (B, ⌈H/2⌉, ⌈W/2⌉, out)
        h, w = x.shape[1:3]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
        return self.reduction(self.norm(x))


class MapTap(nn.Identity):
    """Identity on a (B, C, H, W) view of a stage output — a hook point for Grad-CAM."""


class GswinStage(nn.Module):
    """``depth`` Gswin blocks sharing one GWG (computed from the stage input, eq. 4–5)."""

    def __init__(
        self,
        dim: int,
        depth: int,
        heads: int,
        window: int,
        resolution: int,
        mlp_ratio: float,
        drop_paths: Sequence[float],
        use_shift: bool,
        use_global: bool,
    ):
        super().__init__()
        self.window = window
        self.gwg = GlobalWindowGenerator(dim, resolution, window) if use_global else None
        self.blocks = nn.ModuleList(
            GswinBlock(dim, heads, window, mlp_ratio, drop_paths[i], use_shift, use_global) for i in range(depth)
        )
        self.tap = MapTap()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gwin = None
        if self.gwg is not None:
            ws = effective_window(x.shape[1], x.shape[2], self.window)
            gwin = self.gwg(x.permute(0, 3, 1, 2), ws).permute(0, 2, 3, 1)  # (B, ws, ws, C)
        for blk in self.blocks:
            x = blk(x, gwin)
        return self.tap(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class Gswin(nn.Module):
    """Gswin stages on an embedded token grid: ``forward(x (B, H, W, C0)) -> list of stage outputs``.

    Stage ``k`` runs its blocks, then patch merging halves the grid and doubles the
    width (no merging after the last stage), i.e. ``F^(k+1) = PM(Gswin(F^(k)))`` (eq. 2).
    ``lateral`` (optional) adds extra token grids to a stage's input: the hybrid mode
    that feeds deeper pretrained CNN maps into the matching stage (see the model).
    """

    def __init__(
        self,
        width: int,
        depths: Sequence[int],
        resolution: int,
        window: int = 8,
        head_dim: int = 32,
        mlp_ratio: float = 4.0,
        drop_path: float = 0.1,
        use_shift: bool = True,
        use_global: bool = True,
    ):
        super().__init__()
        self.dims = [width * 2**i for i in range(len(depths))]
        dpr = torch.linspace(0, drop_path, max(1, sum(depths))).tolist()
        self.stages = nn.ModuleList()
        self.merges = nn.ModuleList()
        res, k = resolution, 0
        for i, (dim, depth) in enumerate(zip(self.dims, depths)):
            heads = max(1, dim // head_dim)
            self.stages.append(
                GswinStage(dim, depth, heads, window, res, mlp_ratio, dpr[k : k + depth], use_shift, use_global)
            )
            k += depth
            if i + 1 < len(depths):
                self.merges.append(PatchMerging(dim, self.dims[i + 1]))
                res = math.ceil(res / 2)
        self.norm = nn.LayerNorm(self.dims[-1])
        self.num_features = self.dims[-1]

    def forward(self, x: torch.Tensor, lateral: Optional[dict[int, torch.Tensor]] = None) -> list[torch.Tensor]:
        outs = []
        for i, stage in enumerate(self.stages):
            if lateral and i in lateral:
                x = x + lateral[i]
            x = stage(x)
            outs.append(x)
            if i < len(self.merges):
                x = self.merges[i](x)
        outs[-1] = self.norm(outs[-1])
        return outs

    def set_keep_attention(self, on: bool) -> None:
        for st in self.stages:
            for blk in st.blocks:
                blk.set_keep_attention(on)
