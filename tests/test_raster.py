"""The raster layer and georeferenced results, on real pixels.

GeoTIFFs are made here from the real UCM mosaic ``assets/scenes/scene0.jpg`` (2048 px,
SeLo-style ``anno.json`` with known targets) in UTM 33N (EPSG:32633) at 0.3 m: tiled,
with and without overviews, a 4-band uint16 (B, G, R, NIR) variant of the same pixels,
a nodata variant; localization outputs are re-opened with rasterio.
"""
from __future__ import annotations

import io
import json
import math
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from PIL import Image
from rasterio.crs import CRS
from rasterio.enums import ColorInterp, Resampling
from rasterio.transform import from_origin
from rasterio.warp import transform as warp

from rsviewer.errors import ImageError, RsviewerError
from rsviewer.localize import localize, open_scene
from rsviewer.raster import GeorefError, build_overviews, open_raster
from rsviewer.raster.georef import compose

REPO = Path(__file__).resolve().parents[1]
SCENE0 = REPO / "assets" / "scenes" / "scene0.jpg"
EPSG = 32633
ORIGIN = (500000.0, 5000000.0)
RES = 0.3
# crops of scene0 (x0, y0, size) and targets inside them, from assets/scenes/anno.json
HARBOR = "Lots of boats docked in lines at the harbor and only a few positions are free"
AIRPLANE = "There are three airplanes stopped at the airport"
CROP_A = (512, 0, 1024)  # harbor at scene0 x 768–1024, y 0–768
CROP_B = (1024, 1024, 1024)  # airplanes at scene0 x 1024–1792, y 1536–2048
WIN = (256,)


def _pixels(crop) -> np.ndarray:
    x, y, s = crop
    return np.asarray(Image.open(SCENE0).convert("RGB"))[y:y + s, x:x + s]


def _transform(crop):
    # the crop keeps its place on the map: scene0's origin plus the crop offset
    return from_origin(ORIGIN[0] + crop[0] * RES, ORIGIN[1] - crop[1] * RES, RES, RES)


def write_geotiff(path, arr: np.ndarray, crop, overviews=False, nodata=None, crs=CRS.from_epsg(EPSG),
                  colorinterp=None) -> Path:
    """(h, w, bands) → tiled GeoTIFF (256 px blocks)."""
    h, w, nb = arr.shape
    prof = dict(driver="GTiff", width=w, height=h, count=nb, dtype=arr.dtype.name, crs=crs,
                transform=_transform(crop), tiled=True, blockxsize=256, blockysize=256, compress="deflate")
    if nb == 3 and arr.dtype == np.uint8:
        prof["photometric"] = "RGB"
    if nodata is not None:
        prof["nodata"] = nodata
    with rasterio.open(path, "w", **prof) as d:
        d.write(arr.transpose(2, 0, 1))
        if colorinterp:
            d.colorinterp = colorinterp
        if overviews:
            d.build_overviews([2, 4], Resampling.average)
    return Path(path)


def as_uint16_bgrn(arr8: np.ndarray) -> np.ndarray:
    """The same pixels as a 12-bit-style 4-band product: B, G, R, NIR in uint16."""
    rng = np.random.default_rng(0)
    v = arr8.astype(np.float64) * 13.0 + 900.0 + rng.normal(0, 4, arr8.shape)
    nir = arr8[..., 1].astype(np.float64) * 9 + 1500
    out = np.stack([v[..., 2], v[..., 1], v[..., 0], nir], -1)
    return np.clip(np.rint(out), 0, 65535).astype(np.uint16)


@pytest.fixture(scope="module")
def geo(tmp_path_factory):
    d = tmp_path_factory.mktemp("geo")
    a = _pixels(CROP_A)
    out = {
        "a8": write_geotiff(d / "a8.tif", a, CROP_A),
        "a8_ovr": write_geotiff(d / "a8_ovr.tif", a, CROP_A, overviews=True),
        "a16": write_geotiff(d / "a16.tif", as_uint16_bgrn(a), CROP_A, overviews=True,
                             colorinterp=[ColorInterp.blue, ColorInterp.green, ColorInterp.red,
                                          ColorInterp.undefined]),
        "b8": write_geotiff(d / "b8.tif", _pixels(CROP_B), CROP_B, overviews=True),
        "dir": d,
        "arr_a": a,
    }
    return out


