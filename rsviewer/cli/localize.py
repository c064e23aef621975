"""rsviewer localize — semantic localization of a sentence in a large scene (SeLo).

One scene:
    rsviewer localize --model M --scene IMG --text "…" [--text "…" …] --out PNG [--json]
        [--windows 256,512,768] [--two-stage] [--mode fast|crops] [--anno anno.json]
SeLo metrics over an annotation file:
    rsviewer localize --model M --anno anno.json --scenes DIR [--json] [--out-dir DIR]
"""
from __future__ import annotations

from pathlib import Path

from .common import add_force_arg, add_json_arg, add_model_arg, check_out_file, emit, input_size, load, positive_int, progress_bar


def _sizes(text: str) -> list[int]:
    import argparse

    try:
        sizes = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--windows takes comma-separated pixel sizes, got {text!r}") from None
    if not sizes or any(s < 16 for s in sizes):
        raise argparse.ArgumentTypeError(f"--windows sizes must be ≥ 16 px, got {text!r}")
    return sizes


def register(sub) -> None:
    p = sub.add_parser(
        "localize",
        help="where a sentence lies in a large scene (probability map, SeLo metrics)",
        description="Semantic localization (SeLo): multi-scale sliding windows scored against the query, "
        "accumulated on a coarse grid. With --scene: one map and overlay. With --anno and --scenes (no "
        "--scene): the SeLo metrics Rsu, Ras, Rda, Rmi over every query of the annotation file.",
    )
    add_model_arg(p)
    p.add_argument("--scene", help="scene image (JPEG, PNG, TIFF; tiled TIFFs are read by region)")
    p.add_argument("--text", action="append", default=None,
                   help="query; repeat to average several phrasings on the text side")
    p.add_argument("--out", help="overlay to write, .png or .jpg (JET map at 0.3 over the scene at 0.7)")
    p.add_argument("--anno", help="SeLo anno.json: ground-truth polygons (with --scene: drawn, and metrics "
                                  "when the query matches an entry; without --scene: evaluate all queries)")
    p.add_argument("--scenes", help="with --anno: folder of the scene images (default: images/ next to anno.json)")
    p.add_argument("--out-dir", help="with --anno: write one overlay PNG per query here (a new or empty folder, "
                                     "or with --force one rsviewer wrote)")
    add_force_arg(p, "--out file or --out-dir folder that rsviewer wrote")
    p.add_argument("--windows", type=_sizes, default=[256, 512, 768], help="window sizes in px (default 256,512,768)")
    p.add_argument("--two-stage", action="store_true", help="SeLo v2: 512 px tiles, then refine the best 15%%")
    p.add_argument("--mode", choices=["fast", "crops"], default=None,
                   help="fast: shared feature maps (default); crops: every window encoded on its own (exact SeLo)")
    p.add_argument("--input-size", type=input_size, default=None, help="model input per window (default: the model's)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto")
    p.add_argument("--filter", choices=["median", "gaussian", "none"], default=None,
                   help="smoothing (default: median 251 px; gaussian 255 px with --two-stage)")
    p.add_argument("--max-side", type=positive_int, default=2048, help="long side of the overlay PNG (default 2048)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the window-embedding cache")
    add_json_arg(p)
    p.set_defaults(func=run)


def _opts(args) -> dict:
    o: dict = {"precision": args.precision}
    if args.mode:
        o["mode"] = args.mode
    if args.input_size:
        o["input_size"] = args.input_size
    if args.filter:
        o["filter"] = args.filter
    return o


def run(args) -> int:
    from ..errors import RsviewerError

    if args.scene is None and args.anno is None:
        raise RsviewerError("give --scene IMG --text \"…\", or --anno anno.json [--scenes DIR] for the SeLo metrics")
    if args.scene is None:
        return _run_anno(args)
    if not args.text:
        raise RsviewerError("--text is required with --scene")
    return _run_scene(args)


