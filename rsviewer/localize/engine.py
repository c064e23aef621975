"""Semantic localization (SeLo) of a text query in a large scene, and its evaluation.

One-stage (SeLo): windows of each size in ``window_sizes`` on two grids (offset 0 and
half a window), every window embedded once (cached), cosine with the query vector,
each coarse-grid cell = mean score of the windows covering it (exact area mean, see
:mod:`.grid`), min–max normalisation, then SeLo's 251 px median filter converted to
cells.

Two-stage (SeLo v2, ``two_stage=True``): 512 px tiles on one grid; the best 15 % (+1)
tiles are refined by boxes of 128 and 256 px around 9 anchor points of each (corners,
quarter points, centre); the map is the mean over the kept tiles and the boxes, cells
no box covers get the lowest value, then SeLo v2's 255 px Gaussian.

Query: a string or a list of strings; a list is averaged on the text side (mean of the
unit text vectors, re-normalised: SeLo v2's query averaging). ``text_shuffles=N`` adds
N word-order shuffles of each text, as SeLo v2 does (off by default).

Pairwise architectures (MSSA): by default windows are scored with the image-only
stage-1 vectors (``states["emb"]``), which cache like any dual encoder;
``pairwise="score"`` scores every window with the full ``model.score`` instead (crops,
chunked; exact, but nothing query-independent to cache, so every query re-encodes).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from ..errors import ImageError, QueryError, RsviewerError
from ..utils.progress import check, report
from . import cache as wcache
from ..runtime import resolve_runtime
from .encode import encode_windows, fast_support, model_fingerprint, resolve_precision
from .grid import accumulate, default_cell, grid_shape, normalize, sliding_windows, smooth
from .metrics import load_anno, selo_metrics
from .scene import Scene, open_scene

__all__ = ["LocalizeResult", "localize", "evaluate_anno", "query_vector", "DEFAULT_MODE", "stage2_boxes"]

DEFAULT_MODE = "fast"
DEFAULT_WINDOWS = (256, 512, 768)


@dataclass
class LocalizeResult:
    prob: np.ndarray  # (gh, gw) float32 in [0, 1] on the coarse grid
    scene_size: tuple[int, int]  # (W, H)
    cell: float  # scene pixels per grid cell (the last row/column may be cut by the border)
    text: str | list[str]
    seconds: float
    n_windows: int
    cached: bool
    raw: Optional[np.ndarray] = None  # (gh, gw) mean cosine per cell before normalising (NaN: uncovered)
    scene_path: Optional[Path] = None
    info: dict = field(default_factory=dict)
    georef: Optional[object] = None  # rsviewer.raster.Georef of the scene (CRS may be None: pixel space)
    valid: Optional[np.ndarray] = None  # (gh, gw) valid-pixel fraction per cell; None: all valid

    def valid_cells(self, min_valid: float = 0.5) -> Optional[np.ndarray]:
        """Cells with at least ``min_valid`` valid (not nodata) pixels; None if all are."""
        return None if self.valid is None else self.valid >= min_valid

    def write_cog(self, path, dtype: str = "uint8", model: Optional[str] = None) -> Path:
        """The map as a Cloud-Optimized GeoTIFF in the scene's CRS (see :mod:`.outputs`)."""
        from .outputs import write_prob_cog

        return write_prob_cog(self, path, dtype=dtype, model=model)

    def regions(self, threshold: float = 0.5, top: int = 10) -> list[dict]:
        """Connected regions above ``threshold``, best first (pixel space)."""
        from .outputs import find_regions

        return find_regions(self, threshold, top)

    def write_geojson(self, path, crs: str = "wgs84", threshold: float = 0.5, top: int = 10,
                      model: Optional[str] = None) -> Path:
        """The top regions as GeoJSON, RFC 7946 lon/lat (``crs="scene"``: the scene's CRS)."""
        from .outputs import write_regions

        return write_regions(self, path, crs=crs, threshold=threshold, top=top, model=model)

    @property
    def peak(self) -> tuple[int, int]:
        """Scene pixel (x, y) of the centre of the highest cell."""
        i, j = np.unravel_index(int(np.argmax(self.prob)), self.prob.shape)
        W, H = self.scene_size
        x = min(W - 1, int((j + 0.5) * self.cell))
        y = min(H - 1, int((i + 0.5) * self.cell))
        return x, y

    def upsample(self, size: tuple[int, int]) -> np.ndarray:
        """The map at ``size`` = (w, h) covering the whole scene (bilinear), float32."""
        import cv2

        w, h = int(size[0]), int(size[1])
        W, H = self.scene_size
        gh, gw = self.prob.shape
        fw = max(1, round(gw * self.cell * w / W))
        fh = max(1, round(gh * self.cell * h / H))
        up = cv2.resize(self.prob.astype(np.float32), (fw, fh), interpolation=cv2.INTER_LINEAR)
        if up.shape[0] < h or up.shape[1] < w:
            up = np.pad(up, ((0, max(0, h - up.shape[0])), (0, max(0, w - up.shape[1]))), mode="edge")
        return np.ascontiguousarray(up[:h, :w])

    def overlay(self, max_side: int = 2048, polygons=None, image: Optional[Image.Image] = None) -> Image.Image:
        """SeLo's display: 0.7 × scene + 0.3 × JET(map), the ground-truth polygons in red.
        ``image``: a thumbnail of the scene to draw on (else read from ``scene_path``)."""
        if image is None:
            if self.scene_path is None:
                raise RsviewerError("this result has no scene path; pass image=")
            with open_scene(self.scene_path) as sc:
                image = sc.thumbnail(max_side)
        return render_overlay(image.convert("RGB"), self.upsample(image.size), self.scene_size, polygons)

    def to_json(self) -> dict:
        p = self.prob
        return {
            "text": self.text,
            "scene": str(self.scene_path) if self.scene_path else None,
            "scene_size": list(self.scene_size),
            "grid": list(p.shape),
            "cell": self.cell,
            "seconds": round(self.seconds, 3),
            "windows": self.n_windows,
            "cached": self.cached,
            "peak": list(self.peak),
            "map": {
                "min": float(p.min()), "max": float(p.max()), "mean": float(p.mean()),
                "frac_over_0.5": float((p >= 0.5).mean()),
                "cos_min": _nan(np.nanmin(self.raw)) if self.raw is not None else None,
                "cos_max": _nan(np.nanmax(self.raw)) if self.raw is not None else None,
            },
            "info": self.info,
            "georef": self.georef.to_json() if self.georef is not None else None,
        }


