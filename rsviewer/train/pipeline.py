"""The image pipeline of end-to-end training: decode once, augment on tensors.

- :class:`ImageStore` decodes every training image once, resized to the model's input
  size, and keeps them as one uint8 tensor (1,680 UCM images at 256 px: 330 MB) when that
  fits the memory budget (``ram_gb``); otherwise batches are decoded from disk by
  DataLoader workers. Either way a batch arrives as (b, 3, S, S) uint8.
- :func:`augment` runs on that tensor, on the training device (no torchvision): a random
  resized crop, one of the 8 dihedral views (aerial scenes have no canonical "up") and a
  colour jitter of brightness, contrast and saturation.
- Every random choice is drawn from a generator keyed by (seed, epoch, image): the same
  image gets the same augmentation whichever rank or micro-batch it lands in, and a
  resumed run repeats the interrupted run's choices exactly.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data import load_image
from ..errors import RsviewerError
from ..utils.progress import check, report
from .cache import dihedral

AUGMENTATIONS = ("crop", "dihedral", "jitter")
CROP_SCALE = (0.5, 1.0)  # fraction of the image area kept by the random resized crop
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = 0.2  # brightness, contrast and saturation factors in [1 − J, 1 + J]


def parse_augment(spec: str) -> tuple[str, ...]:
    """``"crop,dihedral,jitter"`` (or ``""``/``"none"``) → the known names, in pipeline order."""
    names = {s.strip() for s in (spec or "").replace("+", ",").split(",") if s.strip() and s.strip() != "none"}
    unknown = names - set(AUGMENTATIONS)
    if unknown:
        raise RsviewerError(f"--augment: unknown {', '.join(sorted(unknown))}; use {', '.join(AUGMENTATIONS)} or none")
    return tuple(a for a in AUGMENTATIONS if a in names)


def sample_rng(seed: int, epoch: int, row: int, stream: int) -> np.random.Generator:
    """The generator of one image's random choices in one epoch (``stream``: 1 pixels, 2 caption)."""
    return np.random.default_rng([seed, epoch, int(row), stream])


def _decode(path, size: int) -> torch.Tensor:
    im = load_image(path)
    if im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence, size: int):
        self.paths, self.size = list(paths), size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return _decode(self.paths[i], self.size)


class ImageStore:
    """The training images as (3, S, S) uint8, in memory when they fit ``ram_gb``."""

    def __init__(self, paths: Sequence, size: int, ram_gb: float = 4.0, workers: int = 2,
                 progress=None, cancel=None, label: str = "decoding images"):
        self.paths, self.size, self.workers = list(paths), int(size), max(0, int(workers))
        need = len(self.paths) * 3 * self.size * self.size
        self.in_memory = need <= ram_gb * 1e9
        self.bank: Optional[torch.Tensor] = None
        if self.in_memory:
            self.bank = torch.empty((len(self.paths), 3, self.size, self.size), dtype=torch.uint8)
            with ThreadPoolExecutor(max(1, self.workers)) as pool:  # Pillow decodes without the GIL
                for i, t in enumerate(pool.map(lambda p: _decode(p, self.size), self.paths)):
                    check(cancel)
                    self.bank[i] = t
                    report(progress, i + 1, len(self.paths), label)

    @property
    def nbytes(self) -> int:
        return len(self.paths) * 3 * self.size * self.size

    def batches(self, rows: Sequence[np.ndarray]) -> Iterator[torch.Tensor]:
        """(b, 3, S, S) uint8 batches of the given image rows, in order."""
        if self.bank is not None:
            for r in rows:
                yield self.bank[torch.as_tensor(np.asarray(r, dtype=np.int64))]
            return
        loader = torch.utils.data.DataLoader(
            _Decoded(self.paths, self.size), batch_sampler=[list(map(int, r)) for r in rows],
            num_workers=self.workers, pin_memory=torch.cuda.is_available(),
        )
        yield from loader


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (b, 3, S, S) → the model's normalised float input."""
    return _standardize(x.float().div_(255.0), mean, std)


def _standardize(x: torch.Tensor, mean, std) -> torch.Tensor:
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def _crop_box(rng: np.random.Generator, h: int, w: int) -> tuple[int, int, int, int]:
    area = h * w * rng.uniform(*CROP_SCALE)
    ratio = math.exp(rng.uniform(math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])))
    ch = min(h, max(1, round(math.sqrt(area / ratio))))
    cw = min(w, max(1, round(math.sqrt(area * ratio))))
    top = int(rng.integers(0, h - ch + 1))
    left = int(rng.integers(0, w - cw + 1))
    return top, left, ch, cw


def augment(x: torch.Tensor, rngs: Sequence[np.random.Generator], ops: tuple[str, ...], mean, std) -> torch.Tensor:
    """Augmented, normalised float batch from uint8 ``x`` (b, 3, S, S), one generator per image.
    Every parameter is drawn whether or not its op is on, so turning one op off does not
    change the others' choices."""
    x = x.float().div_(255.0)
    s = x.shape[-1]
    out = []
    for i, rng in enumerate(rngs):
        box = _crop_box(rng, s, s)
        view = int(rng.integers(0, 8))
        bri, con, sat = rng.uniform(1 - JITTER, 1 + JITTER, size=3)
        xi = x[i : i + 1]
        if "crop" in ops:
            top, left, ch, cw = box
            xi = F.interpolate(xi[..., top : top + ch, left : left + cw], size=(s, s), mode="bilinear",
                               align_corners=False, antialias=True)
        if "dihedral" in ops:
            xi = dihedral(xi, view)
        if "jitter" in ops:
            xi = xi * float(bri)
            gray = (0.299 * xi[:, 0] + 0.587 * xi[:, 1] + 0.114 * xi[:, 2]).unsqueeze(1)
            xi = (xi - gray.mean()) * float(con) + gray.mean()
            gray = (0.299 * xi[:, 0] + 0.587 * xi[:, 1] + 0.114 * xi[:, 2]).unsqueeze(1)
            xi = ((xi - gray) * float(sat) + gray).clamp(0.0, 1.0)
        out.append(xi)
    return _standardize(torch.cat(out), mean, std)
