"""Atomic writes: a crash, a cancel or a full disk never leaves a half-written file.

Files are written to a temporary sibling and renamed into place (``os.replace`` is
atomic on POSIX and Windows). Folders (indexes, checkpoints) are built in a temporary
sibling folder and swapped in; the old folder is removed only after the new one is
complete. An output folder is only ever replaced when rsviewer wrote it (and the caller
says so): a user's own folder, the current folder, or an input is refused in one line
(:func:`check_output_dir`), before the work where callers check early, and again at
write time.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional


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


# ---- output folders: never replace what rsviewer did not write ---------------------------------
MANIFEST = ".rsviewer.json"  # marks folders of kinds without their own tagged file (overlays, ...)
MANIFEST_FORMAT = "rsviewer-output/1"
# folders rsviewer writes, recognised by a tagged JSON file: file name -> format tag
_TAGS = {"config.json": ("model", "rsviewer-model/1"), "index.json": ("index", "rsviewer-index/1")}


def _read_tag(path: Path) -> Optional[dict]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def rsviewer_kind(folder: str | os.PathLike) -> Optional[str]:
    """What kind of rsviewer output ``folder`` is (``model``, ``index``, or the kind its
    manifest names), or ``None`` for anything rsviewer did not write."""
    folder = Path(folder)
    for name, (kind, tag) in _TAGS.items():
        obj = _read_tag(folder / name)
        if obj is not None and obj.get("format") == tag:
            return kind
    obj = _read_tag(folder / MANIFEST)
    if obj is not None and obj.get("format") == MANIFEST_FORMAT:
        return str(obj.get("kind") or "output")
    return None


def _resolved(p: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(p))))


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.relative_to(parent)
        return True
    except ValueError:
        return False


def _check_against_inputs(out: Path, inputs: Iterable, label: str) -> None:
    from ..errors import OutputError

    real = Path(os.path.realpath(out))  # a symlinked parent must not hide an input
    cwd = Path(os.path.realpath(os.getcwd()))
    if real == cwd or _is_within(cwd, real):
        raise OutputError(f"{label} {out} is the current folder or one of its parents; name a new folder")
    if real.parent == real or real == Path(os.path.realpath(os.path.expanduser("~"))):
        raise OutputError(f"{label} {out} is a root or home folder; name a new folder")
    for inp in inputs:
        if inp is None or str(inp) == "":
            continue
        src = Path(os.path.realpath(_resolved(inp)))
        if real == src or _is_within(src, real):
            raise OutputError(f"{label} {out} would replace the input {src}; choose another path")
        if src.is_dir() and _is_within(real, src):
            raise OutputError(f"{label} {out} is inside the input folder {src}; choose a path outside it")


def _check_parent(out: Path, label: str) -> None:
    """The first existing ancestor must be a writable folder, so that minutes of work
    never end in 'No such file or directory'."""
    from ..errors import OutputError

    anc = out.parent
    while not anc.exists():
        if anc.parent == anc:
            break
        anc = anc.parent
    if not anc.is_dir():
        raise OutputError(f"cannot write {label} {out}: {anc} is not a folder")
    try:  # a real probe: os.access says yes to root even on read-only or virtual file systems
        fd, probe = tempfile.mkstemp(prefix=".rsviewer-probe.", dir=anc)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write {label} {out}: {anc} is not writable ({e.strerror or e})") from None


def check_output_dir(
    path: str | os.PathLike, overwrite: bool = False, inputs: Iterable = (), label: str = "output folder",
    flag: str = "overwrite=True", kind: Optional[str] = None,
) -> Path:
    """Refuse, in one line, an output folder whose replacement would lose data.

    Allowed: an absent or empty folder; a folder rsviewer wrote (see :func:`rsviewer_kind`)
    only with ``overwrite``. Refused: a file, a non-empty folder rsviewer did not write,
    the current folder or a parent of it, an input or a parent of one, a path inside an
    input folder, a path whose parent cannot be written, and (when ``kind`` is given) an
    rsviewer folder of another kind (an index never silently replaces a model). ``flag``
    names the permission in the message (``--force`` on the CLI). Returns the absolute path.
    """
    from ..errors import OutputError

    out = _resolved(path)
    _check_against_inputs(out, inputs, label)
    if out.is_symlink():  # swapping would replace the link, not what it points to: ambiguous, refuse
        raise OutputError(f"{label} {out} is a symbolic link; name the folder itself or a new one")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{label} {out} is a file, not a folder; choose another path")
    if out.is_dir():
        try:
            entries = [e.name for e in os.scandir(out) if e.name != MANIFEST]  # only a manifest: empty
        except OSError as e:
            raise OutputError(f"cannot read {label} {out}: {e.strerror}") from None
        if entries:
            have = rsviewer_kind(out)
            if have is None:
                n = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
                raise OutputError(
                    f"{label} {out} is not empty and was not written by rsviewer ({n}, e.g. "
                    f"{sorted(entries)[0]!r}); choose a new or empty folder"
                )
            if kind and have != kind:
                raise OutputError(f"{label} {out} holds an rsviewer {have}, not {kind}; choose another path")
            if not overwrite:
                raise OutputError(f"{label} {out} already holds an rsviewer {have}; pass {flag} to replace it")
    _check_parent(out, label)
    return out


def check_output_file(
    path: str | os.PathLike, overwrite: bool = False, inputs: Iterable = (), label: str = "output file",
    flag: str = "--force",
) -> Path:
    """Refuse, in one line, an output file that is a folder, an input, inside an input
    folder, already there without ``overwrite``, or under a path that cannot be written."""
    from ..errors import OutputError

    out = _resolved(path)
    if out.is_dir():
        raise OutputError(f"{label} {out} is a folder; name a file")
    for inp in inputs:
        if inp is None or str(inp) == "":
            continue
        src = _resolved(inp)
        if out == src or (out.exists() and src.exists() and os.path.samefile(out, src)):
            raise OutputError(f"{label} {out} is an input; choose another path")
        if src.is_dir() and _is_within(Path(os.path.realpath(out)), Path(os.path.realpath(src))):
            raise OutputError(f"{label} {out} is inside the input folder {src}; choose a path outside it")
    if out.exists() and not overwrite:
        raise OutputError(f"{label} {out} already exists; pass {flag} to replace it")
    _check_parent(out, label)
    return out


def claim_output_dir(path: str | os.PathLike, kind: str, overwrite: bool = False, inputs: Iterable = (),
                     label: str = "output folder", flag: str = "overwrite=True") -> Path:
    """Check ``path`` as :func:`check_output_dir` does, then create it (if needed) with a
    manifest naming ``kind``, for folders filled file by file (overlays of an evaluation)."""
    out = check_output_dir(path, overwrite, inputs, label, flag, kind)
    out.mkdir(parents=True, exist_ok=True)
    if rsviewer_kind(out) is None:
        write_json(out / MANIFEST, {"format": MANIFEST_FORMAT, "kind": kind})
    return out


@contextlib.contextmanager
def atomic_dir(
    path: str | os.PathLike, overwrite: bool = False, inputs: Iterable = (), kind: Optional[str] = None,
) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces ``path``.

    ``path`` is checked before and again after the work (:func:`check_output_dir`): it may
    be absent or empty, or — with ``overwrite`` — a folder rsviewer wrote; anything else
    is refused and left untouched. On any exception (``Cancelled``, ``KeyboardInterrupt``,
    ``OSError: No space left``) the temporary folder is deleted and ``path`` is left
    exactly as it was. ``kind`` is written to a manifest when the new folder has no
    tagged file of its own (config.json of a model, index.json of an index).
    """
    path = check_output_dir(path, overwrite, inputs, kind=kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if rsviewer_kind(tmp) is None:
            write_json(tmp / MANIFEST, {"format": MANIFEST_FORMAT, "kind": kind or "output"})
        check_output_dir(path, overwrite, inputs, kind=kind)  # the minutes of work may have changed it
        _swap_in(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_in(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path``; a folder already there (checked: empty or rsviewer's) is
    moved aside first and deleted only once the new one is in place."""
    if not path.exists():
        os.replace(tmp, path)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
    try:
        os.replace(path, aside / path.name)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.replace(aside / path.name, path)
            raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)
