"""Time one explanation map of each method with the default model on this CPU.

Usage: python bench/explain.py [--json] [--model default] [--repeats 5] [--threads N]
       [--image PATH] [--text "…"] [--methods gradcam patch ...]
Prints the median wall time of ``--repeats`` calls of ``rsviewer.explain.explain`` per
method (after one warm-up call), end to end: query encoding, the map, upsampling to the
image. Issue target: one Grad-CAM map ≤ 1 s on a CPU. Model loading is not timed.
Runs from a clean clone without installing the package.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from rsviewer.errors import NotAvailable  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_IMAGE = os.path.join(REPO, "..", "shared", "datasets", "ucm-captions", "images", "2081.jpg")


def _image(path: str | None) -> tuple[Image.Image, str]:
    for p in (path, DEFAULT_IMAGE, os.path.join(REPO, "assets", "gallery", "images", "2081.jpg")):
        if p and os.path.exists(p):
            return Image.open(p).convert("RGB"), os.path.abspath(p)
    g = np.random.default_rng(0)
    return Image.fromarray(g.integers(0, 256, (256, 256, 3), dtype=np.uint8)), "random noise 256x256"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--model", default="default")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--image", default=None)
    ap.add_argument("--text", default="three tennis courts surrounded by trees")
    ap.add_argument("--methods", nargs="+", default=None, help="default: every method the model offers")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from rsviewer.checkpoint import load_model
    from rsviewer.explain import available_methods, explain

    t0 = time.perf_counter()
    model = load_model(args.model)
    load_s = time.perf_counter() - t0
    img, img_name = _image(args.image)
    methods = args.methods or available_methods(model)
    times: dict[str, float | str] = {}
    for m in methods:
        try:
            explain(model, img, args.text, m)  # warm-up (allocator, lazy imports, probes)
        except NotAvailable as e:
            times[m] = f"not available: {e}"
            continue
        ts = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            explain(model, img, args.text, m)
            ts.append(time.perf_counter() - t)
        times[m] = round(statistics.median(ts), 4)
    res = {
        "model": getattr(model, "name", model.arch),
        "arch": model.arch,
        "gradcam_seconds": times.get("gradcam"),
        "methods_seconds": times,
        "repeats": args.repeats,
        "image": img_name,
        "image_size": list(img.size),
        "input_size": model.image_size,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "model_load_seconds": round(load_s, 2),
        "torch": torch.__version__,
    }
    if args.json:
        print(json.dumps(res))
    else:
        print(f"explain with {res['model']} ({res['arch']}), median of {args.repeats}, {res['threads']} threads:")
        for m, v in times.items():
            print(f"  {m:<10} {v if isinstance(v, str) else f'{v:.3f} s'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
