"""rsviewer explain --model M --image PATH --text "…" --method … --out PNG [--json]
rsviewer explain-eval --model M --data JSON --split S [--n 100] [--methods …] [--json]"""
from __future__ import annotations

import argparse

from .common import (
    add_force_arg, add_json_arg, add_model_arg, check_out_file, emit, input_size, load, nonneg_float, positive_int,
    probability, progress_bar,
)

METHOD_CHOICES = ("gradcam", "gradcam++", "scorecam", "rollout", "chefer", "maskclip", "surgery", "attention", "patch", "tokens", "words")


def register(sub) -> None:
    p = sub.add_parser(
        "explain",
        help="heatmap of why an image matches a query (Grad-CAM, attention, tokens, words, ...)",
        description="Explain the similarity of an image with a text (or a query image) and write a PNG.",
    )
    add_model_arg(p)
    p.add_argument("--image", help="the image to explain")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--text", help="the query text")
    q.add_argument("--query-image", help="a query image (image-to-image similarity)")
    p.add_argument("--method", default="gradcam", choices=METHOD_CHOICES, help="(default: %(default)s)")
    p.add_argument("--out", help="PNG to write (overlay, token sheet or word chart)")
    add_force_arg(p, "--out file")
    p.add_argument("--layer", default=None, help="Grad-CAM/Score-CAM layer (default: the architecture's preset; see --list)")
    p.add_argument("--map", default=None, help="attention: which of the architecture's maps to show")
    p.add_argument("--cmap", default="jet", help="jet | viridis | inferno | gray | turbo | magma | plasma | hot")
    p.add_argument("--alpha", type=probability, default=0.5, help="heatmap opacity 0..1 (default %(default)s)")
    p.add_argument("--contour", action="store_true", help="draw iso-contours at 25/50/75 %%")
    p.add_argument("--smooth", type=nonneg_float, default=0.0, help="Gaussian smoothing sigma (fraction of the shorter side if < 1, else px)")
    p.add_argument("--input-size", type=input_size, default=None, help="run the model at this square size (default: its own)")
    p.add_argument("--channels", type=positive_int, default=None, help="scorecam: number of channels used (default 16)")
    p.add_argument("--list", action="store_true", help="print the methods and layers available for the model and exit")
    add_json_arg(p)
    p.set_defaults(func=run)

    e = sub.add_parser(
        "explain-eval",
        help="deletion/insertion faithfulness of the explanation methods",
        description="Deletion and insertion AUCs (normalised by the unperturbed score) of every "
        "available method and a random map, on images of a split with their first caption.",
    )
    add_model_arg(e)
    e.add_argument("--data", required=True, help="dataset JSON (Karpathy layout) or folder")
    e.add_argument("--images", default=None, help="image folder (default: next to the dataset)")
    e.add_argument("--split", default="val", help="(default: %(default)s)")
    e.add_argument("--n", type=positive_int, default=100, help="number of images, a seeded sample (default %(default)s)")
    e.add_argument("--methods", nargs="+", default=None, help="methods to measure (default: all with a heatmap)")
    e.add_argument("--steps", type=positive_int, default=16, help="perturbation steps (default %(default)s)")
    e.add_argument("--baseline", default="blur", choices=["blur", "mean"], help="what removed pixels become")
    e.add_argument("--batch-size", type=positive_int, default=4, help="images per batch (default %(default)s)")
    e.add_argument("--input-size", type=input_size, default=None, help="model input size (default: its own)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--channels", type=positive_int, default=None, help="scorecam: number of channels (default 16)")
    e.add_argument("--out", default=None, help="also write the JSON result to this file")
    add_force_arg(e, "--out file")
    add_json_arg(e)
    e.set_defaults(func=run_eval)


def _progress(args):
    bar = progress_bar(args)
    return bar


