"""rsviewer project --index DIR --method tsne|opentsne|umap|pca --out CSV [--max-points N] [--json]"""
from __future__ import annotations

from .common import add_force_arg, add_json_arg, check_out_file, emit, nonneg_int, progress_bar


def register(sub) -> None:
    p = sub.add_parser("project", help="2-D embedding map (t-SNE/UMAP/PCA) of an index's images and captions")
    p.add_argument("--index", required=True, help="index folder (rsviewer index)")
    p.add_argument("--method", default="auto", help="tsne | opentsne | umap | pca | auto (default: auto = openTSNE "
                   "when installed, else scikit-learn t-SNE)")
    p.add_argument("--out", required=True, help="CSV to write (columns: kind,row,id,label,x,y,text)")
    add_force_arg(p, "CSV")
    p.add_argument("--max-points", type=nonneg_int, default=5000, help="random sample above this many points (default 5000; "
                   "0 = all)")
    p.add_argument("--no-captions", action="store_true", help="images only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cache", action="store_true", help="recompute even if a cached map exists")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    check_out_file(args, args.out, [args.index])  # before the index loads and the map is computed
    from ..project import project_index, write_csv
    from ..retrieval.index import load_index

    index = load_index(args.index)
    proj = project_index(index, args.method, max_points=args.max_points or None, seed=args.seed,
                         captions=not args.no_captions, progress=progress_bar(args), cache=not args.no_cache)
    out = write_csv(proj, index, args.out)
    obj = {"out": str(out), "method": proj.method, "n_points": len(proj), "n_total": proj.n_total,
           "sampled": proj.sampled, "seconds": round(proj.seconds, 2), "cached": proj.cached, **proj.info}
    emit(args, obj, f"{proj.describe()}\n{proj.method} map written to {out} ({proj.seconds:.1f} s"
                    f"{', from cache' if proj.cached else ''})")
    return 0
