"""Gallery indexes: embeddings of a gallery's images (and captions) for one model.

    INDEX/
      index.json            model name, arch, fingerprint, embed_dim, counts, source, created
      items.json            per image: id, path, label, captions
      image_emb.npy         (N, D) float32, unit rows — memory-mapped on load
      caption_emb.npy       (M, D) float32 — the gallery's captions (image→text search, maps)
      caption_image.npy     (M,) int64 — caption → image row
      image_state_<k>.npy   extra per-image states of pairwise models (stage-2 rescoring)
      image_sq8.faiss       (when faiss is installed) the same embeddings as 8-bit codes with a
                            per-dimension range, for the compressed scan (retrieval/search.py);
                            optional: an index without it (older ones, assets/gallery/index)
                            loads as before and large ones get the codes built in memory

Written in a temporary folder and swapped in (``atomic_dir``): a cancel or a full disk
leaves the previous index intact. ``load_index(folder, model)`` refuses an index built
by another model (fingerprint check) with a clear message.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..archs.base import RetrievalModel
from ..data import Dataset, load_dataset
from ..errors import IndexError_, RsviewerError
from ..utils.atomic import atomic_dir, check_output_dir, write_json
from ..utils.progress import CancelToken, ProgressFn
from ..runtime import resolve_runtime, towers
from ..runtime.towers import check_runtime_precision
from .evaluate import encode_images, encode_texts

INDEX_FORMAT = "rsviewer-index/1"
SQ_FILE = "image_sq8.faiss"  # compressed-scan codes (optional; see retrieval/search.py)


@dataclass
class GalleryIndex:
    folder: Optional[Path]
    meta: dict
    items: list[dict]
    image_emb: np.ndarray  # (N, D) float32 (memmap when loaded)
    caption_emb: np.ndarray  # (M, D)
    caption_image: np.ndarray  # (M,)
    image_states: dict[str, np.ndarray] = field(default_factory=dict)
    _compressed: Optional[object] = field(default=None, repr=False, compare=False)  # search.CompressedScan

    def __len__(self) -> int:
        return len(self.items)

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def labels(self) -> list[Optional[str]]:
        return [it.get("label") for it in self.items]

    @property
    def captions(self) -> list[str]:
        return [c for it in self.items for c in it.get("captions", [])]

    def path(self, i: int) -> str:
        return self.items[i]["path"]


def model_identity(model: RetrievalModel) -> dict:
    folder = getattr(model, "model_dir", None)
    return {
        "model": getattr(model, "name", model.arch),
        "model_path": str(Path(folder).resolve()) if folder else None,
        "arch": model.arch,
        "fingerprint": getattr(model, "fingerprint", "untrained"),
        "embed_dim": model.embed_dim,
        "pairwise": model.pairwise,
    }


def index_model_dir(meta: dict) -> Path:
    """The model folder an index was built with: its recorded path when that folder still
    holds the same weights (fingerprint), else the listed model (``rsviewer models``) with
    that fingerprint; otherwise one line naming what is missing."""
    from ..checkpoint import list_models, read_config

    fp, name, path = meta.get("fingerprint"), meta.get("model"), meta.get("model_path")

    def fingerprint_of(folder) -> Optional[str]:
        try:
            return read_config(folder).get("fingerprint")
        except RsviewerError:
            return None

    if path and Path(path).is_dir() and fingerprint_of(path) == fp:
        return Path(path)
    if path and Path(path).exists() and not (Path(path) / "config.json").exists():
        return Path(path)  # a foreign checkpoint opened by path; search's fingerprint check confirms it
    for folder in list_models():
        if fingerprint_of(folder) == fp:
            return folder
    where = f" at {path}" if path else ""
    raise IndexError_(
        f"the index was built with model {name!r}{where} (fingerprint {fp}), which is neither there nor among "
        f"`rsviewer models`; pass --model"
    )


def check_model(index: GalleryIndex, model: RetrievalModel) -> None:
    fp = getattr(model, "fingerprint", "untrained")
    if index.fingerprint != fp:
        raise IndexError_(
            f"index {index.folder.name if index.folder else ''} was built with model "
            f"{index.meta.get('model')!r} ({index.meta.get('arch')}, {index.fingerprint}), not with "
            f"{getattr(model, 'name', model.arch)!r} ({fp}); rebuild it with rsviewer index"
        )


def build_index(
    model: RetrievalModel,
    data: str | os.PathLike | Dataset,
    out: Optional[str | os.PathLike] = None,
    images: Optional[str] = None,
    split: Optional[str] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    batch_size: int = 32,
    skip_missing: bool = False,
    overwrite: bool = False,
    runtime: str = "auto",
    precision: str = "fp32",
) -> GalleryIndex:
    """Encode a gallery (dataset file or image folder); write it to ``out`` if given.

    ``out`` is checked before any encoding: it must be absent or empty, or (with
    ``overwrite``) an index rsviewer wrote, and must not be or contain the gallery.
    ``runtime``: ``auto`` | ``onnx`` | ``torch`` for the frozen towers (:mod:`rsviewer.runtime`).
    ``precision``: ``fp32``, or ``int8`` — the quantized towers, faster on any CPU at a measured
    cost in fidelity (docs/runtime.md); ``index.json`` records what each tower ran at."""
    check_runtime_precision(resolve_runtime(runtime, model), precision)  # before the output folder is claimed
    ds = data if isinstance(data, Dataset) else load_dataset(data, images=images)
    inputs = [ds.source, getattr(ds, "images_dir", None)]
    if out is not None:
        check_output_dir(out, overwrite, inputs, label="index folder", kind="index")
    if split and split != "all":
        ds = ds.split(split)
    if skip_missing:
        ds = Dataset(ds.name, ds.source, ds.format, [it for it in ds.items if it.image and Path(it.image).exists()],
                     getattr(ds, "images_dir", None))
    ds.check_images()
    if len(ds) == 0:
        raise RsviewerError(f"{ds.name} has no images to index")
    t0 = time.time()
    model.eval()
    img = encode_images(model, [it.image for it in ds.items], batch_size, progress, cancel, "indexing images",
                        runtime=runtime, precision=precision)
    captions, cap_image = ds.flat_captions()
    if captions:
        txt = encode_texts(model, captions, progress=progress, cancel=cancel, runtime=runtime,
                           precision=precision)["emb"].numpy()
    else:
        txt = np.zeros((0, model.embed_dim), np.float32)
    emb = img.pop("emb").numpy().astype(np.float32)
    items = [
        {"id": it.id, "path": str(it.image), "label": it.label, "captions": list(it.captions), "split": it.split}
        for it in ds.items
    ]
    meta = {
        "format": INDEX_FORMAT,
        **model_identity(model),
        "source": str(ds.source),
        "dataset": ds.name,
        "split": split or "all",
        "n_images": len(items),
        "n_captions": len(captions),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(time.time() - t0, 2),
    }
    if precision != "fp32":
        meta["precision"] = towers(model, runtime, precision).precisions()
    index = GalleryIndex(None, meta, items, emb, txt.astype(np.float32), cap_image.astype(np.int64),
                         {k: v.numpy() for k, v in img.items()})
    if out is not None:
        save_index(index, out, overwrite=overwrite, inputs=inputs)
    return index


def save_index(index: GalleryIndex, out: str | os.PathLike, overwrite: bool = False, inputs=()) -> Path:
    """Write ``index`` to ``out`` atomically (absent, empty, or — with ``overwrite`` — an
    index rsviewer wrote; anything else is refused and left untouched)."""
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite, inputs=inputs, kind="index") as tmp:
        np.save(tmp / "image_emb.npy", np.ascontiguousarray(index.image_emb, np.float32))
        np.save(tmp / "caption_emb.npy", np.ascontiguousarray(index.caption_emb, np.float32))
        np.save(tmp / "caption_image.npy", np.asarray(index.caption_image, np.int64))
        for k, v in index.image_states.items():
            np.save(tmp / f"image_state_{k}.npy", np.ascontiguousarray(v))
        _write_codes(index, tmp)
        write_json(tmp / "items.json", [_portable(it, out) for it in index.items])
        write_json(tmp / "index.json", index.meta)
    index.folder = out
    if index._compressed is not None:
        index._compressed.emb = index.image_emb
    return out


def _write_codes(index: GalleryIndex, folder: Path) -> None:
    """The compressed-scan codes next to the float32 rows (faiss installed only)."""
    from . import search

    # galleries the float32 scan serves in a few ms do not need codes (nor faiss imported)
    if len(index.items) < search.COMPRESSED_MIN_ROWS or not search.faiss_available():
        return
    CompressedScan = search.CompressedScan
    cs = index._compressed if index._compressed is not None else CompressedScan.build(index.image_emb)
    cs.write(folder / SQ_FILE)
    index._compressed = cs
    index.meta["compressed"] = {"file": SQ_FILE, "codes": "faiss QT_8bit, inner product", "bytes": cs.nbytes}


def _portable(item: dict, out: Path) -> dict:
    """Images inside the index folder's parent (an index shipped next to its gallery, like
    assets/gallery/index) are stored relative to the index, so the pair can move together;
    any other path stays absolute."""
    p = Path(item["path"])
    home = out.resolve().parent
    try:
        rel = p.resolve().relative_to(home)
    except ValueError:
        return item
    return {**item, "path": str(Path("..") / rel)}


def is_index(path: str | os.PathLike) -> bool:
    return (Path(path) / "index.json").exists()


def load_index(folder: str | os.PathLike, model: Optional[RetrievalModel] = None, mmap: bool = True) -> GalleryIndex:
    folder = Path(folder)
    if not (folder / "index.json").exists():
        raise IndexError_(f"{folder} is not an rsviewer index (no index.json); build one with rsviewer index")
    try:
        meta = json.loads((folder / "index.json").read_text())
        items = json.loads((folder / "items.json").read_text())
        mode = "r" if mmap else None
        emb = np.load(folder / "image_emb.npy", mmap_mode=mode)
        cap = np.load(folder / "caption_emb.npy", mmap_mode=mode)
        cap_img = np.load(folder / "caption_image.npy")
        states = {
            p.stem.removeprefix("image_state_"): np.load(p, mmap_mode=mode) for p in sorted(folder.glob("image_state_*.npy"))
        }
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise IndexError_(f"index {folder} is damaged: {str(e).splitlines()[0][:160]}") from None
    if not isinstance(meta, dict) or not isinstance(items, list) or not all(isinstance(it, dict) for it in items):
        raise IndexError_(f"index {folder} is damaged: index.json must hold an object and items.json a list of objects")
    if meta.get("format") != INDEX_FORMAT:
        raise IndexError_(f"{folder} has index format {meta.get('format')!r}, expected {INDEX_FORMAT}")
    if emb.shape[0] != len(items) or cap.shape[0] != cap_img.shape[0]:
        raise IndexError_(f"index {folder} is damaged: {emb.shape[0]} embeddings for {len(items)} items")
    for it in items:  # relative paths are relative to the index folder (see _portable)
        if it.get("path") and not os.path.isabs(it["path"]):
            it["path"] = os.path.normpath(folder.resolve() / it["path"])
    index = GalleryIndex(folder, meta, items, emb, cap, cap_img, states)
    if model is not None:
        check_model(index, model)
    return index


def state_tensors(index: GalleryIndex, rows: np.ndarray) -> dict[str, torch.Tensor]:
    """Image states of ``rows`` (for pairwise stage-2 rescoring)."""
    out = {"emb": torch.from_numpy(np.ascontiguousarray(index.image_emb[rows]))}
    for k, v in index.image_states.items():
        out[k] = torch.from_numpy(np.ascontiguousarray(v[rows]))
    return out
