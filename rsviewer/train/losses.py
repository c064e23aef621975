"""Contrastive objectives shared by the architectures.

- :func:`info_nce` — symmetric InfoNCE (CLIP) with *soft* targets. UCM/RSICD captions
  are templated: the same string often describes several images, and images of one
  scene class share most of their captions. Treating those as negatives teaches the
  model to separate identical sentences. So the target row of a pair puts weight on
  (a) the true pair, (b) every in-batch caption with the identical string, and (c)
  optionally, with total weight ``label_alpha``, the other pairs of the same scene
  label (labels come from the *training* JSON only).
- :func:`vse_triplet` — VSE++ hinge with the hardest negative (Faghri et al. 2018),
  the loss GaLR/AMFMN/MSSA train with; identical captions are never negatives.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def positive_masks(
    image_index: torch.Tensor,
    label_index: Optional[torch.Tensor] = None,
    captions: Optional[Sequence[str]] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, B) bool masks: ``same`` (same image or identical caption) and ``same_label``."""
    b = image_index.shape[0]
    same = image_index[:, None] == image_index[None, :]
    if captions is not None:
        ids = {}
        cap_id = torch.tensor([ids.setdefault(c.strip().lower(), len(ids)) for c in captions], device=same.device)
        same = same | (cap_id[:, None] == cap_id[None, :])
    if label_index is not None:
        lab = label_index.to(same.device)
        same_label = (lab[:, None] == lab[None, :]) & (lab[:, None] >= 0)
    else:
        same_label = torch.zeros(b, b, dtype=torch.bool, device=same.device)
    return same, same_label


def soft_targets(same: torch.Tensor, same_label: torch.Tensor, label_alpha: float) -> torch.Tensor:
    """Row-stochastic targets: (1 − α) on exact positives, α spread over same-label pairs."""
    exact = same.float()
    exact = exact / exact.sum(1, keepdim=True)
    if label_alpha <= 0:
        return exact
    lab = (same_label | same).float()
    lab = lab / lab.sum(1, keepdim=True)
    return (1 - label_alpha) * exact + label_alpha * lab


def info_nce(
    img: torch.Tensor,
    txt: torch.Tensor,
    logit_scale: torch.Tensor,
    targets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Symmetric InfoNCE on unit vectors; ``targets`` (B, B) row-stochastic (default: identity)."""
    logits = logit_scale * img @ txt.T
    if targets is None:
        t = torch.arange(img.shape[0], device=img.device)
        return 0.5 * (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t))
    lt = targets.T / targets.T.sum(1, keepdim=True)
    return 0.5 * (
        -(targets * logits.log_softmax(1)).sum(1).mean() - (lt * logits.T.log_softmax(1)).sum(1).mean()
    )


def vse_triplet(
    img: torch.Tensor,
    txt: torch.Tensor,
    margin: float = 0.2,
    positives: Optional[torch.Tensor] = None,
    hardest: bool = True,
) -> torch.Tensor:
    """VSE++ hinge, both directions; ``positives`` (B, B) are excluded from the negatives."""
    sim = img @ txt.T
    pos = sim.diag()
    mask = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    if positives is not None:
        mask = mask | positives
    cost_t = (margin + sim - pos[:, None]).clamp_min(0).masked_fill(mask, 0)  # image anchors
    cost_i = (margin + sim - pos[None, :]).clamp_min(0).masked_fill(mask, 0)  # caption anchors
    if hardest:
        return cost_t.max(1).values.mean() + cost_i.max(0).values.mean()
    return cost_t.sum(1).mean() + cost_i.sum(0).mean()


def contrastive_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    batch: dict,
    kind: str,
    logit_scale: torch.Tensor,
    label_alpha: float = 0.0,
    margin: float = 0.2,
) -> dict[str, torch.Tensor]:
    """The default objective by name: ``infonce`` | ``triplet`` | ``both``."""
    same, same_label = positive_masks(batch["image_index"], batch.get("label_index"), batch.get("captions"))
    out: dict[str, torch.Tensor] = {}
    if kind in ("infonce", "both"):
        out["infonce"] = info_nce(img, txt, logit_scale, soft_targets(same, same_label, label_alpha))
    if kind in ("triplet", "both"):
        out["triplet"] = vse_triplet(img, txt, margin, positives=same)
    if not out:
        raise ValueError(f"unknown loss {kind!r}; choose infonce, triplet or both")
    out["loss"] = sum(out.values())
    return out
