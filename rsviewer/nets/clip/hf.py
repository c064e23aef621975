"""Any Hugging Face dual encoder (CLIP, SigLIP/SigLIP 2, ChineseCLIP, AltCLIP, ...): a
folder ``AutoModel`` builds and that has ``get_image_features``/``get_text_features``.

Its own tokenizer (``AutoTokenizer`` from the folder) and its own image preprocessing,
read from ``preprocessor_config.json`` and computed here (resize, centre crop,
normalise) — no torchvision, no image-processor class at run time.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import ModelError

RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def is_hf_folder(p: Path) -> bool:
    return p.is_dir() and (p / "config.json").exists() and _hf_config(p) is not None


def _hf_config(p: Path) -> dict | None:
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return cfg if isinstance(cfg, dict) and ("model_type" in cfg or "architectures" in cfg) else None


def preprocessing(folder: Path, model_config: Any = None) -> dict:
    """Resize/crop/normalisation from ``preprocessor_config.json`` (CLIP's defaults when absent)."""
    p = folder / "preprocessor_config.json"
    pc = json.loads(p.read_text()) if p.exists() else {}
    pc = pc.get("image_processor", pc)  # processor_config.json style nesting
    size = pc.get("size", {"shortest_edge": 224})
    if isinstance(size, int):
        size = {"shortest_edge": size}
    crop = pc.get("crop_size", None)
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    do_crop = bool(pc.get("do_center_crop", crop is not None))
    if "shortest_edge" in size:
        resize, rsize = "shortest", int(size["shortest_edge"])
    else:
        resize, rsize = "squash", int(size.get("height", 224))
    out = int(crop["height"]) if do_crop and crop else rsize
    if not do_crop and resize == "shortest":
        resize = "squash"  # a short-side resize without a crop gives non-square inputs; squash like the field's evals
    mean = pc.get("image_mean", [0.48145466, 0.4578275, 0.40821073])
    std = pc.get("image_std", [0.26862954, 0.26130258, 0.27577711])
    if pc.get("do_normalize", True) is False:
        mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    return {
        "resize": resize, "resize_size": rsize, "image_size": out,
        "interpolation": RESAMPLE.get(int(pc.get("resample", 3)), "bicubic"),
        "mean": [float(m) for m in mean], "std": [float(s) for s in std],
        "rescale": float(pc.get("rescale_factor", 1 / 255)) if pc.get("do_rescale", True) else 1.0,
    }


def features(out: Any) -> torch.Tensor:
    """``get_*_features`` output: a tensor (transformers < 5) or an output object (≥ 5)."""
    if isinstance(out, torch.Tensor):
        return out
    for key in ("pooler_output", "image_embeds", "text_embeds"):
        v = getattr(out, key, None)
        if isinstance(v, torch.Tensor):
            return v
    raise ModelError(f"get_*_features returned {type(out).__name__} without a pooled output")


class HFDualEncoder(nn.Module):
    kind = "hf"

    def __init__(self, folder: str | Path):
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder)
        cfg = _hf_config(folder)
        if cfg is None:
            raise ModelError(f"{folder} is not a Hugging Face model folder (no readable config.json)")
        try:
            self.model = AutoModel.from_pretrained(str(folder), attn_implementation="eager", local_files_only=True)
        except Exception as e:  # noqa: BLE001 — transformers raises many kinds; one line for the user
            try:
                self.model = AutoModel.from_pretrained(str(folder), local_files_only=True)
            except Exception:  # noqa: BLE001
                raise ModelError(f"{folder.name}: transformers cannot build this folder ({str(e).splitlines()[0][:160]})") from None
        if not (callable(getattr(self.model, "get_image_features", None)) and callable(getattr(self.model, "get_text_features", None))):
            raise ModelError(
                f"{folder.name} is a {type(self.model).__name__} ({cfg.get('model_type')}), not an image–text dual encoder "
                f"(it has no get_image_features/get_text_features)"
            )
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # noqa: BLE001
            raise ModelError(f"{folder.name}: no usable tokenizer in the folder ({str(e).splitlines()[0][:160]})") from None
        self.model.eval()
        self.model_type = str(cfg.get("model_type", type(self.model).__name__))
        tc = getattr(self.model.config, "text_config", None)
        ctx = getattr(tc, "max_position_embeddings", None) or 77
        tml = getattr(self.tokenizer, "model_max_length", None)
        self.context = int(min(ctx, tml)) if isinstance(tml, int) and tml < 10**6 else int(ctx)
        self.embed_dim = int(getattr(self.model.config, "projection_dim", 0) or getattr(tc, "hidden_size", 0))
        self.sigmoid = hasattr(self.model, "logit_bias")  # SigLIP: sigmoid(scale·cos + bias)

    def tokenize(self, texts: list[str]) -> tuple[dict[str, torch.Tensor], list[bool]]:
        # SigLIP was trained on max-length padding (and no attention mask); CLIP is indifferent
        tok = self.tokenizer(list(texts), padding="max_length", truncation=True, max_length=self.context, return_tensors="pt")
        full = self.tokenizer(list(texts), truncation=False)["input_ids"]
        return dict(tok), [len(ids) > self.context for ids in full]

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return features(self.model.get_image_features(pixel_values=pixels))

    def encode_text(self, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
        names = set(getattr(self.tokenizer, "model_input_names", tokens.keys()))
        if self.model_type == "siglip":  # trained on max-length padding without a mask (its own tokenizer gives none)
            names = {"input_ids"}
        return features(self.model.get_text_features(**{k: v for k, v in tokens.items() if k in names}))

    def vision_model(self):
        return getattr(self.model, "vision_model", None)

    def logit_scale_bias(self) -> tuple[float, float]:
        s = float(self.model.logit_scale.exp()) if hasattr(self.model, "logit_scale") else 100.0
        b = float(self.model.logit_bias) if self.sigmoid else 0.0
        return s, b
