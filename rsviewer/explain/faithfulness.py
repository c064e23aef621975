"""Deletion / insertion faithfulness of explanation maps (Petsiuk et al., RISE, 2018).

For each image of a split and its own first caption, every method's map ranks the
pixels (model input resolution). *Deletion* replaces the most-attributed pixels by a
baseline image in ``steps`` equal steps and re-scores the similarity after each;
*insertion* starts from the baseline and reveals the most-attributed pixels first.
Curves are divided by the unperturbed score s₀, so AUCs compare across images
(1 = the similarity never moved): a faithful map has a **low deletion AUC** (the score
collapses when its top pixels go) and a **high insertion AUC** (its top pixels alone
bring the score back). A ``random`` map (uniform noise on the same grid as the
preset Grad-CAM layer, upsampled the same way) is the reference.

Batching: for a batch of images, all perturbed images of one step — every image ×
method × curve — go through the model together (one forward per step per batch).
The two endpoints (original, baseline) are shared by all methods and computed once.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..archs.base import RetrievalModel
from ..data import Dataset, load_dataset, load_image
from ..errors import NotAvailable, QueryError, RsviewerError
from ..utils.progress import CancelToken, ProgressFn, check, report
from .cam import grad_cams
from .core import HEATMAP_METHODS, METHODS, Query, SimilarityTarget, resolve_layer
from .run import available_methods
from .maps import compute

BASELINES = ("blur", "mean")


def baseline_images(arrs: np.ndarray, kind: str = "blur") -> np.ndarray:
    """(B, S, S, 3) uint8 → the images that "removed" pixels are replaced with:
    ``blur`` = Gaussian blur with sigma S/25 (about 10 px at 256; objects become
    unrecognisable, colours and layout stay), ``mean`` = each image's mean colour."""
    import cv2

    if kind == "blur":
        s = arrs.shape[1]
        return np.stack([cv2.GaussianBlur(a, (0, 0), sigmaX=s / 25.0, borderType=cv2.BORDER_REFLECT) for a in arrs])
    if kind == "mean":
        return np.broadcast_to(arrs.reshape(len(arrs), -1, 3).mean(1).round().astype(np.uint8)[:, None, None, :], arrs.shape).copy()
    raise QueryError(f"baseline must be one of {', '.join(BASELINES)}, not {kind!r}")


