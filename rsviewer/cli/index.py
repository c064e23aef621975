"""rsviewer index --model M --data JSON|--images DIR --out INDEX
rsviewer index --model M --scenes FILE_OR_DIR [--scenes …] --tile 256 --overlap 0.5 [--level N] --out INDEX"""
from __future__ import annotations

from .common import (add_force_arg, add_json_arg, add_model_arg, add_runtime_arg, check_out_dir, emit, load,
                     positive_int, progress_bar)


def register(sub) -> None:
    p = sub.add_parser("index", help="embed a gallery (dataset or image folder) into an index folder")
    add_model_arg(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", help="dataset (Karpathy JSON, precomp folder, CSV)")
    src.add_argument("--images", help="a folder of images (sub-folders become labels)")
    src.add_argument("--scenes", action="append", default=None,
                     help="big scenes (GeoTIFF/COG/JP2/VRT/PNG/JPEG files or folders; repeatable): index their tiles")
    p.add_argument("--tile", type=int, default=256, help="with --scenes: tile side in px at --level (default 256)")
    p.add_argument("--overlap", type=float, default=0.5, help="with --scenes: overlap of neighbouring tiles (default 0.5)")
    p.add_argument("--level", type=int, default=0,
                   help="with --scenes: overview level (0 full resolution; N: tiles cover tile·2^N px)")
    p.add_argument("--image-dir", default=None, help="with --data: where the dataset's images are")
    p.add_argument("--split", default=None, help="index one split only (default: all)")
    p.add_argument("--skip-missing", action="store_true", help="leave out listed images that do not exist")
    p.add_argument("--out", required=True, help="index folder to write: new, empty, or (with --force) an index")
    add_force_arg(p)
    p.add_argument("--batch-size", type=positive_int, default=32)
    add_runtime_arg(p)
    p.add_argument("--precision", choices=["fp32", "int8"], default="fp32",
                   help="with --data/--images: int8 = quantized towers in ONNX Runtime, about 1.7x faster image "
                        "and 2x faster text encoding here at a measured cost in fidelity (docs/runtime.md); "
                        "queries stay fp32 (default: fp32)")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data import load_dataset

    if args.scenes:
        return _run_scenes(args)
    source = args.data or args.images
    check_out_dir(args, args.out, [source, args.image_dir], kind="index")  # before the model loads and minutes of encoding
    ds = load_dataset(source, images=args.image_dir)  # a bad gallery or split, too
    if args.split and args.split != "all":
        ds.split(args.split)
    from ..retrieval.index import build_index

    model = load(args)
    idx = build_index(model, ds, args.out, images=args.image_dir, split=args.split, overwrite=args.force,
                      progress=progress_bar(args), batch_size=args.batch_size, skip_missing=args.skip_missing,
                      runtime=args.runtime, precision=args.precision)
    m = idx.meta
    prec = "".join(f", {t} {p}" for t, p in m.get("precision", {}).items())
    emit(args, {"out": str(args.out), **m},
         f"indexed {m['n_images']} images and {m['n_captions']} captions with {m['model']} → {args.out} "
         f"({m['seconds']:.1f} s, {m['n_images'] / max(m['seconds'], 1e-9):.1f} images/s{prec})")
    return 0


def _run_scenes(args) -> int:
    from ..errors import RsviewerError
    from ..localize.tiles import build_tile_index, scene_files, tile_boxes

    if args.precision != "fp32":
        raise RsviewerError("--precision int8 is for --data/--images galleries; scene tiles are encoded in fp32")
    scene_files(args.scenes)  # missing scenes fail before the model loads
    check_out_dir(args, args.out, args.scenes)
    tile_boxes((64, 64), args.tile, args.overlap, args.level)  # so do bad tile settings (a tiny size: checks only)
    model = load(args)
    idx = build_tile_index(model, args.scenes, args.out, tile=args.tile, overlap=args.overlap, level=args.level,
                           progress=progress_bar(args), overwrite=args.force)
    m = idx.meta
    emit(args, {"out": str(args.out), **m},
         f"indexed {m['n_images']} tiles of {m['tiles']['scenes']} scene(s) ({args.tile} px at level {args.level}, "
         f"overlap {args.overlap:g}) with {m['model']} → {args.out} ({m['seconds']:.1f} s)")
    return 0
