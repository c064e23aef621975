"""Cost of the Evaluate tab on the demo gallery (210 UCM val images, 1,050 captions), per model.

    python bench/evaluate_tab.py --json [--models default,galr-ucm,...] [--rerank none]

Times what the tab's Compute button runs (``gui.evaluate_view.evaluate_models``, no
widgets), for every shipped model, in three states:

* ``cold_s``: nothing cached — the gallery is indexed for the model (every image encoded;
  for the default model the shipped ``assets/gallery/index`` is used instead), captions
  encoded, every pair scored (pairwise models), per-query ranks computed;
* ``disk_s``: a new session: the index comes from the disk cache (``$RSVIEWER_CACHE``);
* ``memory_s``: the same session again (the tab's in-memory cache per model, gallery, rerank).

Model loading is timed separately (``load_s``). The reference measured in the same run
is a numpy float32 matmul of the gallery's size (210 × 256 @ 256 × 1,050), repeated 100
times. The disk cache is a fresh temporary folder (the user's is never touched).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from bench.common import cpu_model as cpu_name  # noqa: E402  (one CPU name for every bench)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="", help="comma-separated (default: every model rsviewer models lists)")
    ap.add_argument("--rerank", default="none", choices=["none", "mr", "smr"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ["RSVIEWER_CACHE"] = tempfile.mkdtemp(prefix="rsviewer-bench-")

    import numpy as np
    import torch

    from rsviewer.checkpoint import list_models
    from rsviewer.gui import evaluate_view, state

    specs = [s for s in args.models.split(",") if s] or [p.name for p in list_models()]
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((210, 256), dtype=np.float32), rng.standard_normal((256, 1050), dtype=np.float32)
    t0 = time.perf_counter()
    for _ in range(100):
        a @ b
    ref_ms = (time.perf_counter() - t0) * 10
    rows = []
    for spec in specs:
        t0 = time.perf_counter()
        state.get_model(spec)
        load_s = time.perf_counter() - t0
        times = {}
        for phase in ("cold_s", "disk_s", "memory_s"):
            if phase == "disk_s":  # a new session: forget what is in memory, keep the disk cache
                state._indexes.clear()
                evaluate_view._scores.clear()
                evaluate_view._results.clear()
            t0 = time.perf_counter()
            out = evaluate_view.evaluate_models([spec], None, args.rerank)
            times[phase] = round(time.perf_counter() - t0, 3)
        pq = out["pqs"][0]
        model = state.get_model(spec)
        rows.append({"model": spec, "arch": model.arch, "pairwise": bool(model.pairwise), "load_s": round(load_s, 2),
                     **times, "mR": round(pq.metrics["mR"], 2), "ceiling_mR": round(pq.ceiling["mR"], 2)})
        print(f"{spec:14s} {model.arch:7s} load {load_s:6.2f} s  cold {times['cold_s']:7.2f} s  "
              f"disk {times['disk_s']:6.2f} s  memory {times['memory_s']:6.3f} s  mR {pq.metrics['mR']:.2f}",
              file=sys.stderr)
    res = {"bench": "evaluate_tab", "gallery": "assets/gallery/gallery.json (210 images, 1,050 captions)",
           "rerank": args.rerank, "cpu": cpu_name(), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
           "load_avg_end": round(os.getloadavg()[0], 2), "reference_numpy_matmul_ms": round(ref_ms, 3),
           "models": rows}
    print(json.dumps(res, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
