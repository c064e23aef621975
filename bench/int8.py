"""What ``precision="int8"`` costs in retrieval quality: val mR with float32 and int8 towers.

    python bench/int8.py --json --models lite-ft-ucm cmer-ucm cmpagl-ucm [--data dataset_ucm.json]

For each model (use models that never trained on the split: ``metrics.json`` says
``train_split``), encodes the split's images and captions with the float32 ONNX towers and
with the int8 ones (runtime/quantize.py), and prints mR for the four combinations (image
fp32/int8 × text fp32/int8, embeddings only, no rerank), the mean cosine between the
float32 and int8 embeddings, and the encoding seconds (the first int8 pass includes the
one-off quantization unless the user cache has it). Pairwise models (MSSA) score with a
head this bench does not run; they are refused.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import loadavg, machine  # noqa: E402

UCM = ROOT.parent / "shared" / "datasets" / "ucm-captions" / "dataset_ucm.json"


def _unit(x):
    import numpy as np

    x = x.numpy()
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def one_model(name: str, ds) -> dict:
    import numpy as np

    from rsviewer.checkpoint import load_model
    from rsviewer.retrieval.evaluate import encode_images, encode_texts
    from rsviewer.retrieval.metrics import retrieval_metrics
    from rsviewer.runtime import towers

    model = load_model(name)
    model.eval()
    if getattr(model, "pairwise", False):
        raise SystemExit(f"error: {name} scores pairs with its own head; this bench compares embeddings")
    captions, cap_image = ds.flat_captions()
    paths = [it.image for it in ds.items]
    emb_i, emb_t, secs = {}, {}, {}
    for prec in ("fp32", "int8"):
        t0 = time.perf_counter()
        emb_i[prec] = _unit(encode_images(model, paths, runtime="onnx", precision=prec)["emb"])
        secs[f"images_{prec}"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()
        emb_t[prec] = _unit(encode_texts(model, captions, runtime="onnx", precision=prec)["emb"])
        secs[f"captions_{prec}"] = round(time.perf_counter() - t0, 2)
    out = {"model": name, "fingerprint": getattr(model, "fingerprint", None),
           "precision": towers(model, "onnx", "int8").precisions(), "seconds": secs}
    for a in ("fp32", "int8"):
        for b in ("fp32", "int8"):
            mr = retrieval_metrics(emb_i[a] @ emb_t[b].T, caption_image=cap_image)["mR"]
            out[f"mR_image_{a}_text_{b}"] = round(mr, 2)
    out["mean_cos_images"] = round(float(np.sum(emb_i["fp32"] * emb_i["int8"], 1).mean()), 5)
    out["mean_cos_captions"] = round(float(np.sum(emb_t["fp32"] * emb_t["int8"], 1).mean()), 5)
    out["mR_change_both_int8"] = round(out["mR_image_int8_text_int8"] - out["mR_image_fp32_text_fp32"], 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["lite-ft-ucm", "cmer-ucm", "cmpagl-ucm"])
    ap.add_argument("--data", default=str(UCM))
    ap.add_argument("--split", default="val")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    from rsviewer.data import load_dataset

    ds = load_dataset(args.data).split(args.split)
    out = {"bench": "int8", "data": args.data, "split": args.split, "n_images": len(ds), **machine(),
           "loadavg": loadavg(), "models": [one_model(n, ds) for n in args.models]}
    changes = [m["mR_change_both_int8"] for m in out["models"]]
    out["mean_mR_change_both_int8"] = round(sum(changes) / len(changes), 2)
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
