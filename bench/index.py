"""Index-building speed (images/s of ``build_index`` over real images) with its same-run reference.

    python bench/index.py --json [--model default] [--data assets/gallery/gallery.json] [--rounds 3]

Builds the same index, in this process, in four ways, interleaved over ``--rounds`` rounds
(this host's run-to-run noise is up to 2× for one command, so each way is timed once per
round and a round's ratios compare runs made seconds apart):

- ``rsviewer``: ``--runtime`` (default ``auto``: the ONNX towers), float32;
- ``rsviewer_int8``: the same with ``precision="int8"`` (quantized towers, runtime/quantize.py);
- ``reference_torch``: torch eager, the reference; all three feed the image tower
  ``CPU_MICRO_BATCH`` images at a time;
- ``torch_whole_batches``: torch eager fed whole batches (how rsviewer ran before the
  micro-batches, and the reference of the ratios measured before 2026-12-04's second session).

Prints each way's seconds per round and at its best, the ratios against the reference
(best against best, and per round), the agreement of each rsviewer index with the
reference's embeddings (cosine) and of their caption→image top-10 lists, the one-off
export/quantization time (``warm_up``; in the user cache after the first run), the CPU
model and the load average. Includes image decoding, resizing, the image and text
encoders and writing the index.
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


def _agreement(a, ref) -> dict:
    """Cosines of the embeddings and the overlap of every caption's top-10 images."""
    import numpy as np

    cos = np.sum(np.asarray(a.image_emb) * np.asarray(ref.image_emb), 1)
    cos_t = np.sum(np.asarray(a.caption_emb) * np.asarray(ref.caption_emb), 1)
    top = lambda idx: np.argsort(-(np.asarray(idx.caption_emb) @ np.asarray(idx.image_emb).T), 1, kind="stable")[:, :10]
    ta, tr = top(a), top(ref)
    overlap = np.mean([len(set(x) & set(y)) / 10 for x, y in zip(ta, tr)])
    return {"min_cosine_images": round(float(cos.min()), 6), "mean_cosine_images": round(float(cos.mean()), 6),
            "min_cosine_captions": round(float(cos_t.min()), 6), "mean_cosine_captions": round(float(cos_t.mean()), 6),
            "top10_overlap_t2i": round(float(overlap), 4), "top1_same_t2i": round(float(np.mean(ta[:, 0] == tr[:, 0])), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default=str(ROOT / "assets" / "gallery" / "gallery.json"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--runtime", default="auto", choices=["auto", "onnx", "openvino"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from rsviewer.checkpoint import load_model
    from rsviewer.retrieval import evaluate
    from rsviewer.retrieval.index import build_index
    from rsviewer.runtime import warm_up

    out = {"bench": "index", "model": args.model, **machine()}
    model = load_model(args.model)
    t0 = time.perf_counter()
    out["runtime"] = warm_up(model, args.runtime)
    out["warm_up_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    out["runtime_int8"] = warm_up(model, args.runtime, "int8")
    out["warm_up_int8_s"] = round(time.perf_counter() - t0, 2)
    micro = evaluate.CPU_MICRO_BATCH
    ways = (("rsviewer", args.runtime, "fp32", micro), ("rsviewer_int8", args.runtime, "int8", micro),
            ("reference_torch", "torch", "fp32", micro), ("torch_whole_batches", "torch", "fp32", args.batch_size))
    secs = {w[0]: [] for w in ways}
    last = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, rt, prec, step in ways:
                evaluate.CPU_MICRO_BATCH = step
                t0 = time.perf_counter()
                last[name] = build_index(model, args.data, Path(tmp) / f"{name}-{r}", batch_size=args.batch_size,
                                         runtime=rt, precision=prec)
                secs[name].append(round(time.perf_counter() - t0, 2))
                evaluate.CPU_MICRO_BATCH = micro
            out.setdefault("loadavg_rounds", []).append(loadavg())
    n = last["rsviewer"].meta["n_images"]
    ref = secs["reference_torch"]
    for name, rt, prec, step in ways:
        out[name] = {"runtime": rt, "precision": prec, "micro_batch": step, "seconds": secs[name],
                     "best_s": min(secs[name]), "images_per_second_best": round(n / min(secs[name]), 2)}
        if name != "reference_torch":
            out[name]["ratio_best"] = round(min(ref) / min(secs[name]), 2)
            out[name]["ratio_per_round"] = [round(a / b, 2) for a, b in zip(ref, secs[name])]
    for name in ("rsviewer", "rsviewer_int8"):
        out[name]["agreement_with_reference"] = _agreement(last[name], last["reference_torch"])
    out.update(n_images=n, n_captions=last["rsviewer"].meta["n_captions"], device=str(model.device),
               loadavg_end=loadavg())
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
