"""Negative-sample recycling (paper §3.4, Fig. 4, eqs. 16–18).

Two FIFO queues ``Q_v`` (image embeddings) and ``Q_s`` (text embeddings) keep the
embeddings of the previous iterations (detached: no extra encoder, no gradient) and
serve as extra negatives for the current batch. The paper's best length is 4× the
batch size (Table 6). A queued sample is a negative for an anchor only when their scene
labels differ ("the negative sample pool is defined as the samples from the negative
queue Q_v that have different scenario categories compared to the positive sample");
when either label is unknown, only a different source image is required.

Loss (cosine similarities of unit vectors, margin α):

    l_v = [α − S(s_e, v_e) + S(s_e, q_v)]_+      q_v ∈ Q_v        (16)
    l_s = [α − S(v_e, s_e) + S(v_e, q_s)]_+      q_s ∈ Q_s        (17)
    L_queue = Σ l_v·e^{−β·l_v} + Σ l_s·e^{−β·l_s}                (18)
"""
from __future__ import annotations

from typing import Optional

import torch


def difficulty_weighted_hinge(l: torch.Tensor, beta: float) -> torch.Tensor:
    """Elementwise ``l·e^{−βl}`` (eq. 18) of hinge values ``l ≥ 0``."""
    return l * torch.exp(-beta * l)


class NegativeQueue:
    """FIFO of (image embedding, text embedding, label, image index) rows.

    Not a module: the queue is training state, not part of a checkpoint. Newest rows
    first; at most ``size`` rows are kept.
    """

    def __init__(self, size: int = 0):
        self.size = int(size)
        self.img: Optional[torch.Tensor] = None
        self.txt: Optional[torch.Tensor] = None
        self.labels: Optional[torch.Tensor] = None
        self.index: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return 0 if self.img is None else int(self.img.shape[0])

    def clear(self) -> None:
        self.img = self.txt = self.labels = self.index = None

    @torch.no_grad()
    def push(self, img: torch.Tensor, txt: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> None:
        """Enqueue a batch (detached); drop the oldest rows beyond ``size``."""
        if self.size <= 0:
            return
        new = (img.detach().float(), txt.detach().float(), labels.detach().long(), index.detach().long())
        if self.img is None:
            cat = new
        else:
            cat = tuple(torch.cat([n, o.to(n.device)]) for n, o in zip(new, (self.img, self.txt, self.labels, self.index)))
        self.img, self.txt, self.labels, self.index = (t[: self.size] for t in cat)

    def negative_mask(self, labels: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """(B, Q) bool: queue row j may serve as a negative of anchor i."""
        assert self.labels is not None and self.index is not None
        la, lq = labels[:, None].long(), self.labels[None, :].to(labels.device)
        known = (la >= 0) & (lq >= 0)
        other_image = index[:, None].long() != self.index[None, :].to(index.device)
        return torch.where(known, la != lq, other_image)

    def loss(
        self,
        img: torch.Tensor,
        txt: torch.Tensor,
        labels: torch.Tensor,
        index: torch.Tensor,
        margin: float,
        beta: float,
        reduce: str = "sum",
    ) -> torch.Tensor:
        """L_queue (eq. 18) for the current pairs (``img[i]``, ``txt[i]``), averaged over
        anchors. ``reduce``: ``"sum"`` over the valid queue negatives (the paper's Σ) or
        ``"mean"`` over them (scale independent of the queue length)."""
        if len(self) == 0:
            return img.new_zeros(())
        qi, qt = self.img.to(img.dtype), self.txt.to(txt.dtype)
        pos = (img * txt).sum(1, keepdim=True)  # S(s_e, v_e) = S(v_e, s_e)
        mask = self.negative_mask(labels, index)
        lv = (margin - pos + txt @ qi.T).clamp_min(0)  # eq. 16: text anchor vs queued images
        ls = (margin - pos + img @ qt.T).clamp_min(0)  # eq. 17: image anchor vs queued texts
        per = (difficulty_weighted_hinge(lv, beta) + difficulty_weighted_hinge(ls, beta)) * mask
        if reduce == "sum":
            return per.sum(1).mean()
        if reduce == "mean":
            return (per.sum(1) / mask.sum(1).clamp_min(1)).mean()
        raise ValueError(f"unknown queue reduce {reduce!r}; use sum or mean")
