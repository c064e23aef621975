"""Helpers shared by the sub-commands: model loading, JSON output, progress bars."""
from __future__ import annotations

import json
import sys
from typing import Any

from ..utils.progress import StderrBar


def add_model_arg(p, required: bool = True) -> None:
    p.add_argument(
        "--model",
        default="default",
        help="'default', a name under models/, or a model folder (default: %(default)s)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")


def add_runtime_arg(p) -> None:
    """``--runtime`` for commands that encode with the frozen towers (rsviewer.runtime)."""
    p.add_argument("--runtime", choices=["auto", "onnx", "openvino", "torch"], default="auto",
                   help="frozen encoders: auto = exported ONNX graphs in ONNX Runtime on the CPU when installed, "
                        "else torch; openvino = the same graphs in OpenVINO (default: auto)")


def add_json_arg(p) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar on stderr")


def progress_bar(args) -> StderrBar:
    return StderrBar(enabled=not getattr(args, "quiet", False))


def load(args):
    from ..checkpoint import load_model
    from ..utils.device import pick_device

    return load_model(args.model, device=pick_device(getattr(args, "device", "auto")))


def emit(args, obj: Any, text: str | None = None) -> None:
    """``--json``: one line of JSON; otherwise ``text`` (or pretty JSON)."""
    if getattr(args, "json", False):
        print(json.dumps(obj, ensure_ascii=False))
    else:
        print(text if text is not None else json.dumps(obj, indent=2, ensure_ascii=False))
