"""CMPAGL's training objectives (§III-F, eq. 17: L = L_ITC + L_Triplet + L_MLM + L_ITM).

- :class:`MomentumQueue` and :func:`momentum_update` — the momentum-contrast machinery of
  ITC (eq. 18; ALBEF/MoCo): a slowly updated copy of the unimodal encoders
  (θ_m ← m·θ_m + (1 − m)·θ, m = 0.995) fills a FIFO queue of past image and text
  features that serve as extra keys.
- :func:`itc_loss` — eq. 18 over [batch momentum keys ; queue], with soft targets:
  every key of the same image, or with an identical caption string, is a positive
  (UCM captions are templated; a queue of a 1,680-image dataset holds older copies
  of the query's own image), optionally plus same-scene-label weight.
- :func:`optimized_triplet` — eq. 19: hinge in both directions summed over all
  negatives, plus Σ_i (1 − S(I_i, T_i)) (the intra-pair term).
- :func:`sample_hard_negatives` — ITM negatives drawn from the in-batch ITC similarity
  (ALBEF's hard-negative mining), never a positive.
- :func:`mask_tokens` — MLM corruption (15 %: 80 % [MASK], 10 % random, 10 % kept).
"""
from __future__ import annotations

import zlib
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F


# ---- momentum encoder + queue ------------------------------------------------------------
@torch.no_grad()
def momentum_update(online: Iterable[torch.Tensor], momentum: Iterable[torch.Tensor], m: float) -> None:
    """θ_m ← m·θ_m + (1 − m)·θ for every pair of tensors (ALBEF ``_momentum_update``)."""
    for p, pm in zip(online, momentum):
        pm.mul_(m).add_(p.detach(), alpha=1.0 - m)


def caption_ids(captions: Sequence[str]) -> torch.Tensor:
    """Stable integer id per caption string (case/space-insensitive) — identical strings match."""
    return torch.tensor([zlib.crc32(" ".join(c.lower().split()).encode()) for c in captions], dtype=torch.long)


