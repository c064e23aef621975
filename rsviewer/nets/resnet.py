"""ResNet-18/50 in torchvision's parameter naming, so users' torchvision state dicts load.

No weights ship for these (nothing here may download them): the user supplies a local
``.pth``/``.safetensors`` file. Feature maps at strides 8/16/32 (layer2/3/4) feed the
same multi-scale heads as EfficientNet-Lite.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .efficientnet_lite import StageInfo

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            self.downsample = nn.Sequential(nn.Conv2d(cin, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + idt)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * 4
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # stride on 3x3 (torchvision v1.5)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(nn.Conv2d(cin, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        idt = x if self.downsample is None else self.downsample(x)
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h)))
        return F.relu(self.bn3(self.conv3(h)) + idt)


_DEPTHS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}


class ResNet(nn.Module):
    mean = IMAGENET_MEAN
    std = IMAGENET_STD

    def __init__(self, variant: str = "resnet18", num_classes: int = 1000):
        super().__init__()
        if variant not in _DEPTHS:
            raise ValueError(f"unknown ResNet {variant!r}; choose from {sorted(_DEPTHS)}")
        block, reps = _DEPTHS[variant]
        self.variant = variant
        self.native_resolution = 224
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        cin = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), reps)):
            layers = []
            for j in range(n):
                layers.append(block(cin, planes, (1 if i == 0 else 2) if j == 0 else 1))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.fc = nn.Linear(cin, num_classes)
        e = block.expansion
        self.feature_info = [StageInfo(8, 2, 128 * e), StageInfo(16, 3, 256 * e), StageInfo(32, 4, 512 * e)]
        self.num_features = 512 * e

    _LAYERS = {"s8": "layer2", "s16": "layer3", "s32": "layer4"}

    def forward_features(self, x: torch.Tensor, head: bool = True, upto: str | None = None) -> dict[str, torch.Tensor]:
        """``{"s8", "s16", "s32"}``; ``upto="s8"|"s16"`` stops after that stage (see EfficientNetLite)."""
        if upto is not None and upto not in ("s8", "s16"):
            raise ValueError(f"cannot split the backbone after {upto!r}; use s8 or s16")
        h = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        out = {"s8": self.layer2(self.layer1(h))}
        if upto != "s8":
            out["s16"] = self.layer3(out["s8"])
            if upto is None:
                out["s32"] = self.layer4(out["s16"])
        return out

    def forward_from(self, h: torch.Tensor, after: str, head: bool = True) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        if after == "s8":
            h = out["s16"] = self.layer3(h)
        elif after != "s16":
            raise ValueError(f"cannot split the backbone after {after!r}; use s8 or s16")
        out["s32"] = self.layer4(h)
        return out

    def prefixes_after(self, after: str) -> list[str]:
        return {"s8": ["layer3.", "layer4."], "s16": ["layer4."]}[after]

    def cam_layers(self) -> dict[str, tuple[str, nn.Module]]:
        """Grad-CAM target layers by role (see EfficientNetLite.cam_layers); the head is layer4."""
        return {"head": ("layer4", self.layer4), "s32": ("layer4", self.layer4),
                "s16": ("layer3", self.layer3), "s8": ("layer2", self.layer2)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.forward_features(x)["s32"].mean((2, 3)))
