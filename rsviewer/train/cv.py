"""Honest model selection: K-fold cross-validation over train+val.

    rsviewer train --arch lite --data dataset_ucm.json --out models/default --cv 9

A single 210-image val split is too small to choose recipes and epochs on: its noise
(about ±1.5 mR) gets fitted, and the chosen model does worse on unseen data. Here

- the images of train+val are split into K folds **by image** (an image's captions
  never straddle folds), every label spread evenly; by default each fold is a block of
  consecutive images of every label (see :func:`image_folds`: UCM neighbours are
  near-duplicates, and its official splits are such blocks);
- for each fold a fresh model (same seed, same recipe) trains on the other K−1 folds
  and is evaluated on the held-out fold after every epoch (with the weight EMA when
  the recipe uses one), also with test-time augmentation (mean of the 8 dihedral
  views' embeddings) for dual encoders;
- the per-epoch curve of the mean held-out mR picks the epoch count; the report gives
  mean ± standard error over folds at that epoch (``se = std(ddof=1) / sqrt(K)``);
- the final model is retrained on all of train+val with the same schedule and stopped
  at the chosen epoch; its ``metrics.json`` carries the CV figures and says it saw val.

The frozen-feature cache is shared: train and val features are cached per split (the
same entries as a plain run), concatenated once, and each fold indexes rows of them.

With K = 9 on UCM (1,890 images) every fold trains on 1,680 images and is evaluated on
a 210-image gallery: the same sizes as the standard train/test split, so the CV mean
estimates the test mR of the recipe (the chosen-epoch argmax makes it a little
optimistic; it is still far less so than a single val split).

Held-out similarity matrices at the chosen epoch are kept next to the report
(``cv_sims.npz``) so ``rsviewer ensemble`` can choose member weights by CV without
retraining anything.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..archs.registry import create_model
from ..data import Dataset, load_dataset
from ..errors import RsviewerError
from ..retrieval.metrics import retrieval_metrics
from ..utils.atomic import atomic_file, write_json
from ..utils.device import pick_device
from ..utils.progress import CancelToken, ProgressFn
from .trainer import (
    TrainConfig,
    _Ema,
    _seed_all,
    _subset,
    _Split,
    _swapped,
    cache_split,
    cached_similarity,
    split_text_features,
    make_optimizer,
    train,
    train_epoch,
)

CV_REPORT = "cv.json"
CV_SIMS = "cv_sims.npz"


def image_folds(ds: Dataset, k: int, seed: int = 0, mode: str = "blocked") -> list[np.ndarray]:
    """K disjoint arrays of image positions covering ``ds``. The unit is the image file
    (duplicate listings of one file stay together), and every label is spread evenly.

    ``blocked`` (default): within each label the images keep their dataset order and are
    cut into K contiguous blocks; fold j is block j of every label. Neighbouring UCM
    images of a class are often cut from the same scene (near-duplicates), and the
    official splits are such blocks (per class: 1–80 train, 81–90 test, 91–100 val), so
    random folds would leak near-duplicates across folds and overestimate (measured: one
    random fold gave held-out mR 60 where blocked folds and val give ≈ 50). On UCM
    train+val with K = 9 the last fold is exactly the val split.
    ``random``: shuffled within each label (``seed``), for data without that structure."""
    if k < 2:
        raise RsviewerError(f"--cv needs at least 2 folds, got {k}")
    if mode not in ("blocked", "random"):
        raise RsviewerError(f"unknown fold mode {mode!r}; use blocked or random")
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(ds.items):
        groups.setdefault(str(it.image or it.id), []).append(i)
    if k > len(groups):
        raise RsviewerError(f"--cv {k}: only {len(groups)} images to split")
    by_label: dict[str, list[str]] = {}
    for key in groups:  # dataset order (dicts keep insertion order)
        by_label.setdefault(ds.items[groups[key][0]].label or "", []).append(key)
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    nxt = 0
    for label in sorted(by_label):
        members = by_label[label]
        if mode == "blocked":
            for j, block in enumerate(np.array_split(np.arange(len(members)), k)):
                for m in block:
                    folds[j].extend(groups[members[m]])
        else:  # round-robin over a shuffle: balanced folds
            for j in rng.permutation(len(members)):
                folds[nxt % k].extend(groups[members[j]])
                nxt += 1
    return [np.array(sorted(f), dtype=np.int64) for f in folds]


def folds_digest(ds: Dataset, folds: list[np.ndarray]) -> str:
    """Identifies the fold assignment (image ids per fold): CV figures of two recipes are
    comparable, and their held-out scores combinable, only when this matches."""
    payload = [[ds.items[i].id for i in f] for f in folds]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def _mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else float("nan")
    return float(v.mean()), se


def _fold_run(arch, model_config, cfg, union: _Split, rows_train, rows_held, device, log, tta: bool):
    """Train on ``rows_train``, evaluate on ``rows_held`` after every epoch; returns the
    history and the held-out similarity matrices per epoch (float16)."""
    _seed_all(cfg.seed)
    model = create_model(arch, **(model_config or {}))
    train_items = [union.ds.items[i] for i in rows_train]
    label_names = sorted({it.label for it in train_items if it.label})
    tr_caps = [c for it in train_items for c in it.captions]
    model.prepare_training(tr_caps, [it.label for it in train_items])
    model.freeze_bases()
    model.to(device)
    # image features do not depend on prepare_training; text features may (GaLR's
    # vocabulary), so they are fetched per fold through the keyed cache
    union_fold = _Split(union.ds, label_names)
    union_fold.image_feats = union.image_feats
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(union.ds.items):
        groups.setdefault(it.split, []).append(i)
    union_fold.text_feats = split_text_features(model, union_fold, groups, device, use_cache=cfg.cache)
    tr = union_fold.subset(rows_train, label_names)
    held = union_fold.subset(rows_held, label_names)
    steps = max(1, len(tr.ds) // min(cfg.batch_size, len(tr.ds)))
    opt, sched, params, total = make_optimizer(model, cfg, steps)
    ema = _Ema(model, cfg.ema) if cfg.ema > 0 else None
    rng = np.random.default_rng(cfg.seed)
    views = cfg.views
    history, sims, sims_tta = [], [], []
    for epoch in range(cfg.epochs):
        t0 = time.time()
        loss = train_epoch(model, tr, cfg, opt, sched, params, ema, rng, epoch, steps, total, views, device)
        row = {"epoch": epoch + 1, "loss": round(loss, 5), "seconds": round(time.time() - t0, 2)}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            with _swapped(model, ema):
                sim = cached_similarity(model, held, device)
                row["mR"] = round(float(retrieval_metrics(sim, caption_image=held.cap_image)["mR"]), 3)
                sims.append(sim.astype(np.float16))
                if tta and not model.pairwise and views > 1:  # mean over the cached views
                    st = cached_similarity(model, held, device, tta=True)
                    row["mR_tta"] = round(float(retrieval_metrics(st, caption_image=held.cap_image)["mR"]), 3)
                    sims_tta.append(st.astype(np.float16))
        history.append(row)
        log(f"  epoch {epoch + 1}/{cfg.epochs} loss {loss:.4f}" + (f" held-out mR {row['mR']:.2f}" if "mR" in row else "")
            + (f" (TTA {row['mR_tta']:.2f})" if "mR_tta" in row else ""))
    return history, sims, sims_tta, held.cap_image


def cross_validate(
    arch: str,
    data: str | os.PathLike,
    k: int = 9,
    images: Optional[str] = None,
    model_config: Optional[dict] = None,
    config: Optional[TrainConfig] = None,
    splits: str = "train+val",
    fold_seed: int = 0,
    out: Optional[str | os.PathLike] = None,
    folds: str = "blocked",
    only_folds: Optional[list[int]] = None,
    tta: bool = True,
    log=None,
    command: Optional[str] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
) -> dict:
    """K-fold CV of one recipe (``arch`` + ``model_config`` + ``config``) over ``splits``.
    Returns the report (also written to ``out/cv.json`` with ``out/cv_sims.npz``)."""
    report, arrays = _cross_validate(arch, data, k, images, model_config, config, splits, fold_seed, tta, log,
                                     command, progress, cancel, folds, only_folds, out)
    if out is not None:
        save_cv(Path(out), report, arrays)
    return report


def _union_dataset(data, images, splits: str, cfg: TrainConfig) -> Dataset:
    """The items of ``splits`` (e.g. train+val) as one dataset, in dataset order."""
    full = load_dataset(data, images=images)
    names = [n for n in splits.split("+") if n]
    if "test" in names:
        raise RsviewerError("cross-validation never uses the test split")
    parts = [full.split(n) for n in names]
    union_ds = Dataset(full.name, full.source, full.format, [it for p in parts for it in p.items], full.images_dir)
    return _subset(union_ds, cfg.max_train_images, cfg.seed)  # tiny runs (tests)


def _cross_validate(arch, data, k, images, model_config, config, splits, fold_seed, tta, log, command, progress, cancel,
                    fold_mode="blocked", only_folds=None, partial_out=None):
    from ..archs.registry import arch_class

    cfg = config or TrainConfig.from_dict(dict(getattr(arch_class(arch), "train_defaults", {})))
    log = log or (lambda msg: print(msg, file=sys.stderr))
    t_start = time.time()
    device = pick_device(cfg.device)
    union_ds = _union_dataset(data, images, splits, cfg)
    union_ds.check_images()
    folds = image_folds(union_ds, k, fold_seed, fold_mode)
    digest = folds_digest(union_ds, folds)

    # features for every image of train+val, all views, from the per-split cache entries
    probe = create_model(arch, **(model_config or {}))
    if not probe.cache_features:
        raise RsviewerError(f"{arch}: cross-validation runs on cached features; this architecture trains end to end")
    probe.freeze_bases()
    probe.to(device)
    union = _Split(union_ds, sorted({it.label for it in union_ds.items if it.label}))
    log(f"cv: {k} folds over {len(union_ds)} images of {splits} ({digest}); caching features × {cfg.views} views")
    cache_split(probe, union, cfg.views, device, progress, cancel, cfg.cache)
    union.text_feats = None  # per fold (may depend on the fold's vocabulary)
    del probe

    per_fold, all_sims, all_tta, cap_images = [], [], [], []
    run = sorted(set(only_folds)) if only_folds else list(range(1, k + 1))
    if any(not 1 <= f <= k for f in run):
        raise RsviewerError(f"--cv-folds: fold numbers are 1..{k}, got {run}")
    meta = {
        "arch": arch, "model_config": model_config or {}, "train_config": asdict(cfg), "data": str(data),
        "splits": splits, "k": k, "fold_mode": fold_mode, "fold_seed": fold_seed, "folds_digest": digest,
        "folds_run": run, "command": command, "device": str(device),
        "device_name": _cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(0),
        "threads": torch.get_num_threads(),
    }
    for f in run:
        held_rows = folds[f - 1]
        train_rows = np.setdiff1d(np.arange(len(union_ds)), held_rows)
        log(f"cv fold {f}/{k}: train {len(train_rows)} images, held out {len(held_rows)}")
        hist, sims, sims_tta, cap_img = _fold_run(arch, model_config, cfg, union, train_rows, held_rows, device, log, tta)
        per_fold.append({"fold": f, "n_train_images": int(len(train_rows)), "n_held_images": int(len(held_rows)),
                         "n_held_captions": int(len(cap_img)), "history": hist})
        all_sims.append(sims)
        all_tta.append(sims_tta)
        cap_images.append(cap_img)
        if partial_out is not None:  # a report after every fold: a stopped run keeps what it measured
            Path(partial_out).mkdir(parents=True, exist_ok=True)
            write_json(Path(partial_out) / CV_REPORT, {**summarize(per_fold), **meta, "complete": False, "folds": per_fold})
        if progress:
            progress(len(per_fold), len(run), f"cv fold {f}/{k}")

    report = summarize(per_fold)
    report.update({
        **meta,
        "complete": len(run) == k,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "wall_seconds": round(time.time() - t_start, 1),
        "folds": per_fold,
    })
    evaluated = [e["epoch"] for e in report["curve"]]
    idx = evaluated.index(report["chosen_epoch"])
    arrays = {}
    for f, sims, sims_tta, cap in zip(run, all_sims, all_tta, cap_images):
        f0 = f - 1  # arrays are keyed by 0-based fold index
        arrays[f"sim{f0}"] = sims[idx]
        if sims_tta:
            arrays[f"tta{f0}"] = sims_tta[idx]
        if len(run) < k:  # a merge of the runs may choose another epoch: keep every evaluated one
            for j, e in enumerate(evaluated):
                arrays[f"sim{f0}_e{e}"] = sims[j]
                if sims_tta:
                    arrays[f"tta{f0}_e{e}"] = sims_tta[j]
        arrays[f"cap{f0}"] = cap
        arrays[f"images{f0}"] = folds[f0]
    return report, arrays


def summarize(per_fold: list[dict]) -> dict:
    """Per-epoch mean ± SE over folds; the chosen epoch is the argmax of the mean curve."""
    evaluated = [h["epoch"] for h in per_fold[0]["history"] if "mR" in h]
    curve = []
    for e in evaluated:
        vals = [next(h for h in fold["history"] if h["epoch"] == e)["mR"] for fold in per_fold]
        mean, se = _mean_se(vals)
        row = {"epoch": e, "mR_mean": round(mean, 3), "mR_se": round(se, 3)}
        tvals = [next(h for h in fold["history"] if h["epoch"] == e).get("mR_tta") for fold in per_fold]
        if all(v is not None for v in tvals):
            tm, ts = _mean_se(tvals)
            row.update({"mR_tta_mean": round(tm, 3), "mR_tta_se": round(ts, 3)})
        curve.append(row)
    best = max(curve, key=lambda r: (r["mR_mean"], -r["epoch"]))
    last = curve[-1]
    at_best = [next(h for h in fold["history"] if h["epoch"] == best["epoch"])["mR"] for fold in per_fold]
    out = {
        "chosen_epoch": best["epoch"],
        "mR_mean": best["mR_mean"],
        "mR_se": best["mR_se"],
        "mR_per_fold": at_best,
        "last_epoch": {"epoch": last["epoch"], "mR_mean": last["mR_mean"], "mR_se": last["mR_se"]},
        "curve": curve,
    }
    if "mR_tta_mean" in best:
        out["tta"] = {"mR_mean": best["mR_tta_mean"], "mR_se": best["mR_tta_se"]}
    return out


def save_cv(out: Path, report: dict, arrays: dict) -> None:
    """``cv.json`` and the held-out scores at the chosen epoch (``cv_sims.npz``)."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / CV_SIMS) as fh:
        np.savez_compressed(fh, **arrays)
    write_json(out / CV_REPORT, report)