class MomentumQueue:
    """FIFO queue of momentum features with their image index, caption id and label.

    ``enqueue`` writes a batch at the pointer and advances it modulo ``size``
    (wrapping around, so the oldest entries are overwritten first); empty slots have
    index −1 and are never used as keys. Kept off the module's state dict: it is
    training state, not part of the model.
    """

    def __init__(self, size: int, dims: dict[str, int], device=None):
        self.size = int(size)
        self.feats = {k: torch.zeros(self.size, d, device=device) for k, d in dims.items()}
        self.image_index = torch.full((self.size,), -1, dtype=torch.long, device=device)
        self.caption_id = torch.full((self.size,), -1, dtype=torch.long, device=device)
        self.label = torch.full((self.size,), -1, dtype=torch.long, device=device)
        self.ptr = 0
        self.count = 0  # total entries ever enqueued

    @torch.no_grad()
    def enqueue(self, feats: dict[str, torch.Tensor], image_index, caption_id, label) -> None:
        n = int(image_index.shape[0])
        if n == 0 or self.size == 0:
            return
        if n > self.size:  # only the newest ``size`` entries can stay
            feats = {k: v[-self.size :] for k, v in feats.items()}
            image_index, caption_id, label = image_index[-self.size :], caption_id[-self.size :], label[-self.size :]
            n = self.size
        pos = (self.ptr + torch.arange(n)) % self.size
        pos = pos.to(self.image_index.device)
        for k, v in feats.items():
            self.feats[k][pos] = v.detach().to(self.feats[k])
        self.image_index[pos] = image_index.to(self.image_index)
        self.caption_id[pos] = caption_id.to(self.caption_id)
        self.label[pos] = label.to(self.label)
        self.ptr = (self.ptr + n) % self.size
        self.count += n

    def valid(self) -> torch.Tensor:
        return self.image_index >= 0

    def ordered(self) -> torch.Tensor:
        """Slot indices from oldest to newest among the filled slots."""
        if self.count < self.size:
            return torch.arange(self.count)
        return (self.ptr + torch.arange(self.size)) % self.size

    def keys(self) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Filled entries: (feats, image_index, caption_id, label)."""
        v = self.valid()
        return {k: f[v] for k, f in self.feats.items()}, self.image_index[v], self.caption_id[v], self.label[v]

    def to(self, device) -> "MomentumQueue":
        self.feats = {k: v.to(device) for k, v in self.feats.items()}
        self.image_index, self.caption_id, self.label = (
            self.image_index.to(device), self.caption_id.to(device), self.label.to(device)
        )
        return self


# ---- ITC (eq. 18) ------------------------------------------------------------------------------
def soft_positive_targets(pos: torch.Tensor, same_label: Optional[torch.Tensor], label_alpha: float) -> torch.Tensor:
    """Row-stochastic targets: (1 − α) over exact positives, α over same-label keys (and positives)."""
    exact = pos.float()
    exact = exact / exact.sum(1, keepdim=True).clamp_min(1e-12)
    if label_alpha <= 0 or same_label is None:
        return exact
    lab = (same_label | pos).float()
    lab = lab / lab.sum(1, keepdim=True).clamp_min(1e-12)
    return (1 - label_alpha) * exact + label_alpha * lab


def itc_loss(
    img: torch.Tensor,
    txt: torch.Tensor,
    img_keys: torch.Tensor,
    txt_keys: torch.Tensor,
    targets: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """Eq. 18: ½[CE(I → [T̂ ; queue]) + CE(T → [Î ; queue])] with (B, K) soft ``targets``.

    ``img``/``txt`` (B, D) online features; ``*_keys`` (K, D) momentum features of the
    batch followed by the queue. The positive structure is symmetric (key j is positive
    for query b iff it shows b's image or carries b's caption), so one target matrix
    serves both directions.
    """
    li = logit_scale * img @ txt_keys.T
    lt = logit_scale * txt @ img_keys.T
    return 0.5 * (-(targets * li.log_softmax(1)).sum(1).mean() - (targets * lt.log_softmax(1)).sum(1).mean())


# ---- optimized triplet (eq. 19) ------------------------------------------------------------------
def optimized_triplet(
    sim: torch.Tensor,
    margin: float = 0.2,
    positives: Optional[torch.Tensor] = None,
    reduction: str = "sum",
    hardest: bool = False,
) -> torch.Tensor:
    """Eq. 19 on an (N, N) image×text similarity matrix with matching pairs on the diagonal.

    Σ_i Σ_j [α − S(I_i,T_i) + S(I_i,T_j)]_+ + Σ_j Σ_i [α − S(I_j,T_j) + S(I_i,T_j)]_+ + Σ_i [1 − S(I_i,T_i)]

    The j = i terms are not negatives and are left out, as are ``positives`` (N, N)
    (identical captions of other images). ``reduction="mean"`` divides the whole sum by
    N (per-anchor); ``hardest`` keeps only the hardest negative per anchor (VSE++) — an
    option, not the paper's form.
    """
    n = sim.shape[0]
    d = sim.diag()
    neg = ~torch.eye(n, dtype=torch.bool, device=sim.device)
    if positives is not None:
        neg = neg & ~positives
    cost_t = (margin - d[:, None] + sim).clamp_min(0) * neg  # image anchors I_i, negative texts T_j
    cost_i = (margin - d[None, :] + sim).clamp_min(0) * neg  # text anchors T_j, negative images I_i
    if hardest:
        rank = cost_t.max(1).values.sum() + cost_i.max(0).values.sum()
    else:
        rank = cost_t.sum() + cost_i.sum()
    total = rank + (1.0 - d).sum()
    if reduction == "mean":
        return total / n
    if reduction != "sum":
        raise ValueError(f"unknown reduction {reduction!r}")
    return total


# ---- ITM hard negatives -------------------------------------------------------------------------
@torch.no_grad()
def sample_hard_negatives(
    sim: torch.Tensor, positives: torch.Tensor, generator: Optional[torch.Generator] = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ALBEF's ITM negatives from the in-batch similarity (logits) ``sim`` (B_img, B_txt).

    Returns (neg_image_for_text (B,), neg_text_for_image (B,), ok (B,) bool): for
    text t a non-positive image drawn with probability softmax(sim[:, t]); for image i
    a non-positive text drawn with softmax(sim[i, :]). Rows without any negative
    (a batch of one image's captions) are flagged ``ok = False``.
    """
    blocked = positives | torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    w_i2t = sim.float().softmax(1).masked_fill(blocked, 0.0)
    w_t2i = sim.float().T.softmax(1).masked_fill(blocked.T, 0.0)
    ok = (w_i2t.sum(1) > 0) & (w_t2i.sum(1) > 0)
    w_i2t[~ok] = 1.0
    w_t2i[~ok] = 1.0
    neg_txt = torch.multinomial(w_i2t.cpu(), 1, generator=generator).squeeze(1).to(sim.device)
    neg_img = torch.multinomial(w_t2i.cpu(), 1, generator=generator).squeeze(1).to(sim.device)
    return neg_img, neg_txt, ok


# ---- MLM -----------------------------------------------------------------------------------------------
def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    special_ids: Sequence[int],
    prob: float = 0.15,
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT/ALBEF masking: returns (corrupted ids, labels with −100 where not predicted).

    ``prob`` of the real (non-special, non-pad) tokens are chosen, at least one per
    caption; of those 80 % become [MASK], 10 % a random token, 10 % stay.
    """
    ids = input_ids.clone()
    cand = attention_mask.bool().clone()
    for s in special_ids:
        cand &= input_ids != s
    r = torch.rand(ids.shape, generator=generator)
    chosen = (r < prob) & cand
    # at least one masked token per caption that has any candidate
    none = (chosen.sum(1) == 0) & (cand.sum(1) > 0)
    if none.any():
        score = torch.rand(ids.shape, generator=generator).masked_fill(~cand, -1.0)
        first = score.argmax(1)
        chosen[none, first[none]] = True
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, -100))
    u = torch.rand(ids.shape, generator=generator)
    to_mask = chosen & (u < 0.8)
    to_rand = chosen & (u >= 0.8) & (u < 0.9)
    ids[to_mask] = mask_id
    rand_ids = torch.randint(vocab_size, ids.shape, generator=generator)
    ids[to_rand] = rand_ids[to_rand]
    return ids, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 20: −mean log P(w_t | rest, image) over the masked positions."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
