"""Training loop shared by every architecture.

    rsviewer train --arch lite --data dataset_ucm.json --out models/NAME

- trains on the ``train`` split, evaluates on ``val`` after every epoch and keeps the
  checkpoint with the best val mR (model selection on val; the test split is never
  read);
- frozen backbones: features are cached once (``train/cache.py``), each step runs only
  the trained heads (``CachedRunner``); with ``end_to_end`` the towers learn too, on
  augmented pixels every step (``end_to_end.EndToEndRunner``; many GPUs through torchrun,
  ``distributed.py``);
- AdamW, linear warm-up + cosine decay, gradient clipping, fixed seed;
- optional weight EMA (``--ema 0.98``): val is measured, and the checkpoint saved, with
  the moving average of the trained weights; on small data like UCM this removes most of
  the epoch-to-epoch noise of val mR that otherwise decides which epoch ships;
- the best model is saved atomically whenever val improves, and a resumable state
  (``train_state.pt``: optimizer, scheduler, RNG, history) after every epoch;
  ``--resume`` continues from it; the state file is removed when training completes;
- ``metrics.json`` records data, split, command, seed, device, epochs, wall time,
  history and the val numbers.
"""
from __future__ import annotations

import math
import os
import platform
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ..archs.base import RetrievalModel
from ..archs.registry import create_model
from ..checkpoint import METRICS, load_model, save_model
from ..data import Dataset, load_dataset
from ..errors import DatasetError, RsviewerError
from ..retrieval.metrics import retrieval_metrics
from ..utils.atomic import atomic_file, claim_output_dir
from ..utils.device import autocast, pick_device
from ..utils.progress import CancelToken, ProgressFn, check, report
from .cache import RowSelection, dihedral, gather, image_feature_cache, text_feature_cache
from .distributed import DistInfo, barrier, setup, teardown

STATE = "train_state.pt"


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup: float = 0.1  # fraction of steps
    grad_clip: float = 5.0
    views: int = 8  # dihedral augmentations cached per training image (1 = none)
    seed: int = 0
    device: str = "auto"
    train_split: str = "train"
    val_split: str = "val"
    max_train_images: Optional[int] = None  # tiny runs (tests)
    max_val_images: Optional[int] = None
    cache: bool = True  # use the on-disk feature cache
    eval_every: int = 1
    ema: float = 0.0  # >0: evaluate and save an exponential moving average of the trained weights
    # stop after this epoch although the schedule spans ``epochs`` (the epoch count chosen by
    # cross-validation, train/cv.py: the CV runs saw the same schedule up to that epoch)
    stop_epoch: Optional[int] = None
    # without a val split: also save the model after every epoch to OUT.epochs/eNN (the
    # final run of a CV can then start before the CV has chosen its epoch)
    snapshots: bool = False
    # end-to-end training (train/end_to_end.py): the pretrained towers learn too, on
    # augmented pixels each step, instead of cached frozen features
    end_to_end: bool = False
    image_from: str = "all"  # backbone layers trained: all | s8 | s16 (the layers after it) | none
    text_from: str = "all"  # text encoder: all | N (layers N..) | none
    image_lr_scale: float = 0.1  # learning-rate multipliers of the fine-tuned pretrained towers
    text_lr_scale: float = 0.1
    accum: int = 1  # micro-batches per optimizer step (gradient accumulation)
    augment: str = "crop,dihedral,jitter"
    ram_gb: float = 4.0  # decoded training images are held in memory up to this size
    workers: int = 2  # image decoding threads / DataLoader workers

    def __post_init__(self) -> None:
        """Absurd values are one line here, not a crash after minutes of feature caching."""
        bad = [f"{k} must be at least 1, got {getattr(self, k)!r}" for k in ("epochs", "batch_size", "eval_every", "accum")
               if getattr(self, k) < 1]
        for k in ("image_lr_scale", "text_lr_scale", "ram_gb", "workers"):
            if getattr(self, k) < 0:
                bad.append(f"{k} must be at least 0, got {getattr(self, k)!r}")
        if self.image_from not in ("all", "none", "s8", "s16"):
            bad.append(f"image_from must be all, s8, s16 or none, got {self.image_from!r}")
        if self.text_from not in ("all", "none") and not str(self.text_from).isdigit():
            bad.append(f"text_from must be all, none or a layer number, got {self.text_from!r}")
        if not 1 <= self.views <= 8:
            bad.append(f"views must be between 1 and 8, got {self.views!r}")
        for k in ("max_train_images", "max_val_images"):
            if getattr(self, k) is not None and getattr(self, k) < 1:
                bad.append(f"{k} must be at least 1, got {getattr(self, k)!r}")
        if not 0.0 <= self.ema < 1.0:
            bad.append(f"ema must be in [0, 1), got {self.ema!r}")
        if not self.lr > 0:
            bad.append(f"lr must be greater than 0, got {self.lr!r}")
        if self.stop_epoch is not None and not 1 <= self.stop_epoch <= self.epochs:
            bad.append(f"stop_epoch must be between 1 and epochs, got {self.stop_epoch!r}")
        if bad:
            raise RsviewerError("train config: " + "; ".join(bad))
        from .pipeline import parse_augment

        parse_augment(self.augment)  # one line for an unknown augmentation

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class TrainResult:
    out: Path
    best_epoch: int
    val: dict
    history: list = field(default_factory=list)
    seconds: float = 0.0


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _lr_lambda(total: int, warmup: float):
    w = max(1, int(total * warmup))

    def f(step: int) -> float:
        if step < w:
            return (step + 1) / w
        p = (step - w) / max(1, total - w)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, p)))

    return f


