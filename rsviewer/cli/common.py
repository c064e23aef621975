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
        help="'default', a name under models/, a model folder, a Hugging Face dual-encoder folder or an "
        "OpenAI/open_clip checkpoint file (default: %(default)s)",
    )
    p.add_argument("--set", dest="model_set", action="append", default=[], metavar="KEY=VALUE",
                   help="with a checkpoint file: override an inferred setting, e.g. activation=gelu")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")


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
