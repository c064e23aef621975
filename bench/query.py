"""Text-query latency: text encoding + exact top-10 over N synthetic gallery embeddings.

    python bench/query.py --json [--model default] [--sizes 10000,100000,1000000] [--repeat 21]

The gallery is N random unit vectors of the model's embedding dimension (float32,
what an index stores); the query is encoded by the real model each time. Prints the
median over ``--repeat`` queries per size.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--repeat", type=int, default=21)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import numpy as np
    import torch

    from rsviewer.checkpoint import load_model
    from rsviewer.retrieval.search import topk

    model = load_model(args.model)
    queries = ["many planes parked at the airport", "four tennis courts next to a parking lot",
               "a river goes through the forest", "some storage tanks near the road"]
    # warm-up the text encoder
    with torch.no_grad():
        model.text_states(queries)
    rng = np.random.default_rng(0)
    out = {"model": args.model, "arch": model.arch, "embed_dim": model.embed_dim,
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "latency_ms": {}, "encode_ms": None}
    enc = []
    for size in [int(s) for s in args.sizes.split(",")]:
        emb = rng.standard_normal((size, model.embed_dim), dtype=np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        times = []
        for r in range(args.repeat):
            q = queries[r % len(queries)]
            t0 = time.perf_counter()
            with torch.no_grad():
                v = model.text_states([q])["emb"].numpy()[0]
            t1 = time.perf_counter()
            topk(emb, v, 10)
            t2 = time.perf_counter()
            times.append((t2 - t0) * 1000)
            enc.append((t1 - t0) * 1000)
        out["latency_ms"][str(size)] = round(statistics.median(times), 2)
        del emb
    out["encode_ms"] = round(statistics.median(enc), 2)
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
