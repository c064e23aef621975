"""Semantic localization: windows, coarse grid, SeLo metrics, scene reader, cache,
cancel, query averaging, an end-to-end run on a small UCM mosaic and the CLI."""
from __future__ import annotations

import io
import json
import math
import threading
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from rsviewer.archs.base import BaseConfig, RetrievalModel, l2n
from rsviewer.errors import Cancelled, QueryError
from rsviewer.localize import (
    LocalizeResult,
    accumulate,
    evaluate_anno,
    load_anno,
    localize,
    open_scene,
    query_vector,
    selo_metrics,
    sliding_windows,
)
from rsviewer.localize.grid import axis_starts, normalize, odd_kernel

from conftest import SHARED, UCM_JSON, needs_shared

UCM_IMAGES = SHARED / "datasets" / "ucm-captions" / "images"


# ---- a tiny model with the RetrievalModel interface (and feature_maps/pool) -----------------
class TinyModel(RetrievalModel):
    """Convolutions with kernel = stride (no padding, no context), so the shared-map mode
    must reproduce the crop mode exactly when windows sit on the 32 px grid."""

    arch = "tiny"

    def __init__(self, seed: int = 0):
        super().__init__(BaseConfig(image_size=64, embed_dim=8))
        g = torch.Generator().manual_seed(seed)
        self.c32 = nn.Conv2d(3, 6, 32, stride=32)
        self.c16 = nn.Conv2d(3, 4, 16, stride=16)
        self.proj = nn.Linear(10, 8)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        self.eval()

    def feature_maps(self, x):
        return {"s16": torch.relu(self.c16(x)), "s32": torch.relu(self.c32(x))}

    def pool(self, maps):
        return torch.cat([maps["s32"].mean((2, 3)), maps["s16"].mean((2, 3))], 1)

    def image_features(self, x):
        return {"pooled": self.pool(self.feature_maps(x))}

    def image_head(self, feats):
        return l2n(self.proj(feats["pooled"]))

    def text_states(self, texts):
        vecs = []
        for t in texts:
            g = torch.Generator().manual_seed(sum(map(ord, t)) % 10_000)
            vecs.append(torch.randn(8, generator=g))
        return {"emb": l2n(torch.stack(vecs) * torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8]))}


class NoMapsModel(TinyModel):
    """Same model without feature_maps/pool: the fast mode must fall back to crops."""

    feature_maps = None  # type: ignore[assignment]
    pool = None  # type: ignore[assignment]

    def image_features(self, x):
        return {"pooled": TinyModel.pool(self, TinyModel.feature_maps(self, x))}


