"""An inference-only copy of an EfficientNet-Lite backbone for the shared-map mode.

On a CPU, running EfficientNet-Lite over a 10k px scene spends as much time in
BatchNorm, ReLU6 and explicit "SAME" padding (memory-bound passes over large
activations) as in the convolutions. This copy

- folds every BatchNorm into the preceding convolution's weights and bias,
- pads stride-1 convolutions inside the convolution (TF "SAME" is symmetric for odd
  kernels at stride 1; only the five stride-2 convolutions keep an explicit pad),
- applies ReLU6 in place,
- keeps weights in channels-last layout, in bf16 when asked.

It computes the same function as ``backbone.forward_features`` (checked numerically
when it is built); the model itself is never modified. Built once per model and dtype.
"""
from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import Cancelled

__all__ = ["fused_backbone"]

_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _FConv(nn.Module):
    def __init__(self, conv: nn.Conv2d, bn: nn.BatchNorm2d, dtype: torch.dtype):
        super().__init__()
        w = conv.weight.detach().float()
        scale = bn.weight.detach().float() / torch.sqrt(bn.running_var.detach().float() + bn.eps)
        b = bn.bias.detach().float() - bn.running_mean.detach().float() * scale
        if conv.bias is not None:
            b = b + conv.bias.detach().float() * scale
        self.weight = nn.Parameter((w * scale.view(-1, 1, 1, 1)).to(dtype).contiguous(memory_format=torch.channels_last),
                                   requires_grad=False)
        self.bias = nn.Parameter(b.to(dtype), requires_grad=False)
        self.stride = conv.stride
        self.groups = conv.groups
        self.k = conv.weight.shape[-1]
        self.sym = self.stride == (1, 1) and self.k % 2 == 1
        self.shifted = None
        if self.stride == (2, 2) and self.k % 2 == 1:
            # TF "SAME" at stride 2 on an even input pads (k-1)//2 before and k//2 after.
            # A (k+1)×(k+1) kernel with a leading zero row/column and a symmetric pad of
            # k//2 gives the same sums without materialising a padded copy.
            wk = F.pad(self.weight.detach().float(), [1, 0, 1, 0])
            self.shifted = nn.Parameter(wk.to(dtype).contiguous(memory_format=torch.channels_last), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sym:
            return F.conv2d(x, self.weight, self.bias, 1, self.k // 2, 1, self.groups)
        ih, iw = x.shape[-2:]
        if self.shifted is not None and ih % 2 == 0 and iw % 2 == 0:
            return F.conv2d(x, self.shifted, self.bias, self.stride, self.k // 2, 1, self.groups)
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + self.k - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + self.k - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, 1, self.groups)


class _FBlock(nn.Module):
    def __init__(self, blk, dtype):
        super().__init__()
        self.expand = _FConv(blk._expand_conv, blk._bn0, dtype) if blk.has_expand else None
        self.dw = _FConv(blk._depthwise_conv, blk._bn1, dtype)
        self.project = _FConv(blk._project_conv, blk._bn2, dtype)
        self.skip = blk.skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.expand is not None:
            h = F.relu6(self.expand(h), inplace=True)
        h = F.relu6(self.dw(h), inplace=True)
        h = self.project(h)
        if self.skip:
            h += x
        return h


class FusedLite(nn.Module):
    def __init__(self, bb, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.stem = _FConv(bb._conv_stem, bb._bn0, dtype)
        self.blocks = nn.ModuleList(_FBlock(b, dtype) for b in bb._blocks)
        self.head = _FConv(bb._conv_head, bb._bn1, dtype)
        self.taps = dict(bb._taps)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        h = F.relu6(self.stem(x.to(self.dtype)), inplace=True)
        out: dict[str, torch.Tensor] = {}
        for i, blk in enumerate(self.blocks):
            h = blk(h)
            if i in self.taps:
                out[f"s{self.taps[i]}"] = h
        out["s32"] = F.relu6(self.head(h), inplace=True)
        return out


def _is_lite(bb) -> bool:
    return all(hasattr(bb, a) for a in ("_conv_stem", "_bn0", "_blocks", "_conv_head", "_bn1", "_taps"))


def fused_backbone(model, dtype: torch.dtype = torch.float32):
    """A fused copy of ``model.backbone`` if it is an EfficientNet-Lite whose
    ``forward_features`` is exactly ``model.feature_maps`` (checked), else ``None``."""
    per = _cache.setdefault(model, {})
    key = (dtype, str(model.device))
    if key in per:
        return per[key]
    fused = None
    bb = getattr(model, "backbone", None)
    if bb is not None and _is_lite(bb) and callable(getattr(model, "feature_maps", None)):
        try:
            with torch.inference_mode():
                ref32 = FusedLite(bb, torch.float32).to(model.device).eval()
                g = torch.Generator().manual_seed(1)
                x = torch.randn(1, 3, 96, 96, generator=g).to(model.device)
                want = model.feature_maps(x)
                got = ref32.forward_features(x.contiguous(memory_format=torch.channels_last))
                ok = set(want) == set(got) and all(
                    torch.allclose(want[k].float(), got[k].float(), atol=1e-3, rtol=1e-3) for k in want
                )
            if ok:
                fused = ref32 if dtype == torch.float32 else FusedLite(bb, dtype).to(model.device).eval()
        except Cancelled:
            raise  # not a verdict on the backbone: nothing is memoised
        except Exception:
            fused = None
    per[key] = fused
    return fused
