"""rsviewer models — list the model folders rsviewer can find, with their val numbers."""
from __future__ import annotations

from .common import add_json_arg, emit


def register(sub) -> None:
    p = sub.add_parser("models", help="list available models (models/ folders) and their val mR")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoint import list_models, read_config, read_metrics

    rows = []
    for d in list_models():
        cfg, met = read_config(d), read_metrics(d)
        rows.append({
            "name": d.name, "path": str(d), "arch": cfg["arch"], "embed_dim": cfg.get("embed_dim"),
            "parameters": cfg.get("parameters"), "val_mR": (met.get("val") or {}).get("mR"),
            "dataset": met.get("dataset"),
        })
    lines = [f"{r['name']:<16} {r['arch']:<8} val mR {format(r['val_mR'], '6.2f') if r['val_mR'] is not None else '     —'}  {r['path']}" for r in rows]
    emit(args, rows, "\n".join(lines) or "no models found")
    return 0
