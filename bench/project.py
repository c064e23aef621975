"""Time a 2-D embedding map of 10,000 points (SPEC §8; issue target ≤ 10 s on this CPU).

Usage: python bench/project.py [--json] [--n 10000] [--method auto|tsne|opentsne|umap|pca] [--dim 256]

The points are synthetic: ``--clusters`` Gaussian clusters of unit vectors in ``--dim``
dimensions (like a gallery's image and caption embeddings: 21 scene labels, 256-d).
Prints ``{"n", "method", "seconds", ...}``; the timing is one run of
``rsviewer.project.embed_2d`` (PCA-50 reduction included), no disk cache involved.
Runs from a clean clone without installing the package.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from rsviewer.project import embed_2d, resolve_method  # noqa: E402


def clustered_unit_vectors(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.8 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--clusters", type=int, default=21)
    ap.add_argument("--method", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:
        pass
    method = resolve_method(args.method)
    x = clustered_unit_vectors(args.n, args.dim, args.clusters, args.seed)
    t = time.perf_counter()
    y = embed_2d(x, method, seed=args.seed)
    sec = time.perf_counter() - t
    out = {"n": args.n, "method": method, "seconds": round(sec, 2), "dim": args.dim, "clusters": args.clusters,
           "data": "synthetic clustered unit vectors", "cpus": os.cpu_count()}
    assert y.shape == (args.n, 2) and np.isfinite(y).all()
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{method}: {args.n:,} points ({args.dim}-d, {args.clusters} clusters) in {sec:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