def _nan(v) -> Optional[float]:
    v = float(v)
    return None if math.isnan(v) else v


def render_overlay(image: Image.Image, heat: np.ndarray, scene_size, polygons=None, alpha: float = 0.3) -> Image.Image:
    import cv2

    u8 = np.clip(np.rint(heat * 255.0), 0, 255).astype(np.uint8)
    jet = cv2.cvtColor(cv2.applyColorMap(u8, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    base = np.asarray(image, dtype=np.uint8)
    out = Image.fromarray(cv2.addWeighted(base, 1.0 - alpha, jet, alpha, 0), "RGB")
    if polygons:
        from .metrics import _polygons

        s = image.size[0] / scene_size[0]
        draw = ImageDraw.Draw(out)
        width = max(2, round(max(image.size) / 400))
        for poly in _polygons(polygons):
            pts = [(x * s, y * s) for x, y in poly]
            if len(pts) >= 2:
                draw.line(pts + [pts[0]], fill=(255, 0, 0), width=width, joint="curve")
    return out


# ---- query --------------------------------------------------------------------------------------
def _texts(text, shuffles: int = 0, seed: int = 0) -> list[str]:
    if isinstance(text, str):
        texts = [text]
    elif isinstance(text, (list, tuple)):
        texts = [t for t in text]
    else:
        raise QueryError(f"the query must be a string or a list of strings, not {type(text).__name__}")
    if not texts:
        raise QueryError("the query list is empty")
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            raise QueryError("the query text is empty")
    if shuffles > 0:
        rng = np.random.default_rng(seed)
        extra = []
        for t in texts:
            words = t.split()
            for _ in range(shuffles):
                extra.append(" ".join(rng.permutation(words).tolist()))
        texts = texts + extra
    return texts


def query_vector(model, texts: Sequence[str]) -> tuple[torch.Tensor, dict]:
    """Mean of the unit text vectors (re-normalised) and the raw text states."""
    with torch.inference_mode():
        states = model.text_states(list(texts))
    emb = F.normalize(states["emb"].float(), dim=-1)
    return F.normalize(emb.mean(0), dim=-1), states


# ---- embeddings with cache ----------------------------------------------------------------------
def _pre(model) -> list:
    """The input normalisation: part of the cache key (a checkpoint's fingerprint covers
    its trained tensors, not how pixels are normalised before the frozen backbone)."""
    return [[round(float(v), 6) for v in getattr(model, "mean", ())], [round(float(v), 6) for v in getattr(model, "std", ())]]


def _px(scene: Scene):
    """Band choice and 8-bit stretch: they change the pixels, so they are part of the key
    (None for plain 8-bit RGB, so existing cache entries stay valid)."""
    key = scene.pixel_key() if hasattr(scene, "pixel_key") else None
    if key and key["stretch"] is None and key["bands"] == [1, 2, 3]:
        return None
    return key


def _keep_valid(scene: Scene, boxes: np.ndarray, min_valid: float) -> tuple[np.ndarray, int]:
    """Drop windows with less than ``min_valid`` valid pixels (nodata, alpha, outside)."""
    frac = scene.valid_fraction(boxes) if hasattr(scene, "valid_fraction") else None
    if frac is None or len(boxes) == 0:
        return boxes, 0
    keep = frac >= min_valid
    return boxes[keep], int((~keep).sum())


def _embed(model, scene: Scene, boxes: np.ndarray, *, mode: str, input_size: int, precision: str,
           tile: int, halo: int, batch_size, use_cache: bool, progress, cancel, message: str, runtime: str = "auto"):
    """(emb, cached, info) for ``boxes`` (whole-list cache entry)."""
    prec = resolve_precision(precision, model.device)
    eff_mode = mode
    if mode == "fast":
        ok, reason, _ = fast_support(model, input_size, probe=False)  # no forward pass on a cache hit
        eff_mode = "fast" if ok else "crops"
    cfg = {"mode": eff_mode, "input": input_size, "precision": prec, "pre": _pre(model), "px": _px(scene),
           "runtime": resolve_runtime(runtime, model)}
    if eff_mode == "fast":
        cfg.update(tile=tile, halo=halo)
    key = wcache.cache_key(scene.file_key, model_fingerprint(model), cfg, boxes)
    if use_cache:
        hit = wcache.load(key, boxes)
        if hit is not None:
            report(progress, len(boxes), len(boxes), message + " (cached)")
            return hit[1], True, {"mode": eff_mode, "input_size": input_size, "precision": prec, "cache": "hit"}
    emb, _, info = encode_windows(model, scene, boxes, mode=eff_mode, input_size=input_size, precision=prec,
                                  batch_size=batch_size, tile=tile, halo=halo, progress=progress,
                                  cancel=cancel, message=message, runtime=runtime)
    check(cancel)
    if info["mode"] != eff_mode:  # the numerical check refused the fast mode: store as crops
        cfg = {"mode": info["mode"], "input": input_size, "precision": prec, "pre": _pre(model), "px": _px(scene),
               "runtime": resolve_runtime(runtime, model)}
        key = wcache.cache_key(scene.file_key, model_fingerprint(model), cfg, boxes)
    if use_cache:
        try:
            wcache.save(key, boxes, emb, {"scene": scene.file_key, "config": cfg})
            info["cache"] = "written"
        except OSError as e:  # a full disk must not lose the result
            info["cache"] = f"not written ({e.strerror or e})"
    return emb, False, info


def _embed_pool(model, scene: Scene, boxes: np.ndarray, *, input_size: int, precision: str, batch_size,
                use_cache: bool, progress, cancel, message: str, runtime: str = "auto"):
    """Stage-2 boxes (query dependent): one growing per-scene pool of crop embeddings."""
    prec = resolve_precision(precision, model.device)
    cfg = {"mode": "crops", "input": input_size, "precision": prec, "pool": True, "pre": _pre(model),
           "px": _px(scene), "runtime": resolve_runtime(runtime, model)}
    key = wcache.cache_key(scene.file_key, model_fingerprint(model), cfg)
    have_b = np.zeros((0, 3), np.int64)
    have_e = None
    if use_cache:
        hit = wcache.load(key)
        if hit is not None:
            have_b, have_e = hit
    index = {tuple(int(v) for v in b): i for i, b in enumerate(have_b)}
    missing = np.array([b for b in boxes if tuple(int(v) for v in b) not in index], dtype=np.int64).reshape(-1, 3)
    new_e = None
    if len(missing):
        new_e, _, _ = encode_windows(model, scene, missing, mode="crops", input_size=input_size, precision=prec,
                                     batch_size=batch_size, progress=progress, cancel=cancel, message=message,
                                     runtime=runtime)
        check(cancel)
        all_b = np.concatenate([have_b, missing])
        all_e = new_e if have_e is None else np.concatenate([have_e, new_e])
        if use_cache:
            try:
                wcache.save(key, all_b, all_e, {"scene": scene.file_key, "config": cfg})
            except OSError:
                pass
        have_b, have_e = all_b, all_e
        index = {tuple(int(v) for v in b): i for i, b in enumerate(have_b)}
    rows = [index[tuple(int(v) for v in b)] for b in boxes]
    return have_e[rows], len(missing) == 0


def stage2_boxes(scene_size, tiles: np.ndarray, half_sizes=(64, 128)) -> np.ndarray:
    """SeLo v2 refinement boxes: around 9 anchors of each tile (corners, quarter points,
    centre), squares of side 2·h for h in ``half_sizes``, shifted inside the scene."""
    W, H = scene_size
    out, seen = [], set()
    fr = [(0, 0), (0, 1), (1, 0), (1, 1), (0.25, 0.25), (0.25, 0.75), (0.75, 0.25), (0.75, 0.75), (0.5, 0.5)]
    for x, y, s in np.asarray(tiles, dtype=np.int64):
        for a, b in fr:
            px, py = x + a * s, y + b * s
            for h in half_sizes:
                side = int(min(2 * h, W, H))
                bx = int(min(max(px - h, 0), W - side))
                by = int(min(max(py - h, 0), H - side))
                key = (bx, by, side)
                if key not in seen:
                    seen.add(key)
                    out.append(key)
    return np.asarray(out, dtype=np.int64).reshape(-1, 3)


# ---- localize ----------------------------------------------------------------------------------
def localize(model, scene: str | Path | Scene, text: str | list[str], window_sizes=DEFAULT_WINDOWS,
             two_stage: bool = False, progress=None, cancel=None, cache: bool = True, **opts) -> LocalizeResult:
    """Probability map of ``text`` over ``scene`` on a coarse grid (see module doc).

    Options: ``mode`` ``"fast"`` (default; shared feature maps, falls back to crops for
    architectures without ``feature_maps``/``pool``) | ``"crops"`` (exact SeLo);
    ``input_size`` (model input per window, default the model's); ``precision``
    ``auto|fp32|bf16``; ``cell`` (px per grid cell, default :func:`default_cell`);
    ``filter`` ``median|gaussian|none`` and ``filter_px``; ``batch_size``; ``tile``,
    ``halo`` (fast mode); ``pairwise`` ``emb|score``; ``text_shuffles``; two-stage:
    ``stage1_size`` (512), ``stage1_fraction`` (0.15), ``stage2_half_sizes`` ((64, 128)).
    """
    t0 = time.perf_counter()
    mode = opts.pop("mode", DEFAULT_MODE)
    precision = opts.pop("precision", "auto")
    runtime = opts.pop("runtime", "auto")  # frozen towers: auto | onnx | torch (rsviewer.runtime)
    cell = opts.pop("cell", None)
    filt = opts.pop("filter", None)
    filter_px = opts.pop("filter_px", None)
    batch_size = opts.pop("batch_size", None)
    tile = int(opts.pop("tile", 32))
    halo = int(opts.pop("halo", 1))
    pairwise = opts.pop("pairwise", "emb")
    shuffles = int(opts.pop("text_shuffles", 0))
    seed = int(opts.pop("seed", 0))
    stage1_size = int(opts.pop("stage1_size", 512))
    stage1_fraction = float(opts.pop("stage1_fraction", 0.15))
    half_sizes = tuple(int(h) for h in opts.pop("stage2_half_sizes", (64, 128)))
    input_size = int(opts.pop("input_size", None) or model.image_size)
    min_valid = float(opts.pop("min_valid", 0.5))
    if opts:
        raise TypeError(f"localize() got unknown options: {', '.join(sorted(opts))}")
    if mode not in ("fast", "crops"):
        raise RsviewerError(f"unknown mode {mode!r}; use fast or crops")
    if pairwise not in ("emb", "score"):
        raise RsviewerError(f"unknown pairwise scoring {pairwise!r}; use emb or score")
    sizes = [int(s) for s in (window_sizes or DEFAULT_WINDOWS)]
    if any(s < 16 for s in sizes):
        raise RsviewerError(f"window sizes must be at least 16 px, got {sizes}")
    texts = _texts(text, shuffles, seed)
    check(cancel)

    own = not isinstance(scene, Scene)
    sc = open_scene(scene) if own else scene
    try:
        W, H = sc.size
        c = int(cell or default_cell((W, H)))
        finest = min(sizes) if not two_stage else min([stage1_size] + [2 * h for h in half_sizes])
        sc.check_readable(min(finest, W, H) / input_size)  # fail now, not after an hour of work
        if hasattr(sc, "check_not_empty"):
            sc.check_not_empty()  # an all-nodata scene: one line, no work
            sc.ensure_stretch()  # fixed before any window is read, stored with the result
        q, tstates = query_vector(model, texts)
        check(cancel)
        full_score = bool(getattr(model, "pairwise", False)) and pairwise == "score"
        info: dict = {"window_sizes": sizes, "two_stage": two_stage, "cell": c, "texts": len(texts)}
        common = dict(input_size=input_size, precision=precision, batch_size=batch_size, runtime=runtime)

        def score_windows(boxes: np.ndarray, message: str, pool: bool = False):
            if full_score:
                n_t = len(texts)

                def score_fn(states):
                    s = model.score(states, tstates)  # (B, n_t)
                    return s.float().mean(1).cpu().numpy() if n_t > 1 else s.float()[:, 0].cpu().numpy()

                _, sc_, inf = encode_windows(model, sc, boxes, mode="crops", score_fn=score_fn, progress=progress,
                                             cancel=cancel, message=message, **common)
                return sc_, False, inf
            if pool:
                emb, cached = _embed_pool(model, sc, boxes, use_cache=cache, progress=progress, cancel=cancel,
                                          message=message, **common)
                inf = {"mode": "crops"}
            else:
                emb, cached, inf = _embed(model, sc, boxes, mode=mode, tile=tile, halo=halo, use_cache=cache,
                                          progress=progress, cancel=cancel, message=message, **common)
            s = emb @ q.cpu().numpy().astype(np.float32)
            return s.astype(np.float64), cached, inf

        skipped = 0

        def valid_only(b: np.ndarray) -> np.ndarray:
            nonlocal skipped
            b, k = _keep_valid(sc, b, min_valid)
            skipped += k
            if len(b) == 0:
                raise ImageError(f"{sc.path.name}: no window has {min_valid:.0%} valid pixels (nodata everywhere)")
            return b

        if not two_stage:
            boxes = valid_only(sliding_windows((W, H), sizes))
            scores, cached, inf = score_windows(boxes, "encoding windows")
            info.update(inf)
            kind = filt or "median"
        else:
            tiles = valid_only(sliding_windows((W, H), [stage1_size], offsets="single"))
            s1, cached1, inf = score_windows(tiles, "stage 1: tiles")
            info.update(inf)
            n_sel = min(len(tiles), int(len(tiles) * stage1_fraction) + 1)
            top = np.argsort(-s1, kind="stable")[:n_sel]
            b2 = stage2_boxes((W, H), tiles[top], half_sizes)
            b2, k2 = _keep_valid(sc, b2, min_valid)
            skipped += k2
            check(cancel)
            s2, cached2, _ = score_windows(b2, "stage 2: refinement", pool=True)
            boxes = np.concatenate([tiles[top], b2])
            scores = np.concatenate([s1[top], s2])
            cached = cached1 and cached2
            info.update(stage1_tiles=len(tiles), stage1_kept=int(n_sel), stage2_boxes=len(b2))
            kind = filt or "gaussian"
        check(cancel)
        raw, cov = accumulate(boxes, scores, (W, H), c)
        valid = sc.valid_grid(c) if hasattr(sc, "valid_grid") else None
        if valid is not None:
            raw = np.where(valid >= min_valid, raw, np.nan)  # nodata scores nothing
        prob = normalize(raw)
        prob = smooth(prob, c, kind, filter_px)
        if valid is not None:
            prob = np.where(valid >= min_valid, prob, 0.0)
        if skipped:
            info["skipped_nodata_windows"] = skipped
        if hasattr(sc, "stretch"):
            info.update(bands=list(sc.bands), stretch=sc.stretch, crs=sc.georef.crs_label())
        info.update(filter=kind, filter_px=filter_px or (251 if kind == "median" else 255 if kind == "gaussian" else None),
                    grid=list(prob.shape), covered=float((cov > 0).mean()))
        secs = time.perf_counter() - t0
        report(progress, 1, 1, "done")
        return LocalizeResult(prob=prob.astype(np.float32), scene_size=(W, H), cell=float(c), text=text,
                              seconds=secs, n_windows=int(len(boxes)), cached=bool(cached),
                              raw=raw.astype(np.float32), scene_path=sc.path, info=info,
                              georef=getattr(sc, "georef", None), valid=valid)
    finally:
        if own:
            sc.close()


# ---- evaluation ----------------------------------------------------------------------------------
def _scene_path(anno_path: Path, scenes_dir: Optional[Path], name: str) -> Path:
    cands = []
    if scenes_dir is not None:
        cands.append(Path(scenes_dir) / name)
    base = anno_path.parent
    cands += [base / "images" / name, base / name, base.parent / "imgs" / name, base.parent / "images" / name]
    for c in cands:
        if c.exists():
            return c
    raise ImageError(f"scene {name} of {anno_path.name} not found (looked in {', '.join(str(c.parent) for c in cands)})")


def evaluate_anno(model, anno_path, scenes_dir=None, progress=None, cancel=None, out_dir=None, **opts) -> dict:
    """SeLo metrics over every query of an ``anno.json``: means and per-query rows.

    ``scenes_dir``: folder of the ``jpg_name`` images (default: ``images/`` next to the
    anno file, the anno's folder, or SeLo's ``../imgs``). ``out_dir``: also write each
    query's overlay PNG there. Other options go to :func:`localize`.
    """
    from ..utils.atomic import atomic_file

    t0 = time.perf_counter()
    anno_path = Path(anno_path)
    items = load_anno(anno_path)
    window_sizes = opts.pop("window_sizes", DEFAULT_WINDOWS)
    two_stage = opts.pop("two_stage", False)
    use_cache = opts.pop("cache", True)
    max_side = int(opts.pop("max_side", 2048))
    scenes: dict[Path, Scene] = {}
    thumbs: dict[Path, Image.Image] = {}
    rows = []
    n = len(items)
    try:
        for i, item in enumerate(items):
            check(cancel)
            path = _scene_path(anno_path, Path(scenes_dir) if scenes_dir else None, item["jpg_name"])
            if path not in scenes:
                scenes[path] = open_scene(path)
            sc = scenes[path]

            def sub(done, total, msg, _i=i):
                report(progress, _i * 1000 + int(1000 * done / max(1, total)), n * 1000, f"query {_i + 1}/{n}: {msg}")

            res = localize(model, sc, item["caption"], window_sizes=window_sizes, two_stage=two_stage,
                           progress=sub if progress else None, cancel=cancel, cache=use_cache, **dict(opts))
            m = selo_metrics(res.prob, item["points"], res.scene_size, cell=res.cell)
            row = {"caption": item["caption"], "scene": item["jpg_name"], "label": item.get("label"), **m,
                   "seconds": round(res.seconds, 3), "cached": res.cached, "peak": list(res.peak)}
            if out_dir is not None:
                if path not in thumbs:
                    thumbs[path] = sc.thumbnail(max_side)
                img = res.overlay(polygons=item["points"], image=thumbs[path])
                out = Path(out_dir) / f"q{i:02d}_{Path(item['jpg_name']).stem}.png"
                with atomic_file(out, "wb") as fh:
                    img.save(fh, format="PNG")
                row["overlay"] = str(out)
            rows.append(row)
            report(progress, (i + 1) * 1000, n * 1000, f"query {i + 1}/{n}")
    finally:
        for s in scenes.values():
            s.close()
    mean = {k: float(np.mean([r[k] for r in rows])) for k in ("Rsu", "Ras", "Rda", "Rmi")}
    return {**mean, "n_queries": len(rows), "seconds": round(time.perf_counter() - t0, 3), "per_query": rows}
