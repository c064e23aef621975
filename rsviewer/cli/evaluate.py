"""rsviewer eval --model M --data JSON --split val [--rerank none|mr|smr] [--compare B] [--per-query out.csv] [--json]

``--per-query FILE`` (.csv or .parquet) writes one row per caption (text→image: rank of its
image, top-1 image and label) and per image (image→text: rank of its best caption); with
``--compare B`` both models' columns side by side and ``rank_diff`` (see
``rsviewer.retrieval.per_query``). The printed R@K are those of ``rsviewer eval``.
"""
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
    p.add_argument("--per-query", default=None, metavar="FILE",
                   help="write per-query ranks (one row per caption and per image) to FILE.csv or FILE.parquet")
    p.add_argument("--compare", default=None, metavar="MODEL_B",
                   help="a second model evaluated on the same split; its columns and the rank difference "
                        "go next to --model's")
    add_json_arg(p)
    p.set_defaults(func=run)


def _lines(res: dict, name: str, split: str, rerank: str) -> str:
    i, t = res["i2t"], res["t2i"]
    return (
        f"{res['model']} on {name}/{split} ({res['n_images']} images, {res['n_captions']} captions), "
        f"rerank {rerank}\n"
        f"  image→text  R@1 {i['R@1']:6.2f}  R@5 {i['R@5']:6.2f}  R@10 {i['R@10']:6.2f}\n"
        f"  text→image  R@1 {t['R@1']:6.2f}  R@5 {t['R@5']:6.2f}  R@10 {t['R@10']:6.2f}\n"
        f"  mR {res['mR']:.2f}"
    )


def _check_out(path) -> None:
    from pathlib import Path

    from ..errors import RsviewerError

    from ..retrieval.per_query import _guard

    p = Path(path)
    if p.suffix.lower() not in (".csv", ".parquet"):
        raise RsviewerError(f"--per-query {path}: end the file name in .csv or .parquet")
    _guard(p)  # before minutes of encoding: refuse a folder or a file rsviewer did not write


def _load_b(args):
    from ..checkpoint import load_model
    from ..utils.device import pick_device

    return load_model(args.compare, device=pick_device(getattr(args, "device", "auto")))


def run(args) -> int:
    from ..data import load_dataset

    if args.per_query:
        _check_out(args.per_query)
    ds = load_dataset(args.data, images=args.images)
    ds.split(args.split)  # fail fast on a missing split, before loading the model
    from ..retrieval.evaluate import evaluate

    model = load(args)
    model_b = _load_b(args) if args.compare else None
    if not args.per_query and model_b is None:
        res = evaluate(model, ds, args.split, args.rerank, progress=progress_bar(args), batch_size=args.batch_size)
        emit(args, res, _lines(res, ds.name, args.split, args.rerank))
        rc = 0
    else:
        rc = _run_per_query(args, ds, model, model_b)
    _warn_if_seen(args.split, [m for m in (model, model_b) if m is not None])  # after the figures it qualifies
    return rc


def _warn_if_seen(split: str, models) -> None:
    """One stderr line when a model trained on the split it is evaluated on (not a held-out figure)."""
    import sys

    from ..retrieval.per_query import seen_in_training, trained_splits

    for m in models:
        if seen_in_training(m, [split]):
            print(f"warning: {getattr(m, 'name', m.arch)} was trained on {'+'.join(sorted(trained_splits(m)))}: "
                  f"its {split} figures are not held-out", file=sys.stderr)


def _summary(pq, ds, split: str) -> dict:
    """The same dict as ``retrieval.evaluate.evaluate`` (rounded), from the per-query result."""
    r = lambda d: {k: round(float(pq.metrics[d][k]), 2) for k in ("R@1", "R@5", "R@10")}  # noqa: E731
    return {"model": pq.model, "data": str(ds.source), "split": split, "n_images": len(pq.ids),
            "n_captions": len(pq.captions), "rerank": pq.rerank, "i2t": r("i2t"), "t2i": r("t2i"),
            "mR": round(float(pq.metrics["mR"]), 2)}


def _same_weights(a, b) -> bool:
    fa, fb = getattr(a, "fingerprint", None), getattr(b, "fingerprint", None)
    return fa is not None and fa == fb and getattr(a, "model_dir", None) == getattr(b, "model_dir", None)


def _run_per_query(args, ds, model, model_b) -> int:
    from ..retrieval.per_query import compare_table, per_query, per_query_table, score_dataset, write_table

    bar = progress_bar(args)
    scores = score_dataset(model, ds, args.split, args.rerank, progress=bar, batch_size=args.batch_size)
    pqs = [per_query(scores)]
    if model_b is not None:
        if _same_weights(model, model_b):  # the same model folder twice: its scores are the same
            scores_b = scores
        else:
            scores_b = score_dataset(model_b, ds, args.split, args.rerank, progress=bar, batch_size=args.batch_size)
        pqs.append(per_query(scores_b))
    res = [_summary(pq, ds, args.split) for pq in pqs]
    ceiling = round(float(pqs[0].ceiling["mR"]), 2)
    out = dict(res[0])
    out["ceiling_mR"] = ceiling
    out["n_distinct_captions"] = pqs[0].ceiling["n_distinct"]
    text = _lines(res[0], ds.name, args.split, args.rerank)
    if model_b is not None:
        out["compare"] = res[1]
        text += "\n" + _lines(res[1], ds.name, args.split, args.rerank)
        text += f"\n  mR difference (B − A) {res[1]['mR'] - res[0]['mR']:+.2f}"
    text += (f"\n  ceiling mR {ceiling:.2f} (a model perfect except among identical captions; "
             f"{out['n_distinct_captions']} distinct of {res[0]['n_captions']})")
    if args.per_query:
        table = compare_table(*pqs) if model_b is not None else per_query_table(pqs[0])
        meta = {"models": [r["model"] for r in res], "rerank": args.rerank, "split": args.split,
                "data": str(ds.source), "metrics": res, "ceiling_mR": ceiling}
        path = write_table(table, args.per_query, meta)
        out["per_query"] = str(path)
        text += f"\n  per-query ranks: {path} ({len(table['direction'])} rows)"
    emit(args, out, text)
    return 0
