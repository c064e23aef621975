"""rsviewer models — list the model folders rsviewer can find, with their val (or cross-validation) numbers."""
from __future__ import annotations

from .common import add_json_arg, emit


def register(sub) -> None:
    p = sub.add_parser("models", help="list available models (models/ folders) with their val mR, or CV mR for a model retrained after cross-validation")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoint import model_summaries

    rows = model_summaries()  # a broken folder: one warning line on stderr, the rest listed
    def mr(r):  # a model retrained after cross-validation has no val figure: its CV estimate instead
        if r["cv_mR"] is not None:
            return f" CV mR {r['cv_mR']:6.2f}" + (f" ± {r['cv_se']:.2f}" if r["cv_se"] is not None else "")
        return f"val mR {r['val_mR']:6.2f}" if r["val_mR"] is not None else "val mR      —"

    width = max([16] + [len(r["name"]) for r in rows])  # names line up however long
    lines = [f"{r['name']:<{width}} {r['arch']:<8} {mr(r):<20} {r['path']}" for r in rows]
    emit(args, rows, "\n".join(lines) or "no models found")
    return 0