def _run_scene(args) -> int:
    from ..utils.atomic import image_format, save_image

    if args.out:  # a bad suffix or path fails before the scene is read
        image_format(args.out)
        check_out_file(args, args.out, [args.scene, args.anno])
    from ..localize import load_anno, localize, open_scene, selo_metrics

    text = args.text[0] if len(args.text) == 1 else list(args.text)
    entries = load_anno(args.anno) if args.anno else []  # bad input fails before the model loads
    with open_scene(args.scene) as sc:
        model = load(args)
        bar = progress_bar(args)
        res = localize(model, sc, text, window_sizes=args.windows, two_stage=args.two_stage, progress=bar,
                       cache=not args.no_cache, **_opts(args))
        polys, metrics = None, None
        if args.anno:
            name = Path(args.scene).name
            entries = [e for e in entries if e["jpg_name"] == name]
            match = [e for e in entries if e["caption"] in args.text]
            if match:
                polys = [pl for e in match for pl in e["points"]]
                metrics = selo_metrics(res.prob, polys, res.scene_size, cell=res.cell)
        out = None
        if args.out:
            img = res.overlay(polygons=polys, image=sc.thumbnail(args.max_side))
            out = save_image(img, args.out)
    obj = res.to_json()
    obj["model"] = getattr(model, "name", None)
    if out:
        obj["out"] = str(out)
    if metrics:
        obj["metrics"] = metrics
    W, H = res.scene_size
    lines = [
        f"{Path(args.scene).name} {W}×{H}: {res.n_windows} windows, {res.info.get('mode')} mode"
        f"{' (cached)' if res.cached else ''}, {res.seconds:.1f} s",
        f"peak at x={res.peak[0]} y={res.peak[1]} (grid {res.prob.shape[1]}×{res.prob.shape[0]}, {res.cell:g} px cells)",
    ]
    if metrics:
        lines.append("  ".join(f"{k} {metrics[k]:.4f}" for k in ("Rsu", "Ras", "Rda", "Rmi")))
    if out:
        lines.append(f"wrote {out}")
    emit(args, obj, "\n".join(lines))
    return 0


def _run_anno(args) -> int:
    from ..utils.atomic import check_output_dir, claim_output_dir

    if args.out_dir:  # before the engine imports (seconds); claimed below once the anno file is good
        check_output_dir(args.out_dir, args.force, [args.anno, args.scenes], label="--out-dir", flag="--force",
                         kind="localize-overlays")
    from ..localize import evaluate_anno, load_anno

    load_anno(args.anno)  # a bad file fails before the model loads
    if args.out_dir:  # a user's folder is refused before any work; ours is marked by a manifest
        claim_output_dir(args.out_dir, "localize-overlays", overwrite=args.force,
                         inputs=[args.anno, args.scenes], label="--out-dir", flag="--force")
    model = load(args)
    bar = progress_bar(args)
    res = evaluate_anno(model, args.anno, args.scenes, progress=bar, out_dir=args.out_dir,
                        window_sizes=args.windows, two_stage=args.two_stage, cache=not args.no_cache,
                        max_side=args.max_side, **_opts(args))
    res["model"] = getattr(model, "name", None)
    lines = [f"{'Rsu':>6} {'Ras':>6} {'Rda':>6} {'Rmi':>6} {'sec':>6}  scene       caption"]
    for r in res["per_query"]:
        lines.append(f"{r['Rsu']:6.3f} {r['Ras']:6.3f} {r['Rda']:6.3f} {r['Rmi']:6.3f} {r['seconds']:6.1f}  "
                     f"{r['scene']:<11} {r['caption'][:60]}")
    lines.append(f"{res['Rsu']:6.3f} {res['Ras']:6.3f} {res['Rda']:6.3f} {res['Rmi']:6.3f} {res['seconds']:6.1f}  "
                 f"mean over {res['n_queries']} queries")
    emit(args, res, "\n".join(lines))
    return 0