def _write_scene(path: Path, w: int, h: int, seed: int = 0) -> np.ndarray:
    """A smooth colourful test scene (smooth so JPEG stays close to the original)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    chans = []
    for c in range(3):
        fx, fy, ph = rng.uniform(0.005, 0.03), rng.uniform(0.005, 0.03), rng.uniform(0, 6)
        chans.append(127 + 100 * np.sin(xx * fx + ph) * np.cos(yy * fy))
    arr = np.clip(np.stack(chans, -1), 0, 255).astype(np.uint8)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        tifffile.imwrite(str(path), arr, tile=(64, 64), photometric="rgb")
    else:
        Image.fromarray(arr).save(path, quality=95) if path.suffix.lower() in (".jpg", ".jpeg") else Image.fromarray(arr).save(path)
    return arr


# ---- windows and grid -------------------------------------------------------------------------
@pytest.mark.parametrize("size", [(1000, 333), (517, 777), (255, 1030), (300, 300), (100, 50), (2048, 2048)])
def test_windows_cover_every_pixel_and_edges(size):
    W, H = size
    boxes = sliding_windows(size, (256, 512, 768))
    cover = np.zeros((H, W), np.int32)
    for x, y, s in boxes:
        assert 0 <= x and 0 <= y and x + s <= W and y + s <= H  # inside the scene
        cover[y : y + s, x : x + s] += 1
    assert (cover > 0).all()
    assert len({tuple(b) for b in boxes.tolist()}) == len(boxes)  # no duplicates
    for side in sorted(set(boxes[:, 2].tolist())):
        b = boxes[boxes[:, 2] == side]
        assert (b[:, 0] + side).max() == W and (b[:, 1] + side).max() == H  # flush with the border
        assert b[:, 0].min() == 0 and b[:, 1].min() == 0


def test_axis_starts_selo_layout():
    assert axis_starts(1000, 256, 0) == [0, 256, 512, 744]
    assert axis_starts(1000, 256, 128) == [128, 384, 640, 744]
    assert axis_starts(512, 256, 0) == [0, 256]  # end == border: flush = same window
    assert axis_starts(100, 256, 0) == [0]


@pytest.mark.parametrize("size,cell", [((1000, 333), 8), ((517, 777), 16), ((300, 300), 32), ((250, 130), 64)])
def test_coarse_accumulation_equals_bruteforce(size, cell):
    W, H = size
    rng = np.random.default_rng(1)
    boxes = sliding_windows(size, (64, 100, 256))
    scores = rng.normal(size=len(boxes))
    grid, cov = accumulate(boxes, scores, size, cell)
    S = np.zeros((H, W))
    C = np.zeros((H, W))
    for (x, y, s), v in zip(boxes, scores):
        S[y : y + s, x : x + s] += v
        C[y : y + s, x : x + s] += 1
    full = S / C  # SeLo: each pixel = mean score of the windows covering it
    gh, gw = math.ceil(H / cell), math.ceil(W / cell)
    ref = np.array([[full[i * cell : (i + 1) * cell, j * cell : (j + 1) * cell].mean() for j in range(gw)]
                    for i in range(gh)])
    assert grid.shape == (gh, gw)
    np.testing.assert_allclose(grid, ref, atol=1e-9)
    assert np.allclose(cov, 1.0)


def test_accumulation_partial_coverage_and_normalize():
    boxes = np.array([[0, 0, 32]])
    grid, cov = accumulate(boxes, np.array([2.0]), (64, 64), 16)
    assert np.isfinite(grid[:2, :2]).all() and np.isnan(grid[2:, 2:]).all()
    assert cov[0, 0] == 1.0 and cov[3, 3] == 0.0
    # a box covering half a cell: that cell's mean is over its covered pixels only
    grid, cov = accumulate(np.array([[0, 0, 8]]), np.array([1.0]), (32, 32), 16)
    assert grid[0, 0] == 1.0 and cov[0, 0] == pytest.approx(0.25)
    p = normalize(np.array([[1.0, np.nan], [3.0, 2.0]]))
    np.testing.assert_allclose(p, [[0.0, 0.0], [1.0, 0.5]])


def test_odd_kernel():
    assert odd_kernel(251, 8) == 31 and odd_kernel(251, 32) == 7 and odd_kernel(251, 1000) == 1


# ---- metrics on hand-made maps ----------------------------------------------------------------
W = H = 2048
POLY = [[768, 0], [1024, 0], [1024, 768], [768, 768]]  # anno layout of ucm-mosaics scene0 "harbor"
POLY2 = [[0, 1536], [768, 1536], [768, 2048], [0, 2048]]
RAS_HALF = (math.exp(1.5) - 1) / (math.exp(3) - 1)


def _perfect():
    p = np.zeros((H, W), np.float32)
    p[0:768, 768:1024] = 1.0
    return p


def test_metrics_perfect_map():
    m = selo_metrics(_perfect(), [POLY], (W, H), return_details=True)
    assert m["Rsu"] == pytest.approx(1.0)
    assert m["regions"] == [[896, 384, 607]]  # centre = vertex mean, r = int(1.5 * mean vertex distance)
    (cx, cy), = m["candidates"]  # one candidate, inside r, near the centre (border-reflected box filters)
    d = math.hypot(cx - 896, cy - 384)
    assert d < 60
    assert m["Ras"] == pytest.approx((math.exp(3 * d / 607) - 1) / (math.exp(3) - 1))
    assert m["Rda"] == 1.0
    assert m["Rmi"] == pytest.approx(0.4 + 0.35 * (1 - m["Ras"]) + 0.25)
    assert m["Rmi"] > 0.99


def test_metrics_empty_map():
    m = selo_metrics(np.zeros((H, W)), [POLY], (W, H))
    assert m == {"Rsu": 0.0, "Ras": 1.0, "Rda": 0.0, "Rmi": 0.0}


def test_metrics_peak_off_target():
    p = np.zeros((H, W), np.float32)
    p[1500:1800, 1500:1800] = 1.0
    m = selo_metrics(p, [POLY], (W, H), return_details=True)
    assert m["candidates"] == [[1652.0, 1652.0]]  # the blob's centre, outside r
    assert m["Rsu"] == 0.0 and m["Ras"] == 1.0 and m["Rda"] == 0.0 and m["Rmi"] == 0.0


def test_metrics_two_regions_one_found():
    p = _perfect()
    m = selo_metrics(p, [POLY, POLY2], (W, H), return_details=True)
    # region 1: candidate at distance d; region 2: none within r → offset r → g = (d/607 + 1) / 2
    (cx, cy), = m["candidates"]
    g = (math.hypot(cx - 896, cy - 384) / 607 + 1.0) / 2
    assert m["Ras"] == pytest.approx((math.exp(3 * g) - 1) / (math.exp(3) - 1))
    assert m["Ras"] == pytest.approx(RAS_HALF, abs=0.03)
    assert m["Rda"] == 0.5  # (1 + 0) / 2
    assert m["Rsu"] == pytest.approx(1.0)  # all mass inside the mask
    assert m["Rmi"] == pytest.approx(0.4 + 0.35 * (1 - m["Ras"]) + 0.125)


def test_metrics_uniform_map_rsu_and_rda_with_two_candidates():
    m = selo_metrics(np.full((H, W), 0.5, np.float32), [POLY], (W, H))
    assert m["Rsu"] == pytest.approx(1 - math.exp(-0.707), abs=1e-9)  # L·R = 1 for a uniform map
    # two equal blobs inside one big region: n = 2 → 0.5 (1 − mean dist / r) + e^{−2}
    big = [[0, 0], [2048, 0], [2048, 2048], [0, 2048]]
    p = np.zeros((H, W), np.float32)
    p[900:1100, 400:600] = 1.0
    p[900:1100, 1400:1600] = 1.0
    m = selo_metrics(p, [big], (W, H), return_details=True)
    c = np.array(m["candidates"])
    assert len(c) == 2
    r = m["regions"][0][2]
    assert r == int(1.5 * math.hypot(1024, 1024))
    md = np.linalg.norm(c - c.mean(0), axis=1).mean()
    assert md == pytest.approx(500, abs=2)
    assert m["Rda"] == pytest.approx(0.5 * (1 - md / r) + math.exp(-2))


def test_metrics_on_grid_match_fullres():
    full = _perfect()
    grid = full[::8, ::8]  # 8 px cells that cover the scene exactly
    a = selo_metrics(full, [POLY], (W, H))
    b = selo_metrics(grid, [POLY], (W, H), cell=8)
    for k in a:
        assert b[k] == pytest.approx(a[k], abs=0.02)
    # a grid from localize() on a scene that is not a multiple of the cell: the default
    # cell is recognised without being passed (the GUI calls it so)
    g = np.zeros((88, 125), np.float32)
    g[20:40, 30:60] = 1.0
    poly = [[240, 160], [480, 160], [480, 320], [240, 320]]
    assert selo_metrics(g, [poly], (1000, 700)) == selo_metrics(g, [poly], (1000, 700), cell=8)
    # a scene bigger than the metric raster: computed at reduced scale, same answer
    big = selo_metrics(grid, [[[x * 4, y * 4] for x, y in POLY]], (W * 4, H * 4), cell=32)
    assert big["Rsu"] == pytest.approx(1.0) and big["Rda"] == 1.0 and big["Rmi"] > 0.97


def test_load_anno(tmp_path):
    p = tmp_path / "anno.json"
    p.write_text(json.dumps([{"caption": "x", "jpg_name": "a.jpg", "label": "l", "points": [[[0, 0], [1, 0], [1, 1]]]},
                             {"caption": "y", "jpg_name": "a.jpg", "points": [[0, 0], [2, 0], [2, 2]]}]))
    a = load_anno(p)
    assert len(a) == 2 and a[1]["points"] == [[[0.0, 0.0], [2.0, 0.0], [2.0, 2.0]]]


# ---- scene reader ----------------------------------------------------------------------------
def test_scene_regions_png_jpeg_tiff_identical(tmp_path):
    w, h = 333, 250
    ref = _write_scene(tmp_path / "s.png", w, h)
    _write_scene(tmp_path / "s.jpg", w, h)
    _write_scene(tmp_path / "s.tif", w, h)
    scenes = {ext: open_scene(tmp_path / f"s.{ext}") for ext in ("png", "jpg", "tif")}
    assert scenes["tif"].backend == "rasterio" and scenes["png"].backend == "pillow"
    for sc in scenes.values():
        assert sc.size == (w, h)
    for (x, y, rw, rh, out) in [(0, 0, 64, 64, None), (100, 37, 150, 120, None), (300, 200, 64, 64, None),
                                (-10, -5, 40, 30, None), (10, 20, 200, 200, (64, 64)), (0, 0, w, h, (111, 83))]:
        a = scenes["png"].read_region(x, y, rw, rh, out)
        b = scenes["tif"].read_region(x, y, rw, rh, out)
        c = scenes["jpg"].read_region(x, y, rw, rh, out)
        assert a.dtype == np.uint8 and a.shape == ((out or (rw, rh))[1], (out or (rw, rh))[0], 3)
        np.testing.assert_array_equal(a, b)  # lossless formats: identical
        assert np.abs(a.astype(int) - c.astype(int)).mean() < 3  # JPEG q95: close
    np.testing.assert_array_equal(scenes["tif"].read_region(5, 6, 70, 80), ref[6:86, 5:75])
    assert np.all(scenes["png"].read_region(-10, 0, 10, 5) == 0)  # outside reads black
    th = scenes["tif"].thumbnail(100)
    assert max(th.size) == 100 and th.mode == "RGB"
    for sc in scenes.values():
        sc.close()


def test_scene_tiff_16bit_and_errors(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    arr = (np.arange(128 * 96, dtype=np.uint16).reshape(96, 128) * 3)
    tifffile.imwrite(str(tmp_path / "g16.tif"), arr, tile=(32, 32))
    with open_scene(tmp_path / "g16.tif") as sc:
        reg = sc.read_region(0, 0, 128, 96)
        assert reg.shape == (96, 128, 3) and reg.dtype == np.uint8
        assert reg[0, 0, 0] == 0 and reg[-1, -1, 0] == 255 and (reg[..., 0] == reg[..., 2]).all()
    from rsviewer.errors import ImageError

    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError):
        open_scene(tmp_path / "empty.jpg")
    with pytest.raises(ImageError):
        open_scene(tmp_path / "missing.png")


def test_scene_pixel_limit(tmp_path, monkeypatch):
    from rsviewer.errors import ImageError

    _write_scene(tmp_path / "s.png", 200, 100)
    _write_scene(tmp_path / "s.jpg", 200, 100)
    monkeypatch.setenv("RSVIEWER_MAX_PIXELS", "10000")
    with open_scene(tmp_path / "s.png") as sc:
        assert sc.size == (200, 100)  # the header is read without the limit
        with pytest.raises(ImageError, match="tiled TIFF"):
            sc.read_region(0, 0, 10, 10)
    with open_scene(tmp_path / "s.jpg") as sc:
        assert sc.thumbnail(50).size == (50, 25)  # a 1/2 JPEG draft decode fits the limit
        with pytest.raises(ImageError, match="tiled TIFF"):
            sc.read_region(0, 0, 10, 10)  # full resolution does not
    with pytest.raises(ImageError, match="tiled TIFF"):  # localize refuses before any work
        localize(TinyModel(), tmp_path / "s.jpg", "q", window_sizes=(64,), cache=False)


def test_scene_tiff_reduced_read_from_overviews(tmp_path, monkeypatch):
    """A reduced read of a big region is served by GDAL (overviews of a sidecar .ovr or
    block-wise decimation) and agrees with decoding it whole and resizing."""
    import rsviewer.raster.reader as reader
    from rsviewer.raster import build_overviews

    _write_scene(tmp_path / "s.tif", 600, 520)
    with open_scene(tmp_path / "s.tif") as sc:
        whole = sc.read_region(-20, 10, 630, 480, (110, 80))
        monkeypatch.setattr(reader, "_DIRECT_PIXELS", 3000)  # force GDAL's decimated read
        decimated = sc.read_region(-20, 10, 630, 480, (110, 80))
        ticks = []
        build_overviews(sc, progress=lambda d, t, m: ticks.append((d, t)), rows=128)
        assert sc.overviews == [2] and ticks[-1][0] == ticks[-1][1]
        from_ovr = sc.read_region(-20, 10, 630, 480, (110, 80))
    for arr in (decimated, from_ovr):
        assert arr.shape == whole.shape
        assert np.abs(arr.astype(int) - whole.astype(int)).mean() < 3


# ---- engine with the tiny model ------------------------------------------------------------
def test_fast_mode_equals_crops_on_aligned_grid(tmp_path):
    _write_scene(tmp_path / "s.png", 320, 256)  # every window edge on the 32 px grid at its scale
    m = TinyModel()
    kw = dict(window_sizes=(64, 128), cache=False, precision="fp32", filter="none", tile=3)
    a = localize(m, tmp_path / "s.png", "a query", mode="fast", **kw)
    b = localize(m, tmp_path / "s.png", "a query", mode="crops", **kw)
    assert a.info["mode"] == "fast" and b.info["mode"] == "crops"
    np.testing.assert_allclose(a.raw, b.raw, atol=1e-5)
    c = localize(NoMapsModel(), tmp_path / "s.png", "a query", mode="fast", **kw)  # no maps: falls back
    assert c.info["mode"] == "crops"
    np.testing.assert_allclose(c.raw, b.raw, atol=1e-5)


def test_fast_mode_same_embeddings_for_any_band_height(tmp_path):
    # the band memory handling (preallocated bands, rows trimmed between bands) must not
    # change a window's features: one-cell bands, two-cell bands and one band for the whole
    # scene give the same embeddings, on a scene with partial border cells
    from rsviewer.localize.encode import encode_windows
    from rsviewer.localize.grid import sliding_windows

    _write_scene(tmp_path / "s.png", 350, 290)
    m = TinyModel()
    sc = open_scene(tmp_path / "s.png")
    boxes = sliding_windows(sc.size, (64, 128))
    ref = encode_windows(m, sc, boxes, mode="fast", tile=64, precision="fp32", runtime="torch")[0]
    for tile in (1, 2, 3):
        emb, _, info = encode_windows(m, sc, boxes, mode="fast", tile=tile, precision="fp32", runtime="torch")
        assert info["mode"] == "fast" and info["tiles"] > 1
        np.testing.assert_allclose(emb, ref, atol=1e-6)


def test_result_shape_upsample_overlay(tmp_path):
    _write_scene(tmp_path / "s.png", 300, 200)
    res = localize(TinyModel(), tmp_path / "s.png", "q", window_sizes=(64, 128), cache=False)
    assert isinstance(res, LocalizeResult)
    assert res.prob.dtype == np.float32 and res.prob.min() >= 0 and res.prob.max() <= 1
    assert res.prob.shape == (math.ceil(200 / res.cell), math.ceil(300 / res.cell))
    assert res.upsample((150, 100)).shape == (100, 150)
    ov = res.overlay(max_side=150, polygons=[[[0, 0], [100, 0], [100, 100]]])
    assert ov.size == (150, 100) and ov.mode == "RGB"
    x, y = res.peak
    assert 0 <= x < 300 and 0 <= y < 200
    json.dumps(res.to_json())


def test_query_averaging(tmp_path):
    m = TinyModel()
    q, _ = query_vector(m, ["first text", "second one"])
    e = m.text_states(["first text", "second one"])["emb"]
    ref = torch.nn.functional.normalize(torch.nn.functional.normalize(e, dim=-1).mean(0), dim=-1)
    torch.testing.assert_close(q, ref)
    _write_scene(tmp_path / "s.png", 256, 192)
    kw = dict(window_sizes=(64,), cache=False, filter="none", precision="fp32")
    both = localize(m, tmp_path / "s.png", ["first text", "second one"], **kw)
    one = localize(m, tmp_path / "s.png", "first text", **kw)
    two = localize(m, tmp_path / "s.png", "second one", **kw)
    # cosine is linear in the (unit) query: the averaged map ∝ the sum of the two raw maps
    n = float(torch.linalg.norm(torch.nn.functional.normalize(e, dim=-1).mean(0)))
    np.testing.assert_allclose(both.raw, (one.raw + two.raw) / 2 / n, atol=1e-5)
    with pytest.raises(QueryError):
        localize(m, tmp_path / "s.png", [], **kw)
    with pytest.raises(QueryError):
        localize(m, tmp_path / "s.png", "  ", **kw)


class CancelAfter:
    """Fires after ``n`` progress reports (≈ batches/tiles)."""

    def __init__(self, n: int):
        self.n = n
        self.event = threading.Event()

    def progress(self, done, total, msg):
        self.n -= 1
        if self.n <= 0:
            self.event.set()

    def is_set(self):
        return self.event.is_set()


@pytest.mark.parametrize("mode", ["fast", "crops"])
def test_cancel_leaves_no_files_then_cache_works(tmp_path, monkeypatch, mode):
    cache = tmp_path / "cache"
    monkeypatch.setenv("RSVIEWER_CACHE", str(cache))
    _write_scene(tmp_path / "s.png", 640, 512)
    m = TinyModel()
    kw = dict(window_sizes=(64, 128), mode=mode, batch_size=4, tile=4)
    c = CancelAfter(3)
    with pytest.raises(Cancelled):
        localize(m, tmp_path / "s.png", "q", progress=c.progress, cancel=c, **kw)
    files = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
    # the ONNX towers exported on the way (rsviewer.runtime) are complete cache entries; nothing else
    assert [p for p in files if "onnx" not in p.relative_to(cache).parts or p.name.endswith(".tmp")] == []
    first = localize(m, tmp_path / "s.png", "q", **kw)
    assert not first.cached and len(list((cache / "localize").glob("*.npz"))) == 1
    second = localize(m, tmp_path / "s.png", "another query", **kw)
    assert second.cached and second.n_windows == first.n_windows
    again = localize(m, tmp_path / "s.png", "q", **kw)
    np.testing.assert_allclose(again.prob, first.prob)
    # two-stage also runs, caches, and cancels cleanly
    ts = localize(m, tmp_path / "s.png", "q", two_stage=True, **kw)
    assert ts.info["stage1_kept"] >= 1 and ts.n_windows > ts.info["stage1_kept"]


def test_cancel_inside_a_forward_pass(tmp_path, monkeypatch):
    """The cancel hook stops a long forward between two sub-modules."""
    monkeypatch.setenv("RSVIEWER_CACHE", str(tmp_path / "cache"))
    _write_scene(tmp_path / "s.png", 256, 256)
    m = TinyModel()
    ev = threading.Event()
    orig = m.c32.forward

    def slow(x):  # cancel arrives while the forward pass runs
        ev.set()
        return orig(x)

    m.c32.forward = slow
    with pytest.raises(Cancelled):
        localize(m, tmp_path / "s.png", "q", window_sizes=(64,), cancel=ev, mode="crops")
    assert not (tmp_path / "cache" / "localize").exists() or not list((tmp_path / "cache" / "localize").iterdir())


def test_cancel_during_first_call_setup_is_not_memoised(tmp_path, monkeypatch):
    """A cancel that lands in the one-off per-model set-up (shared-map probe) stops the job
    and is not remembered as "this model cannot use the fast mode"."""
    from rsviewer.localize.encode import _fast_cache

    monkeypatch.setenv("RSVIEWER_CACHE", str(tmp_path / "cache"))
    _write_scene(tmp_path / "s.png", 256, 256)
    m = TinyModel()
    ev = threading.Event()
    orig = m.c32.forward

    def cancel_in_probe(x):  # the first forward of a fresh model is the probe
        ev.set()
        return orig(x)

    m.c32.forward = cancel_in_probe
    with pytest.raises(Cancelled):
        localize(m, tmp_path / "s.png", "q", window_sizes=(64,), cancel=ev)
    assert not _fast_cache.get(m)  # nothing memoised
    m.c32.forward = orig
    res = localize(m, tmp_path / "s.png", "q", window_sizes=(64,))
    assert "fallback" not in res.info


# ---- end to end with the default model on a small UCM mosaic -------------------------------
def _ucm_files(label: str, n: int) -> list[Path]:
    d = json.loads(UCM_JSON.read_text())
    return [UCM_IMAGES / i["filename"] for i in d["images"] if i["split"] == "val" and i.get("label") == label][:n]


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory):
    if not UCM_JSON.exists():
        pytest.skip("shared UCM data not available")
    forest = _ucm_files("forest", 3)
    tennis = _ucm_files("tenniscourt", 1)
    tiles = [forest[0], forest[1], forest[2], tennis[0]]  # tennis court bottom-right
    canvas = Image.new("RGB", (512, 512))
    for k, p in enumerate(tiles):
        canvas.paste(Image.open(p).convert("RGB").resize((256, 256)), ((k % 2) * 256, (k // 2) * 256))
    path = tmp_path_factory.mktemp("mosaic") / "mosaic.png"
    canvas.save(path)
    return path


@pytest.fixture(scope="module")
def default_model():
    from rsviewer.checkpoint import load_model

    return load_model("default")


def test_fused_backbone_matches_model(default_model):
    """The inference copy (BN folded, shifted stride-2 kernels, in-place ReLU6) computes
    the model's own feature maps, on even sizes and on sizes that become odd."""
    from rsviewer.localize.fused import fused_backbone

    fb = fused_backbone(default_model, torch.float32)
    assert fb is not None
    g = torch.Generator().manual_seed(0)
    for h, w in [(128, 96), (100, 84)]:
        x = torch.randn(2, 3, h, w, generator=g)
        with torch.inference_mode():
            want = default_model.feature_maps(x)
            got = fb.forward_features(x.contiguous(memory_format=torch.channels_last))
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=2e-4, rtol=1e-4)
    assert fused_backbone(TinyModel()) is None  # not an EfficientNet-Lite: no fused copy


