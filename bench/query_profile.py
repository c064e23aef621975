#!/usr/bin/env python
"""Where one 1M-image text query's time goes (encode vs 8-bit faiss scan vs float32 re-score).

    python bench/query_profile.py

1M random unit vectors of the default model's dimension, the index's compressed scan
(faiss QT_8bit, 1 thread); medians of 15 of: the ONNX 1-thread text encoding, the faiss
scan for 256 / 64 / 40 candidates, the float32 re-score of 256 rows, and the whole
``CompressedScan.topk`` path with encoding; idle and with the other core busy
(bench/common.py: busy_core). Prints one dict per condition.
"""
import sys, time, statistics, numpy as np
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[1]))
from bench.common import busy_core, loadavg
from rsviewer.checkpoint import load_model
from rsviewer.runtime import towers, warm_up
from rsviewer.retrieval.search import CompressedScan
m = load_model('default'); warm_up(m, 'auto'); tw = towers(m, 'auto')
rng = np.random.default_rng(0)
emb = rng.standard_normal((1_000_000, m.embed_dim), dtype=np.float32); emb /= np.linalg.norm(emb, axis=1, keepdims=True)
cs = CompressedScan.build(emb)
QS = ["many planes parked at the airport", "a river goes through the forest"]
def med(fn, r=15):
    ts=[]
    for i in range(r):
        t=time.perf_counter(); fn(i); ts.append((time.perf_counter()-t)*1000)
    return round(statistics.median(ts),2)
v = tw.text_states([QS[0]])["emb"].numpy()[0]
q = v.reshape(1,-1).astype(np.float32)
for cond in ("idle","busy"):
    import contextlib
    with (busy_core() if cond=="busy" else contextlib.nullcontext()):
        res = {"load": loadavg()}
        res["encode"] = med(lambda i: tw.text_states([QS[i%2]]))
        for c in (256, 64, 40):
            res[f"faiss_{c}"] = med(lambda i: cs.fi.search(q, c))
        _, cand = cs.fi.search(q, 256); cand=np.sort(cand[0])
        res["rescore256"] = med(lambda i: np.asarray(emb[cand]) @ q[0])
        res["total"] = med(lambda i: cs.topk(tw.text_states([QS[i%2]])["emb"].numpy()[0], 10))
        print(cond, res, flush=True)
