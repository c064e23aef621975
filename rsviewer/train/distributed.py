"""Data-parallel training through PyTorch's own engine (torchrun + DistributedDataParallel).

    torchrun --nproc-per-node 4 -m rsviewer train --arch lite --end-to-end ...
    torchrun --nnodes 2 --node-rank R --rdzv-endpoint HOST:29400 --nproc-per-node 8 -m rsviewer train ...

torchrun starts the processes and sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` and the
rendezvous; :func:`setup` reads them (NCCL on GPUs, gloo on CPU). There is no process
management of our own.

How a global batch is split (:class:`GlobalBatches`): every rank draws the *same*
permutation and batch of ``B`` images per step; rank ``r`` runs the expensive towers on
rows ``r·B/W … (r+1)·B/W`` only. The towers' outputs are then gathered with gradient
(:func:`gather_features`), and every rank evaluates the architecture's loss on the whole
global batch — so negatives span the global batch (as in CLIP training), momentum queues
receive identical updates on every rank, and the loss equals the one-process loss of the
same batch. Gradients: each rank's copy of the global loss sends ``W × ∂L/∂f`` back to its
own features through the gather; DDP's average over ranks divides by ``W`` again, so the
parameters get exactly ``∂L/∂θ`` of the global batch (heads and towers alike).

Only rank 0 writes (model, state, metrics); the others wait at a barrier.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from ..errors import RsviewerError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """The rank layout torchrun (or a launcher with the same variables) set; one process otherwise."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise RsviewerError("RANK/WORLD_SIZE/LOCAL_RANK must be integers (set by torchrun)") from None
    return DistInfo(rank, world, local)


def setup(device: torch.device) -> tuple[DistInfo, torch.device]:
    """Join the process group torchrun described (if any); returns the layout and this
    rank's device (``cuda:LOCAL_RANK`` on GPUs)."""
    info = env_info()
    if not info.active:
        return info, device
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def teardown(info: DistInfo) -> None:
    if info.active and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.active:
        dist.barrier()


def gather_features(info: DistInfo, feats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate every rank's (b, ...) tensors in rank order, keeping the gradient path to
    this rank's part (``torch.distributed.nn.all_gather`` is differentiable)."""
    if not info.active:
        return feats
    from torch.distributed.nn.functional import all_gather

    return {k: torch.cat(all_gather(v.contiguous()), 0) for k, v in feats.items()}


class GlobalBatches:
    """The distributed batch sampler: per epoch one seeded permutation of the ``n`` training
    images, cut into global batches of ``batch`` (the remainder is dropped, as every rank must
    see equal shards); :meth:`local` is this rank's contiguous share of a global batch. The
    schedule depends on (seed, epoch) only — not on the number of ranks, nor on whether the
    run was resumed."""

    def __init__(self, n: int, batch: int, info: DistInfo, seed: int):
        batch = min(batch, n)
        if batch % info.world:
            raise RsviewerError(f"--batch-size {batch} must be divisible by the number of processes ({info.world})")
        self.n, self.batch, self.info, self.seed = n, batch, info, seed
        self.per_rank = batch // info.world

    def __len__(self) -> int:
        return max(1, self.n // self.batch)

    def epoch(self, epoch: int) -> np.ndarray:
        """(steps, batch) image rows of the epoch's global batches."""
        perm = np.random.default_rng([self.seed, epoch, 7]).permutation(self.n)
        return perm[: len(self) * self.batch].reshape(len(self), self.batch)

    def local(self, rows: np.ndarray) -> np.ndarray:
        r = self.info.rank
        return rows[r * self.per_rank : (r + 1) * self.per_rank]


def wrap_ddp(module: torch.nn.Module, info: DistInfo, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around the step module (unused parameters allowed: some
    architectures leave heads idle on some batches)."""
    if not info.active:
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids: Optional[list[int]] = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, find_unused_parameters=True)
