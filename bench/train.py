"""Training throughput on this machine: the cached-feature path next to a full-network step.

    python bench/train.py --json

- ``cached``: one optimizer step of the default recipe (lite: MLP heads, InfoNCE +
  triplet) on cached frozen features, batch 128 — what ``rsviewer train`` runs per step;
- ``end_to_end``: ``rsviewer train --end-to-end`` itself (every EfficientNet-Lite0 and
  MiniLM weight trainable, real 256 px UCM images, augmentations on tensors), two epochs
  of ``--e2e-images`` images, the second epoch's images/s;
- ``feature_cache``: ``image_feature_cache`` (what ``rsviewer train`` and ``--cv`` run
  once per split: the frozen tower's maps of every dihedral view) on ``--cache-images``
  UCM images of ``--cache-arch``, as shipped (the CPU tower fed ``CPU_MICRO_BATCH``
  images at a time) and with whole batches of 32 (the code before 2026-12-04), same run;
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


def bench_feature_cache(arch: str, images: int, views: int, reps: int = 2) -> dict:
    """Images/s of the frozen-feature cache (no disk: ``use_cache=False``), micro-batched as
    shipped and with whole batches; the two alternate and each keeps its best run."""
    from rsviewer.archs.registry import create_model
    from rsviewer.data import load_dataset
    from rsviewer.train import cache

    data = Path(os.environ.get("RSVIEWER_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "datasets" / "ucm-captions" / "dataset_ucm.json"
    paths = [it.image for it in load_dataset(data).split("train").items[:images]]
    model = create_model(arch)
    model.freeze_bases()
    shipped = cache.micro_batch
    best = {"micro_batches": float("inf"), "whole_batches": float("inf")}
    for _ in range(reps + 1):  # the first round warms both (oneDNN primitives per batch shape)
        for name, fn in (("micro_batches", shipped), ("whole_batches", lambda device, n, cpu_step=None: n)):
            cache.micro_batch = fn
            try:
                t = time.perf_counter()
                cache.image_feature_cache(model, paths, views=views, batch_size=32, use_cache=False)
                best[name] = min(best[name], time.perf_counter() - t)
            finally:
                cache.micro_batch = shipped
    rate = {k: round(images * views / v, 1) for k, v in best.items()}
    return {"arch": arch, "images": images, "views": views, "batch_size": 32, "micro_batch": cache.micro_batch("cpu", 32),
            "image_views_per_s": rate["micro_batches"], "whole_batches_image_views_per_s": rate["whole_batches"],
            "ratio": round(rate["micro_batches"] / rate["whole_batches"], 2)}


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
    ap.add_argument("--cache-arch", default="mssa", help="architecture of the feature-cache run (its frozen maps)")
    ap.add_argument("--cache-images", type=int, default=64)
    ap.add_argument("--cache-views", type=int, default=4)
    ap.add_argument("--only-cache", action="store_true", help="run the feature-cache part alone")
    args = ap.parse_args(argv)
    from rsviewer.archs.registry import create_model

    torch.manual_seed(0)
    if args.only_cache:
        res = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
               "load_average_before": list(os.getloadavg()), "reference": reference(),
               "feature_cache": bench_feature_cache(args.cache_arch, args.cache_images, args.cache_views),
               "load_average_after": list(os.getloadavg())}
        print(json.dumps(res, indent=None if args.json else 2))
        return 0
    res = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average_before": list(os.getloadavg()),
        "reference": reference(),
        "cached": bench_cached(create_model("lite"), 128, args.reps * 4),
        "end_to_end": bench_end_to_end(args.e2e_images, args.e2e_batch, args.device),
        "feature_cache": bench_feature_cache(args.cache_arch, args.cache_images, args.cache_views),
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
