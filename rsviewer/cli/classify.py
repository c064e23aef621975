"""rsviewer classify --model M --images DIR [--json] — zero-shot, sub-folder names are the classes"""
from __future__ import annotations

from .common import add_json_arg, add_model_arg, add_runtime_arg, emit, load, progress_bar


def register(sub) -> None:
    p = sub.add_parser("classify", help="zero-shot scene classification (sub-folder names are the classes)")
    add_model_arg(p)
    p.add_argument("--images", required=True, help="folder with one sub-folder of images per class")
    p.add_argument("--predictions", action="store_true", help="with --json: include per-image predictions")
    add_runtime_arg(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data import load_dataset

    ds = load_dataset(args.images)  # a bad folder fails before the model loads
    from ..retrieval.classify import classify

    model = load(args)
    res = classify(model, ds, progress=progress_bar(args), runtime=args.runtime)
    out = {k: res[k] for k in ("accuracy", "n", "per_class")}
    if res.get("calibration"):
        out["calibration"] = res["calibration"]  # how --predictions probabilities were computed
    if args.predictions:
        out["predictions"] = res["predictions"]
        out["prompts"] = res["prompts"]
    lines = [f"zero-shot accuracy {res['accuracy']}% on {res['n']} images, {len(res['classes'])} classes"]
    lines += [f"  {name:<22} {acc:6.2f}%  ({res['prompts'][name]})" for name, acc in sorted(res["per_class"].items())]
    emit(args, out, "\n".join(lines))
    return 0