@needs_shared()
@pytest.mark.parametrize("mode", ["fast", "crops"])
def test_end_to_end_tennis_court_in_mosaic(mosaic, default_model, mode):
    res = localize(default_model, mosaic, "tennis court", window_sizes=(256,), mode=mode, cache=False)
    x, y = res.peak
    assert x >= 256 and y >= 256, (x, y)
    q = res.prob.shape[0] // 2
    assert res.prob[q:, q:].mean() > res.prob[:q, :q].mean() + 0.3
    poly = [[256, 256], [512, 256], [512, 512], [256, 512]]
    m = selo_metrics(res.prob, [poly], res.scene_size, cell=res.cell)
    assert m["Rsu"] > 0.5


@needs_shared()
def test_cli_json(mosaic, default_model, tmp_path, monkeypatch):
    import rsviewer.cli.localize as cli_loc
    from rsviewer.cli.main import main

    monkeypatch.setenv("RSVIEWER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli_loc, "load", lambda args: default_model)  # the model is loaded once per session
    out = tmp_path / "ov.png"
    anno = tmp_path / "anno.json"
    anno.write_text(json.dumps([{"caption": "tennis court", "jpg_name": "mosaic.png", "label": "tenniscourt",
                                 "points": [[[256, 256], [512, 256], [512, 512], [256, 512]]]}]))
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["localize", "--scene", str(mosaic), "--text", "tennis court", "--out", str(out), "--json",
                   "--quiet", "--windows", "256", "--anno", str(anno)])
    assert rc == 0
    obj = json.loads(buf.getvalue())
    assert obj["windows"] > 0 and len(obj["peak"]) == 2 and "seconds" in obj and "metrics" in obj
    assert Image.open(out).size == (512, 512)
    buf = io.StringIO()
    with redirect_stdout(buf):
        rc = main(["localize", "--anno", str(anno), "--scenes", str(mosaic.parent), "--json", "--quiet",
                   "--windows", "256", "--out-dir", str(tmp_path / "ov")])
    assert rc == 0
    obj = json.loads(buf.getvalue())
    assert {"Rsu", "Ras", "Rda", "Rmi", "n_queries", "seconds", "per_query"} <= set(obj)
    assert obj["n_queries"] == 1 and Path(obj["per_query"][0]["overlay"]).exists()


@needs_shared()
def test_cli_overlay_format_from_suffix(mosaic, default_model, tmp_path, monkeypatch, capsys):
    import rsviewer.cli.localize as cli_loc
    from rsviewer.cli.main import main

    monkeypatch.setenv("RSVIEWER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli_loc, "load", lambda args: default_model)
    out = tmp_path / "ov.jpg"
    args = ["localize", "--scene", str(mosaic), "--text", "tennis court", "--quiet", "--windows", "256"]
    assert main(args + ["--out", str(out)]) == 0
    assert Image.open(out).format == "JPEG" and Image.open(out).size == (512, 512)
    # an unknown suffix is a one-line error before any work, and writes nothing
    assert main(args + ["--out", str(tmp_path / "ov.bmpx")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "end it in .png, .jpg" in err[0]
    assert not list(tmp_path.glob("ov.bmpx*"))
