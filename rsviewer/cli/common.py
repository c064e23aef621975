"""Helpers shared by the sub-commands: model loading, JSON output, progress bars,
argument types that refuse absurd numbers in the parser, and output-path checks that
run before any work."""
from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Iterable

from ..utils.progress import StderrBar


def add_model_arg(p, required: bool = True) -> None:
    p.add_argument(
        "--model",
        default="default",
        help="'default', a name under models/, a model folder, a Hugging Face dual-encoder folder or an "
        "OpenAI/open_clip checkpoint file (default: %(default)s)",
    )
    p.add_argument("--set", dest="model_set", action="append", default=[], metavar="KEY=VALUE",
                   help="with a checkpoint file: override an inferred setting, e.g. activation=gelu")
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

    sets = parse_sets(getattr(args, "model_set", None) or [])
    model = load_model(args.model, device=pick_device(getattr(args, "device", "auto")), overrides=sets or None)
    desc = getattr(model, "description", None)
    if desc and not getattr(args, "quiet", False):  # a foreign model: say what was inferred
        print(f"{model.name}: {desc}", file=sys.stderr)
    return model


def parse_sets(items) -> dict:
    """``["activation=gelu", ...]`` → dict (one-line error for a malformed item)."""
    from ..errors import RsviewerError

    out = {}
    for it in items:
        k, sep, v = str(it).partition("=")
        if not sep or not k.strip():
            raise RsviewerError(f"--set expects KEY=VALUE, not {it!r}")
        out[k.strip()] = v
    return out


def emit(args, obj: Any, text: str | None = None) -> None:
    """``--json``: one line of JSON; otherwise ``text`` (or pretty JSON)."""
    if getattr(args, "json", False):
        print(json.dumps(obj, ensure_ascii=False))
    else:
        print(text if text is not None else json.dumps(obj, indent=2, ensure_ascii=False))


# ---- argument types: argparse turns their ArgumentTypeError into one `error:` line, exit 2 ----
def _number(text: str, kind):
    try:
        v = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if isinstance(v, float) and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def positive_int(text: str) -> int:
    """An integer ≥ 1 (batch sizes, epochs, k, steps, ...)."""
    v = _number(text, int)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def nonneg_int(text: str) -> int:
    v = _number(text, int)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {v}")
    return v


def views_int(text: str) -> int:
    """Dihedral views of an image: 1 (none) to 8 (all rotations and flips)."""
    v = _number(text, int)
    if not 1 <= v <= 8:
        raise argparse.ArgumentTypeError(f"must be between 1 and 8, got {v}")
    return v


def probability(text: str) -> float:
    """A number in [0, 1] (opacity, EMA decay, ...)."""
    v = _number(text, float)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {v:g}")
    return v


def positive_float(text: str) -> float:
    v = _number(text, float)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {v:g}")
    return v


def nonneg_float(text: str) -> float:
    v = _number(text, float)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {v:g}")
    return v


def input_size(text: str) -> int:
    """A model input side in pixels (16 .. 4096)."""
    v = _number(text, int)
    if not 16 <= v <= 4096:
        raise argparse.ArgumentTypeError(f"must be between 16 and 4096 px, got {v}")
    return v


# ---- outputs: checked before any work (rsviewer.utils.atomic checks again at write time) ----
def add_force_arg(p, what: str = "folder") -> None:
    if what == "folder":
        text = "replace an existing folder that rsviewer wrote (one it did not write is never replaced)"
    else:
        text = f"replace an existing {what}"
    p.add_argument("--force", action="store_true", help=text)


def check_out_dir(args, path, inputs: Iterable = (), label: str = "--out", force=None, kind=None) -> None:
    from ..utils.atomic import check_output_dir

    force = getattr(args, "force", False) if force is None else force
    check_output_dir(path, force, inputs, label=label, flag="--force", kind=kind)


def check_out_file(args, path, inputs: Iterable = (), label: str = "--out") -> None:
    from ..utils.atomic import check_output_file

    check_output_file(path, getattr(args, "force", False), inputs, label=label, flag="--force")
