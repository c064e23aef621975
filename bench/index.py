"""Index-building speed: images/s of ``build_index`` over real images.

    python bench/index.py --json [--model default] [--data assets/gallery/gallery.json] [--batch-size 32]

Includes image decoding, resizing, the image encoder and writing the index.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default=str(ROOT / "assets" / "gallery" / "gallery.json"))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import torch

    from rsviewer.checkpoint import load_model
    from rsviewer.retrieval.index import build_index

    model = load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        idx = build_index(model, args.data, Path(tmp) / "index", batch_size=args.batch_size)
        dt = time.perf_counter() - t0
    out = {"model": args.model, "arch": model.arch, "n_images": idx.meta["n_images"],
           "n_captions": idx.meta["n_captions"], "seconds": round(dt, 2),
           "images_per_second": round(idx.meta["n_images"] / dt, 2), "threads": torch.get_num_threads(),
           "device": str(model.device)}
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
