"""End-to-end training: the pretrained towers learn too (``rsviewer train --end-to-end``).

The cached-feature path (``trainer.CachedRunner``) computes the frozen towers once and
trains only the heads. Here every step runs the towers on freshly augmented pixels and
tokenised captions, with gradients, so the image backbone and the text encoder are
fine-tuned (in full or from a named stage/layer, at their own learning-rate multiplier).
The architecture's own ``training_loss`` is unchanged: it receives the towers' outputs
exactly where it would receive cached features.

- images: decoded once into memory as uint8 (``pipeline.ImageStore``), augmented on the
  training device (random resized crop, dihedral view, colour jitter);
- bf16 autocast on GPUs (fp16 with a gradient scaler where bf16 is missing);
- gradient accumulation (``accum`` micro-batches per optimizer step; negatives stay
  within a micro-batch);
- many processes: ``distributed.py`` (torchrun + DDP, loss on the gathered global batch);
- determinism: batches, augmentations, caption choices and dropout are functions of
  (seed, epoch, step), so a resumed run continues the interrupted run's curve and N
  processes reproduce the one-process losses of the same global batch.

Frozen BatchNorm: the pretrained towers stay in eval mode (running statistics and no
dropout), as ``RetrievalModel.train`` keeps them; with per-GPU batches of a few dozen,
batch statistics would be noise, and ranks would disagree.
"""
from __future__ import annotations

import time
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from ..errors import RsviewerError
from ..retrieval.metrics import retrieval_metrics
from ..utils.device import autocast
from ..utils.progress import check, report
from .distributed import DistInfo, GlobalBatches, gather_features, wrap_ddp
from .pipeline import ImageStore, augment, normalize, parse_augment, sample_rng


