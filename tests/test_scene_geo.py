"""The Scene view on a georeferenced raster: sidecar overviews built on open, cursor
coordinates, localization regions and GeoJSON drawn in place, COG/GeoJSON save, a tile
hit centred. Real widgets, driven with pytest-qt."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio

from test_raster import CROP_A, EPSG, HARBOR, _pixels, write_geotiff

WAIT = 240_000


@pytest.fixture
def scene_widget(qtbot, monkeypatch):
    import rsviewer.gui.scene_view as sv
    from rsviewer.gui.app import make_app
    from rsviewer.gui.workers import JobManager

    make_app()
    monkeypatch.setattr(sv, "OVERVIEW_MIN_SIDE", 512)  # a small file stands in for a 30k one
    jobs = JobManager()
    w = sv.SceneWidget(jobs)
    qtbot.addWidget(w)
    w.resize(1100, 800)
    w.show()
    return w


def test_scene_view_georeferenced(scene_widget, qtbot, tmp_path):
    from rsviewer.checkpoint import load_model

    w = scene_widget
    path = write_geotiff(tmp_path / "a.tif", _pixels(CROP_A), CROP_A)  # no overviews
    w.open_scene(path)
    qtbot.waitUntil(lambda: w.item is not None or "Could not" in w.info.text(), timeout=WAIT)
    assert w.item is not None, w.info.text()
    assert (tmp_path / "a.tif.ovr").exists() and w.scene_obj.overviews == [2, 4]  # built once on open
    assert "EPSG:32633" in w.info.text() and "a.tif.ovr" in w.info.text()
    txt = w.coords_text(512, 256)
    assert txt.startswith("pixel 512, 256") and f"EPSG:{EPSG}" in txt and "lon 15.0" in txt
    with rasterio.open(path) as d:
        mx, my = d.transform * (512, 256)
    assert f"{mx:,.2f}" in txt and f"{my:,.2f}" in txt
    w.view.zoom(4.0)  # tiles refine on zoom, from the overview or full resolution
    qtbot.waitUntil(lambda: bool(w.item.tiles), timeout=WAIT)

    w.session.model = load_model("default")  # a standalone tab: its own session
    w.query.setText(HARBOR)
    w.windows.setCurrentText("256 px")
    w.run_localize()
    qtbot.waitUntil(lambda: w.result is not None or "failed" in w.info.text(), timeout=WAIT)
    assert w.result is not None, w.info.text()
    assert w.region_items and "region" in w.info.text()
    assert "score" in w.coords_text(300, 300)
    cog = w.save_overlay(tmp_path / "heat.tif")
    gj = w.save_overlay(tmp_path / "regions.geojson")
    with rasterio.open(cog) as d:
        assert d.crs.to_epsg() == EPSG
    feats = json.loads(Path(gj).read_text())["features"]
    # the saved GeoJSON (lon/lat) comes back onto the same pixels
    n = w.load_geojson(gj)
    assert n == len(feats) and len(w.region_items) >= n
    ring = w.region_items[0].polygon()
    r0 = w.result.regions()[0]["bbox_px"]
    br = ring.boundingRect()
    assert abs(br.left() - r0[0]) < 1.0 and abs(br.top() - r0[1]) < 1.0
    w.grab().save(str(tmp_path / "scene_view.png"))
    import os

    if os.environ.get("RSVIEWER_SHOT_DIR"):  # for looking at it
        w.grab().save(str(Path(os.environ["RSVIEWER_SHOT_DIR"]) / "scene_view_geo.png"))
    # a tile-index hit: centred on its box
    w.open_scene(path, box=(256, 0, 256, 256))
    from PySide6.QtCore import QRectF

    seen = w.view.mapToScene(w.view.viewport().rect()).boundingRect()
    assert seen.contains(QRectF(256, 0, 256, 256)) and seen.height() < 1000  # zoomed in, the hit in view
    assert w.region_items[0].toolTip() == "hit"


def test_tile_index_gallery_shows_tiles_and_double_click_opens_the_scene(qtbot, tmp_path, monkeypatch):
    """A tile index opened as the app's gallery: hits show their tile (a window of the scene,
    not the scene) and its coordinates; a double-click opens the Scene view centred on the hit."""
    from PySide6.QtCore import Qt

    from rsviewer.checkpoint import load_model
    from rsviewer.gui.app import make_app
    from rsviewer.gui.main_window import MainWindow
    from rsviewer.gui.util import thumb_key, thumbs
    from rsviewer.localize.tiles import build_tile_index
    from test_raster import AIRPLANE, CROP_B

    monkeypatch.setenv("RSVIEWER_CONFIG_DIR", str(tmp_path / "config"))
    scenes = tmp_path / "scenes"
    scenes.mkdir()
    write_geotiff(scenes / "a.tif", _pixels(CROP_A), CROP_A)
    write_geotiff(scenes / "b.tif", _pixels(CROP_B), CROP_B, overviews=True)
    build_tile_index(load_model("default"), [scenes], tmp_path / "tiles", tile=256, overlap=0.5)

    make_app()
    win = MainWindow(model="default", gallery=str(tmp_path / "tiles"))
    qtbot.addWidget(win)
    win.resize(1400, 900)
    win.show()
    qtbot.waitUntil(lambda: win.index is not None or bool(win.last_error), timeout=WAIT)
    assert win.index is not None, win.last_error
    win.run_text(AIRPLANE)
    qtbot.waitUntil(lambda: win.last_result is not None or bool(win.last_error), timeout=WAIT)
    hits = win.results.hits()
    assert hits and all(h.tile for h in hits)
    top = hits[0]
    assert top.path.endswith("b.tif")
    key = thumb_key(top)
    qtbot.waitUntil(lambda: key in thumbs().pixmaps or key in thumbs().failed, timeout=WAIT)
    assert key not in thumbs().failed, thumbs().failed.get(key)
    pm = thumbs().pixmaps[key]
    assert max(pm.width(), pm.height()) <= thumbs().size and pm.width() > 0  # the tile, at thumbnail size
    tip = win.results.model.data(win.results.model.index(0), Qt.ToolTipRole)
    assert "px " in tip and "°N" in tip and "Scene view" in tip
    win.results.grab().save(str(tmp_path / "tiles.png"))

    ix = win.results.model.index(0)
    win.results.view.scrollTo(ix)
    pos = win.results.view.visualRect(ix).center()
    qtbot.mouseClick(win.results.view.viewport(), Qt.LeftButton, pos=pos)
    qtbot.mouseDClick(win.results.view.viewport(), Qt.LeftButton, pos=pos)
    sv = win.scene
    assert win.tabs.currentWidget() is sv
    qtbot.waitUntil(lambda: sv.item is not None or "Could not" in sv.info.text(), timeout=WAIT)
    assert sv.scene_path is not None and sv.scene_path.resolve() == Path(top.path).resolve()
    x, y, w, h = top.tile["box"]
    qtbot.waitUntil(lambda: bool(sv.region_items), timeout=WAIT)
    c = sv.view.mapToScene(sv.view.viewport().rect().center())
    assert x <= c.x() <= x + w and y <= c.y() <= y + h, (c, top.tile["box"])
    # the dock shows the tile itself, not the whole scene
    qtbot.waitUntil(lambda: win.details.image_rgb is not None, timeout=WAIT)
    assert win.details.image_rgb.shape[0] <= max(w, h)
    win.grab().save(str(tmp_path / "scene.png"))

    # the embedding map of the tile index: its image points are tiles; the hover card shows the
    # tile (not the scene) and a click opens the Scene view at that tile
    from rsviewer.gui.util import item_thumb_key

    win.tabs.setCurrentWidget(win.map)
    win.map.compute("pca")
    qtbot.waitUntil(lambda: win.map.proj is not None or not win.jobs.busy("map"), timeout=WAIT)
    proj = win.map.proj
    assert proj is not None
    i = next(j for j in range(len(proj.row)) if int(proj.kind[j]) == 0)
    item = win.index.items[int(proj.row[i])]
    assert item["tile"] and "#tile=" in item_thumb_key(item)
    win.map._fill_card(i)
    assert "open the scene here" in win.map.card.text.text()
    win.map.activate_point(i)
    assert win.tabs.currentWidget() is sv
    qtbot.waitUntil(lambda: sv.scene_path is not None and sv.scene_path.resolve() == Path(item["path"]).resolve(),
                    timeout=WAIT)
    win.jobs.cancel()
    win.jobs.wait_all(10_000)