def pixel_ranks(heat: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(S, S) map → rank of every pixel (0 = most attributed); ties broken at random."""
    flat = heat.astype(np.float64).ravel()
    noise = rng.random(flat.size) * 1e-9 * max(1.0, float(np.abs(flat).max()))
    order = np.argsort(-(flat + noise), kind="stable")
    ranks = np.empty(flat.size, dtype=np.int64)
    ranks[order] = np.arange(flat.size)
    return ranks.reshape(heat.shape)


def _auc(curve: np.ndarray) -> float:
    """Area under a curve sampled at equal steps over [0, 1] (trapezoids)."""
    c = np.asarray(curve, dtype=np.float64)
    return float(((c[1:] + c[:-1]) / 2).sum() / (len(c) - 1))


def _up(grid: np.ndarray, s: int) -> np.ndarray:
    from .core import upsample

    return upsample(np.asarray(grid, dtype=np.float32), (s, s))


@torch.no_grad()
def _own_scores(model: RetrievalModel, pixels: torch.Tensor, owner: np.ndarray, txt: dict, chunk: int) -> np.ndarray:
    """Score of each image with the caption of its owner (index into ``txt``)."""
    out = []
    for s in range(0, len(pixels), chunk):
        st = model.image_states(pixels[s : s + chunk])
        sc = model.score(st, txt)  # (chunk, B)
        idx = torch.as_tensor(owner[s : s + chunk], device=sc.device)
        out.append(sc.gather(1, idx[:, None])[:, 0].float().cpu())
    return torch.cat(out).numpy()


def evaluate_faithfulness(
    model: RetrievalModel,
    data,
    split: str = "val",
    n: int = 100,
    methods: Optional[Sequence[str]] = None,
    steps: int = 16,
    batch_size: int = 4,
    baseline: str = "blur",
    seed: int = 0,
    images: Optional[str] = None,
    input_size: Optional[int] = None,
    chunk: int = 32,
    min_score: float = 0.05,
    method_opts: Optional[dict] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
) -> dict:
    """Deletion and insertion AUCs of each method (and a random map) over ``n`` images.

    Images: a seeded random sample of ``n`` items of ``split`` (all if fewer), each
    with its first caption. Images whose unperturbed score is below ``min_score`` are
    skipped (the normalisation by s₀ would blow up) and counted in ``"skipped"``.
    ``method_opts``: {method: {option: value}} passed to :func:`explain`'s methods.
    """
    if steps < 2:
        raise QueryError("steps must be at least 2")
    if n < 1:
        raise QueryError("n must be at least 1")
    baseline_images(np.zeros((1, 4, 4, 3), np.uint8), baseline)  # validates the name
    t_start = time.perf_counter()
    ds = data if isinstance(data, Dataset) else load_dataset(data, images=images)
    sub = ds.split(split)
    items = [it for it in sub.items if it.captions]
    if not items:
        raise RsviewerError(f"{sub.name} split {split!r} has no captioned images")
    rng = np.random.default_rng(seed)
    if len(items) > n:
        pick = np.sort(rng.choice(len(items), n, replace=False))
        items = [items[i] for i in pick]
    missing = [str(it.image) for it in items if it.image is None or not it.image.exists()]
    if missing:
        raise RsviewerError(f"{len(missing)} images are missing (first: {missing[0]}); pass --images DIR")

    avail = available_methods(model)
    if methods is None:
        wanted = [m for m in avail if m in HEATMAP_METHODS]
    else:
        wanted = []
        for m in methods:
            if m == "random":
                continue
            if m not in METHODS:
                raise QueryError(f"unknown method {m!r}; choose from {', '.join(METHODS)} and random")
            if m == "words":
                raise QueryError("words has no image map; it cannot be measured by deletion/insertion")
            wanted.append(m)
    not_available: dict[str, str] = {}
    for m in list(wanted):
        if m not in avail:
            not_available[m] = f"not available for {model.arch}"
            wanted.remove(m)
    names = wanted + ["random"]
    opts = dict(method_opts or {})

    was_training = model.training
    model.eval()
    s = int(input_size or model.image_size)
    dev = model.device
    cam_layer = None
    if any(m in ("gradcam", "gradcam++") for m in wanted):
        cam_layer = resolve_layer(model, None)
    per = {m: {"del": [], "ins": [], "seconds": 0.0} for m in names}
    base_ratio: list[float] = []
    skipped = 0
    used = 0
    errors: dict[str, str] = {}
    n_batches = -(-len(items) // batch_size)
    total = n_batches * steps
    done = 0
    try:
        for bi in range(n_batches):
            check(cancel)
            batch = items[bi * batch_size : (bi + 1) * batch_size]
            caps = [it.captions[0] for it in batch]
            imgs = [load_image(it.image).resize((s, s), Image.BICUBIC) for it in batch]
            arrs = np.stack([np.asarray(im, dtype=np.uint8) for im in imgs])
            x = model.preprocess_array(arrs).to(dev)
            xb = model.preprocess_array(baseline_images(arrs, baseline)).to(dev)
            with torch.no_grad():
                txt = {k: v.to(dev) for k, v in model.text_states(caps).items()}
            nb = len(batch)
            own = np.arange(nb)
            s0 = _own_scores(model, x, own, txt, chunk)
            sb = _own_scores(model, xb, own, txt, chunk)
            keep = s0 > min_score
            skipped += int((~keep).sum())

            # ---- maps (S, S) for every kept image and method
            heat: dict[str, list[Optional[np.ndarray]]] = {m: [None] * nb for m in names}
            grid_hw = None
            cams_wanted = [m for m in wanted if m in ("gradcam", "gradcam++")]
            if cams_wanted:
                t0 = time.perf_counter()
                lname, module = cam_layer
                copts = opts.get("gradcam", {})
                cams, _, shape = grad_cams(
                    model, x, SimilarityTarget(txt, paired=True), module, cams_wanted, lname,
                    copts.get("rectify_activations", "auto"),
                )
                grid_hw = shape[-2:]
                dt = (time.perf_counter() - t0) / len(cams_wanted)
                for m in cams_wanted:
                    per[m]["seconds"] += dt
                    for i in range(nb):
                        heat[m][i] = _up(np.maximum(cams[m][i].cpu().numpy(), 0), s)
            for m in wanted:
                if m in cams_wanted:
                    continue
                t0 = time.perf_counter()
                for i in range(nb):
                    if not keep[i]:
                        continue
                    check(cancel)
                    st = {k: v[i : i + 1] for k, v in txt.items()}
                    q = Query(caps[i], None, st, SimilarityTarget(st))
                    try:
                        r = compute(model, x[i : i + 1], q, m, **opts.get(m, {}))
                    except NotAvailable as e:
                        errors[m] = str(e)
                        continue
                    g = np.asarray(r.grid, dtype=np.float32)
                    heat[m][i] = _up(np.maximum(g, 0) if r.rectify else g, s)
                    if grid_hw is None and m == "scorecam":
                        grid_hw = g.shape
                per[m]["seconds"] += time.perf_counter() - t0
            gh, gw = grid_hw or (max(1, s // 32), max(1, s // 32))
            for i in range(nb):
                heat["random"][i] = _up(rng.random((gh, gw)).astype(np.float32), s)

            # ---- ranks, then one forward per step for all images × methods × curves
            jobs = [(i, m) for i in range(nb) if keep[i] for m in names if heat[m][i] is not None]
            if not jobs:
                done += steps
                continue
            ranks = torch.from_numpy(np.stack([pixel_ranks(heat[m][i], rng) for i, m in jobs])).to(dev)  # (J, S, S)
            owners = np.array([i for i, _ in jobs])
            xi, bi_ = x[owners], xb[owners]
            npx = s * s
            curves_del = np.ones((len(jobs), steps + 1))
            curves_ins = np.ones((len(jobs), steps + 1))
            ratio_b = (sb / np.where(s0 > 0, s0, 1.0))[owners]
            curves_del[:, steps] = ratio_b
            curves_ins[:, 0] = ratio_b
            for k in range(1, steps):
                check(cancel)
                thr = int(round(k * npx / steps))
                top = (ranks < thr)[:, None]  # (J, 1, S, S): the k/steps most attributed pixels
                deleted = torch.where(top, bi_, xi)
                inserted = torch.where(top, xi, bi_)
                both = torch.cat([deleted, inserted])
                sc = _own_scores(model, both, np.concatenate([owners, owners]), txt, chunk)
                curves_del[:, k] = sc[: len(jobs)] / s0[owners]
                curves_ins[:, k] = sc[len(jobs) :] / s0[owners]
                done += 1
                report(progress, done, total, "deletion/insertion")
            done += 1
            report(progress, done, total, "deletion/insertion")
            for j, (i, m) in enumerate(jobs):
                per[m]["del"].append(curves_del[j])
                per[m]["ins"].append(curves_ins[j])
            used += int(keep.sum())
            base_ratio += list((sb / np.where(s0 > 0, s0, 1.0))[keep])
    finally:
        model.train(was_training)

    out_methods: dict[str, dict] = {}
    rand_del = np.array([_auc(c) for c in per["random"]["del"]])
    rand_ins = np.array([_auc(c) for c in per["random"]["ins"]])
    for m in names:
        if not per[m]["del"]:
            continue
        d = np.array([_auc(c) for c in per[m]["del"]])
        ins = np.array([_auc(c) for c in per[m]["ins"]])
        k = len(d)
        entry = {
            "deletion_auc": round(float(d.mean()), 4),
            "insertion_auc": round(float(ins.mean()), 4),
            "deletion_auc_sem": round(float(d.std(ddof=1) / np.sqrt(k)) if k > 1 else 0.0, 4),
            "insertion_auc_sem": round(float(ins.std(ddof=1) / np.sqrt(k)) if k > 1 else 0.0, 4),
            "n": k,
            "deletion_curve": [round(float(v), 4) for v in np.mean(per[m]["del"], 0)],
            "insertion_curve": [round(float(v), 4) for v in np.mean(per[m]["ins"], 0)],
        }
        if m != "random":
            entry["seconds_per_map"] = round(per[m]["seconds"] / max(1, k), 4)
            if len(rand_del) == k:  # paired with the random map on the same images
                entry["beats_random"] = {
                    "deletion": round(float((d < rand_del).mean()), 3),
                    "insertion": round(float((ins > rand_ins).mean()), 3),
                }
        out_methods[m] = entry
    res = {
        "methods": out_methods,
        "n": used,
        "model": getattr(model, "name", model.arch),
        "arch": model.arch,
        "fingerprint": getattr(model, "fingerprint", None),
        "split": split,
        "data": str(getattr(ds, "source", data)),
        "steps": steps,
        "baseline": baseline,
        "input_size": s,
        "seed": seed,
        "method_opts": opts,
        "skipped": skipped,
        "baseline_score_ratio": round(float(np.mean(base_ratio)), 4) if base_ratio else None,
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    if cam_layer is not None:
        res["gradcam_layer"] = cam_layer[0]
    if not_available or errors:
        res["not_available"] = {**not_available, **errors}
    return res