def load_cv_sims(folder: str | os.PathLike) -> tuple[dict, dict]:
    """(report, arrays) of a CV run folder or a model folder trained with ``--cv``."""
    folder = Path(folder)
    rep = folder / CV_REPORT
    if not rep.exists():
        raise RsviewerError(f"{folder} has no {CV_REPORT} (train it with --cv K)")
    report = json.loads(rep.read_text())
    sims = folder / CV_SIMS
    if not sims.exists():
        raise RsviewerError(f"{folder} has no {CV_SIMS}")
    with np.load(sims) as z:
        arrays = {k: z[k] for k in z.files}
    return report, arrays


def cv_summary(report: dict) -> dict:
    """The CV figures a model's metrics.json carries."""
    keys = ("k", "fold_mode", "fold_seed", "folds_digest", "splits", "chosen_epoch", "mR_mean", "mR_se", "mR_per_fold",
            "last_epoch", "tta", "curve", "command", "commands", "wall_seconds", "load_average")
    return {k: report[k] for k in keys if k in report}


def train_with_cv(
    arch: str,
    data: str | os.PathLike,
    out: str | os.PathLike,
    k: int,
    images: Optional[str] = None,
    model_config: Optional[dict] = None,
    config: Optional[TrainConfig] = None,
    fold_seed: int = 0,
    final: bool = True,
    folds: str = "blocked",
    log=None,
    command: Optional[str] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    merge: Optional[list[str | os.PathLike]] = None,
):
    """CV the recipe, then (``final``) retrain on train+val for the chosen epochs into ``out``.
    The CV report and held-out scores go to ``out`` too. ``merge``: folders of
    ``--cv-only --cv-folds`` runs of this recipe that cover every fold; their merged CV
    replaces running the folds here (:func:`merge_cv_runs`)."""
    from ..archs.registry import arch_class

    cfg = config or TrainConfig.from_dict(dict(getattr(arch_class(arch), "train_defaults", {})))
    log = log or (lambda msg: print(msg, file=sys.stderr))
    out = Path(out)
    if merge:
        report, arrays = merge_cv_runs(merge)
        check_same_recipe(report, arch, model_config, cfg, _union_dataset(data, images, "train+val", cfg), k, folds,
                          fold_seed)
    else:
        report, arrays = _cross_validate(arch, data, k, images, model_config, cfg, "train+val", fold_seed, True, log,
                                         command, progress, cancel, folds)
    log(f"cv: mR {report['mR_mean']:.2f} ± {report['mR_se']:.2f} (SE over {k} folds) at epoch {report['chosen_epoch']}"
        + (f"; with TTA {report['tta']['mR_mean']:.2f} ± {report['tta']['mR_se']:.2f}" if "tta" in report else ""))
    result = None
    if final:
        final_cfg = replace(cfg, train_split="train+val", val_split="", stop_epoch=report["chosen_epoch"],
                            max_val_images=None)
        result = train(arch, data, out, images=images, model_config=model_config, config=final_cfg, log=log,
                       command=command, progress=progress, cancel=cancel, extra_metrics={"cv": cv_summary(report)},
                       overwrite=True)  # the CV run's own folder; a foreign one is still refused
    # written after the model folder exists: save_model swaps the folder in atomically and
    # would drop files written into it before
    save_cv(out, report, arrays)
    return report, result


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _simplex(n: int, step: float) -> list[tuple[float, ...]]:
    """Weight vectors on the simplex with the given grid step (all members ≥ 0, Σ = 1)."""
    m = int(round(1 / step))

    def rec(left: int, k: int):
        if k == 1:
            yield (left,)
            return
        for i in range(left + 1):
            for rest in rec(left - i, k - 1):
                yield (i, *rest)

    return [tuple(x / m for x in w) for w in rec(m, n)]


