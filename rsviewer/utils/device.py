"""Device choice: CUDA when present (with bf16/fp16 autocast), else CPU."""
from __future__ import annotations

import contextlib

import torch

from ..errors import RsviewerError


def pick_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` → cuda if available else cpu; ``cpu``; ``cuda``/``cuda:N`` (error if absent)."""
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise RsviewerError("--device cuda was asked for but no CUDA GPU is available")
    if spec not in ("cpu",) and not spec.startswith("cuda"):
        raise RsviewerError(f"unknown device {spec!r}; use auto, cpu or cuda")
    return torch.device(spec)


def autocast(device: torch.device | str):
    """bf16 autocast on GPUs that support it (fp16 otherwise); a no-op on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def describe(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"
