"""Text-query latency to top-10, text encoding included, with its same-run reference.

    python bench/query.py --json [--model default] [--sizes 10000,100000,1000000] [--repeat 21]

The gallery is N random unit vectors of the model's embedding dimension (what an index
stores); the query is encoded by the real model every time. For each size, in this run:

- **rsviewer**: ``encode_query_text`` (ONNX Runtime's 1-thread query session with
  ``--runtime auto``) + ``scan_images`` (the 8-bit faiss scan + exact float32 re-score of
  256 candidates from ``COMPRESSED_MIN_ROWS`` images on, the float32 scan below);
- **reference**: torch eager ``model.text_states`` (torch's default threads) + a numpy
  float32 matmul and ``argpartition`` over the whole matrix;

both once with the machine as it is and once with the other core kept busy by a
competing process this bench starts (``bench/common.py: busy_core``). Prints medians,
the reference/rsviewer ratio, the top-10 agreement of the compressed scan with float32
(random vectors are a harder case than real embeddings: their top scores bunch up),
encoding alone at 1 and N threads, the CPU model and the load average.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import busy_core, loadavg, machine  # noqa: E402

QUERIES = ["many planes parked at the airport", "four tennis courts next to a parking lot",
           "a river goes through the forest", "some storage tanks near the road"]


def _median_ms(fn, repeat: int) -> float:
    ts = []
    for r in range(repeat):
        t0 = time.perf_counter()
        fn(QUERIES[r % len(QUERIES)])
        ts.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(ts), 2)


def encode_only(model, tw, repeat: int) -> dict:
    """One short query's encoding: ORT at 1 and N threads, torch eager at its threads."""
    import torch

    from rsviewer.runtime.towers import default_threads

    n = default_threads()
    out = {}
    if tw.runtime != "torch":
        for th in sorted({1, n}):
            tw.text_states([QUERIES[0]], threads=th)
            out[f"{tw.runtime}_{th}_thread"] = _median_ms(lambda q: tw.text_states([q], threads=th), repeat)
    with torch.no_grad():
        model.text_states(QUERIES)
        out[f"torch_{torch.get_num_threads()}_threads"] = _median_ms(lambda q: model.text_states([q]), repeat)
    return out


def one_size(model, tw, size: int, repeat: int, rng) -> dict:
    import numpy as np
    import torch

    from rsviewer.retrieval.search import COMPRESSED_MIN_ROWS, CompressedScan, topk

    emb = rng.standard_normal((size, model.embed_dim), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    t0 = time.perf_counter()
    cs = CompressedScan.build(emb) if size >= COMPRESSED_MIN_ROWS else None
    build_s = time.perf_counter() - t0

    def ours(q):
        v = tw.text_states([q])["emb"].numpy()[0]
        return cs.topk(v, 10) if cs is not None else topk(emb, v, 10)

    def reference(q):
        with torch.no_grad():
            v = model.text_states([q])["emb"].numpy()[0]
        s = emb @ v
        part = np.argpartition(-s, 9)[:10]
        return part[np.argsort(-s[part])]

    agree = []  # compressed vs exact top-10, on the real encoded queries
    for q in QUERIES:
        v = tw.text_states([q])["emb"].numpy()[0]
        agree.append(ours(q)[0].tolist() == topk(emb, v, 10)[0].tolist())
    ours("warm-up"), reference("warm-up")
    res = {"scan": "compressed (faiss QT_8bit + float32 re-score)" if cs is not None else "float32",
           "scan_bytes_per_query": int(cs.nbytes + 256 * emb.shape[1] * 4) if cs is not None else int(emb.nbytes),
           "reference_bytes_per_query": int(emb.nbytes), "codes_build_s": round(build_s, 2),
           "top10_identical_to_float32": f"{sum(agree)}/{len(agree)}"}
    for cond in ("idle", "busy"):
        ctx = busy_core() if cond == "busy" else _null()
        with ctx:
            la = loadavg()
            a = _median_ms(ours, repeat)
            b = _median_ms(reference, repeat)
        res[cond] = {"rsviewer_ms": a, "reference_ms": b, "ratio": round(b / a, 2), "loadavg": la}
    del emb, cs
    return res


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--repeat", type=int, default=21)
    ap.add_argument("--runtime", default="auto", choices=["auto", "onnx", "openvino", "torch"])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    import numpy as np

    from rsviewer.checkpoint import load_model
    from rsviewer.runtime import towers, warm_up

    out = {"bench": "query", "model": args.model, **machine()}
    model = load_model(args.model)
    t0 = time.perf_counter()
    info = warm_up(model, args.runtime)
    tw = towers(model, args.runtime)
    out.update(arch=model.arch, embed_dim=model.embed_dim, runtime=info, warm_up_s=round(time.perf_counter() - t0, 2))
    with busy_core():
        busy = encode_only(model, tw, args.repeat)
    out["encode_ms"] = {"idle": encode_only(model, tw, args.repeat), "busy": busy}
    rng = np.random.default_rng(0)
    out["sizes"] = {str(s): one_size(model, tw, int(s), args.repeat, rng) for s in args.sizes.split(",")}
    out["loadavg_end"] = loadavg()
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
