"""Feature caching for frozen backbones: compute once, train many epochs in minutes.

The frozen parts of a model (``image_features`` / ``text_features``) are deterministic,
so their outputs for every (image, view) and caption are computed once and stored as
``.npy`` files (float16, memory-mapped on read) under ``$RSVIEWER_CACHE/features``
(``$RSVIEWER_CACHE`` defaults to ``~/.cache/rsviewer``). The key hashes what determines the output: the
model's feature signature (backbone, weights sha256, input size, ...), the image files
(path, size, mtime) or caption strings, and the views. Each entry is written in a
temporary folder and renamed into place, so a cancelled run leaves no half cache.

Views are the 8 dihedral transforms of the image (rotations by 90° and flips): aerial
scenes have no canonical "up", so these are the augmentations of the field (AMFMN,
GaLR train with random rotations).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from ..data import load_image
from ..utils.device import micro_batch
from ..utils.progress import CancelToken, ProgressFn, check, report

MAX_VIEWS = 8


def cache_root() -> Path:
    return Path(os.environ.get("RSVIEWER_CACHE", Path.home() / ".cache" / "rsviewer")) / "features"


def dihedral(x: torch.Tensor, view: int) -> torch.Tensor:
    """View ``0..7`` of a (B, C, H, W) batch: rotate by 90°·(v % 4), then flip if v ≥ 4."""
    y = torch.rot90(x, view % 4, dims=(2, 3)) if view % 4 else x
    return y.flip(3) if view >= 4 else y


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _load_entry(folder: Path) -> Optional[dict[str, np.ndarray]]:
    if not (folder / "done").exists():
        return None
    return {p.stem: np.load(p, mmap_mode="r") for p in sorted(folder.glob("*.npy"))}


def _write_entry(folder: Path, arrays: dict[str, np.ndarray], meta: dict) -> dict[str, np.ndarray]:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for k, v in arrays.items():
            np.save(tmp / f"{k}.npy", v)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        (tmp / "done").write_text("")
        if folder.exists():
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _load_entry(folder)  # type: ignore[return-value]


def _stack_features(chunks: list[dict[str, torch.Tensor]]) -> dict[str, np.ndarray]:
    keys = chunks[0].keys()
    return {k: torch.cat([c[k] for c in chunks]).numpy() for k in keys}


class _eval_mode:
    """Frozen features are computed in eval mode (BatchNorm running stats, no dropout):
    a freshly built module is in train mode, and batch statistics would make every
    cached feature depend on its batch."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was)


def _to_storage(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu()
    return t.half() if t.is_floating_point() else t


def _view_features(model, pixels: torch.Tensor, views: int) -> dict[str, torch.Tensor]:
    """``{name: (B, views, ...)}`` frozen features of every dihedral view of ``pixels``."""
    per_view = [{k: _to_storage(v) for k, v in model.image_features(dihedral(pixels, v)).items()} for v in range(views)]
    return {k: torch.stack([pv[k] for pv in per_view], 1) for k in per_view[0]}


@torch.no_grad()
def image_feature_cache(
    model,
    paths: Sequence[Path],
    views: int = 1,
    batch_size: int = 32,
    device: str | torch.device = "cpu",
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    use_cache: bool = True,
) -> dict[str, np.ndarray]:
    """``{name: (N, views, ...)}`` frozen image features, computed or read from disk."""
    views = max(1, min(int(views), MAX_VIEWS))
    # resolved paths: "../shared/x.jpg" and "/work/shared/x.jpg" are the same cache entry
    files = [(str(Path(p).resolve()), *(lambda s: (s.st_size, int(s.st_mtime)))(Path(p).stat())) for p in paths]
    payload = {"sig": model.feature_signature("image"), "files": files, "views": views}
    folder = cache_root() / f"img-{_key(payload)}"
    if use_cache and (hit := _load_entry(folder)) is not None:
        report(progress, len(paths), len(paths), "image features (cached)")
        return hit
    # an entry of the same images with more views holds these views first (same order)
    for more in range(MAX_VIEWS, views, -1):
        if use_cache and (hit := _load_entry(cache_root() / f"img-{_key({**payload, 'views': more})}")) is not None:
            report(progress, len(paths), len(paths), f"image features (cached, {views} of {more} views)")
            return {k: v[:, :views] for k, v in hit.items()}
    chunks: list[dict[str, torch.Tensor]] = []
    total = len(paths)
    with _eval_mode(model):
        for start in range(0, total, batch_size):
            check(cancel)
            batch = model.preprocess([load_image(p) for p in paths[start : start + batch_size]]).to(device)
            step = micro_batch(device, len(batch))  # 6x faster on the CPU than whole batches
            for m in range(0, len(batch), step):
                chunks.append(_view_features(model, batch[m : m + step], views))
            report(progress, min(start + batch_size, total), total, "image features")
    arrays = _stack_features(chunks)
    if not use_cache:
        return arrays
    return _write_entry(folder, arrays, {"n": total, "views": views, "sig": payload["sig"]})


@torch.no_grad()
def text_feature_cache(
    model,
    captions: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    use_cache: bool = True,
) -> dict[str, np.ndarray]:
    """``{name: (M, ...)}`` frozen text features. Token-level features are padded to the
    longest caption so every batch slices without re-tokenizing."""
    payload = {"sig": model.feature_signature("text"), "captions": _key({"c": list(captions)}), "n": len(captions)}
    folder = cache_root() / f"txt-{_key(payload)}"
    if use_cache and (hit := _load_entry(folder)) is not None:
        report(progress, len(captions), len(captions), "text features (cached)")
        return hit
    # tokenise everything at once so all chunks share one padded length
    tokens_all = model.tokenize([c if c.strip() else "." for c in captions])
    chunks: list[dict[str, torch.Tensor]] = []
    total = len(captions)
    with _eval_mode(model):
        for start in range(0, total, batch_size):
            check(cancel)
            tok = {k: v[start : start + batch_size].to(device) for k, v in tokens_all.items()}
            chunks.append({k: _to_storage(v) for k, v in model.text_features(tok).items()})
            report(progress, min(start + batch_size, total), total, "text features")
    arrays = _stack_features(chunks)
    if not use_cache:
        return arrays
    return _write_entry(folder, arrays, {"n": total, "sig": payload["sig"]})


class RowSelection:
    """Rows ``rows`` of a feature array, selected when indexed rather than copied: the folds
    of a CV share the union's arrays (MSSA's three maps × 8 views of train+val are 4.3 GB;
    a copy per fold put one CV process at 12 GB)."""

    def __init__(self, array, rows: np.ndarray):
        self.array, self.rows = array, np.asarray(rows, dtype=np.int64)

    @property
    def shape(self) -> tuple:
        return (len(self.rows),) + tuple(self.array.shape[1:])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        if isinstance(index, tuple):
            return self.array[(self.rows[index[0]],) + index[1:]]
        return self.array[self.rows[index]]

    def __array__(self, dtype=None, copy=None):
        out = self.array[self.rows]
        return out if dtype is None else out.astype(dtype)


def gather(arrays: dict[str, np.ndarray], rows: np.ndarray, views: Optional[np.ndarray] = None) -> dict[str, torch.Tensor]:
    """Batch of cached features as float32 tensors (``views`` picks one view per row)."""
    out = {}
    for k, a in arrays.items():
        v = a[rows] if views is None else a[rows, views]
        t = torch.from_numpy(np.ascontiguousarray(v))
        out[k] = t.float() if t.is_floating_point() else t
    return out


ForwardFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]
