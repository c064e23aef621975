"""rsviewer search --index DIR --text "…" | --image PATH  [-k 10] [--json]"""
from __future__ import annotations

import sys

from .common import add_json_arg, add_runtime_arg, check_out_file, emit, positive_int


def register(sub) -> None:
    p = sub.add_parser("search", help="top-K gallery matches for a text or an image")
    p.add_argument("--index", required=True, help="index folder (rsviewer index)")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="text query")
    q.add_argument("--image", help="image query (path)")
    p.add_argument("-k", type=positive_int, default=10, help="number of results (default 10)")
    p.add_argument("--model", default=None, help="model (default: the one the index was built with)")
    p.add_argument("--device", default="auto")
    p.add_argument("--target", default="images", choices=["images", "captions"], help="for --image: what to return")
    p.add_argument("--rerank", default="none", choices=["none", "mr", "smr"])
    p.add_argument("--label", action="append", default=None, help="only results with this scene label (repeatable)")
    p.add_argument("--geojson", default=None, help="tile index: also write the hits' footprints as GeoJSON")
    p.add_argument("--geojson-crs", default="wgs84", choices=["wgs84", "scene"],
                   help="GeoJSON coordinates: wgs84 lon/lat (RFC 7946, default) or the scenes' CRS")
    p.add_argument("--scan", default="auto", choices=["auto", "exact", "compressed"],
                   help="auto: 8-bit compressed scan + exact re-score from 100k images when faiss is installed")
    add_runtime_arg(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoint import load_model
    from ..retrieval.index import index_model_dir, load_index
    from ..retrieval.search import search_image, search_text
    from ..utils.device import pick_device

    if args.geojson:
        from ..raster.write import check_output_path

        check_output_path(args.geojson, (".geojson", ".json"), "--geojson")  # before any work
        check_out_file(args, args.geojson, [args.index])
    index = load_index(args.index)
    model = load_model(args.model or index_model_dir(index.meta), device=pick_device(args.device))
    if args.text is not None:
        res = search_text(model, index, args.text, args.k, rerank=args.rerank, labels=args.label,
                          runtime=args.runtime, scan=args.scan)
    else:
        from ..data import read_hint

        hint = read_hint(args.image)
        if hint:
            print(f"warning: {hint}", file=sys.stderr)
        res = search_image(model, index, args.image, args.k, target=args.target, labels=args.label, rerank=args.rerank,
                           runtime=args.runtime, scan=args.scan)
    lines = [f"{res.mode}: {res.query!r} over {res.n_gallery} images ({sum(res.seconds.values()):.1f} ms)"]
    for h in res.hits:
        extra = h.text if h.text else (h.captions[0] if h.captions else "")
        lines.append(f"{h.rank:3d}  {h.score:+.4f}  {h.id:<24} {h.label or '':<18} {extra}")
    obj = res.to_json()
    if index.meta.get("kind") == "tiles":
        from ..localize.tiles import hits_with_tiles

        lines, obj = hits_with_tiles(index, res, lines, obj, args.geojson, args.geojson_crs)
    elif args.geojson:
        raise QueryError(f"--geojson needs a tile index (rsviewer index --scenes); {args.index} is a gallery")
    emit(args, obj, "\n".join(lines))
    return 0

