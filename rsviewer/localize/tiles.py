"""Tile indexes: every window of one or many whole scenes as a searchable gallery.

``build_tile_index(model, ["a.tif", "dir/"], "runs/tiles", tile=256, overlap=0.5, level=0)``
cuts each scene into square tiles of ``tile`` px *at overview level* ``level`` (a tile
covers ``tile · 2**level`` full-resolution px), stepping by ``(1 - overlap)`` of a tile,
the last tile of a row/column flush with the border; tiles that are mostly nodata are
left out. The tiles are embedded with the localizer's window encoder (shared feature
maps, one pass over the scene per tile size) and saved as an ordinary rsviewer index
(``retrieval.index.save_index``) whose items carry, besides ``path`` (the scene), a
``tile`` record: pixel box, level, map bounds, CRS and transform, lon/lat bounds
when the CRS allows. ``rsviewer search`` prints them and writes them as GeoJSON.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from ..errors import ImageError, RsviewerError
from ..raster.georef import Georef, GeorefError
from ..raster.reader import open_raster
from ..utils.progress import check, report

__all__ = ["tile_boxes", "scene_files", "build_tile_index", "tile_georef", "tile_feature"]

SCENE_SUFFIXES = {".tif", ".tiff", ".jp2", ".vrt", ".png", ".jpg", ".jpeg"}


def _starts(length: int, side: int, step: int) -> list[int]:
    if side >= length:
        return [0]
    s = list(range(0, length - side + 1, step))
    if s[-1] + side < length:
        s.append(length - side)  # flush with the border: edges are always covered
    return s


def tile_boxes(size: tuple[int, int], tile: int = 256, overlap: float = 0.5, level: int = 0) -> np.ndarray:
    """(N, 3) ``(x, y, side)`` full-resolution boxes of the tiles of a scene."""
    if tile < 16:
        raise RsviewerError(f"--tile must be at least 16 px, got {tile}")
    if not 0.0 <= overlap < 1.0:
        raise RsviewerError(f"--overlap must be in [0, 1), got {overlap}")
    if level < 0 or level > 12:
        raise RsviewerError(f"--level must be between 0 and 12, got {level}")
    W, H = int(size[0]), int(size[1])
    side = int(min(tile * 2 ** level, W, H))
    step = max(1, int(round(side * (1.0 - overlap))))
    return np.asarray([(x, y, side) for y in _starts(H, side, step) for x in _starts(W, side, step)],
                      dtype=np.int64).reshape(-1, 3)


def scene_files(sources: Iterable) -> list[Path]:
    """Files named, and the scene files (by suffix) directly inside folders named."""
    out: list[Path] = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() in SCENE_SUFFIXES and q.is_file())
            if not found:
                raise ImageError(f"{p} has no scene files ({', '.join(sorted(SCENE_SUFFIXES))})")
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise ImageError(f"scene not found: {p}")
    return out


def _tile_record(g: Georef, box, level: int) -> dict:
    x, y, s = (int(v) for v in box)
    rec = {"box": [x, y, s, s], "level": int(level), "bounds": g.box_bounds(x, y, x + s, y + s),
           "crs": g.crs.to_wkt() if g.has_crs else None, "crs_label": g.crs_label(),
           "transform": list(g.transform)[:6]}
    return rec


def tile_georef(tile: dict, name: str = "tile") -> Georef:
    """The scene's :class:`Georef` back from a stored tile record."""
    from affine import Affine
    from rasterio.crs import CRS

    crs = CRS.from_wkt(tile["crs"]) if tile.get("crs") else None
    return Georef(crs, Affine(*tile["transform"][:6]), (0, 0), name)


def read_tile(path, tile: dict, side: Optional[int] = None):
    """One tile of a tile index as an RGB PIL image, read through the raster layer (a window
    of the scene, never the whole scene), with the stretch stored at indexing; ``side``: a
    preview of at most that many pixels (the reader takes an overview when it has one)."""
    from PIL import Image

    x, y, w, h = (int(v) for v in tile["box"])
    out = None if side is None else (min(w, int(side)), min(h, int(side)))
    with open_raster(path, stretch=tile.get("stretch")) as r:
        return Image.fromarray(r.read_region(x, y, w, h, out_size=out), "RGB")


def tile_caption(tile: dict) -> str:
    """Where a tile is, in one short line: its pixel box and, when known, its centre in lon/lat."""
    x, y, w, h = (int(v) for v in tile["box"])
    text = f"px {x:,},{y:,} ({w} px)"
    lb = tile.get("lonlat_bounds")
    if lb:
        lon, lat = (lb[0] + lb[2]) / 2, (lb[1] + lb[3]) / 2
        text += f" · {abs(lat):.5f}°{'N' if lat >= 0 else 'S'} {abs(lon):.5f}°{'E' if lon >= 0 else 'W'}"
    elif tile.get("crs_label"):
        b = tile.get("bounds")
        if b:
            text += f" · {tile['crs_label']} {(b[0] + b[2]) / 2:,.1f}, {(b[1] + b[3]) / 2:,.1f}"
    return text


def tile_feature(tile: dict, props: dict, crs: str = "wgs84") -> dict:
    """A GeoJSON Feature of a tile's footprint (lon/lat, or the scene's CRS)."""
    g = tile_georef(tile, props.get("id", "tile"))
    x, y, w, h = tile["box"]
    corners = [(x, y), (x + w, y), (x + w, y + h), (x, y + h), (x, y)]
    if crs == "wgs84":
        lon, lat = g.to_lonlat([c[0] for c in corners], [c[1] for c in corners])
        ring = [[round(a, 8), round(b, 8)] for a, b in zip(lon, lat)]
    else:
        ring = [list(g.pixel_to_map(*c)) for c in corners]
    return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": props}