def ensemble_cv(members: list[tuple[dict, dict]], step: float = 0.1, tta: bool = False) -> dict:
    """Choose ensemble weights from the members' held-out CV scores (no retraining).

    ``members``: (report, arrays) per member, from :func:`load_cv_sims`; all must share the
    fold assignment. Every weight vector on a simplex grid is scored on every fold; the
    chosen weights maximise the mean over folds. Choosing them on the same folds is
    optimistic, so the report also gives a nested estimate: for each fold, the weights
    chosen on the other K−1 folds, scored on it."""
    digests = {rep["folds_digest"] for rep, _ in members}
    if len(digests) != 1:
        raise RsviewerError("the members were cross-validated on different folds; rerun them with the same --cv K and --fold-seed")
    k = members[0][0]["k"]
    key = "tta" if tta else "sim"
    for rep, arr in members:
        if f"{key}0" not in arr:
            raise RsviewerError(f"{rep.get('command') or 'a member'}: no {'TTA ' if tta else ''}held-out scores stored")
    grid = _simplex(len(members), step)
    common = sorted(set.intersection(*[{int(m[1]) for x in arr if (m := re.fullmatch(r"sim(\d+)", x))} for _, arr in members]))
    table = np.zeros((len(grid), len(common)))
    for c, f in enumerate(common):
        sims = [arr[f"{key}{f}"].astype(np.float32) for _, arr in members]
        cap = members[0][1][f"cap{f}"]
        for g, w in enumerate(grid):
            s = sum(wi * si for wi, si in zip(w, sims) if wi)
            table[g, c] = retrieval_metrics(s, caption_image=cap)["mR"]
    means = table.mean(1)
    best = int(np.argmax(means))
    nested = []
    for f in range(len(common)):
        others = np.delete(table, f, axis=1).mean(1)
        nested.append(float(table[int(np.argmax(others)), f]))
    mean_b, se_b = _mean_se(table[best])
    mean_n, se_n = _mean_se(nested)
    singles = {}
    for i in range(len(members)):
        one = tuple(1.0 if j == i else 0.0 for j in range(len(members)))
        singles[i] = _mean_se(table[grid.index(one)])
    return {
        "weights": list(grid[best]),
        "step": step,
        "tta": tta,
        "k": k,
        "folds": [f + 1 for f in common],
        "folds_digest": digests.pop(),
        "mR_mean": round(mean_b, 3),
        "mR_se": round(se_b, 3),
        "mR_per_fold": [round(float(x), 3) for x in table[best]],
        "nested": {"mR_mean": round(mean_n, 3), "mR_se": round(se_n, 3), "mR_per_fold": [round(x, 3) for x in nested]},
        "members_alone": [{"mR_mean": round(m, 3), "mR_se": round(s, 3)} for m, s in singles.values()],
    }


