"""rsviewer search --index DIR --text "…" | --image PATH  [-k 10] [--json]"""
from __future__ import annotations

from .common import add_json_arg, emit


def register(sub) -> None:
    p = sub.add_parser("search", help="top-K gallery matches for a text or an image")
    p.add_argument("--index", required=True, help="index folder (rsviewer index)")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="text query")
    q.add_argument("--image", help="image query (path)")
    p.add_argument("-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--model", default=None, help="model (default: the one the index was built with)")
    p.add_argument("--device", default="auto")
    p.add_argument("--target", default="images", choices=["images", "captions"], help="for --image: what to return")
    p.add_argument("--rerank", default="none", choices=["none", "mr", "smr"])
    p.add_argument("--label", action="append", default=None, help="only results with this scene label (repeatable)")
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoint import load_model
    from ..errors import QueryError
    from ..retrieval.index import load_index
    from ..retrieval.search import search_image, search_text
    from ..utils.device import pick_device

    if args.k < 1:
        raise QueryError("-k must be at least 1")
    index = load_index(args.index)
    model = load_model(args.model or _index_model(index), device=pick_device(args.device))
    if args.text is not None:
        res = search_text(model, index, args.text, args.k, rerank=args.rerank, labels=args.label)
    else:
        res = search_image(model, index, args.image, args.k, target=args.target, labels=args.label, rerank=args.rerank)
    lines = [f"{res.mode}: {res.query!r} over {res.n_gallery} images ({sum(res.seconds.values()):.1f} ms)"]
    for h in res.hits:
        extra = h.text if h.text else (h.captions[0] if h.captions else "")
        lines.append(f"{h.rank:3d}  {h.score:+.4f}  {h.id:<24} {h.label or '':<18} {extra}")
    emit(args, res.to_json(), "\n".join(lines))
    return 0


def _index_model(index) -> str:
    """The model an index was built with: its name under models/, else the path it was opened from."""
    from ..checkpoint import list_models

    name, path = index.meta["model"], index.meta.get("model_path")
    return name if path is None or any(d.name == name for d in list_models()) else path
