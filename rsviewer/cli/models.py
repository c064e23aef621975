"""rsviewer models — list the model folders rsviewer can find, with their val numbers."""
from __future__ import annotations

from .common import add_json_arg, emit


def register(sub) -> None:
    p = sub.add_parser("models", help="list available models (models/ folders) and their val mR")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoint import model_summaries

    rows = model_summaries()  # a broken folder: one warning line on stderr, the rest listed
    def mr(r):
        v = r["val_mR"]
        return format(v, "6.2f") if isinstance(v, (int, float)) else "     —"

    lines = [f"{r['name']:<16} {r['arch']:<8} val mR {mr(r)}  {r['path']}" for r in rows]
    emit(args, rows, "\n".join(lines) or "no models found")
    return 0