@pytest.fixture(scope="module")
def default_model():
    from rsviewer.checkpoint import load_model

    return load_model("default")


@pytest.fixture(scope="module")
def harbor(geo, default_model):
    return localize(default_model, geo["a8_ovr"], HARBOR, window_sizes=WIN, cache=False)


# ---- reader ----------------------------------------------------------------------------------
def test_geotiff_reads_blocks_exactly_with_and_without_overviews(geo):
    a = geo["arr_a"]
    with open_raster(geo["a8"]) as r, open_raster(geo["a8_ovr"]) as ro:
        assert r.backend == "rasterio" and r.size == (1024, 1024) and r.overviews == []
        assert ro.overviews == [2, 4]
        assert r.crs.to_epsg() == EPSG and r.transform == _transform(CROP_A)
        for sc in (r, ro):  # full-resolution windows are the file's pixels, exactly
            np.testing.assert_array_equal(sc.read_region(100, 37, 300, 260), a[37:297, 100:400])
            edge = sc.read_region(900, -20, 200, 100)  # outside reads black
            assert edge.shape == (100, 200, 3) and (edge[:20] == 0).all() and (edge[20:, 124:] == 0).all()
            np.testing.assert_array_equal(edge[20:, :124], a[0:80, 900:1024])
        t, to = r.thumbnail(256), ro.thumbnail(256)  # the second from the 1/4 overview
        assert t.size == to.size == (256, 256)
        assert np.abs(np.asarray(t, int) - np.asarray(to, int)).mean() < 4
        assert r.georef.pixel_to_map(0, 0) == (ORIGIN[0] + CROP_A[0] * RES, ORIGIN[1])
        lon, lat = r.georef.lonlat_or_none(512, 512)
        assert 14.9 < lon < 15.1 and 45.1 < lat < 45.2  # UTM 33N, central meridian 15°E


def test_uint16_four_band_colour_interpretation_and_stored_stretch(geo):
    with open_raster(geo["a16"]) as r:
        assert r.count == 4 and r.dtype == "uint16"
        assert r.bands == (3, 2, 1)  # R, G, B by colour interpretation, NIR left out
        st = r.ensure_stretch()
        assert st["method"] == "percentile 2-98" and st["from"] == "overview 1/2" and len(st["lo"]) == 3
        got = r.read_region(0, 0, 1024, 1024).astype(np.float64)
        # a linear map of the 8-bit pixels (up to the clipping of the 2 % tails)
        ref = geo["arr_a"].astype(np.float64)
        for c in range(3):
            assert np.corrcoef(got[..., c].ravel(), ref[..., c].ravel())[0, 1] > 0.97
    with open_raster(geo["a16"], bands=(4,)) as nir:  # an explicit band choice
        assert nir.bands == (4, 4, 4)
    with open_raster(geo["a16"], stretch=st) as again:  # the stored stretch reproduces the pixels
        np.testing.assert_array_equal(again.read_region(10, 20, 64, 64), got[20:84, 10:74].astype(np.uint8))


def test_uint16_variant_ranks_windows_like_the_8bit_original(geo, default_model):
    from scipy.stats import spearmanr

    from rsviewer.localize import query_vector, sliding_windows
    from rsviewer.localize.encode import encode_windows

    q, _ = query_vector(default_model, [HARBOR])
    scores = []
    for key in ("a8", "a16"):
        with open_raster(geo[key]) as r:
            boxes = sliding_windows(r.size, WIN)
            emb, _, _ = encode_windows(default_model, r, boxes, mode="fast")
            scores.append(emb @ q.numpy())
    rho = spearmanr(scores[0], scores[1]).statistic
    assert rho >= 0.95, rho


