"""sha256 of foreign weights, cached on disk by (path, size, mtime): opening a 1.7 GB
ViT-L-14 a second time costs a ``stat``, not a minute of hashing. A file whose size or
modification time changed is hashed again, so a changed file is always noticed."""
from __future__ import annotations

import json
import os
from pathlib import Path

from ...utils.atomic import write_json
from ..weights import _hash_file


def cache_file() -> Path:
    root = os.environ.get("RSVIEWER_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache"), "rsviewer")
    return Path(root) / "sha256.json"


def _files(p: Path) -> list[Path]:
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in {".safetensors", ".bin", ".pth", ".pt"})
    return [p]


def sha256_cached(path: str | os.PathLike) -> str:
    """sha256 of a file (or of a folder's weight files, name + hash each, sorted)."""
    import hashlib

    p = Path(path).resolve()
    files = _files(p)
    cf = cache_file()
    cf.parent.mkdir(parents=True, exist_ok=True)
    try:
        cache = json.loads(cf.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    changed = False
    hashes = []
    for f in files:
        st = f.stat()
        key = str(f)
        entry = cache.get(key)
        if not (isinstance(entry, list) and entry[:2] == [st.st_size, st.st_mtime_ns]):
            entry = [st.st_size, st.st_mtime_ns, _hash_file(f)]
            cache[key] = entry
            changed = True
        hashes.append((f.name, entry[2]))
    if changed:
        try:
            write_json(cf, cache)
        except OSError:
            pass  # a read-only home only costs the next open a re-hash
    if not p.is_dir():
        return hashes[0][1]
    h = hashlib.sha256()
    for name, digest in hashes:
        h.update(name.encode())
        h.update(digest.encode())
    return h.hexdigest()
