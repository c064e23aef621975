"""Caption datasets in the field's common layouts, loaded into one ``Dataset`` shape.

Formats (auto-detected by :func:`load_dataset`):

- ``karpathy``: ``{"images": [{"filename", "split", "label"?, "sentences": [{"raw"}]}]}``
  (UCM-Captions, Sydney, RSICD, COCO style). An optional ``filepath`` is prefixed to the
  filename; ``tokens`` are joined when ``raw`` is missing.
- ``precomp``: the GaLR/AMFMN folder with ``{split}_caps.txt`` (one caption a line) and
  ``{split}_filename.txt`` (one line per image, or one line per caption).
- ``csv``: RSITMD/RSICD CSV with ``filename`` and ``sentence`` (a Python-literal list of
  captions, parsed with ``ast.literal_eval``) plus optional ``split`` and ``label``.
- ``folder``: a folder of images without captions; class subfolders become labels.

Image paths: item ids are paths relative to the dataset's image folder
(``Dataset.images_dir``), so :meth:`Dataset.with_images` can re-root them cheaply.
Loading does not touch the image files (fast: UCM's 1,890 items load in ~15 ms);
:meth:`Dataset.check_images` tests they exist.
"""
from __future__ import annotations

import ast
import csv
import io
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import DatasetError
from .images import IMAGE_EXTENSIONS

__all__ = ["Item", "Dataset", "load_dataset", "DATASET_FORMATS"]

DATASET_FORMATS = ("karpathy", "precomp", "csv", "folder")
_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


@dataclass
class Item:
    """One image and its captions."""

    id: str  # the filename as listed (with a Karpathy ``filepath`` prefix); unique
    image: Path | None  # absolute path, None when the format gives no image folder
    captions: list[str]
    split: str  # "train" | "val" | "test" | other as listed | "" (unknown)
    label: str | None  # scene label if known


@dataclass
class Dataset:
    """A list of items plus where they came from."""

    name: str  # stem of the file / name of the folder, e.g. "dataset_ucm"
    source: Path
    format: str  # one of DATASET_FORMATS
    items: list[Item]
    images_dir: Path | None = None  # folder the item ids were resolved against
    _by_id: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Item]:
        return iter(self.items)

    def __getitem__(self, key: int | str) -> Item:
        """``ds[3]`` by position, ``ds["1.jpg"]`` by id."""
        if isinstance(key, str):
            if self._by_id is None:
                self._by_id = {it.id: i for i, it in enumerate(self.items)}
            return self.items[self._by_id[key]]
        return self.items[key]

    def splits(self) -> dict[str, int]:
        """Item count per split, train/val/test first, unknown ("") last."""
        counts: dict[str, int] = {}
        for it in self.items:
            counts[it.split] = counts.get(it.split, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: _split_key(kv[0])))

    def split(self, name: str) -> "Dataset":
        """The items of one split; ``"all"`` returns ``self``."""
        name = (name or "").strip()
        if name.lower() == "all":
            return self
        counts = self.splits()
        if name not in counts:
            available = ", ".join(f"{s or 'unsplit'} {n}" for s, n in counts.items()) or "none"
            shown = f"'{name}'" if name else "an empty"
            raise DatasetError(f"{self.name} has no {shown} split (available: {available})")
        return replace(self, items=[it for it in self.items if it.split == name])

    def labels(self) -> list[str | None]:
        """The label of every item, in item order."""
        return [it.label for it in self.items]

    def flat_captions(self) -> tuple[list[str], np.ndarray]:
        """All captions in item order, and for each caption the index of its item."""
        caps: list[str] = []
        counts = np.empty(len(self.items), dtype=np.int64)
        for i, it in enumerate(self.items):
            caps.extend(it.captions)
            counts[i] = len(it.captions)
        return caps, np.repeat(np.arange(len(self.items), dtype=np.int64), counts)

    def check_images(self) -> None:
        """Raise :class:`DatasetError` if any listed image file is missing."""
        where = self.source.name
        no_dir = [it.id for it in self.items if it.image is None]
        if no_dir:
            raise DatasetError(
                f"{where} gives no image folder for {len(no_dir)} of {len(self.items)} "
                f"images; pass --images DIR"
            )
        exists = os.path.exists
        missing = [it.id for it in self.items if not exists(it.image)]
        if missing:
            first = ", ".join(missing[:3]) + (", …" if len(missing) > 3 else "")
            folder = f" from {self.images_dir}" if self.images_dir is not None else ""
            raise DatasetError(
                f"{len(missing)} of {len(self.items)} images listed in {where} are missing"
                f"{folder} (first: {first}); pass --images DIR"
            )

    def with_images(self, images_dir: str | os.PathLike) -> "Dataset":
        """A copy whose image paths resolve against ``images_dir``."""
        root = _images_dir(images_dir)
        items = [replace(it, image=root / it.id) for it in self.items]
        return replace(self, items=items, images_dir=root)