def run(args) -> int:
    import numpy as np

    from ..errors import QueryError

    if not args.list:  # checked before the engine imports and the model loads (seconds)
        if not args.image:
            raise QueryError("give --image PATH (the image to explain)")
        if args.text is None and not args.query_image:
            raise QueryError("give --text \"…\" or --query-image PATH")
        if not args.out and not args.json:
            raise QueryError("give --out PNG (and/or --json)")
        from pathlib import Path

        from ..errors import ImageError

        for p in (args.image, args.query_image):
            if p and not Path(p).is_file():  # before the model loads (seconds)
                raise ImageError(f"image not found: {p}")
        if args.out:
            check_out_file(args, args.out, [args.image, args.query_image])
    from ..explain import available_methods, broken_methods, explain, gradcam_layer_names, map_stats
    from ..explain.overlay import COLORMAPS, render_png

    if args.cmap not in COLORMAPS:
        raise QueryError(f"unknown colormap {args.cmap!r}; choose from {', '.join(COLORMAPS)}")
    model = load(args)
    if args.list:
        obj = {"model": getattr(model, "name", model.arch), "arch": model.arch,
               "methods": available_methods(model), "layers": gradcam_layer_names(model),
               "broken": broken_methods(model)}
        text = f"methods: {', '.join(obj['methods'])}\nlayers:  {', '.join(obj['layers']) or '-'}"
        if obj["broken"]:  # an architecture bug: say which methods it hides and why
            text += "\nbroken:  " + "; ".join(f"{m} ({why})" for m, why in obj["broken"].items())
        emit(args, obj, text)
        return 0
    opts = {}
    if args.map:
        opts["map"] = args.map
    if args.channels:
        opts["channels"] = args.channels
    if args.input_size:
        opts["input_size"] = args.input_size
    if args.smooth:
        opts["smooth"] = args.smooth
    if args.query_image:
        opts["query_image"] = args.query_image
    ex = explain(model, args.image, args.text, args.method, layer=args.layer, progress=_progress(args), **opts)
    out = None
    if args.out:
        out = render_png(ex, args.out, cmap=args.cmap, alpha=args.alpha, contour=args.contour)
    obj = {
        "method": ex.method,
        "model": getattr(model, "name", model.arch),
        "arch": model.arch,
        "image": str(args.image),
        "query": ex.text if ex.text is not None else {"image": args.query_image},
        "score": round(ex.score, 6),
        "layer": ex.layer,
        "seconds": ex.info.get("seconds"),
        "out": str(out) if out else None,
    }
    if ex.heatmap is not None:
        obj["map"] = map_stats(ex.heatmap)
    if ex.words is not None and ex.word_weights is not None:
        obj["words"] = ex.words
        obj["word_weights"] = np.round(np.asarray(ex.word_weights, dtype=float), 5).tolist()
        if ex.word_rows:
            obj["word_rows"] = ex.word_rows
    if ex.grids:
        obj["grids"] = {k: list(v.shape) for k, v in ex.grids.items()}
    if ex.grid_words:
        obj["grid_words"] = ex.grid_words
    obj["info"] = {k: v for k, v in ex.info.items() if k not in ("seconds",)}
    lines = [f"{ex.method} on {args.image}: score {ex.score:+.4f}" + (f" (layer {ex.layer})" if ex.layer else "")]
    if ex.heatmap is not None:
        st = obj["map"]
        lines.append(
            f"map: mean {st['mean']:.3f}, peak at x={st['peak'][0]} y={st['peak'][1]}, "
            f"entropy {st['entropy']:.3f}, top-10% mass {st['top10_mass']:.2f}"
        )
    if ex.words is not None and ex.word_weights is not None:
        ww = np.asarray(ex.word_weights)
        row = ww if ww.ndim == 1 else ww.mean(0)
        lines.append("words: " + "  ".join(f"{w} {v:.2f}" for w, v in zip(ex.words, row)))
    if out:
        lines.append(f"wrote {out}")
    emit(args, obj, "\n".join(lines))
    return 0


def run_eval(args) -> int:
    from ..data import load_dataset

    if args.out:  # before minutes of perturbation runs
        check_out_file(args, args.out, [args.data, args.images])
    load_dataset(args.data, images=args.images).split(args.split)  # a bad dataset or split: before the model loads
    from ..explain.faithfulness import evaluate_faithfulness

    model = load(args)
    res = evaluate_faithfulness(
        model,
        args.data,
        split=args.split,
        n=args.n,
        methods=args.methods,
        steps=args.steps,
        batch_size=args.batch_size,
        baseline=args.baseline,
        seed=args.seed,
        images=args.images,
        input_size=args.input_size,
        method_opts={"scorecam": {"channels": args.channels}} if args.channels else None,
        progress=_progress(args),
    )
    res["command"] = "rsviewer explain-eval " + " ".join(_argv(args))
    if args.out:
        from pathlib import Path

        from ..utils.atomic import write_json

        write_json(Path(args.out), res)
    lines = [
        f"faithfulness of {res['model']} on {res['split']} (n={res['n']}, {res['steps']} steps, {res['baseline']} baseline)",
        f"{'method':<12} {'deletion AUC ↓':>15} {'insertion AUC ↑':>16}",
    ]
    for m, v in res["methods"].items():
        lines.append(
            f"{m:<12} {v['deletion_auc']:>9.3f} ±{v['deletion_auc_sem']:.3f} {v['insertion_auc']:>10.3f} ±{v['insertion_auc_sem']:.3f}"
        )
    for m, why in res.get("not_available", {}).items():
        lines.append(f"{m:<12} not available: {why}")
    emit(args, res, "\n".join(lines))
    return 0


def _argv(args: argparse.Namespace) -> list[str]:
    out = ["--model", str(args.model), "--data", str(args.data), "--split", str(args.split), "--n", str(args.n)]
    if args.methods:
        out += ["--methods", *args.methods]
    if args.steps != 16:
        out += ["--steps", str(args.steps)]
    if args.baseline != "blur":
        out += ["--baseline", args.baseline]
    if args.input_size:
        out += ["--input-size", str(args.input_size)]
    if args.seed:
        out += ["--seed", str(args.seed)]
    if args.channels:
        out += ["--channels", str(args.channels)]
    return out
