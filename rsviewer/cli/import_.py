"""rsviewer import PATH --name NAME — make a foreign model (OpenAI/open_clip checkpoint
file, Hugging Face dual-encoder folder) a named rsviewer model.

Writes ``models/NAME/`` in the one checkpoint format: config.json names arch ``clip``
with the inferred configuration and preprocessing; the foreign weights are referenced
by path and sha256, never copied (the hash is cached by size and modification time, so
opening stays fast; a changed file is refused).
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelError
from .common import add_json_arg, emit, parse_sets


def register(sub) -> None:
    p = sub.add_parser("import", help="make a CLIP-family checkpoint or Hugging Face folder a named model (weights referenced, not copied)")
    p.add_argument("path", help="OpenAI/open_clip checkpoint (.pt/.bin/.safetensors) or Hugging Face folder")
    p.add_argument("--name", required=True, help="model name (the folder models/NAME is written)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override what was inferred: activation=quick_gelu|gelu, vision_heads=N, text_heads=N, "
                        "caption_prefix=TEXT, image_size=N, resize=shortest|squash, interpolation=bicubic|bilinear")
    p.add_argument("--models-dir", default=None, help="where to write NAME (default: $RSVIEWER_MODELS or ./models)")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..archs.clip import Clip, config_for
    from ..checkpoint import save_model

    name = args.name.strip()
    if not name or "/" in name or os.sep in name or name.startswith("."):
        raise ModelError(f"--name must be a plain folder name, not {args.name!r}")
    root = Path(args.models_dir or (os.environ.get("RSVIEWER_MODELS", "").split(os.pathsep)[0] or "models"))
    out = root / name
    if out.exists():
        raise ModelError(f"{out} already exists; choose another --name or remove it yourself")
    src = Path(args.path).expanduser()
    if not src.exists():
        raise ModelError(f"{src} not found")
    cfg, desc = config_for(src, parse_sets(args.set))
    model = Clip(cfg)
    model.cfg.sha256 = model.weights_sha256  # from now on the weights must be these bytes
    print(f"inferred: {desc}", file=__import__("sys").stderr)
    root.mkdir(parents=True, exist_ok=True)
    metrics = {"imported_from": str(src.resolve()), "sha256": model.weights_sha256, "description": desc}
    save_model(model, out, metrics=metrics)
    emit(args, {"name": name, "path": str(out), "arch": "clip", "layout": cfg.layout, "sha256": model.weights_sha256,
                "description": desc},
         f"imported {src.name} as {name} → {out} (weights referenced by sha256 {model.weights_sha256[:12]}…, not copied)")
    return 0