def _subset(ds: Dataset, n: Optional[int], seed: int) -> Dataset:
    if n is None or n >= len(ds):
        return ds
    rng = np.random.default_rng(seed)
    keep = sorted(rng.choice(len(ds), size=n, replace=False).tolist())
    return Dataset(ds.name, ds.source, ds.format, [ds.items[i] for i in keep], getattr(ds, "images_dir", None))


class _Split:
    """Captions, labels and (cached) features of one split."""

    def __init__(self, ds: Dataset, label_names: list[str]):
        self.ds = ds
        self.captions, self.cap_image = ds.flat_captions()
        if not self.captions:
            raise DatasetError(f"split of {ds.name} has no captions to train on")
        self.image_caps: list[np.ndarray] = [np.flatnonzero(self.cap_image == i) for i in range(len(ds))]
        self.labels = np.array([label_names.index(it.label) if it.label in label_names else -1 for it in ds.items])
        self.paths = [it.image for it in ds.items]
        self.image_feats: Optional[dict] = None
        self.text_feats: Optional[dict] = None

    def subset(self, rows: np.ndarray, label_names: list[str]) -> "_Split":
        """The images ``rows`` with their captions and the matching rows of the cached features."""
        rows = np.asarray(rows, dtype=np.int64)
        ds = Dataset(self.ds.name, self.ds.source, self.ds.format, [self.ds.items[i] for i in rows], self.ds.images_dir)
        sub = _Split(ds, label_names)
        caps = np.concatenate([self.image_caps[i] for i in rows])
        if self.image_feats is not None:
            sub.image_feats = {k: RowSelection(v, rows) for k, v in self.image_feats.items()}
        if self.text_feats is not None:
            sub.text_feats = {k: np.asarray(v[caps]) for k, v in self.text_feats.items()}
        return sub