def build_tile_index(model, scenes: Sequence, out=None, tile: int = 256, overlap: float = 0.5, level: int = 0,
                     min_valid: float = 0.5, progress=None, cancel=None, mode: str = "fast",
                     precision: str = "auto", bands: Optional[Sequence[int]] = None, overwrite: bool = False):
    """Embed the tiles of every scene into a gallery index (see module doc)."""
    from ..retrieval.index import INDEX_FORMAT, GalleryIndex, model_identity, save_index
    from .encode import encode_windows

    files = scene_files(scenes)
    if not files:
        raise ImageError("no scenes to index")
    t0 = time.time()
    model.eval()
    plans = []
    for f in files:  # open everything first: a bad scene fails before any encoding
        r = open_raster(f, bands=bands)
        try:
            r.check_not_empty()
            b = tile_boxes(r.size, tile, overlap, level)
            frac = r.valid_fraction(b)
            if frac is not None:
                b = b[frac >= min_valid]
            plans.append((f, b, r.georef))
        finally:
            r.close()
    total = sum(len(b) for _, b, _ in plans)
    if total == 0:
        raise ImageError("no tile has enough valid pixels to index")
    embs, items, done = [], [], 0
    for f, boxes, g in plans:
        check(cancel)
        if len(boxes) == 0:
            continue

        def sub(d, t, msg, _done=done, _name=f.name):
            report(progress, _done + int(len(boxes) * d / max(1, t)), total, f"{_name}: {msg}")

        with open_raster(f, bands=bands) as r:
            emb, _, _ = encode_windows(model, r, boxes, mode=mode, precision=precision, progress=sub, cancel=cancel,
                                       message="encoding tiles")
            stretch = r.ensure_stretch()
        embs.append(emb)
        for x, y, s in boxes:
            rec = _tile_record(g, (x, y, s), level)
            ll = g.lonlat_or_none(x, y) if g.has_crs else None
            if ll is not None:
                try:
                    lon, lat = g.to_lonlat([x, x + s, x + s, x], [y, y, y + s, y + s])
                    rec["lonlat_bounds"] = [min(lon), min(lat), max(lon), max(lat)]
                except Exception:
                    pass
            if stretch:
                rec["stretch"] = stretch
            items.append({"id": f"{f.stem}@{int(x)},{int(y)},{int(s)}", "path": str(f.resolve()), "label": f.stem,
                          "captions": [], "split": None, "tile": rec})
        done += len(boxes)
        report(progress, done, total, f"{f.name}: {len(boxes)} tiles")
    emb = np.concatenate(embs).astype(np.float32)
    meta = {"format": INDEX_FORMAT, **model_identity(model), "kind": "tiles",
            "source": [str(f) for f in files], "dataset": "tiles of " + ", ".join(f.name for f in files[:3])
            + (" …" if len(files) > 3 else ""), "split": "all", "n_images": len(items), "n_captions": 0,
            "tiles": {"tile": tile, "overlap": overlap, "level": level, "min_valid": min_valid, "scenes": len(files)},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.time() - t0, 2)}
    index = GalleryIndex(None, meta, items, emb, np.zeros((0, emb.shape[1]), np.float32), np.zeros(0, np.int64), {})
    if out is not None:
        save_index(index, out, overwrite=overwrite)
    return index


def hits_with_tiles(index, res, lines: list[str], obj: dict, geojson=None, crs: str = "wgs84"):
    """``rsviewer search`` on a tile index: each hit line gets its pixel box and map
    bounds, the JSON its tile record; ``geojson``: the hits' footprints written there."""
    from ..raster.write import write_geojson

    out_lines = lines[:1]
    feats = []
    for h, hj in zip(res.hits, obj["hits"]):
        t = index.items[h.row].get("tile")
        if t is None:
            continue
        hj["tile"] = {k: v for k, v in t.items() if k != "crs"}
        x, y, w, hh = t["box"]
        b = t["bounds"]
        where = f"px {x},{y} +{w}×{hh} L{t['level']}  map [{b[0]:.1f}, {b[1]:.1f}, {b[2]:.1f}, {b[3]:.1f}] {t['crs_label']}"
        if t.get("lonlat_bounds"):
            lb = t["lonlat_bounds"]
            where += f"  lon/lat {(lb[0] + lb[2]) / 2:.6f},{(lb[1] + lb[3]) / 2:.6f}"
        out_lines.append(f"{h.rank:3d}  {h.score:+.4f}  {Path(h.path).name:<20} {where}")
        if geojson:
            props = {"rank": h.rank, "score": h.score, "id": h.id, "scene": h.path, "box_px": t["box"],
                     "level": t["level"], "query": res.query}
            feats.append(tile_feature(t, props, crs))
    if geojson:
        crs_obj = None
        if crs == "wgs84":
            for h in res.hits:
                t = index.items[h.row]["tile"]
                tile_georef(t, Path(h.path).name).require_crs("GeoJSON tiles")
        else:
            t = index.items[res.hits[0].row]["tile"] if res.hits else None
            crs_obj = tile_georef(t).crs if t else None
            if t is not None and crs_obj is None:
                raise GeorefError(f"{Path(res.hits[0].path).name} has no CRS; its tiles cannot be written as GeoJSON")
        write_geojson(geojson, feats, crs=crs_obj, name="rsviewer search",
                      extra={"query": res.query, "model": index.meta.get("model")})
        out_lines.append(f"wrote {geojson}")
        obj["geojson"] = str(geojson)
    return out_lines, obj
