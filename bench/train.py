"""Training throughput on this machine: the cached-feature path next to a full-network step.

    python bench/train.py --json

- ``cached``: one optimizer step of the default recipe (lite: MLP heads, InfoNCE +
  triplet) on cached frozen features, batch 128 — what ``rsviewer train`` runs per step;
- ``full_network``: forward + backward + AdamW through the whole lite network (every
  EfficientNet-Lite0 and MiniLM weight trainable) on 256 px images, batch 8 — the cost of
  an end-to-end step; rsviewer's trainer does not run end-to-end steps (see docs/models.md);
- ``reference``: a float32 numpy matmul measured in the same run (GFLOP/s).

Images/s count training images (one caption each) per second; the load average and the
CPU model are recorded because the machine is shared.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from bench.common import cpu_model as cpu_name  # noqa: E402  (one CPU name for every bench)


def _timed(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def bench_cached(model, batch: int, reps: int) -> dict:
    from rsviewer.train.trainer import TrainConfig, make_optimizer

    d_img = model.image_proj[1].in_features
    d_txt = model.text_proj[1].in_features
    g = torch.Generator().manual_seed(0)
    b = {
        "image_feats": {"pooled": torch.rand(batch, d_img, generator=g)},
        "text_feats": {"pooled": torch.randn(batch, d_txt, generator=g)},
        "image_index": torch.arange(batch),
        "label_index": torch.arange(batch) % 21,
        "captions": [f"caption {i}" for i in range(batch)],
        "epoch": 0, "step": 0, "total_steps": 100,
    }
    if model.text_prefix < model.text.num_layers:
        raise SystemExit("bench expects the default (frozen-text) lite recipe")
    model.freeze_bases()
    opt, sched, params, _ = make_optimizer(model, TrainConfig(), 10)
    model.train()

    def step():
        loss = model.training_loss(b)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    s = _timed(step, 2, reps)
    return {"batch": batch, "seconds_per_step": round(s, 4), "images_per_s": round(batch / s, 1)}


def bench_full(model, batch: int, reps: int) -> dict:
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    x = torch.randn(batch, 3, model.image_size, model.image_size)
    tokens = model.tokenize([f"many planes parked at the airport number {i}" for i in range(batch)])
    from rsviewer.archs.base import l2n
    from rsviewer.nets.text import mean_pool
    from rsviewer.train.losses import info_nce

    def step():
        img = model.image_head({"pooled": model.pool(model.backbone.forward_features(x))})
        hidden = model.text(tokens["input_ids"], tokens["attention_mask"])  # every MiniLM layer
        txt = l2n(model.text_proj(mean_pool(hidden, tokens["attention_mask"])))
        loss = info_nce(img, txt, model.logit_scale.exp())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    s = _timed(step, 1, reps)
    return {"batch": batch, "image_size": model.image_size, "seconds_per_step": round(s, 3), "images_per_s": round(batch / s, 2)}


def reference(n: int = 1024, reps: int = 5) -> dict:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    s = _timed(lambda: a @ a, 1, reps)
    return {"numpy_matmul_n": n, "gflops": round(2 * n**3 / s / 1e9, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--full-batch", type=int, default=8)
    args = ap.parse_args(argv)
    from rsviewer.archs.registry import create_model

    torch.manual_seed(0)
    res = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_before": list(os.getloadavg()),
        "reference": reference(),
        "cached": bench_cached(create_model("lite"), 128, args.reps * 4),
        "full_network": bench_full(create_model("lite"), args.full_batch, args.reps),
        "load_average_after": list(os.getloadavg()),
    }
    res["full_vs_cached_slowdown"] = round(res["cached"]["images_per_s"] / res["full_network"]["images_per_s"], 1)
    if args.json:
        print(json.dumps(res))
    else:
        print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
