"""Training throughput on this machine: the cached-feature path next to a full-network step.

    python bench/train.py --json

- ``cached``: one optimizer step of the default recipe (lite: MLP heads, InfoNCE +
  triplet) on cached frozen features, batch 128 — what ``rsviewer train`` runs per step;
- ``end_to_end``: ``rsviewer train --end-to-end`` itself (every EfficientNet-Lite0 and
  MiniLM weight trainable, real 256 px UCM images, augmentations on tensors), two epochs
  of ``--e2e-images`` images, the second epoch's images/s;
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


def bench_end_to_end(images: int, batch: int, device: str) -> dict:
    """rsviewer's own end-to-end trainer (``train --end-to-end``: every EfficientNet-Lite0 and
    MiniLM weight trainable, 256 px UCM images decoded into memory, crop + dihedral + jitter
    on tensors) for two epochs of ``images``; the second epoch's images/s (the first warms up)."""
    import tempfile

    from rsviewer.train.trainer import TrainConfig, train

    data = Path(os.environ.get("RSVIEWER_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "datasets" / "ucm-captions" / "dataset_ucm.json"
    cfg = TrainConfig(epochs=2, batch_size=batch, max_train_images=images, val_split="", ema=0.0, end_to_end=True,
                      device=device)
    with tempfile.TemporaryDirectory() as tmp:
        res = train("lite", data, Path(tmp) / "m", config=cfg, log=lambda m: None)
    return {"batch": batch, "images": images, "image_size": 256, "device": device,
            "epoch_seconds": [h["seconds"] for h in res.history],
            "images_per_s": res.history[-1]["images_per_second"]}


def reference(n: int = 1024, reps: int = 5) -> dict:
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    s = _timed(lambda: a @ a, 1, reps)
    return {"numpy_matmul_n": n, "gflops": round(2 * n**3 / s / 1e9, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--e2e-batch", type=int, default=16)
    ap.add_argument("--e2e-images", type=int, default=64)
    ap.add_argument("--device", default="cpu", help="device of the end-to-end run (cpu | cuda)")
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
        "end_to_end": bench_end_to_end(args.e2e_images, args.e2e_batch, args.device),
        "load_average_after": list(os.getloadavg()),
    }
    res["end_to_end_vs_cached_slowdown"] = round(res["cached"]["images_per_s"] / res["end_to_end"]["images_per_s"], 1)
    if args.json:
        print(json.dumps(res))
    else:
        print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
