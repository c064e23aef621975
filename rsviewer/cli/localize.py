"""rsviewer localize — semantic localization of a sentence in a large scene (SeLo).

One scene:
    rsviewer localize --model M --scene IMG --text "…" [--text "…" …] [--out FILE …] [--json]
        [--windows 256,512,768] [--two-stage] [--mode fast|crops] [--anno anno.json]
    --out by suffix (repeatable): .png/.jpg overlay; .tif COG probability map in the scene's CRS;
    .geojson top regions (WGS 84 lon/lat; --geojson-crs scene for the scene's CRS)
SeLo metrics over an annotation file:
    rsviewer localize --model M --anno anno.json --scenes DIR [--json] [--out-dir DIR]
"""
from __future__ import annotations

from pathlib import Path

from .common import (add_force_arg, add_json_arg, add_model_arg, add_runtime_arg, check_out_file, emit, input_size,
                     load, positive_int, progress_bar)


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
    p.add_argument("--out", action="append", default=None,
                   help="output by suffix, repeatable: .png/.jpg overlay (JET map at 0.3 over the scene at 0.7); "
                        ".tif/.tiff probability map as a COG in the scene's CRS; .geojson top regions")
    p.add_argument("--cog-dtype", choices=["uint8", "float32"], default="uint8",
                   help="COG values: uint8 0-255 (default) or float32 0-1")
    p.add_argument("--geojson-crs", choices=["wgs84", "scene"], default="wgs84",
                   help="GeoJSON coordinates: wgs84 lon/lat (RFC 7946, default) or the scene's CRS")
    p.add_argument("--threshold", type=float, default=0.5, help="regions: cells with probability ≥ this (default 0.5)")
    p.add_argument("--regions", type=int, default=10, help="regions: how many, best first (default 10)")
    p.add_argument("--bands", default=None, help="bands shown as R,G,B (e.g. 4,3,2, or 1 for grey; default by "
                                                  "colour interpretation, else 1,2,3)")
    p.add_argument("--build-overviews", action="store_true",
                   help="build a sidecar .ovr first when a large GeoTIFF has no overviews")
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
    add_runtime_arg(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def _opts(args) -> dict:
    o: dict = {"precision": args.precision, "runtime": args.runtime}
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


_OVERLAY = (".png", ".jpg", ".jpeg", ".webp")
_COG = (".tif", ".tiff")
_GEOJSON = (".geojson", ".json")


def parse_bands(text):
    from ..errors import RsviewerError

    if not text:
        return None
    try:
        b = [int(v) for v in str(text).replace(" ", "").split(",") if v]
    except ValueError:
        raise RsviewerError(f"--bands takes 1-based band numbers like 4,3,2, got {text!r}") from None
    if len(b) not in (1, 3):
        raise RsviewerError(f"--bands takes one band (grey) or three (R,G,B), got {text!r}")
    return b


def check_outputs(outs, scene, geojson_crs: str) -> None:
    """Every output's suffix and folder, and what a GeoJSON needs of the scene: checked
    before the model loads or any window is read."""
    from ..raster.write import check_output_path

    for o in outs or []:
        check_output_path(o, _OVERLAY + _COG + _GEOJSON, "--out")
        if o.lower().endswith(_GEOJSON):
            scene.georef.require_crs("GeoJSON regions")
            if geojson_crs == "wgs84":
                scene.georef.check_wgs84("GeoJSON in WGS 84")


def write_outputs(res, sc, outs, args_like, model_name, polys=None) -> list[str]:
    """Write each ``--out`` by its suffix; returns the paths written."""
    from ..utils.atomic import save_image

    written = []
    for o in outs or []:
        low = o.lower()
        if low.endswith(_COG):
            written.append(str(res.write_cog(o, dtype=args_like.cog_dtype, model=model_name)))
        elif low.endswith(_GEOJSON):
            written.append(str(res.write_geojson(o, crs=args_like.geojson_crs, threshold=args_like.threshold,
                                                 top=args_like.regions, model=model_name)))
        else:
            img = res.overlay(polygons=polys, image=sc.thumbnail(args_like.max_side))
            written.append(str(save_image(img, o)))
    return written


def _run_scene(args) -> int:
    from ..localize import load_anno, localize, open_scene, selo_metrics
    from ..raster import build_overviews, needs_overviews

    for o in args.out or []:  # a file rsviewer did not write is never replaced; checked before any work
        check_out_file(args, o, [args.scene, args.anno])

    text = args.text[0] if len(args.text) == 1 else list(args.text)
    entries = load_anno(args.anno) if args.anno else []  # bad input fails before the model loads
    with open_scene(args.scene, bands=parse_bands(args.bands)) as sc:
        check_outputs(args.out, sc, args.geojson_crs)
        if args.build_overviews and needs_overviews(sc):
            build_overviews(sc, progress=progress_bar(args))
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
        written = write_outputs(res, sc, args.out, args, getattr(model, "name", None), polys)
    obj = res.to_json()
    obj["model"] = getattr(model, "name", None)
    if written:
        obj["out"] = written[0] if len(written) == 1 else written
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
    g = res.georef
    if g is not None and not g.has_crs:
        lines.append("scene has no CRS: results are in pixel space")
    elif g is not None:
        ll = g.lonlat_or_none(*res.peak)
        mx, my = g.pixel_to_map(*res.peak)
        lines.append(f"peak at {g.crs_label()} {mx:.2f}, {my:.2f}" + (f" (lon {ll[0]:.6f}, lat {ll[1]:.6f})" if ll else ""))
    if res.info.get("skipped_nodata_windows"):
        lines.append(f"{res.info['skipped_nodata_windows']} mostly-nodata windows skipped")
    for w in written:
        lines.append(f"wrote {w}")
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