class _Step(nn.Module):
    """What DDP wraps: this rank's towers, the gather, the architecture's loss on the global batch."""

    def __init__(self, model: nn.Module, info: DistInfo):
        super().__init__()
        self.model, self.info = model, info

    def forward(self, pixels: torch.Tensor, tokens: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict:
        img = gather_features(self.info, self.model.image_features(pixels))
        txt = gather_features(self.info, self.model.text_features(tokens))
        return self.model.training_loss({**meta, "image_feats": img, "text_feats": txt})


def tower_lr_scales(tuned: dict[str, list[str]], cfg) -> dict[str, float]:
    """Learning-rate multipliers of the pretrained towers being fine-tuned (``tuned``: what
    ``model.tune_end_to_end`` made trainable, by side)."""
    mult = {"image": cfg.image_lr_scale, "text": cfg.text_lr_scale}
    return {p: mult.get(side, 1.0) for side, prefixes in tuned.items() for p in prefixes}


def _step_seed(seed: int, epoch: int, micro: int) -> int:
    return (seed * 1_000_003 + epoch * 10_007 + micro) % (2**63)


class EndToEndRunner:
    """Epochs and validation of end-to-end training (the trainer's loop calls these)."""

    def __init__(self, model, tr, va, cfg, device: torch.device, info: DistInfo, progress=None, cancel=None, log=print):
        self.model, self.tr, self.va, self.cfg, self.device, self.info = model, tr, va, cfg, device, info
        self.progress, self.cancel = progress, cancel
        self.ops = parse_augment(cfg.augment)
        size = model.image_size
        t0 = time.time()
        self.train_images = ImageStore(tr.paths, size, cfg.ram_gb, cfg.workers, progress, cancel, "decoding train images")
        self.val_images = (ImageStore(va.paths, size, cfg.ram_gb, cfg.workers, progress, cancel, "decoding val images")
                           if va is not None and info.main else None)
        where = "in memory" if self.train_images.in_memory else f"decoded per batch by {cfg.workers} workers"
        log(f"end to end: {len(tr.ds)} train images at {size} px {where} ({self.train_images.nbytes / 1e6:.0f} MB, "
            f"{time.time() - t0:.1f} s); augment {'+'.join(self.ops) or 'none'}; image tower from {cfg.image_from}, "
            f"text tower from {cfg.text_from}" + (f"; {info.world} processes" if info.active else ""))
        # channels-last convolutions: 1.6x faster forward + backward of EfficientNet-Lite0 on a
        # 2-core AVX-512 CPU (batch 16, 256 px); the weights are saved contiguous as before
        bb = getattr(model, "backbone", None)
        self.channels_last = isinstance(bb, nn.Module) and any(isinstance(m, nn.Conv2d) for m in bb.modules())
        if self.channels_last:
            bb.to(memory_format=torch.channels_last)
        self.sampler = GlobalBatches(len(tr.ds), cfg.batch_size, info, cfg.seed)
        self.step_module = wrap_ddp(_Step(model, info), info, device)
        self.accum = min(cfg.accum, len(self.sampler))  # micro-batches per optimizer step
        self.micro_per_epoch = len(self.sampler) - len(self.sampler) % self.accum
        self.steps_per_epoch = self.micro_per_epoch // self.accum
        fp16 = device.type == "cuda" and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler("cuda") if fp16 else None
        self.images_per_second: Optional[float] = None

    def _batch(self, rows: np.ndarray, epoch: int, step: int, total: int, pixels_u8: torch.Tensor):
        """(pixels, tokens, meta) of one micro-batch: this rank's pixels and tokens, the global metadata."""
        tr, cfg = self.tr, self.cfg
        cap = np.array([tr.image_caps[i][sample_rng(cfg.seed, epoch, i, 2).integers(len(tr.image_caps[i]))] for i in rows])
        local = self.sampler.local(rows)
        lo = self.info.rank * self.sampler.per_rank
        pixels = augment(pixels_u8.to(self.device, non_blocking=True),
                         [sample_rng(cfg.seed, epoch, i, 1) for i in local], self.ops, self.model.mean, self.model.std)
        if self.channels_last:
            pixels = pixels.contiguous(memory_format=torch.channels_last)
        captions = [tr.captions[c] for c in cap]
        # the global batch is tokenised on every rank: one padded length, so the gather fits
        tokens = {k: v[lo : lo + len(local)].to(self.device) for k, v in self.model.tokenize(captions).items()}
        meta = {
            "image_index": torch.as_tensor(rows, device=self.device),
            "label_index": torch.as_tensor(tr.labels[rows], device=self.device),
            "captions": captions, "epoch": epoch, "step": step, "total_steps": total,
        }
        return pixels, tokens, meta

    def train_epoch(self, epoch: int, opt, sched, params, ema, total: int) -> float:
        model, cfg = self.model, self.cfg
        model.train()
        rows_all = self.sampler.epoch(epoch)[: self.micro_per_epoch]
        local_rows = [self.sampler.local(r) for r in rows_all]
        losses: list[float] = []
        t0, seen = time.time(), 0
        opt.zero_grad(set_to_none=True)
        for m, (rows, pixels_u8) in enumerate(zip(rows_all, self.train_images.batches(local_rows))):
            check(self.cancel)
            step = epoch * self.steps_per_epoch + m // self.accum
            torch.manual_seed(_step_seed(cfg.seed, epoch, m))  # dropout/sampling inside the heads: same on every rank
            pixels, tokens, meta = self._batch(rows, epoch, step, total, pixels_u8)
            with autocast(self.device):
                terms = self.step_module(pixels, tokens, meta)
            loss = terms["loss"]
            if not torch.isfinite(loss):
                raise RsviewerError(f"training diverged at epoch {epoch + 1} (loss {loss.item()}); lower --lr")
            scaled = loss / self.accum
            (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            if (m + 1) % self.accum == 0:
                self._optimizer_step(opt, sched, params, ema, meta)
            losses.append(float(loss.detach()))
            seen += len(rows)
            report(self.progress, m + 1, len(rows_all), f"epoch {epoch + 1}/{cfg.epochs}")
        self.images_per_second = seen / max(1e-9, time.time() - t0)
        return float(np.mean(losses))

    def _optimizer_step(self, opt, sched, params, ema, meta) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(opt)
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip)
        if self.scaler is not None:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if hasattr(self.model, "after_step"):
            self.model.after_step(meta)  # queues and momentum copies: the same global batch on every rank
        if ema is not None:
            ema.update(self.model)

    @torch.no_grad()
    def evaluate(self, batch: int = 64) -> dict:
        """Val metrics with the current towers (re-encoded: they changed this epoch)."""
        from .trainer import _cat_states, score_all

        model, va = self.model, self.va
        model.eval()
        n = len(va.ds)
        chunks = [np.arange(s, min(s + batch, n)) for s in range(0, n, batch)]
        with autocast(self.device):
            fmt = torch.channels_last if self.channels_last else torch.contiguous_format
            img = _cat_states([model.image_states(normalize(x.to(self.device), model.mean, model.std).contiguous(memory_format=fmt))
                               for x in self.val_images.batches(chunks)])
            txt = _cat_states([model.text_states(va.captions[s : s + batch]) for s in range(0, len(va.captions), batch)])
            sim = score_all(model, img, txt)
        return retrieval_metrics(sim, caption_image=va.cap_image)