# ---- georeferenced outputs ----------------------------------------------------------------------
def test_cog_keeps_the_scene_crs_and_transform(harbor, geo, tmp_path):
    assert harbor.georef.crs.to_epsg() == EPSG
    for dtype in ("uint8", "float32"):
        p = harbor.write_cog(tmp_path / f"p_{dtype}.tif", dtype=dtype, model="default")
        with rasterio.open(p) as d:
            assert d.crs.to_epsg() == EPSG
            assert d.transform == compose(_transform(CROP_A), Affine.scale(harbor.cell))
            assert (d.transform.c, d.transform.f) == (ORIGIN[0] + CROP_A[0] * RES, ORIGIN[1])
            assert d.dtypes[0] == dtype and d.overviews(1)  # a COG, with overviews
            assert d.tags()["RSVIEWER_QUERY"] == HARBOR
            v = d.read(1)
            want = harbor.prob if dtype == "float32" else np.rint(harbor.prob * 255)
            np.testing.assert_allclose(v, want, atol=1e-6)
            assert d.profile.get("tiled") and d.driver == "GTiff"
        with rasterio.open(p) as d:
            b = d.bounds
            assert b.left == ORIGIN[0] + CROP_A[0] * RES and b.top == ORIGIN[1]
            assert b.right >= ORIGIN[0] + (CROP_A[0] + 1024) * RES - 1e-6


def _utm(lon, lat):
    x, y = warp("EPSG:4326", f"EPSG:{EPSG}", [lon], [lat])
    return x[0], y[0]


def test_geojson_region_lies_on_the_harbor(harbor, tmp_path):
    # the harbor of anno.json, in map coordinates (scene0 px 768–1024 × 0–768)
    tx0, tx1 = ORIGIN[0] + 768 * RES, ORIGIN[0] + 1024 * RES
    ty0, ty1 = ORIGIN[1] - 768 * RES, ORIGIN[1]
    win_m = WIN[0] * RES
    p = harbor.write_geojson(tmp_path / "r.geojson", threshold=0.5, top=3, model="default")
    fc = json.loads(p.read_text())
    assert fc["type"] == "FeatureCollection" and "crs" not in fc  # RFC 7946: lon/lat, no crs member
    top = fc["features"][0]
    props = top["properties"]
    assert props["query"] == HARBOR and props["model"] == "default" and props["score_max"] >= 0.5
    assert props["area_m2"] == pytest.approx(props["area_px"] * RES * RES)
    px, py = _utm(*props["peak_lonlat"])
    assert tx0 - win_m <= px <= tx1 + win_m and ty0 - win_m <= py <= ty1 + win_m, (px, py)
    ring = top["geometry"]["coordinates"][0] if top["geometry"]["type"] == "Polygon" \
        else top["geometry"]["coordinates"][0][0]
    xs, ys = zip(*(_utm(lon, lat) for lon, lat in ring))
    # the region overlaps the target box
    assert min(xs) < tx1 and max(xs) > tx0 and min(ys) < ty1 and max(ys) > ty0
    # in the scene's CRS on request: the same outline in metres, with a crs member
    fs = json.loads(harbor.write_geojson(tmp_path / "s.geojson", crs="scene").read_text())
    assert fs["crs"]["properties"]["name"].endswith(str(EPSG))
    ring_s = fs["features"][0]["geometry"]["coordinates"]
    ring_s = ring_s[0] if fs["features"][0]["geometry"]["type"] == "Polygon" else ring_s[0][0]
    assert abs(min(x for x, _ in ring_s) - min(xs)) < 0.05