def cached_similarity(model: RetrievalModel, split: _Split, device, tta: bool = False, batch: int = 256) -> np.ndarray:
    """(N_images, N_captions) scores from cached features: view 0, or with ``tta`` the mean
    of the unit embeddings of every cached view (dual encoders; see retrieval/tta.py)."""
    model.eval()
    n = len(split.ds)
    n_views = next(iter(split.image_feats.values())).shape[1]
    views = range(n_views) if tta and not model.pairwise else [0]
    with torch.no_grad(), autocast(device):
        per_view = []
        for v in views:
            img_states = [
                model.image_states_from({k: t.to(device) for k, t in gather(split.image_feats, np.arange(s, min(s + batch, n)), np.full(min(s + batch, n) - s, v, dtype=np.int64)).items()})
                for s in range(0, n, batch)
            ]
            per_view.append(_cat_states(img_states))
        img = per_view[0] if len(per_view) == 1 else {"emb": torch.nn.functional.normalize(torch.stack([p["emb"].float() for p in per_view]).mean(0), dim=-1)}
        m = len(split.captions)
        txt_states = [
            model.text_states_from({k: t.to(device) for k, t in gather(split.text_feats, np.arange(s, min(s + batch, m))).items()})
            for s in range(0, m, batch)
        ]
        return score_all(model, img, _cat_states(txt_states))


def _cat_states(parts: list[dict]) -> dict:
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def evaluate_cached(model: RetrievalModel, split: _Split, device, batch: int = 256) -> dict:
    """Val metrics from cached features (view 0), full pairwise scoring for pairwise archs."""
    return retrieval_metrics(cached_similarity(model, split, device, batch=batch), caption_image=split.cap_image)


def score_all(model: RetrievalModel, img: dict, txt: dict, chunk: int = 64) -> np.ndarray:
    """Full (N_images, N_captions) score matrix, chunked over images for pairwise models."""
    if not model.pairwise:
        return model.score(img, txt).float().cpu().numpy()
    n = next(iter(img.values())).shape[0]
    rows = []
    for s in range(0, n, chunk):
        rows.append(model.score({k: v[s : s + chunk] for k, v in img.items()}, txt).float().cpu())
    return torch.cat(rows).numpy()


def load_splits(full: Dataset, cfg: TrainConfig) -> tuple[Dataset, Optional[Dataset]]:
    """The training images (``train_split``, e.g. ``train`` or ``train+val``) and the
    selection split (``val_split``; empty = none, the epoch count was chosen by CV)."""
    names = [n for n in cfg.train_split.split("+") if n]
    parts = [full.split(n) for n in names]
    train_ds = Dataset(full.name, full.source, full.format, [it for p in parts for it in p.items], full.images_dir)
    train_ds = _subset(train_ds, cfg.max_train_images, cfg.seed)
    val_ds = None
    if cfg.val_split:
        if cfg.val_split in names:
            raise RsviewerError(f"cannot select on {cfg.val_split!r}: it is part of the training data")
        try:
            val_ds = _subset(full.split(cfg.val_split), cfg.max_val_images, cfg.seed)
        except DatasetError:
            raise DatasetError(
                f"{full.name} has no {cfg.val_split!r} split to select on; splits: {full.splits()}"
            ) from None
        val_ds.check_images()
    train_ds.check_images()
    return train_ds, val_ds


def cache_split(model: RetrievalModel, split: _Split, views: int, device, progress=None, cancel=None, use_cache=True) -> None:
    """Fill ``split``'s cached features. Image features are cached per dataset split (train,
    val, ...) and concatenated, so train+val and CV folds reuse the entries of a plain run."""
    groups: dict[str, list[int]] = {}
    for i, it in enumerate(split.ds.items):
        groups.setdefault(it.split, []).append(i)
    order = np.concatenate([np.asarray(g) for g in groups.values()])
    parts = [
        image_feature_cache(model, [split.paths[i] for i in g], views, device=device, progress=progress, cancel=cancel, use_cache=use_cache)
        for g in groups.values()
    ]
    if len(parts) == 1:
        split.image_feats = parts[0]  # memory-mapped as read
    else:
        stacked = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        if not np.array_equal(order, np.arange(len(order))):  # back to the split's item order (else no second copy)
            inverse = np.argsort(order)
            stacked = {k: v[inverse] for k, v in stacked.items()}
        split.image_feats = stacked
    split.text_feats = split_text_features(model, split, groups, device, progress, cancel, use_cache)


