"""Device choice: CUDA when present (with bf16/fp16 autocast), else CPU."""
from __future__ import annotations

import contextlib

import torch

from ..errors import RsviewerError

# On the CPU a batch of images goes through an image tower a few at a time: the
# activations of 4 images at 256 px stay in cache, those of 32 do not. Measured on the
# demo index (2-core AVX-512 EPYC, docs/runtime.md): torch eager 2.6x faster than whole
# batches of 32, ONNX Runtime about 1.15x; the frozen-feature cache of training 6x
# (MSSA's three maps). The batch size still sets progress and memory.
CPU_MICRO_BATCH = 4


def micro_batch(device: torch.device | str, n: int, cpu_step: int | None = None) -> int:
    """Images per forward pass of a frozen image tower: ``CPU_MICRO_BATCH`` on the CPU,
    the whole batch of ``n`` on a GPU."""
    return max(1, cpu_step or CPU_MICRO_BATCH) if torch.device(device).type == "cpu" else max(1, n)


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
