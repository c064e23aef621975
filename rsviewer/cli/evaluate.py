"""rsviewer eval --model M --data JSON --split val [--rerank none|mr|smr] [--json]"""
from __future__ import annotations

from .common import add_json_arg, add_model_arg, emit, load, positive_int, progress_bar


def register(sub) -> None:
    p = sub.add_parser("eval", help="R@1/5/10 both ways and mR on a dataset split (SPEC §3)")
    add_model_arg(p)
    p.add_argument("--data", required=True, help="dataset (Karpathy JSON, precomp folder, CSV)")
    p.add_argument("--images", default=None, help="image folder (default: next to the dataset)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--rerank", default="none", choices=["none", "mr", "smr"])
    p.add_argument("--batch-size", type=positive_int, default=32)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data import load_dataset

    ds = load_dataset(args.data, images=args.images)
    ds.split(args.split)  # fail fast on a missing split, before loading the model
    from ..retrieval.evaluate import evaluate

    model = load(args)
    res = evaluate(model, ds, args.split, args.rerank, progress=progress_bar(args), batch_size=args.batch_size)
    i, t = res["i2t"], res["t2i"]
    text = (
        f"{res['model']} on {ds.name}/{args.split} ({res['n_images']} images, {res['n_captions']} captions), "
        f"rerank {args.rerank}\n"
        f"  image→text  R@1 {i['R@1']:6.2f}  R@5 {i['R@5']:6.2f}  R@10 {i['R@10']:6.2f}\n"
        f"  text→image  R@1 {t['R@1']:6.2f}  R@5 {t['R@5']:6.2f}  R@10 {t['R@10']:6.2f}\n"
        f"  mR {res['mR']:.2f}"
    )
    emit(args, res, text)
    return 0