def split_text_features(model, split: _Split, groups: dict[str, list[int]], device, progress=None, cancel=None, use_cache=True) -> dict:
    """Caption features cached per dataset split like the image features, concatenated in
    the split's caption order (token-level features padded with zeros to one length)."""
    if len(groups) <= 1:
        return text_feature_cache(model, split.captions, device=device, progress=progress, cancel=cancel, use_cache=use_cache)
    cap_rows = [np.concatenate([split.image_caps[i] for i in g]) for g in groups.values()]
    parts = [text_feature_cache(model, [split.captions[c] for c in rows], device=device, progress=progress, cancel=cancel, use_cache=use_cache)
             for rows in cap_rows]
    inverse = np.argsort(np.concatenate(cap_rows))
    out = {}
    for k in parts[0]:
        arrs = [np.asarray(p[k]) for p in parts]
        if arrs[0].ndim > 1 and len({a.shape[1] for a in arrs}) > 1:  # per-split padded token length
            n = max(a.shape[1] for a in arrs)
            arrs = [np.pad(a, [(0, 0), (0, n - a.shape[1])] + [(0, 0)] * (a.ndim - 2)) for a in arrs]
        out[k] = np.concatenate(arrs)[inverse]
    return out


def make_optimizer(model: RetrievalModel, cfg: TrainConfig, steps_per_epoch: int, extra_scales: Optional[dict] = None):
    """AdamW with one group per (lr multiplier, decay or not), warm-up + cosine over ``epochs``.
    ``extra_scales`` (prefix → multiplier, e.g. the towers of end-to-end training) win over
    the architecture's own."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    scales = {**(extra_scales or {}), **{k: v for k, v in model.lr_scales().items() if k not in (extra_scales or {})}}
    groups: dict[tuple[float, bool], list] = {}
    for n, p in named:
        mult = next((v for k, v in scales.items() if n.startswith(k)), 1.0)
        groups.setdefault((mult, p.ndim >= 2), []).append(p)
    opt = torch.optim.AdamW(
        [{"params": ps, "lr": cfg.lr * mult, "weight_decay": cfg.weight_decay if dec else 0.0}
         for (mult, dec), ps in sorted(groups.items(), key=lambda kv: (-kv[0][1], -kv[0][0]))],
        lr=cfg.lr,
    )
    total = steps_per_epoch * cfg.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total, cfg.warmup))
    return opt, sched, [p for _, p in named], total


def train_epoch(model, tr: _Split, cfg: TrainConfig, opt, sched, params, ema, rng, epoch: int,
                steps_per_epoch: int, total: int, views: int, device, progress=None, cancel=None) -> float:
    """One epoch over the cached features of ``tr``; returns the mean loss."""
    model.train()
    bs = min(cfg.batch_size, len(tr.ds))
    order = rng.permutation(len(tr.ds))
    losses: list[float] = []
    for b in range(steps_per_epoch):
        check(cancel)
        rows = order[b * bs : (b + 1) * bs]
        view = rng.integers(0, views, size=len(rows))
        cap = np.array([rng.choice(tr.image_caps[i]) for i in rows])
        batch: dict[str, Any] = {
            "image_feats": {k: v.to(device) for k, v in gather(tr.image_feats, rows, view).items()},
            "text_feats": {k: v.to(device) for k, v in gather(tr.text_feats, cap).items()},
            "image_index": torch.as_tensor(rows, device=device),
            "label_index": torch.as_tensor(tr.labels[rows], device=device),
            "captions": [tr.captions[c] for c in cap],
            "epoch": epoch,
            "step": epoch * steps_per_epoch + b,
            "total_steps": total,
        }
        with autocast(device):
            terms = model.training_loss(batch)
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise RsviewerError(f"training diverged at epoch {epoch + 1} (loss {loss.item()}); lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        sched.step()
        if hasattr(model, "after_step"):
            model.after_step(batch)
        if ema is not None:
            ema.update(model)
        losses.append(float(loss.detach()))
        report(progress, epoch * steps_per_epoch + b + 1, total, f"epoch {epoch + 1}/{cfg.epochs}")
    return float(np.mean(losses))


class CachedRunner:
    """Epochs and validation on cached frozen features (the CPU path)."""

    def __init__(self, model, tr: _Split, va: Optional[_Split], cfg: TrainConfig, device, progress=None, cancel=None,
                 log=print, start_epoch: int = 0):
        self.model, self.tr, self.va, self.cfg, self.device = model, tr, va, cfg, device
        self.progress, self.cancel = progress, cancel
        self.views = cfg.views
        log(f"caching frozen features: {len(tr.ds)} train images × {self.views} views" + (f", {len(va.ds)} val images" if va else ""))
        cache_split(model, tr, self.views, device, progress, cancel, cfg.cache)
        if va is not None:
            cache_split(model, va, 1, device, progress, cancel, cfg.cache)
        self.steps_per_epoch = max(1, len(tr.ds) // min(cfg.batch_size, len(tr.ds)))
        self.rng = np.random.default_rng(cfg.seed + start_epoch)
        if start_epoch:
            torch.manual_seed(cfg.seed + start_epoch)
        self.images_per_second: Optional[float] = None

    def train_epoch(self, epoch: int, opt, sched, params, ema, total: int) -> float:
        t0 = time.time()
        loss = train_epoch(self.model, self.tr, self.cfg, opt, sched, params, ema, self.rng, epoch, self.steps_per_epoch,
                           total, self.views, self.device, self.progress, self.cancel)
        bs = min(self.cfg.batch_size, len(self.tr.ds))
        self.images_per_second = self.steps_per_epoch * bs / max(1e-9, time.time() - t0)
        return loss

    def evaluate(self) -> dict:
        return evaluate_cached(self.model, self.va, self.device)


def train(
    arch: str,
    data: str | os.PathLike,
    out: str | os.PathLike,
    images: Optional[str] = None,
    model_config: Optional[dict] = None,
    config: Optional[TrainConfig] = None,
    resume: bool = False,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    log=None,
    command: Optional[str] = None,
    overwrite: bool = False,
    extra_metrics: Optional[dict] = None,
) -> TrainResult:
    """Train ``arch`` on ``cfg.train_split`` of ``data``; save the best-on-val model to ``out``
    (or, without a val split, the model after ``stop_epoch``/``epochs``).

    ``out`` must be absent or empty, or a model folder rsviewer wrote (with ``overwrite``,
    or ``resume``); it is checked and claimed before any work. Under torchrun the
    processes train one model data-parallel (train/distributed.py); only rank 0 writes."""
    if config is None:  # the architecture's recipe, as the CLI uses it
        from ..archs.registry import arch_class

        config = TrainConfig.from_dict(dict(getattr(arch_class(arch), "train_defaults", {})))
    info, device = setup(pick_device(config.device))
    try:
        return _train(arch, data, Path(out), images, model_config, config, resume, progress, cancel, log, command,
                      overwrite, extra_metrics, info, device)
    finally:
        teardown(info)


def _open_model(arch: str, out: Path, resume: bool, model_config: Optional[dict], tr: _Split, train_ds: Dataset):
    """(model, resumable state or None): a fresh model, or the one being resumed with the
    weights of its last epoch."""
    if not resume:
        model = create_model(arch, **(model_config or {}))
        model.prepare_training(tr.captions, [it.label for it in train_ds.items])
        return model, None
    if not (out / STATE).exists():
        raise RsviewerError(f"nothing to resume: {out / STATE} does not exist")
    model = load_model(out, device="cpu", expect_arch=arch) if (out / "config.json").exists() else None
    state = torch.load(out / STATE, map_location="cpu", weights_only=True)
    if model is None or state.get("arch") != arch:
        raise RsviewerError(f"{out} holds a training state of another architecture")
    if state.get("model_state"):
        model.load_state_dict(state["model_state"], strict=False)  # last epoch, not best
    return model, state


def _train(arch, data, out: Path, images, model_config, cfg: TrainConfig, resume, progress, cancel, log, command,
           overwrite, extra_metrics, info: DistInfo, device) -> TrainResult:
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if not info.main:  # one voice: rank 0 logs, reports progress and writes
        log, progress = (lambda msg: None), None
    if info.active and not cfg.end_to_end:
        raise RsviewerError("several processes train end to end only (--end-to-end); the cached-feature path is one process")
    t_start = time.time()
    _seed_all(cfg.seed)

    full = load_dataset(data, images=images)
    train_ds, val_ds = load_splits(full, cfg)
    label_names = sorted({it.label for it in train_ds.items if it.label})
    tr = _Split(train_ds, label_names)
    va = _Split(val_ds, label_names) if val_ds is not None else None

    model, state = _open_model(arch, out, resume, model_config, tr, train_ds)
    tuned: dict[str, list[str]] = {}
    if cfg.end_to_end:
        try:
            tuned = model.tune_end_to_end(cfg.image_from, cfg.text_from)
        except ValueError as e:
            raise RsviewerError(f"{arch}: {e}") from None
    elif not model.cache_features:
        raise RsviewerError(f"{arch} trains its towers: use --end-to-end")
    if info.main:  # checked by the CLI already; claimed once the model and its settings are known to be good
        claim_output_dir(out, "model", overwrite=overwrite or resume, inputs=[data, images, full.images_dir],
                         label="output model folder")
    barrier(info)
    model.freeze_bases()
    model.to(device)
    start_epoch = state["epoch"] + 1 if state is not None else 0

    if cfg.end_to_end:
        from .end_to_end import EndToEndRunner, tower_lr_scales

        runner = EndToEndRunner(model, tr, va, cfg, device, info, progress, cancel, log)
        scales = tower_lr_scales(tuned, cfg)
    else:
        runner = CachedRunner(model, tr, va, cfg, device, progress, cancel, log, start_epoch)
        scales = {}
    opt, sched, params, total = make_optimizer(model, cfg, runner.steps_per_epoch, scales)
    last_epoch = min(cfg.epochs, cfg.stop_epoch or cfg.epochs)
    history: list[dict] = []
    best = {"mR": -1.0, "epoch": -1, "val": {}}
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        history, best = state["history"], state["best"]
        t_start -= float(state.get("wall_seconds", 0.0))  # wall time counts the earlier part too
        log(f"resuming at epoch {start_epoch + 1}/{cfg.epochs}" + (f" (best val mR so far {best['mR']:.2f})" if va else ""))

    ema = _Ema(model, cfg.ema) if cfg.ema > 0 else None
    if ema is not None and state is not None and state.get("ema"):
        ema.shadow = {k: v.to(device) for k, v in state["ema"].items()}
    run = dict(full=full, cfg=cfg, model=model, t_start=t_start, device=device, command=command, data=data,
               images=images, extra=extra_metrics, n_train=len(tr.ds), world=info.world)

    for epoch in range(start_epoch, last_epoch):
        t_ep = time.time()
        loss = runner.train_epoch(epoch, opt, sched, params, ema, total)
        row = {"epoch": epoch + 1, "loss": loss, "seconds": round(time.time() - t_ep, 2),
               "images_per_second": round(runner.images_per_second or 0.0, 2)}
        if info.main:
            best = _end_of_epoch(model, runner, va, cfg, ema, out, epoch, last_epoch, row, best, device)
            history.append(row)
            log(
                f"epoch {epoch + 1}/{cfg.epochs} loss {row['loss']:.4f}"
                + (f" val mR {row['val_mR']:.2f} (best {best['mR']:.2f} @ {best['epoch']})" if "val_mR" in row else "")
            )
            _save_state(out, arch, model, opt, sched, history, best, epoch, ema, t_start)
            _write_metrics(out, arch, best=best, history=history, final=False, **run)
        barrier(info)

    if info.main:
        _write_metrics(out, arch, best=best, history=history, final=True, **run)
        (out / STATE).unlink(missing_ok=True)
    barrier(info)
    return TrainResult(out, best["epoch"], best["val"], history, time.time() - t_start)


def _end_of_epoch(model, runner, va, cfg: TrainConfig, ema, out: Path, epoch: int, last_epoch: int, row: dict,
                  best: dict, device) -> dict:
    """Validate (or, without a val split, keep the last epoch) and save the model that is
    best so far; returns the updated ``best``."""
    if va is None and cfg.snapshots:
        with _swapped(model, ema):
            save_model(model.cpu(), out.parent / f"{out.name}.epochs" / f"e{epoch + 1:02d}", metrics=None, overwrite=True)
            model.to(device)
    if va is None:  # no selection split: the model after the last epoch is the one
        if epoch + 1 == last_epoch:
            with _swapped(model, ema):
                save_model(model.cpu(), out, metrics=None, overwrite=True)  # our own folder (claimed above)
                model.to(device)
            best = {"mR": float("nan"), "epoch": epoch + 1, "val": {}}
    elif (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == last_epoch:
        with _swapped(model, ema):
            val = runner.evaluate()
            row["val_mR"] = round(val["mR"], 3)
            if val["mR"] > best["mR"]:
                best = {"mR": val["mR"], "epoch": epoch + 1, "val": val}
                save_model(model.cpu(), out, metrics=None, overwrite=True)  # our own folder (claimed above)
                model.to(device)
    return best


def _save_state(out: Path, arch: str, model, opt, sched, history, best, epoch: int, ema, t_start: float) -> None:
    """Resumable state: last-epoch weights + optimizer, scheduler, history (atomic)."""
    with atomic_file(out / STATE) as fh:
        torch.save(
            {
                "arch": arch,
                "model_config": model.cfg.to_dict(),
                "model_state": {k: v.cpu() for k, v in model.trained_state_dict().items()},
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "history": history,
                "best": best,
                "epoch": epoch,
                "ema": {k: v.cpu() for k, v in ema.shadow.items()} if ema is not None else None,
                "wall_seconds": time.time() - t_start,
            },
            fh,
        )


class _Ema:
    """Exponential moving average of the trainable parameters (``decay`` per step)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach(), 1.0 - self.decay)


