"""OpenAI's ModifiedResNet image tower (RN50 / RN101 / RN50x4 ...), written from the
published description and loading OpenAI / open_clip keys (``visual.*``) directly:

- a 3-convolution stem (width/2, width/2, width; the first with stride 2) + 2×2 average pool;
- Bottlenecks that are *anti-aliased*: a stride > 1 is an average pool before the last
  1×1 convolution (and an ``AvgPool`` as ``downsample.-1`` on the shortcut), never a
  strided convolution;
- ``AttentionPool2d``: the mean token joins the flattened grid, a positional embedding is
  added, and one multi-head attention with the mean as the only query gives the embedding.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != planes * 4:
            self.downsample = nn.Sequential(OrderedDict([
                ("-1", nn.AvgPool2d(stride)),
                ("0", nn.Conv2d(inplanes, planes * 4, 1, bias=False)),
                ("1", nn.BatchNorm2d(planes * 4)),
            ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(self.avgpool(out)))
        short = x if self.downsample is None else self.downsample(x)
        return self.relu3(out + short)


class AttentionPool2d(nn.Module):
    def __init__(self, grid: int, dim: int, heads: int, out_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, dim))
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.c_proj = nn.Linear(dim, out_dim)
        self.heads = heads
        self.last_attention: torch.Tensor | None = None  # (B, heads, 1 + h·w) when kept
        self.keep_attention = False

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) → (B, 1 + h·w, C): mean token first, positions added (resized
        bicubically when the grid differs from the trained one)."""
        b, c, h, w = x.shape
        t = x.flatten(2).transpose(1, 2)
        t = torch.cat([t.mean(1, keepdim=True), t], 1)
        pos = self.positional_embedding
        g = int(round((pos.shape[0] - 1) ** 0.5))
        if (h, w) != (g, g):
            grid = pos[1:].reshape(1, g, g, c).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
            pos = torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, c)])
        return t + pos.to(t.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(x)
        b, n, c = t.shape
        d = c // self.heads
        q = self.q_proj(t[:, :1]).reshape(b, 1, self.heads, d).transpose(1, 2)
        k = self.k_proj(t).reshape(b, n, self.heads, d).transpose(1, 2)
        v = self.v_proj(t).reshape(b, n, self.heads, d).transpose(1, 2)
        att = torch.softmax((q * d**-0.5) @ k.transpose(-1, -2), -1)  # (B, H, 1, N)
        if self.keep_attention:
            self.last_attention = att[:, :, 0].detach()
        out = (att @ v).transpose(1, 2).reshape(b, c)
        return self.c_proj(out)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) → (B, h·w, out): every position through the value path alone
        (MaskCLIP's dense features for ResNets)."""
        t = self.tokens(x)[:, 1:]
        return self.c_proj(self.v_proj(t))


class ModifiedResNet(nn.Module):
    def __init__(self, layers: tuple[int, int, int, int], width: int, out_dim: int, heads: int, image_size: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        self._inplanes = width
        self.layer1 = self._stage(width, layers[0])
        self.layer2 = self._stage(width * 2, layers[1], stride=2)
        self.layer3 = self._stage(width * 4, layers[2], stride=2)
        self.layer4 = self._stage(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(image_size // 32, width * 32, heads, out_dim)

    def _stage(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        mods = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * 4
        mods += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*mods)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.relu3(self.bn3(self.conv3(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attnpool(self.trunk(x))
