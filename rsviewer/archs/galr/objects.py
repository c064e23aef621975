"""Where GaLR's objects come from.

The paper detects objects with PP-YOLO trained on DOTA (eq. 4). No DOTA-trained
detector exists here, so there are two sources:

``cluster`` (default, needs no detector)
    The stride-16 feature grid of the frozen backbone (16×16 cells for a 256 px image),
    box-filtered 3×3, is clustered with k-means (16 clusters) on [L2-normalised feature,
    λ·(x, y)] (deterministic farthest-point initialisation, fixed iterations); every
    4-connected component of a cluster is one object: centre = mean of its cell
    centres, area = fraction of cells, box = bounding box of its cells. Its *category*
    and *probability* come from the backbone's own ImageNet classifier applied to the
    region's mean stride-32 feature (``object_category="imagenet"``), with the 1000
    classes pooled into 32 groups (k-means of the classifier's unit weight vectors, so
    alike classes share a group): category = the group with the most softmax mass,
    probability = that mass. A category thus means the same thing in every image — a
    per-image cluster id would not (it is kept as ``cluster`` for display) — and
    neighbouring fragments of one surface share it, which is what DREA's merge needs. Backbones without a trustworthy classifier
    (user weights, random init) use ``"lsh"``: the sign pattern of fixed random
    projections of the region feature (2^bits categories), confidence = mean
    |projection| margin through a sigmoid. Everything is a deterministic function of
    the frozen backbone, so it is part of the cached frozen features.

``file`` (users with a detector)
    Detections per image, DOTA style (one ``NAME.txt`` or ``NAME.labels.txt`` per image
    in a folder: ``x1 y1 x2 y2 x3 y3 x4 y4 class difficulty [score]``, ``imagesource:``
    / ``gsd:`` header lines ignored) or one JSON file (``{"image.jpg": [obj, ...]}``,
    ``[{"image": ..., "objects": [...]}]`` or a flat ``[{"image": ..., "box"|"bbox"|
    "poly", "category", "score"}]``; ``box`` = x1 y1 x2 y2, ``bbox`` = x y w h, ``poly``
    = [[x, y], ...], pixels unless ``"normalized": true``). Categories are the 18 DOTA
    v2 classes, then any other names in the file (sorted).

    The model interface passes pixels, not file names (``image_features(pixels)``), so
    detections are found by *content*: every image named in the detection file is read
    once, preprocessed exactly like the model's input, and its 8-bit pixels hashed;
    an input tensor (in any of the 8 dihedral views the trainer caches) is matched by
    the same hash and the objects are rotated/flipped with it. An image without
    detections gets an empty graph (the paper's "images with no targets").
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ...errors import ModelError
from .graph import Obj

DOTA_CLASSES = (
    "plane", "ship", "storage-tank", "baseball-diamond", "tennis-court", "basketball-court",
    "ground-track-field", "harbor", "bridge", "large-vehicle", "small-vehicle", "helicopter",
    "roundabout", "soccer-ball-field", "swimming-pool", "container-crane", "airport", "helipad",
)  # fmt: skip


# ---- geometry of the dihedral views (train/cache.py: rot90 ×(v % 4), then flip W if v ≥ 4) ----
def dihedral_point(x: float, y: float, view: int) -> tuple[float, float]:
    """Where normalised point (x = column, y = row) lands in view ``view`` of the image."""
    for _ in range(view % 4):  # torch.rot90(k=1, dims=(H, W)): out[i, j] = in[j, W-1-i]
        x, y = y, 1.0 - x
    if view >= 4:
        x = 1.0 - x
    return x, y


def dihedral_obj(o: Obj, view: int) -> Obj:
    from dataclasses import replace

    if view == 0:
        return o
    cx, cy = dihedral_point(o.cx, o.cy, view)
    (ax, ay), (bx, by) = dihedral_point(o.box[0], o.box[1], view), dihedral_point(o.box[2], o.box[3], view)
    return replace(o, cx=cx, cy=cy, box=(min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)))


def undo_dihedral(x: torch.Tensor, view: int) -> torch.Tensor:
    if view >= 4:
        x = x.flip(-1)
    return torch.rot90(x, -(view % 4), dims=(-2, -1)) if view % 4 else x


# ---- the clustering source ---------------------------------------------------------------------
def _farthest_point_init(z: torch.Tensor, k: int) -> torch.Tensor:
    """(B, P, D) → (B, k) seed indices: first the point farthest from the mean, then each
    next one farthest from the chosen seeds. Deterministic (ties: lowest index)."""
    b, p, _ = z.shape
    idx = torch.empty(b, k, dtype=torch.long, device=z.device)
    d = (z - z.mean(1, keepdim=True)).pow(2).sum(-1)
    idx[:, 0] = d.argmax(1)
    mind = torch.full((b, p), float("inf"), device=z.device, dtype=z.dtype)
    for j in range(1, k):
        last = z[torch.arange(b), idx[:, j - 1]]
        mind = torch.minimum(mind, (z - last[:, None]).pow(2).sum(-1))
        idx[:, j] = mind.argmax(1)
    return idx


def kmeans(z: torch.Tensor, k: int, iters: int = 10) -> torch.Tensor:
    """Batched k-means of (B, P, D) points with farthest-point seeds; (B, P) cluster ids."""
    k = max(1, min(k, z.shape[1]))
    cent = torch.gather(z, 1, _farthest_point_init(z, k)[:, :, None].expand(-1, -1, z.shape[-1]))
    for _ in range(iters):
        assign = torch.cdist(z, cent).argmin(-1)  # (B, P)
        onehot = F.one_hot(assign, k).to(z.dtype)  # (B, P, k)
        cnt = onehot.sum(1)  # (B, k)
        new = onehot.transpose(1, 2) @ z / cnt.clamp_min(1)[:, :, None]
        cent = torch.where(cnt[:, :, None] > 0, new, cent)  # an empty cluster keeps its centre
    return torch.cdist(z, cent).argmin(-1)


def kmeans_grid(feat: torch.Tensor, k: int, spatial: float = 1.0, iters: int = 10, smooth: int = 3) -> torch.Tensor:
    """Cluster the cells of (B, C, H, W) maps (after a ``smooth``×``smooth`` box filter) on
    [unit feature, spatial·(x, y)]; returns (B, H, W) cluster ids."""
    b, c, h, w = feat.shape
    feat = feat.float()
    if smooth > 1:
        feat = F.avg_pool2d(feat, smooth, 1, smooth // 2, count_include_pad=False)
    f = F.normalize(feat.flatten(2).transpose(1, 2), dim=-1)  # (B, P, C)
    ys, xs = torch.meshgrid(torch.arange(h, dtype=f.dtype), torch.arange(w, dtype=f.dtype), indexing="ij")
    xy = torch.stack([(xs + 0.5) / w, (ys + 0.5) / h], -1).reshape(1, h * w, 2).to(f.device)
    z = torch.cat([f, spatial * xy.expand(b, -1, -1)], -1)
    return kmeans(z, k, iters).reshape(b, h, w)


def components(labels: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """4-connected components of every label of an (H, W) map: [(label, bool mask)] in a
    fixed order (by label, then scipy's raster order)."""
    from scipy import ndimage

    out = []
    for lab in np.unique(labels):
        comp, n = ndimage.label(labels == lab)
        for j in range(1, n + 1):
            out.append((int(lab), comp == j))
    return out


def mask_geometry(mask: np.ndarray) -> tuple[float, float, float, tuple[float, float, float, float]]:
    """(cx, cy, area, box) of a cell mask, normalised to [0, 1]."""
    h, w = mask.shape
    rows, cols = np.nonzero(mask)
    cx = float((cols + 0.5).mean() / w)
    cy = float((rows + 0.5).mean() / h)
    area = float(mask.sum() / mask.size)
    box = (float(cols.min() / w), float(rows.min() / h), float((cols.max() + 1) / w), float((rows.max() + 1) / h))
    return cx, cy, area, box


def box_mask(box: Sequence[float], h: int, w: int) -> np.ndarray:
    """Cells of an (h, w) grid whose centres fall in a normalised box (at least the nearest)."""
    x1, y1, x2, y2 = box
    xs = (np.arange(w) + 0.5) / w
    ys = (np.arange(h) + 0.5) / h
    m = (ys[:, None] >= y1) & (ys[:, None] <= y2) & (xs[None, :] >= x1) & (xs[None, :] <= x2)
    if not m.any():
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        m[min(h - 1, max(0, int(cy * h))), min(w - 1, max(0, int(cx * w)))] = True
    return m


Categorizer = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def class_groups(fc: torch.nn.Linear, groups: int) -> torch.Tensor:
    """(n_classes,) group id of every classifier class: k-means of the unit class weight
    vectors (classes the backbone finds alike share a group). Deterministic."""
    w = F.normalize(fc.weight.detach().float(), dim=-1)[None]
    return kmeans(w, groups, iters=25)[0]


def imagenet_categorizer(fc: torch.nn.Linear, groups: int = 0) -> Categorizer:
    """Top-1 ImageNet class and its softmax probability; with ``groups`` > 0 the classes are
    pooled into that many groups (:func:`class_groups`): category = the group with the most
    probability mass, probability = that mass."""
    member = F.one_hot(class_groups(fc, groups)).float() if groups > 0 else None

    def run(region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            p = fc(region.float()).softmax(-1)
            if member is not None:
                p = p @ member.to(p.device)
            prob, cat = p.max(-1)
        return cat, prob

    return run


def lsh_categorizer(dim: int, bits: int = 6, seed: int = 0) -> Categorizer:
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(dim, bits, generator=g) / np.sqrt(dim)
    weights = 2 ** torch.arange(bits)

    def run(region: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = F.normalize(region.float(), dim=-1) @ proj.to(region.device) * np.sqrt(dim)
        cat = ((z > 0).long() * weights.to(region.device)).sum(-1)
        prob = torch.sigmoid(z.abs()).mean(-1)
        return cat, prob

    return run


def cluster_objects(
    grid: torch.Tensor,
    region_map: torch.Tensor,
    categorize: Categorizer,
    n_clusters: int = 12,
    spatial: float = 1.0,
    iters: int = 10,
    names: Optional[Sequence[str]] = None,
    smooth: int = 3,
) -> list[tuple[list[Obj], list[np.ndarray]]]:
    """Per image: (raw objects, their cell masks on the grid).

    ``grid`` (B, C, H, W) is what is clustered; ``region_map`` (B, C', h', w') is averaged
    over each region (upsampled to H×W, nearest) and categorised."""
    b, _, h, w = grid.shape
    labels = kmeans_grid(grid, n_clusters, spatial, iters, smooth).cpu().numpy()
    reg = F.interpolate(region_map.float(), size=(h, w), mode="nearest").flatten(2)  # (B, C', P)
    out = []
    for i in range(b):
        comps = components(labels[i])
        if not comps:
            out.append(([], []))
            continue
        masks = np.stack([m for _, m in comps]).reshape(len(comps), -1)
        mt = torch.from_numpy(masks).to(reg.dtype).to(reg.device)
        means = (mt @ reg[i].T) / mt.sum(1, keepdim=True)
        cats, probs = categorize(means)
        objs = []
        for j, ((lab, m), c, p) in enumerate(zip(comps, cats.tolist(), probs.tolist())):
            cx, cy, area, box = mask_geometry(m)
            name = names[c] if names is not None and c < len(names) else str(c)
            objs.append(Obj(cx, cy, area, float(p), int(c), box, (j,), name, {"cluster": lab}))
        out.append((objs, [m for _, m in comps]))
    return out


# ---- detections from a file --------------------------------------------------------------------
def parse_dota(text: str) -> list[dict]:
    """DOTA label lines → ``[{"poly": [(x, y)×4], "name", "difficult", "score"}]`` (pixels)."""
    out = []
    for ln, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or line.startswith(("imagesource:", "gsd:")):
            continue
        if len(parts) < 9:
            raise ModelError(f"DOTA line {ln} has {len(parts)} fields; expected x1 y1 … x4 y4 class [difficulty] [score]")
        try:
            xy = [float(v) for v in parts[:8]]
        except ValueError:
            raise ModelError(f"DOTA line {ln}: coordinates are not numbers: {line.strip()[:80]!r}") from None
        det = {"poly": list(zip(xy[0::2], xy[1::2])), "name": parts[8], "difficult": 0, "score": 1.0}
        if len(parts) > 9:
            det["difficult"] = int(float(parts[9]))
        if len(parts) > 10:
            det["score"] = float(parts[10])
        out.append(det)
    return out


def _json_obj(o: dict, normalized: bool) -> dict:
    if "poly" in o:
        poly = [(float(x), float(y)) for x, y in o["poly"]]
    elif "box" in o:
        x1, y1, x2, y2 = (float(v) for v in o["box"])
        poly = [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]
    elif "bbox" in o:
        x, y, w, h = (float(v) for v in o["bbox"])
        poly = [(x, y), (x + w, y), (x + w, y + h), (x, y + h)]
    else:
        raise ModelError(f"detection without poly/box/bbox: {json.dumps(o)[:80]}")
    name = str(o.get("category", o.get("class", o.get("name", "object"))))
    score = float(o.get("score", o.get("prob", o.get("confidence", 1.0))))
    return {"poly": poly, "name": name, "score": score, "normalized": bool(o.get("normalized", normalized))}


def parse_json_detections(data) -> dict[str, list[dict]]:
    """The three JSON layouts (module docstring) → ``{image name: [detection]}``."""
    normalized = False
    if isinstance(data, dict) and "images" in data and isinstance(data["images"], (dict, list)):
        normalized = bool(data.get("normalized", False))
        data = data["images"]
    out: dict[str, list[dict]] = {}
    if isinstance(data, dict):
        for name, objs in data.items():
            out[str(name)] = [_json_obj(o, normalized) for o in objs]
        return out
    if isinstance(data, list):
        for item in data:
            if not isinstance(item, dict):
                raise ModelError("detection JSON list entries must be objects")
            name = item.get("image", item.get("filename", item.get("file_name")))
            if name is None:
                raise ModelError(f"detection entry without an image name: {json.dumps(item)[:80]}")
            lst = out.setdefault(str(name), [])
            if "objects" in item:
                lst.extend(_json_obj(o, normalized) for o in item["objects"])
            else:
                lst.append(_json_obj(item, normalized))
        return out
    raise ModelError("detection JSON must be an object or a list")


def load_detections(path: str | os.PathLike) -> dict[str, list[dict]]:
    """A folder of DOTA ``*.txt`` files (key = image stem) or a JSON file (key = image name)."""
    p = Path(path).expanduser()
    if p.is_dir():
        out = {}
        for f in sorted(p.glob("*.txt")):
            stem = f.name[: -len(".labels.txt")] if f.name.endswith(".labels.txt") else f.stem
            out[stem] = parse_dota(f.read_text(errors="replace"))
        if not out:
            raise ModelError(f"no DOTA .txt detection files in {p}")
        return out
    if not p.exists():
        raise ModelError(f"detections not found: {p}")
    if p.suffix.lower() == ".txt":
        return {p.name[: -len(".labels.txt")] if p.name.endswith(".labels.txt") else p.stem: parse_dota(p.read_text())}
    try:
        return parse_json_detections(json.loads(p.read_text()))
    except json.JSONDecodeError as e:
        raise ModelError(f"{p} is not valid JSON (line {e.lineno})") from None


def detections_digest(path: str | os.PathLike) -> str:
    p = Path(path).expanduser()
    h = hashlib.sha256()
    files = sorted(p.glob("*.txt")) if p.is_dir() else [p]
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def category_names(dets: dict[str, list[dict]]) -> list[str]:
    extra = sorted({d["name"] for lst in dets.values() for d in lst} - set(DOTA_CLASSES))
    return [*DOTA_CLASSES, *extra]


def detection_objs(dets: Sequence[dict], width: int, height: int, names: Sequence[str]) -> list[Obj]:
    """Detections (pixels or normalised) → raw :class:`Obj` (centre, polygon area, box)."""
    index = {n: i for i, n in enumerate(names)}
    out = []
    for j, d in enumerate(dets):
        pts = np.asarray(d["poly"], dtype=np.float64)
        if not d.get("normalized", False):
            pts = pts / np.array([width, height], dtype=np.float64)
        pts = np.clip(pts, 0.0, 1.0)
        x, y = pts[:, 0], pts[:, 1]
        area = 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))  # shoelace
        box = (float(x.min()), float(y.min()), float(x.max()), float(y.max()))
        cat = index.get(d["name"], len(names) - 1)
        out.append(Obj(float(x.mean()), float(y.mean()), area, float(d.get("score", 1.0)), cat, box, (j,), d["name"]))
    return out


def pixel_fingerprint(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> str:
    """Hash of a normalised (3, S, S) input, taken on its 8-bit pixels (robust to float noise)."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    u8 = ((x.detach().float().cpu() * s + m) * 255.0).round().clamp(0, 255).to(torch.uint8)
    return hashlib.blake2b(u8.numpy().tobytes(), digest_size=16).hexdigest()


class DetectionIndex:
    """Detections of a file, found by image content (see module docstring)."""

    def __init__(self, path: str, images: Optional[str], names: Sequence[str]):
        self.path = Path(path).expanduser()
        self.dets = load_detections(self.path)
        base = self.path if self.path.is_dir() else self.path.parent
        self.dirs = [Path(images).expanduser()] if images else [base, base / "images"]
        self.names = list(names)
        self._index: Optional[dict[str, list[Obj]]] = None
        self.missing: list[str] = []

    def _find(self, name: str) -> Optional[Path]:
        from ...data.images import IMAGE_EXTENSIONS

        for d in self.dirs:
            cand = d / name
            if cand.is_file():
                return cand
            for ext in sorted(IMAGE_EXTENSIONS):
                c2 = d / f"{name}{ext}"
                if c2.is_file():
                    return c2
        return None

    def build(self, preprocess: Callable, mean, std) -> None:
        from ...data import load_image

        index: dict[str, list[Obj]] = {}
        for name, dets in self.dets.items():
            p = self._find(name)
            if p is None:
                self.missing.append(name)
                continue
            im = load_image(p)
            objs = detection_objs(dets, im.width, im.height, self.names)
            index[pixel_fingerprint(preprocess([im])[0], mean, std)] = objs
        if not index:
            where = ", ".join(str(d) for d in self.dirs)
            raise ModelError(f"none of the {len(self.dets)} images named in {self.path} was found in {where}")
        self._index = index

    def lookup(self, x: torch.Tensor, mean, std) -> Optional[list[Obj]]:
        """Objects of one normalised (3, S, S) input in whatever dihedral view it is, or None."""
        assert self._index is not None
        for v in range(8):
            objs = self._index.get(pixel_fingerprint(undo_dihedral(x, v), mean, std))
            if objs is not None:
                return [dihedral_obj(o, v) for o in objs]
        return None