class _swapped:
    """Context: the model carries the EMA weights inside, its own weights again after."""

    def __init__(self, model: torch.nn.Module, ema: Optional[_Ema]):
        self.model, self.ema, self.saved = model, ema, {}

    def __enter__(self):
        if self.ema is not None:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for n, v in self.ema.shadow.items():
                    self.saved[n] = params[n].detach().clone()
                    params[n].copy_(v)
        return self.model

    def __exit__(self, *exc):
        if self.ema is not None:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for n, v in self.saved.items():
                    params[n].copy_(v.to(params[n].device))
        return False


def _write_metrics(out, arch, full, cfg, model, best, history, t_start, device, command, data, images, final, extra=None,
                   n_train=None, world=1):
    from ..utils.atomic import write_json

    if not (out / "config.json").exists():
        return
    metrics = {
        "arch": arch,
        "data": str(data),
        "images": str(images) if images else None,
        "dataset": full.name,
        "train_split": cfg.train_split,
        "n_train_images": n_train,
        # where the epoch (and recipe) was chosen: a val split, or cross-validation (extra["cv"])
        "selected_on": cfg.val_split or ("cross-validation" if extra and "cv" in extra else "none"),
        "saw_val": "val" in cfg.train_split.split("+"),
        "command": command or "rsviewer " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
        "seed": cfg.seed,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(0) if str(device).startswith("cuda") else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "processes": world,  # data-parallel ranks (torchrun)
        "trained": "end to end" if cfg.end_to_end else "heads on cached features",
        "torch": torch.__version__,
        "train_config": asdict(cfg),
        "epochs_run": len(history),
        "best_epoch": best["epoch"],
        "wall_seconds": round(time.time() - t_start, 1),  # includes the parts before any --resume
        "complete": final,
        "val": best["val"],
        "parameters": model.parameter_counts(),
        "history": history,
        **(extra or {}),
    }
    write_json(out / METRICS, metrics)