def load_dataset(
    path: str | os.PathLike,
    images: str | os.PathLike | None = None,
    split: str | None = None,
) -> Dataset:
    """Load a dataset file or folder, detecting its format.

    ``images`` overrides where image files are looked for (SPEC §2: else the file's
    ``images/`` subfolder, else the file's folder; precomp folders: ``images/`` or none).
    It is ignored for a folder of images. ``split`` (e.g. "test", "all") selects items.
    """
    src = Path(path)
    if not src.exists():
        raise DatasetError(f"dataset not found: {src}")
    images_root = _images_dir(images) if images is not None else None
    if src.is_dir():
        ds = _load_precomp(src, images_root) if _has_caps(src) else _load_folder(src)
    else:
        ds = _load_file(src, images_root)
    return ds.split(split) if split is not None else ds


# --- detection -------------------------------------------------------------------

def _load_file(src: Path, images_root: Path | None) -> Dataset:
    if src.name.endswith(("_caps.txt", "_filename.txt")):
        return _load_precomp(src.parent, images_root)
    suffix = src.suffix.lower()
    if suffix == ".json":
        data = _read_json(src)
        if not (isinstance(data, dict) and "images" in data) and _has_caps(src.parent):
            return _load_precomp(src.parent, images_root)  # e.g. the precomp vocab json
        return _load_karpathy(src, data, images_root)
    if suffix in (".csv", ".tsv"):
        return _load_csv(src, images_root)
    if _has_caps(src.parent):
        return _load_precomp(src.parent, images_root)
    head = _read_text(src, limit=4096).lstrip()
    if head.startswith("{"):
        return _load_karpathy(src, _read_json(src), images_root)
    first = head.splitlines()[0].lower() if head else ""
    if "filename" in first and "sentence" in first:
        return _load_csv(src, images_root)
    raise DatasetError(
        f"{src.name} is not a known dataset format (expected a Karpathy-style .json, "
        f"an RSITMD-style .csv, a precomp folder or a folder of images)"
    )


def _has_caps(folder: Path) -> bool:
    try:
        return any(n.endswith("_caps.txt") for n in os.listdir(folder))
    except OSError:
        return False


def _images_dir(images: str | os.PathLike) -> Path:
    root = Path(images)
    if not root.exists():
        raise DatasetError(f"image folder not found: {root}")
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder (--images expects the folder holding the images)")
    return root.resolve()


def _default_images(src: Path, images_root: Path | None) -> Path:
    """SPEC §2: --images, else ``<file's folder>/images/``, else the file's folder."""
    if images_root is not None:
        return images_root
    folder = src.resolve().parent
    sub = folder / "images"
    return sub if sub.is_dir() else folder


def _split_key(name: str) -> tuple[int, str]:
    if name == "":
        return (9, "")
    return (_SPLIT_ORDER.get(name, 5), name)


