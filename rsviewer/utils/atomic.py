"""Atomic writes: a crash, a cancel or a full disk never leaves a half-written file.

Files are written to a temporary sibling and renamed into place (``os.replace`` is
atomic on POSIX and Windows). Folders (indexes, checkpoints) are built in a temporary
sibling folder and swapped in; the old folder is removed only after the new one is
complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
    """Open a temporary file next to ``path``; rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF"}


def image_format(path: str | os.PathLike) -> str:
    """The Pillow format a file name's suffix asks for; a one-line error for any other."""
    from ..errors import QueryError

    fmt = IMAGE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise QueryError(f"cannot tell the image format of {Path(path).name!r}; end it in .png, .jpg, .webp or .tif")
    return fmt


def save_image(img, path: str | os.PathLike, quality: int = 90) -> Path:
    """Write a PIL image atomically in the format its suffix names (.png, .jpg, .webp, .tif):
    a full-resolution overlay is ~7 MB as PNG and well under 1 MB as JPEG."""
    path = Path(path)
    fmt = image_format(path)
    if fmt in ("JPEG", "WEBP") and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    with atomic_file(path, "wb") as fh:
        img.save(fh, format=fmt, **({"quality": quality} if fmt in ("JPEG", "WEBP") else {}))
    return path


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_file(path, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path`` (old contents removed).

    On any exception (including ``Cancelled`` and ``OSError: No space left``) the
    temporary folder is deleted and ``path`` is left exactly as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if old is not None:
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
