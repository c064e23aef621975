"""Index-building speed (images/s of ``build_index`` over real images) with its same-run reference.

    python bench/index.py --json [--model default] [--data assets/gallery/gallery.json] [--batch-size 32]

Runs ``build_index`` three times in this process on the same images: with ``--runtime``
(default ``auto``: the ONNX towers), with ``runtime="torch"`` (torch eager, the
reference; both feed the image tower ``CPU_MICRO_BATCH`` images at a time), and with
torch eager fed whole batches (``torch_whole_batches``: how rsviewer ran before the
micro-batches, and the reference of the ratios measured before 2026-12-04's second
session), and prints all three, the ratios, the agreement of the two indexes' embeddings,
the one-off ONNX export/load time (``warm_up``; in the user cache after the first run),
the CPU model and the load average. Includes image decoding, resizing, the image and
text encoders and writing the index.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import loadavg, machine  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default=str(ROOT / "assets" / "gallery" / "gallery.json"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--runtime", default="auto", choices=["auto", "onnx", "openvino", "torch"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import numpy as np

    from rsviewer.checkpoint import load_model
    from rsviewer.retrieval import evaluate
    from rsviewer.retrieval.index import build_index
    from rsviewer.runtime import warm_up

    out = {"bench": "index", "model": args.model, **machine()}
    model = load_model(args.model)
    t0 = time.perf_counter()
    out["runtime"] = warm_up(model, args.runtime)
    out["warm_up_s"] = round(time.perf_counter() - t0, 2)
    runs = {}
    micro = evaluate.CPU_MICRO_BATCH
    with tempfile.TemporaryDirectory() as tmp:
        for name, rt, step in (("rsviewer", args.runtime, micro), ("reference_torch", "torch", micro),
                               ("torch_whole_batches", "torch", args.batch_size)):
            la = loadavg()
            evaluate.CPU_MICRO_BATCH = step
            t0 = time.perf_counter()
            idx = build_index(model, args.data, Path(tmp) / name, batch_size=args.batch_size, runtime=rt)
            dt = time.perf_counter() - t0
            evaluate.CPU_MICRO_BATCH = micro
            runs[name] = (idx, {"runtime": rt, "seconds": round(dt, 2),
                                "images_per_second": round(idx.meta["n_images"] / dt, 2), "loadavg": la})
        a, b = runs["rsviewer"][0], runs["reference_torch"][0]
        cos = np.sum(np.asarray(a.image_emb) * np.asarray(b.image_emb), 1)
        cos_t = np.sum(np.asarray(a.caption_emb) * np.asarray(b.caption_emb), 1)
    out.update({k: v[1] for k, v in runs.items()})
    out.update(n_images=a.meta["n_images"], n_captions=a.meta["n_captions"],
               ratio=round(out["reference_torch"]["seconds"] / out["rsviewer"]["seconds"], 2),
               ratio_vs_whole_batches=round(out["torch_whole_batches"]["seconds"] / out["rsviewer"]["seconds"], 2),
               min_cosine_images=round(float(cos.min()), 6), min_cosine_captions=round(float(cos_t.min()), 6),
               device=str(model.device), loadavg_end=loadavg())
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
