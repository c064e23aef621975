"""Time the MR and SMR rerankers (both directions) on a random 1,000 x 5,000 matrix.

Usage: python bench/rerank.py [--json] [--repeats 5] [--images 1000] [--seed 0]
Prints the median wall time of ``--repeats`` runs of each method (SPEC §4: "well under
a second" on CPU). Runs from a clean clone without installing the package.
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

from rsviewer.retrieval.rerank import mr_rerank, smr_rerank  # noqa: E402


def _median_seconds(fn, sim, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn(sim)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--images", type=int, default=1000, help="N; captions = 5N")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    n = args.images
    # cosine-like scores, negatives included (exercises the shift="auto" path)
    sim = np.random.default_rng(args.seed).uniform(-1.0, 1.0, (n, 5 * n)).astype(np.float32)
    mr_rerank(sim[:20, :100])  # warm-up (imports, allocator)
    smr_rerank(sim[:20, :100])
    res = {
        "shape": [n, 5 * n],
        "mr_seconds": _median_seconds(mr_rerank, sim, args.repeats),
        "smr_seconds": _median_seconds(smr_rerank, sim, args.repeats),
    }
    if args.json:
        print(json.dumps(res))
    else:
        print(f"rerank {n} x {5 * n} (both directions, median of {args.repeats}): "
              f"MR {res['mr_seconds']:.3f} s, SMR {res['smr_seconds']:.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
