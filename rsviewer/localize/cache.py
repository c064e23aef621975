"""Window-embedding cache: ``$RSVIEWER_CACHE/localize/<key>.npz`` (default
``~/.cache/rsviewer``).

The key hashes the scene file (resolved path, size in bytes, mtime in ns), the model
fingerprint and everything that changes an embedding (input normalisation, mode, model
input size, precision, tile/halo of the fast mode, a format version) plus the exact
list of windows. Files are written atomically (temporary file + rename), so a cancelled or
crashed run leaves either the previous complete file or nothing. A damaged file is
ignored and rewritten.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np

from ..utils.atomic import atomic_file

FORMAT = 1


def cache_dir() -> Path:
    return Path(os.environ.get("RSVIEWER_CACHE", Path.home() / ".cache" / "rsviewer")) / "localize"


def cache_key(scene_key: tuple, model_fp: str, config: dict, boxes: Optional[np.ndarray] = None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": FORMAT, "scene": list(scene_key), "model": model_fp, "config": config},
                        sort_keys=True, default=str).encode())
    if boxes is not None:
        h.update(np.ascontiguousarray(np.asarray(boxes, dtype=np.int64)).tobytes())
    return h.hexdigest()[:32]


def load(key: str, boxes: Optional[np.ndarray] = None) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """(boxes, emb) from the cache, or None (missing, damaged, other windows)."""
    path = cache_dir() / f"{key}.npz"
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            b, e = np.asarray(z["boxes"]), np.asarray(z["emb"], dtype=np.float32)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
        return None
    if boxes is not None and (b.shape != np.shape(boxes) or not np.array_equal(b, boxes)):
        return None
    if len(e) != len(b):
        return None
    return b, e


def save(key: str, boxes: np.ndarray, emb: np.ndarray, meta: Optional[dict] = None) -> Path:
    path = cache_dir() / f"{key}.npz"
    buf = io.BytesIO()
    np.savez(buf, boxes=np.asarray(boxes, dtype=np.int64), emb=np.asarray(emb, dtype=np.float32),
             meta=np.asarray(json.dumps(meta or {}, default=str)))
    with atomic_file(path, "wb") as fh:
        fh.write(buf.getvalue())
    return path
