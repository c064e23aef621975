"""CMER (2024): Focus-Adapter side branch, LoRA text encoder, scene-label prompts in
training, negative-sample recycling with a difficulty-weighted hinge. See ``model.py``;
over a frozen CLIP ViT (``--set clip=PATH``): ``archs/clip_branch.py``."""
from ..clip_branch import ClipBranch
from .focus import FocusAdapter, FocusLayer
from .lora import LoRALinear, apply_lora
from .model import CMER, CMERConfig
from .prompts import augment, readable_label
from .queue import NegativeQueue, difficulty_weighted_hinge

__all__ = [
    "CMER",
    "CMERConfig",
    "ClipBranch",
    "FocusAdapter",
    "FocusLayer",
    "LoRALinear",
    "NegativeQueue",
    "apply_lora",
    "augment",
    "difficulty_weighted_hinge",
    "readable_label",
]