def merge_reports(reports: list[dict]) -> dict:
    """One report from CV runs that covered different folds of the same design
    (``--cv-folds``): same folds digest, recipe and K; folds must not repeat."""
    if len({r["folds_digest"] for r in reports}) != 1 or len({json.dumps(r["train_config"], sort_keys=True) for r in reports}) != 1:
        raise RsviewerError("these CV reports do not share folds and recipe")
    per_fold = sorted((f for r in reports for f in r["folds"]), key=lambda f: f["fold"])
    if len({f["fold"] for f in per_fold}) != len(per_fold):
        raise RsviewerError("the CV reports cover the same fold twice")
    meta = {k: v for k, v in reports[0].items() if k not in ("folds", "curve", "complete", "wall_seconds")}
    out = {**meta, **summarize(per_fold), "folds_run": [f["fold"] for f in per_fold],
           "complete": len(per_fold) == reports[0]["k"], "folds": per_fold,
           "wall_seconds": round(sum(r.get("wall_seconds") or 0 for r in reports), 1)}
    return out


# the fields of a TrainConfig that make the recipe (the rest say where and how it runs)
RECIPE_FIELDS = ("epochs", "batch_size", "lr", "weight_decay", "warmup", "grad_clip", "views", "seed", "eval_every",
                 "ema", "max_train_images")