def _read_text(src: Path, limit: int | None = None) -> str:
    try:
        with open(src, "rb") as f:
            raw = f.read() if limit is None else f.read(limit)
    except PermissionError:
        raise DatasetError(f"cannot read {src}: permission denied") from None
    except OSError as exc:
        raise DatasetError(f"cannot read {src}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        if limit is not None:
            return raw.decode("utf-8-sig", errors="replace")
        raise DatasetError(f"{src.name} is not UTF-8 text (bad byte at offset {exc.start})") from None


def _check_unique(items: list[Item], where: str) -> None:
    seen: dict[str, int] = {}
    for i, it in enumerate(items):
        j = seen.setdefault(it.id, i)
        if j != i:
            raise DatasetError(f"duplicate image id '{it.id}' in {where} (items {j} and {i})")


# --- karpathy json -------------------------------------------------------------------

def _read_json(src: Path):
    text = _read_text(src)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(
            f"{src.name} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    except RecursionError:
        raise DatasetError(f"{src.name} is not valid JSON (nested too deeply)") from None


def _sentence_text(sent, where: str) -> str:
    if isinstance(sent, str):
        return sent.strip()
    if isinstance(sent, dict):
        raw = sent.get("raw")
        if isinstance(raw, str):
            return raw.strip()
        tokens = sent.get("tokens")
        if isinstance(tokens, list):
            return " ".join(str(t) for t in tokens).strip()
    raise DatasetError(f"{where} has a sentence without 'raw' text or 'tokens'")


def _load_karpathy(src: Path, data, images_root: Path | None) -> Dataset:
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(
            f"{src.name} has no \"images\" list (expected the Karpathy layout "
            f"{{\"images\": [{{\"filename\", \"split\", \"sentences\"}}]}})"
        )
    root = _default_images(src, images_root)
    items: list[Item] = []
    for n, entry in enumerate(data["images"]):
        where = f"item {n} of {src.name}"
        if not isinstance(entry, dict):
            raise DatasetError(f"{where} is not an object")
        filename = entry.get("filename")
        if not isinstance(filename, str) or not filename.strip():
            raise DatasetError(f"{where} has no filename")
        filepath = entry.get("filepath")
        iid = filename.strip()
        if isinstance(filepath, str) and filepath.strip():
            iid = f"{filepath.strip().rstrip('/')}/{iid}"
        sents = entry.get("sentences") or []
        if not isinstance(sents, list):
            raise DatasetError(f"{where} has 'sentences' that is not a list")
        label = entry.get("label")
        items.append(Item(
            id=iid,
            image=root / iid,
            captions=[_sentence_text(s, where) for s in sents],
            split=str(entry.get("split") or "").strip(),
            label=str(label) if label not in (None, "") else None,
        ))
    _check_unique(items, src.name)
    return Dataset(src.stem, src.resolve(), "karpathy", items, root)


# --- GaLR / AMFMN precomp folder -----------------------------------------------------

_LABEL_RE = re.compile(r"(.+)_\d+$")


def _precomp_label(filename: str) -> str | None:
    """Scene label from a precomp filename: the part before the last ``_`` when a
    number follows it (``boat_0.tif`` → ``boat``); None otherwise (``00001.jpg``)."""
    m = _LABEL_RE.match(Path(filename).stem)
    return m.group(1) if m else None


def _lines(path: Path) -> list[str]:
    lines = _read_text(path).splitlines()
    while lines and not lines[-1].strip():  # trailing blank lines are not captions
        lines.pop()
    return lines


def _load_precomp(folder: Path, images_root: Path | None) -> Dataset:
    if images_root is None:
        sub = folder.resolve() / "images"
        images_root = sub if sub.is_dir() else None
    splits = sorted((n[: -len("_caps.txt")] for n in os.listdir(folder) if n.endswith("_caps.txt")),
                    key=_split_key)
    items: list[Item] = []
    for split in splits:
        fn_path = folder / f"{split}_filename.txt"
        if not fn_path.is_file():
            raise DatasetError(f"{folder.name} has {split}_caps.txt but no {split}_filename.txt")
        caps = [c.strip() for c in _lines(folder / f"{split}_caps.txt")]
        files = [f.strip() for f in _lines(fn_path)]
        for k, f in enumerate(files):
            if not f:
                raise DatasetError(f"line {k + 1} of {fn_path.name} is empty")
        # Blank caption lines inside the file are kept (RSITMD has a few): captions
        # are matched to images by position, so dropping them would shift the rest.
        if len(files) == len(caps):  # one filename per caption: group consecutive runs
            groups: list[tuple[str, list[str]]] = []
            for f, c in zip(files, caps):
                if groups and groups[-1][0] == f:
                    groups[-1][1].append(c)
                else:
                    groups.append((f, [c]))
        else:  # one filename per image, the same number of captions each
            if not files or len(caps) % len(files):
                raise DatasetError(
                    f"{folder.name}: {split}_caps.txt has {len(caps)} lines, not a multiple of "
                    f"the {len(files)} lines of {split}_filename.txt"
                )
            k = len(caps) // len(files)
            groups = [(f, caps[i * k:(i + 1) * k]) for i, f in enumerate(files)]
        items.extend(
            Item(f, images_root / f if images_root is not None else None, c, split, _precomp_label(f))
            for f, c in groups
        )
    _check_unique(items, folder.name)
    return Dataset(folder.resolve().name, folder.resolve(), "precomp", items, images_root)


# --- RSITMD / RSICD csv --------------------------------------------------------------

_CSV_CAPTION_COLUMNS = ("sentence", "sentences", "caption", "captions", "raw")


def _parse_captions(value: str, where: str) -> list[str]:
    value = value.strip()
    if not value:
        return []
    if value[0] in "[(":
        try:
            parsed = ast.literal_eval(value)  # never eval: the file is untrusted
        except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
            raise DatasetError(f"{where}: cannot parse the caption list") from None
        if isinstance(parsed, str):
            return [parsed.strip()]
        if isinstance(parsed, (list, tuple)) and all(isinstance(s, str) for s in parsed):
            return [s.strip() for s in parsed]
        raise DatasetError(f"{where}: the caption column is not a list of strings")
    return [value]


def _load_csv(src: Path, images_root: Path | None) -> Dataset:
    text = _read_text(src)
    delimiter = "\t" if src.suffix.lower() == ".tsv" else ","
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 24))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DatasetError(f"{src.name} is empty") from None
    except csv.Error as exc:
        raise DatasetError(f"{src.name} is not a valid CSV file ({exc})") from None
    cols = {h.strip().lower(): i for i, h in enumerate(header) if h.strip()}
    cap_col = next((cols[c] for c in _CSV_CAPTION_COLUMNS if c in cols), None)
    if "filename" not in cols or cap_col is None:
        missing = [n for n, ok in (("filename", "filename" in cols), ("sentence", cap_col is not None)) if not ok]
        raise DatasetError(
            f"{src.name} lacks the column{'s' if len(missing) > 1 else ''} {', '.join(missing)} "
            f"(found: {', '.join(h.strip() for h in header if h.strip()) or 'none'})"
        )
    fcol, scol, lcol = cols["filename"], cols.get("split"), cols.get("label")
    root = _default_images(src, images_root)
    items: list[Item] = []
    try:
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue
            where = f"line {reader.line_num} of {src.name}"
            if len(row) <= max(fcol, cap_col):
                raise DatasetError(f"{where} has {len(row)} columns, fewer than the header")
            filename = row[fcol].strip()
            if not filename:
                raise DatasetError(f"{where} has no filename")
            caps = _parse_captions(row[cap_col], where)
            split = row[scol].strip() if scol is not None and scol < len(row) else ""
            label = row[lcol].strip() if lcol is not None and lcol < len(row) else ""
            if items and items[-1].id == filename and items[-1].split == split:
                items[-1].captions.extend(caps)  # one row per caption: merge the run
                continue
            items.append(Item(filename, root / filename, caps, split, label or None))
    except csv.Error as exc:
        raise DatasetError(f"{src.name} is not a valid CSV file (line {reader.line_num}: {exc})") from None
    _check_unique(items, src.name)
    return Dataset(src.stem, src.resolve(), "csv", items, root)


# --- folder of images ------------------------------------------------------------------

def _natural_key(rel: str) -> list:
    """Sort "2.jpg" before "10.jpg" (UCM and most tile folders are numbered)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t.lower())
            for t in re.split(r"(\d+)", rel) if t]


def _load_folder(folder: Path) -> Dataset:
    root = folder.resolve()
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.startswith(".") or os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            rels.append(name if rel_dir == "." else f"{Path(rel_dir).as_posix()}/{name}")
    if not rels:
        raise DatasetError(
            f"no images found in {folder} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    rels.sort(key=_natural_key)
    # Label = the top-level class folder the image sits in (how `classify` gets its
    # class names); images directly in the root have none.
    items = [Item(r, root / r, [], "", r.split("/", 1)[0] if "/" in r else None) for r in rels]
    return Dataset(root.name, root, "folder", items, root)
