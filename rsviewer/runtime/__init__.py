"""An inference runtime for the frozen, gradient-free towers of every model.

Index building, localization windows, zero-shot classification and query encoding run
the image and text towers through :func:`towers` (ONNX Runtime when installed, exported
once per model fingerprint into ``$RSVIEWER_CACHE/onnx`` and parity-checked against
PyTorch); training, Grad-CAM and anything with gradients stays in PyTorch.

- :mod:`.export` — the ONNX export, its cache and the parity check
- :mod:`.towers` — sessions, the ``torch|onnx|auto`` choice, thread counts, ``warm_up``
- :mod:`.quantize` — ``precision="int8"``: quantized copies of the exports, with their fidelity
"""
from .towers import RUNTIMES, Towers, ort_available, resolve_runtime, towers, warm_up

__all__ = ["RUNTIMES", "Towers", "ort_available", "resolve_runtime", "towers", "warm_up"]
