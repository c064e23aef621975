"""Cost and accuracy of MSSA's two-stage search on a gallery (default: UCM val, 210 images).

Usage: python bench/mssa_search.py [--model mssa-ucm] [--data JSON] [--split val]
                                   [--candidates 50] [--queries 100] [--threads N] [--json]

MSSA's IGTA makes the text vector depend on the image, so searching a gallery with a
text query cannot be one matrix product. The app searches in two stages:
1. stage 1: image-independent vectors, ``img["emb"] @ txt["emb"]`` over the gallery;
2. stage 2: full MSSA scores (``model.score``) for the top-C candidates only, which are
   re-sorted and placed above the rest (kept in stage-1 order).

Reported: milliseconds per text query for each stage (one query at a time, as the app
runs it; images pre-encoded, the query's text encoding timed separately), the same for
image queries against the caption gallery, how many candidates stage 2 rescores, and
val mR of stage 1 alone, two-stage and full pairwise scoring (the number
``rsviewer eval`` reports). Runs from a clean clone without installing the package.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

DEFAULT_DATA = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "datasets", "ucm-captions", "dataset_ucm.json"
)


def two_stage_matrix(stage1: np.ndarray, full: np.ndarray, c: int, axis: int) -> np.ndarray:
    """Scores a two-stage search ranks by: per query (rows if ``axis`` = 1, columns if 0),
    the top-``c`` stage-1 candidates get their full score lifted above every other item,
    the rest keep their stage-1 order below."""
    s1 = stage1 if axis == 1 else stage1.T
    fu = full if axis == 1 else full.T
    c = min(c, s1.shape[1])
    top = np.argpartition(-s1, c - 1, axis=1)[:, :c]
    out = s1 - s1.max() + fu.min() - 1.0  # every non-candidate below every candidate, stage-1 order kept
    rows = np.arange(s1.shape[0])[:, None]
    out[rows, top] = fu[rows, top]
    return out if axis == 1 else out.T


def _slice(states: dict, idx) -> dict:
    return {k: v[idx] for k, v in states.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mssa-ucm", help="model name under models/ or a folder")
    ap.add_argument("--data", default=DEFAULT_DATA, help="dataset JSON (default: UCM-Captions)")
    ap.add_argument("--split", default="val")
    ap.add_argument("--candidates", "-C", type=int, default=50, help="stage-2 candidates per query")
    ap.add_argument("--queries", type=int, default=100, help="queries timed one at a time, per direction")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from rsviewer.checkpoint import load_model
    from rsviewer.data import load_dataset
    from rsviewer.retrieval.evaluate import encode_images, encode_texts, similarity_matrix
    from rsviewer.retrieval.metrics import retrieval_metrics

    model = load_model(args.model, device="cpu")
    if not model.pairwise:
        raise SystemExit(f"{args.model} is a {model.arch} model; two-stage search applies to pairwise models (mssa)")
    sub = load_dataset(args.data).split(args.split)
    captions, cap_image = sub.flat_captions()
    t0 = time.perf_counter()
    img = encode_images(model, [it.image for it in sub.items])
    t_img = time.perf_counter() - t0
    t0 = time.perf_counter()
    txt = encode_texts(model, captions)
    t_txt = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = similarity_matrix(model, img, txt)
    t_full = time.perf_counter() - t0
    stage1 = (img["emb"] @ txt["emb"].T).numpy()
    c = args.candidates
    n_img, n_cap = len(sub), len(captions)

    def mr(s_i2t, s_t2i):
        m = retrieval_metrics(s_i2t, s_t2i, caption_image=cap_image)
        return {"mR": round(float(m["mR"]), 2), "i2t": {k: round(float(m["i2t"][k]), 2) for k in ("R@1", "R@5", "R@10")},
                "t2i": {k: round(float(m["t2i"][k]), 2) for k in ("R@1", "R@5", "R@10")}}

    two_i2t = two_stage_matrix(stage1, full, c, axis=1)  # image queries over captions
    two_t2i = two_stage_matrix(stage1, full, c, axis=0)  # text queries over images

    # ---- per-query timing, one query at a time (the app's path) ----
    rng = np.random.default_rng(0)
    q_txt = rng.choice(n_cap, size=min(args.queries, n_cap), replace=False)
    q_img = rng.choice(n_img, size=min(args.queries, n_img), replace=False)
    enc, s1_ms, s2_ms, max_err = [], [], [], 0.0
    with torch.no_grad():
        for q in q_txt:
            t0 = time.perf_counter()
            tq = model.text_states([captions[q]])
            enc.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            s = img["emb"] @ tq["emb"][0]
            cand = torch.topk(s, min(c, n_img)).indices
            s1_ms.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sc = model.score(_slice(img, cand), tq)[:, 0]
            order = cand[torch.argsort(sc, descending=True)]  # noqa: F841 — the ranked candidates
            s2_ms.append(time.perf_counter() - t0)
            max_err = max(max_err, float(np.abs(sc.numpy() - full[cand.numpy(), q]).max()))
        i1_ms, i2_ms = [], []
        for q in q_img:
            iq = _slice(img, slice(int(q), int(q) + 1))
            t0 = time.perf_counter()
            s = txt["emb"] @ iq["emb"][0]
            cand = torch.topk(s, min(c, n_cap)).indices
            i1_ms.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            sc = model.score(iq, _slice(txt, cand))[0]
            i2_ms.append(time.perf_counter() - t0)

    med = lambda xs: round(1000 * statistics.median(xs), 2)  # noqa: E731
    out = {
        "model": getattr(model, "name", model.arch),
        "data": os.path.abspath(args.data),
        "split": args.split,
        "n_images": n_img,
        "n_captions": n_cap,
        "candidates": c,
        "threads": torch.get_num_threads(),
        "text_query": {
            "queries_timed": len(q_txt),
            "encode_ms": med(enc),
            "stage1_ms": med(s1_ms),
            "stage2_ms": med(s2_ms),
            "stage2_rescored": min(c, n_img),
        },
        "image_query": {
            "queries_timed": len(q_img),
            "stage1_ms": med(i1_ms),
            "stage2_ms": med(i2_ms),
            "stage2_rescored": min(c, n_cap),
        },
        "stage2_matches_full_scores": max_err < 1e-4,
        "encode_seconds": {"images": round(t_img, 2), "captions": round(t_txt, 2)},
        "full_scoring_seconds": round(t_full, 2),
        "full_pairs": n_img * n_cap,
        "val": {
            "stage1_only": mr(stage1, stage1),
            "two_stage": mr(two_i2t, two_t2i),
            "full": mr(full, full),
        },
    }
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        tq, iq = out["text_query"], out["image_query"]
        print(f"{out['model']} on {args.split} ({n_img} images, {n_cap} captions), C = {c}, {out['threads']} threads")
        print(f"text query : encode {tq['encode_ms']} ms, stage 1 {tq['stage1_ms']} ms, stage 2 {tq['stage2_ms']} ms ({tq['stage2_rescored']} images)")
        print(f"image query: stage 1 {iq['stage1_ms']} ms, stage 2 {iq['stage2_ms']} ms ({iq['stage2_rescored']} captions)")
        print(f"full pairwise scoring: {out['full_scoring_seconds']} s for {out['full_pairs']:,} pairs")
        for k, v in out["val"].items():
            print(f"mR {k:12s} {v['mR']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