def merge_cv_runs(folders: list[str | os.PathLike]) -> tuple[dict, dict]:
    """One complete CV (report, held-out scores) from ``--cv-only --cv-folds`` runs that
    together cover every fold once: the folds of a CV can then run in parallel (processes,
    machines). The merged curve chooses the epoch, and each fold's scores at that epoch
    are taken from the per-epoch scores a partial run keeps."""
    loaded = [load_cv_sims(f) for f in folders]
    report = merge_reports([rep for rep, _ in loaded])
    if not report["complete"]:
        missing = sorted(set(range(1, report["k"] + 1)) - set(report["folds_run"]))
        raise RsviewerError(f"the CV runs cover folds {report['folds_run']} of {report['k']}; missing: {missing}")
    epoch = report["chosen_epoch"]
    arrays: dict[str, np.ndarray] = {}
    for folder, (rep, arr) in zip(folders, loaded):
        for f0 in (f - 1 for f in rep["folds_run"]):
            for key in ("sim", "tta"):
                if f"{key}{f0}_e{epoch}" in arr:
                    arrays[f"{key}{f0}"] = arr[f"{key}{f0}_e{epoch}"]
                elif f"{key}{f0}" in arr and rep["chosen_epoch"] == epoch:
                    arrays[f"{key}{f0}"] = arr[f"{key}{f0}"]
                elif key == "sim" or f"{key}{f0}" in arr:
                    raise RsviewerError(f"{folder}: fold {f0 + 1} has no held-out scores at the merged CV's epoch {epoch} "
                                        "(it kept only its own chosen epoch's; rerun that fold)")
            arrays[f"cap{f0}"] = arr[f"cap{f0}"]
            arrays[f"images{f0}"] = arr[f"images{f0}"]
    if not all(f"tta{f - 1}" in arrays for f in report["folds_run"]):  # TTA figures for some folds only: none
        arrays = {k: v for k, v in arrays.items() if not k.startswith("tta")}
    report["commands"] = [rep.get("command") for rep, _ in loaded]
    report["merged_from"] = [str(Path(f).resolve()) for f in folders]
    return report, arrays


def check_same_recipe(report: dict, arch: str, model_config: Optional[dict], cfg: TrainConfig, union_ds: Dataset,
                      k: int, fold_mode: str, fold_seed: int) -> None:
    """A final model trained from a merged CV must be the recipe and the folds that CV measured."""
    got = {"arch": arch, "model_config": model_config or {}, "k": k, "fold_mode": fold_mode, "fold_seed": fold_seed,
           **{f: getattr(cfg, f) for f in RECIPE_FIELDS}}
    cv = {"arch": report["arch"], "model_config": report["model_config"], "k": report["k"],
          "fold_mode": report["fold_mode"], "fold_seed": report["fold_seed"],
          **{f: report["train_config"].get(f) for f in RECIPE_FIELDS}}
    differ = [f"{key} {got[key]!r} (CV runs: {cv[key]!r})" for key in got if got[key] != cv[key]]
    if differ:
        raise RsviewerError("this command's recipe is not the one the CV runs measured: " + "; ".join(differ))
    digest = folds_digest(union_ds, image_folds(union_ds, k, fold_seed, fold_mode))
    if digest != report["folds_digest"]:
        raise RsviewerError(f"the CV runs were made on other data (folds {report['folds_digest']}, here {digest})")