def test_nodata_windows_are_skipped_and_score_nothing(geo, default_model):
    a = geo["arr_a"].copy()
    a[:, :512] = 0  # the left half is nodata
    p = write_geotiff(geo["dir"] / "nodata.tif", a, CROP_A, nodata=0)
    res = localize(default_model, p, HARBOR, window_sizes=WIN, cache=False)
    assert res.info["skipped_nodata_windows"] > 0
    gw = res.prob.shape[1]
    assert (res.prob[:, : gw // 2 - 4] == 0).all()  # nothing scored in the nodata half
    assert res.prob[:, gw // 2 + 4:].max() == pytest.approx(1.0)


# ---- tile index ---------------------------------------------------------------------------------
def test_tile_index_of_two_scenes_finds_the_airplanes(geo, default_model, tmp_path):
    from rsviewer.cli.main import main
    from rsviewer.localize.tiles import build_tile_index
    from rsviewer.retrieval.index import load_index
    from rsviewer.retrieval.search import search_text

    idx = build_tile_index(default_model, [geo["a8_ovr"], geo["b8"]], tmp_path / "tiles", tile=256, overlap=0.5)
    assert idx.meta["kind"] == "tiles" and len(idx) == 2 * 49
    idx = load_index(tmp_path / "tiles")
    hits = search_text(default_model, idx, AIRPLANE, 3).hits
    # the airplanes of anno.json: scene0 px 1024–1792 × 1536–2048 → map bounds
    tgt = (ORIGIN[0] + 1024 * RES, ORIGIN[1] - 2048 * RES, ORIGIN[0] + 1792 * RES, ORIGIN[1] - 1536 * RES)
    t = idx.items[hits[0].row]["tile"]
    assert Path(hits[0].path).name == "b8.tif"
    b = t["bounds"]
    cx, cy = (b[0] + b[2]) / 2, (b[1] + b[3]) / 2
    assert tgt[0] <= cx <= tgt[2] and tgt[1] <= cy <= tgt[3], (b, tgt)
    assert t["crs_label"] == f"EPSG:{EPSG}" and len(t["lonlat_bounds"]) == 4
    from rsviewer.project import project_index  # the embedding map works on a tile index (sampled)

    proj = project_index(idx, method="pca", max_points=60, cache=False)
    assert proj.xy.shape == (60, 2) and proj.n_total == 98
    # the CLI prints the tile and writes its footprint as GeoJSON
    import rsviewer.checkpoint as ck

    gj = tmp_path / "hits.geojson"
    buf = io.StringIO()
    orig = ck.load_model
    try:
        ck.load_model = lambda *a, **k: default_model
        with redirect_stdout(buf):
            rc = main(["search", "--index", str(tmp_path / "tiles"), "--text", AIRPLANE, "-k", "2",
                       "--geojson", str(gj)])
    finally:
        ck.load_model = orig
    assert rc == 0
    out = buf.getvalue()
    assert "b8.tif" in out and f"EPSG:{EPSG}" in out and "lon/lat" in out
    fc = json.loads(gj.read_text())
    assert len(fc["features"]) == 2 and fc["features"][0]["properties"]["box_px"] == t["box"]


# ---- bad input: one line ------------------------------------------------------------------------
def test_bad_rasters_give_one_line(geo, default_model, tmp_path):
    good = geo["a8"].read_bytes()
    (tmp_path / "trunc.tif").write_bytes(good[: len(good) * 2 // 3])
    (tmp_path / "corrupt.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 40)
    errors = []
    for name in ("trunc.tif", "corrupt.tif"):
        with pytest.raises(ImageError) as e:
            open_raster(tmp_path / name)
        errors.append(str(e.value))
    # two bands without an alpha band: say which to show
    two = write_geotiff(tmp_path / "two.tif", geo["arr_a"][..., :2], CROP_A)
    with pytest.raises(ImageError, match="--bands") as e:
        open_raster(two)
    errors.append(str(e.value))
    with open_raster(two, bands=(1,)) as r:
        assert r.read_region(0, 0, 8, 8).shape == (8, 8, 3)
    # one band: shown as grey
    one = write_geotiff(tmp_path / "one.tif", geo["arr_a"][..., 1:2], CROP_A)
    with open_raster(one) as r:
        px = r.read_region(0, 0, 16, 16)
        assert (px[..., 0] == px[..., 2]).all() and "grey" in r.notes[0]
    # all nodata
    nod = write_geotiff(tmp_path / "nod.tif", np.zeros((512, 512, 3), np.uint8), CROP_A, nodata=0)
    with pytest.raises(ImageError, match="no valid pixels") as e:
        localize(default_model, nod, "x")
    errors.append(str(e.value))
    # an absurd declared size (a VRT header)
    vrt = tmp_path / "huge.vrt"
    vrt.write_text(f'<VRTDataset rasterXSize="2000000" rasterYSize="2000000"><VRTRasterBand dataType="Byte" band="1">'
                   f'<SimpleSource><SourceFilename relativeToVRT="0">{geo["a8"]}</SourceFilename><SourceBand>1'
                   f'</SourceBand></SimpleSource></VRTRasterBand></VRTDataset>')
    with pytest.raises(ImageError, match="plausible") as e:
        open_raster(vrt)
    errors.append(str(e.value))
    # a CRS with no way to WGS 84
    local = CRS.from_wkt('LOCAL_CS["site grid",LOCAL_DATUM["site",0],UNIT["metre",1],AXIS["X",EAST],AXIS["Y",NORTH]]')
    loc = write_geotiff(tmp_path / "local.tif", geo["arr_a"][:256, :256], CROP_A, crs=local)
    with open_raster(loc) as r:
        with pytest.raises(GeorefError, match="WGS 84") as e:
            r.georef.check_wgs84()
        assert "{" not in str(e.value)  # PROJ's message embeds the CRS as PROJJSON: cut off
        errors.append(str(e.value))
    for msg in errors:
        assert "\n" not in msg and len(msg) < 400, msg


def test_cli_index_scenes_bad_input_one_line(geo, default_model, tmp_path, monkeypatch, capsys):
    # an all-nodata scene among good ones, a truncated one, bad tile settings: exit 2 and one
    # line each, before any tile is encoded; nothing written
    import rsviewer.cli.index as cli_index
    from rsviewer.cli.main import main

    monkeypatch.setattr(cli_index, "load", lambda args: default_model)
    nod = write_geotiff(tmp_path / "nod.tif", np.zeros((512, 512, 3), np.uint8), CROP_A, nodata=0)
    good = geo["a8"].read_bytes()
    (tmp_path / "trunc.tif").write_bytes(good[: len(good) * 2 // 3])
    out = tmp_path / "idx"
    cases = [(["--scenes", str(nod), "--scenes", str(geo["b8"])], "no valid pixels"),
             (["--scenes", str(tmp_path / "trunc.tif")], "truncated"),
             (["--scenes", str(geo["b8"]), "--tile", "8"], "--tile"),
             (["--scenes", str(geo["b8"]), "--overlap", "1.5"], "--overlap")]
    for extra, what in cases:
        assert main(["index", *extra, "--out", str(out), "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and what in err[0], err
    assert not out.exists()


def test_cli_writes_cog_and_geojson_and_checks_outputs_first(geo, default_model, tmp_path, monkeypatch, capsys):
    import rsviewer.cli.localize as cli_loc
    from rsviewer.cli.main import main

    monkeypatch.setenv("RSVIEWER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli_loc, "load", lambda args: default_model)
    cog, gj, png = tmp_path / "heat.tif", tmp_path / "regions.geojson", tmp_path / "ov.png"
    base = ["localize", "--scene", str(geo["a8_ovr"]), "--text", HARBOR, "--windows", "256", "--quiet"]
    assert main(base + ["--out", str(cog), "--out", str(gj), "--out", str(png)]) == 0
    text = capsys.readouterr().out
    assert f"EPSG:{EPSG}" in text and "lon" in text and str(cog) in text
    with rasterio.open(cog) as d:
        assert d.crs.to_epsg() == EPSG
    assert json.loads(gj.read_text())["features"] and Image.open(png).size == (1024, 1024)

    def no_model(args):
        raise AssertionError("the model must not load before the outputs are checked")

    monkeypatch.setattr(cli_loc, "load", no_model)
    bad = [["--out", str(tmp_path / "missing" / "heat.tif")]]
    # a scene without a CRS: GeoJSON refused in one line
    plain = tmp_path / "plain.png"
    Image.fromarray(geo["arr_a"][:256, :256]).save(plain)
    cases = bad + [["--scene", str(plain), "--out", str(tmp_path / "x.geojson")]]
    for extra in cases:
        args = list(base)
        if extra[0] == "--scene":
            args[2] = extra[1]
            extra = extra[2:]
        assert main(args + extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), err
    assert not (tmp_path / "missing").exists() and not (tmp_path / "x.geojson").exists()


def test_sidecar_overviews_build_once_and_cancel_leaves_nothing(geo, tmp_path):
    from rsviewer.errors import Cancelled

    src = write_geotiff(tmp_path / "big.tif", geo["arr_a"], CROP_A)

    class Stop:
        n = 0

        def is_set(self):
            self.n += 1
            return self.n > 2

    with open_raster(src) as r:
        with pytest.raises(Cancelled):
            build_overviews(r, cancel=Stop(), rows=128)
        assert not list(tmp_path.glob("*.ovr*")) and r.overviews == []
        ticks = []
        ovr = build_overviews(r, progress=lambda d, t, m: ticks.append(d), rows=256)
        assert ovr.name == "big.tif.ovr" and r.overviews == [2, 4]
        with pytest.raises(ImageError, match="already has overviews"):
            build_overviews(r)
    with rasterio.open(src) as d:  # GDAL itself picks the sidecar up
        assert d.overviews(1) == [2, 4]
