"""The scene tab: a large scene with tiled pan/zoom, localization heatmap, GT polygons.

Tiles come from the raster layer (``rsviewer.localize.open_scene`` = ``rsviewer.raster.
open_raster``): the thumbnail is read from the file's overviews at once (a 30,000 px
GeoTIFF without overviews gets a sidecar ``.ovr`` built once, with progress and cancel,
when it is opened), and tiles at the level of detail the view needs are read on a
background pool from the matching overview, so panning never blocks the GUI thread.
The cursor shows pixel, map and lon/lat coordinates; the heatmap and the result's
regions (or any GeoJSON opened here, lon/lat or in the scene's CRS) are drawn in place;
Save writes the overlay (.png/.jpg), the map as a COG (.tif) or the regions (.geojson).
Until the localize engine is importable a small Pillow reader stands in.
"""
from __future__ import annotations

import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from PySide6.QtCore import QObject, QPointF, QRectF, QRunnable, Qt, QThreadPool, Signal
from PySide6.QtGui import QColor, QImage, QPainter, QPen, QPixmap, QPolygonF, QTransform
from PySide6.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QGraphicsItem, QGraphicsPixmapItem,
                               QGraphicsPolygonItem, QGraphicsScene, QGraphicsView, QHBoxLayout, QLabel, QLineEdit,
                               QPushButton, QSlider, QVBoxLayout, QWidget)

from ..data import load_image
from .state import Localization
from .util import colorize, rgb_to_qimage

TILE = 512
THUMB_SIDE = 2048
OVERVIEW_MIN_SIDE = 8192  # a GeoTIFF larger than this without overviews gets a sidecar .ovr on open
WINDOW_PRESETS = {"256, 512, 768 px (SeLo)": (256, 512, 768), "128, 256 px": (128, 256), "256 px": (256,),
                  "512, 1024 px": (512, 1024)}


def localize_module():
    """``(rsviewer.localize, "")`` or ``(None, reason)`` when it is genuinely missing;
    an engine that fails to import is reported as failing (and logged), not as missing."""
    from .details import engine_module

    return engine_module("rsviewer.localize", ("open_scene", "localize"), "localize")


class PillowScene:
    """Fallback reader with the ``Scene`` interface (whole image decoded once)."""

    def __init__(self, path):
        self.path = Path(path)
        self._im = load_image(self.path)
        self.size = self._im.size

    def read_region(self, x, y, w, h, out_size=None) -> np.ndarray:
        x0, y0 = max(0, int(x)), max(0, int(y))
        x1, y1 = min(self.size[0], int(x + w)), min(self.size[1], int(y + h))
        crop = self._im.crop((x0, y0, max(x0 + 1, x1), max(y0 + 1, y1)))
        if out_size is not None:
            crop = crop.resize((max(1, int(out_size[0])), max(1, int(out_size[1]))), Image.BILINEAR)
        return np.asarray(crop)

    def thumbnail(self, max_side: int = 2048) -> Image.Image:
        im = self._im.copy()
        im.thumbnail((max_side, max_side), Image.BILINEAR)
        return im


def open_scene_any(path):
    mod, _ = localize_module()
    if mod is not None:
        return mod.open_scene(path)
    return PillowScene(path)


class _TileSignals(QObject):
    ready = Signal(object, QImage)


class _TileJob(QRunnable):
    def __init__(self, scene, key, rect, out, signals, gen):
        super().__init__()
        self.scene, self.key, self.rect, self.out, self.signals, self.gen = scene, key, rect, out, signals, gen

    def run(self) -> None:
        from .workers import background_priority

        background_priority()
        try:
            x, y, w, h = self.rect
            arr = self.scene.read_region(x, y, w, h, out_size=self.out)
            self.signals.ready.emit((self.gen, self.key), rgb_to_qimage(arr))
        except Exception:  # noqa: BLE001 - a tile that fails stays at thumbnail quality
            self.signals.ready.emit((self.gen, self.key), QImage())


class TiledSceneItem(QGraphicsItem):
    """Draws the thumbnail, then full-detail tiles for the visible area at the view's zoom."""

    def __init__(self, scene, thumb: QPixmap, pool: QThreadPool, signals: _TileSignals, gen: int):
        super().__init__()
        self.scene_obj = scene
        self.W, self.H = scene.size
        self.thumb = thumb
        self.pool = pool
        self.gen = gen
        self.tiles: OrderedDict = OrderedDict()
        self.pending: set = set()
        self.limit = 256
        self._sig = signals
        self.setFlag(QGraphicsItem.ItemUsesExtendedStyleOption, True)

    def boundingRect(self) -> QRectF:  # noqa: N802
        return QRectF(0, 0, self.W, self.H)

    def paint(self, p: QPainter, option, widget=None) -> None:
        exposed = option.exposedRect.intersected(self.boundingRect())
        p.setRenderHint(QPainter.SmoothPixmapTransform, True)
        sx = self.thumb.width() / self.W
        src = QRectF(exposed.x() * sx, exposed.y() * sx, exposed.width() * sx, exposed.height() * sx)
        p.drawPixmap(exposed, self.thumb, src)
        lod = QStyleOptionGraphicsItem_lod(option, p)
        if lod <= sx * 1.05:
            return  # the thumbnail is already sharper than the screen
        f = 2 ** max(0, math.floor(math.log2(max(1e-9, 1.0 / lod))))  # scene px per tile px
        span = TILE * f
        tx0, ty0 = int(exposed.left() // span), int(exposed.top() // span)
        tx1, ty1 = int(exposed.right() // span), int(exposed.bottom() // span)
        for ty in range(ty0, ty1 + 1):
            for tx in range(tx0, tx1 + 1):
                key = (f, tx, ty)
                x, y = tx * span, ty * span
                w, h = min(span, self.W - x), min(span, self.H - y)
                if w <= 0 or h <= 0:
                    continue
                pm = self.tiles.get(key)
                if pm is None:
                    self._request(key, (x, y, w, h), (max(1, math.ceil(w / f)), max(1, math.ceil(h / f))))
                    continue
                self.tiles.move_to_end(key)
                if not pm.isNull():
                    p.drawPixmap(QRectF(x, y, w, h), pm, QRectF(0, 0, pm.width(), pm.height()))

    def _request(self, key, rect, out) -> None:
        if key in self.pending:
            return
        self.pending.add(key)
        self.pool.start(_TileJob(self.scene_obj, key, rect, out, self._sig, self.gen))

    def tile_ready(self, key, img: QImage) -> None:
        self.pending.discard(key)
        self.tiles[key] = QPixmap.fromImage(img)
        while len(self.tiles) > self.limit:
            self.tiles.popitem(last=False)
        f, tx, ty = key
        span = TILE * f
        self.update(QRectF(tx * span, ty * span, span, span))

    def loading(self) -> int:
        return len(self.pending)


def QStyleOptionGraphicsItem_lod(option, painter) -> float:  # noqa: N802
    return option.levelOfDetailFromTransform(painter.worldTransform())


class SceneGraphicsView(QGraphicsView):
    hovered = Signal(float, float)  # scene pixel under the cursor

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setMouseTracking(True)
        self.setDragMode(QGraphicsView.ScrollHandDrag)
        self.setTransformationAnchor(QGraphicsView.AnchorUnderMouse)
        self.setResizeAnchor(QGraphicsView.AnchorViewCenter)
        self.setRenderHints(QPainter.SmoothPixmapTransform | QPainter.Antialiasing)
        self.setViewportUpdateMode(QGraphicsView.SmartViewportUpdate)
        self.setBackgroundBrush(QColor("#111827"))
        self.setAcceptDrops(False)
        self.viewport().setAcceptDrops(False)
        self.auto_fit = True  # keep the scene fitted until the user zooms

    def mouseMoveEvent(self, e):  # noqa: N802
        super().mouseMoveEvent(e)
        pt = self.mapToScene(e.position().toPoint())
        self.hovered.emit(pt.x(), pt.y())

    def center_on_box(self, x: float, y: float, w: float, h: float, margin: float = 3.0) -> None:
        """Zoom so that the box and ``margin``× its size around it fill the view, centred."""
        self.auto_fit = False
        cx, cy = x + w / 2, y + h / 2
        side = max(w, h) * margin
        self.fitInView(QRectF(cx - side / 2, cy - side / 2, side, side), Qt.KeepAspectRatio)
        self.centerOn(cx, cy)

    def wheelEvent(self, e):  # noqa: N802
        factor = 1.25 if e.angleDelta().y() > 0 else 0.8
        self.zoom(factor)

    def zoom(self, factor: float) -> None:
        s = self.transform().m11() * factor
        if 1e-3 < s < 16:
            self.auto_fit = False
            self.scale(factor, factor)

    def fit(self) -> None:
        self.auto_fit = True
        if self.scene() is not None and not self.scene().sceneRect().isEmpty():
            self.fitInView(self.scene().sceneRect(), Qt.KeepAspectRatio)

    def resizeEvent(self, e):  # noqa: N802
        super().resizeEvent(e)
        if self.auto_fit:
            self.fit()

    def showEvent(self, e):  # noqa: N802
        super().showEvent(e)
        if self.auto_fit:
            self.fit()


class SceneWidget(QWidget):
    """Renders the session's scene, annotations and localization, and sends it intents.

    The state (scene, annotations, localization and what it was computed for) lives in
    :class:`state.Session`; this widget keeps only what it draws: the thumbnail, the
    tiles and the graphics items. A localization is applied only if it still belongs to
    the open scene and the loaded model."""

    def __init__(self, jobs, session=None, parent=None):
        super().__init__(parent)
        from .state import Session

        self.jobs = jobs
        self.session = session if session is not None else Session()
        self.item: Optional[TiledSceneItem] = None
        self.thumb_rgb: Optional[np.ndarray] = None
        self.heat_item: Optional[QGraphicsPixmapItem] = None
        self.poly_items: list = []
        self.region_items: list = []
        self._regions_source = ""  # whose outlines region_items are: "result" (the localization's) or not
        self._note = ""  # what opening the scene did (built overviews), for its info line
        self._gen = 0
        self.pool = QThreadPool(self)
        self.pool.setMaxThreadCount(2)
        self.tile_signals = _TileSignals()
        self.tile_signals.ready.connect(self._tile_ready)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(8, 8, 8, 8)
        top = QHBoxLayout()
        self.open_button = QPushButton("Open scene…")
        self.open_button.clicked.connect(self._open_dialog)
        self.anno_button = QPushButton("Open anno.json…")
        self.anno_button.clicked.connect(self._anno_dialog)
        self.query = QLineEdit()
        self.query.setPlaceholderText("where is… e.g. a parking lot with many cars")
        self.query.setClearButtonEnabled(True)
        self.query.setAcceptDrops(False)
        self.query.returnPressed.connect(self.run_localize)
        self.windows = QComboBox()
        self.windows.addItems(list(WINDOW_PRESETS))
        self.windows.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.windows.setMinimumContentsLength(22)
        self.windows.setToolTip("Sliding-window sizes in scene pixels (two grids each)")
        self.loc_button = QPushButton("Localize")
        self.loc_button.setObjectName("primary")
        self.loc_button.clicked.connect(self.run_localize)
        top.addWidget(self.open_button)
        top.addWidget(self.anno_button)
        top.addWidget(self.query, 1)
        top.addWidget(self.loc_button)
        lay.addLayout(top)
        second = QHBoxLayout()
        self.anno_combo = QComboBox()
        self.anno_combo.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.anno_combo.setMinimumContentsLength(16)
        self.anno_combo.setToolTip("Annotated queries of this scene (ground-truth polygons)")
        self.anno_combo.activated.connect(self._anno_chosen)
        self.anno_combo.setVisible(False)
        self.overlay_check = QCheckBox("Overlay (O)")
        self.overlay_check.setChecked(True)
        self.overlay_check.toggled.connect(self._overlay_visible)
        self.opacity = QSlider(Qt.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(55)
        self.opacity.setFixedWidth(110)
        self.opacity.valueChanged.connect(lambda v: self.heat_item and self.heat_item.setOpacity(v / 100))
        self.fit_button = QPushButton("Fit")
        self.fit_button.clicked.connect(lambda: self.view.fit())
        self.regions_button = QPushButton("Open GeoJSON…")
        self.regions_button.setToolTip("Draw regions from a GeoJSON file (lon/lat or the scene's CRS) on the scene")
        self.regions_button.clicked.connect(self._geojson_dialog)
        self.save_button = QPushButton("Save…")
        self.save_button.setToolTip("Overlay (.png/.jpg), probability map as a COG in the scene's CRS (.tif), "
                                    "or the top regions as GeoJSON (.geojson)")
        self.save_button.clicked.connect(lambda: self.save_dialog())
        self.save_button.setEnabled(False)
        second.addWidget(self.anno_combo, 1)
        second.addWidget(QLabel("Windows"))
        second.addWidget(self.windows)
        lay.addLayout(second)
        third = QHBoxLayout()
        third.addWidget(self.overlay_check)
        third.addWidget(QLabel("Opacity"))
        third.addWidget(self.opacity)
        third.addStretch(1)
        third.addWidget(self.regions_button)
        third.addWidget(self.fit_button)
        third.addWidget(self.save_button)
        lay.addLayout(third)
        self.info = QLabel("Open a large scene (or drop one on this tab), type a sentence and press Localize.")
        self.info.setObjectName("hint")
        self.info.setWordWrap(True)
        self.info.setTextInteractionFlags(Qt.TextSelectableByMouse)
        lay.addWidget(self.info)
        self.gscene = QGraphicsScene(self)
        self.view = SceneGraphicsView()
        self.view.setScene(self.gscene)
        self.view.hovered.connect(self._hovered)
        lay.addWidget(self.view, 1)
        self.coords = QLabel("")
        self.coords.setObjectName("hint")
        self.coords.setTextInteractionFlags(Qt.TextSelectableByMouse)
        lay.addWidget(self.coords)
        self._pending_box = None
        ev = self.session.events
        ev.connect("model", self._model_changed)
        ev.connect("scene", lambda sc: self._render_scene())
        ev.connect("anno", self._fill_anno_combo)
        ev.connect("localization", self._render_localization)

    # ---- read-only views of the session
    @property
    def model(self):
        return self.session.model

    @property
    def scene_obj(self):
        return self.session.scene

    @property
    def scene_path(self) -> Optional[Path]:
        return self.session.scene_path

    @property
    def anno(self) -> list[dict]:
        return self.session.anno

    @property
    def localization(self):
        return self.session.localization

    @property
    def result(self):
        loc = self.session.localization
        return loc.result if loc is not None else None

    @property
    def metrics(self) -> Optional[dict]:
        loc = self.session.localization
        return loc.metrics if loc is not None else None

    @property
    def heat(self) -> Optional[np.ndarray]:
        loc = self.session.localization
        return loc.heat if loc is not None else None

    def clear_localization(self) -> None:
        self.session.clear_localization()

    def _model_changed(self) -> None:
        """A localization running for the old model is stopped (its map would be the old
        model's); one on screen from the old model is cleared by the session. Say so."""
        ses = self.session
        t = ses.jobs.get("localize")
        running = t is not None and t.key[0] != id(ses.model)
        if running:
            self.jobs.drop("localize")
            ses.end(t)
        loc = ses.localization
        if ses.scene is not None and (running or (loc is not None and loc.key[0] != id(ses.model))):
            name = getattr(ses.model, "name", "the new model")
            self.info.setText(f"The model is now {name}: press Localize to run the query with it.")

    def _tile_ready(self, gkey, img: QImage) -> None:
        gen, key = gkey
        if self.item is not None and gen == self._gen:
            self.item.tile_ready(key, img)

    # ---- opening
    def _open_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open scene", "", "Images (*.jpg *.jpeg *.png *.tif *.tiff "
                                                                     "*.bmp *.webp);;All files (*)")
        if path:
            self.open_scene(path)

    def open_scene(self, path, box=None) -> None:
        """Open a scene; ``box`` = (x, y, w, h) in scene pixels: centre the view on it
        (a tile-index hit)."""
        path = Path(path)
        if box is not None and self.scene_path is not None and path.resolve() == self.scene_path.resolve():
            self.show_box(box)  # already open: just move there
            return
        self.info.setText(f"opening {path.name}…")
        self._pending_box = box
        ses = self.session
        ticket = ses.begin("scene", (str(path),))

        def work(progress, cancel):
            progress(0, 2, "reading header")
            sc = open_scene_any(path)
            note = ""
            try:
                from ..raster import build_overviews, needs_overviews

                if needs_overviews(sc, OVERVIEW_MIN_SIDE) and os.access(path.parent, os.W_OK):
                    build_overviews(sc, progress=progress, cancel=cancel)
                    note = f"built {path.name}.ovr (overviews 1/{', 1/'.join(map(str, sc.overviews))})"
            except ImportError:
                pass
            progress(1, 2, "thumbnail")
            th = sc.thumbnail(THUMB_SIDE)
            progress(2, 2, "thumbnail")
            return sc, np.asarray(th.convert("RGB")), note

        def failed(msg):
            if ses.accepts(ticket, ticket.key):
                ses.end(ticket)
                self.info.setText(f"Could not open the scene {path.name}: {msg}")  # the open scene stays

        self.jobs.start(f"Open scene {path.name}", work, lambda out: self._opened(ticket, path, *out), failed,
                        slot="scene-open")

    def _opened(self, ticket, path: Path, sc, thumb_rgb: np.ndarray, note: str = "") -> None:
        ses = self.session
        if not ses.accepts(ticket, ticket.key):
            if hasattr(sc, "close"):
                sc.close()
            return
        ses.end(ticket)
        old = ses.scene
        if old is not None and old is not sc and hasattr(old, "close"):
            self.pool.waitForDone(2000)  # tiles still reading from the old scene
            old.close()
        t = ses.jobs.get("localize")
        if t is not None:  # a localization of the old scene: nobody wants it now
            self.jobs.drop("localize")
            ses.end(t)
        self.thumb_rgb, self._note = thumb_rgb, note
        ses.scene_opened(path, sc)  # → _render_scene, _render_localization(None)
        # an anno.json next to the scene (or one folder up) is picked up automatically
        if not ses.anno:
            for cand in (path.parent / "anno.json", path.parent.parent / "anno.json"):
                if cand.exists():
                    try:
                        self.load_anno(cand)
                    except Exception:  # noqa: BLE001 - a bad sidecar file is not the scene's problem
                        pass
                    break
        self._fill_anno_combo()

    def _render_scene(self) -> None:
        sc, path, note = self.session.scene, self.session.scene_path, self._note
        self._gen += 1
        self.gscene.clear()
        self.heat_item = None
        self.poly_items = []
        self.region_items = []
        self.item = TiledSceneItem(sc, QPixmap.fromImage(rgb_to_qimage(self.thumb_rgb)), self.pool,
                                   self.tile_signals, self._gen)
        self.gscene.addItem(self.item)
        self.gscene.setSceneRect(self.item.boundingRect())
        self.view.fit()
        self.save_button.setEnabled(False)
        W, H = sc.size
        reader = "" if localize_module()[0] is not None else " · Pillow reader (localize engine not available)"
        desc = sc.describe() if hasattr(sc, "describe") else f"{path.name}: {W:,} × {H:,} px"
        self.info.setText(f"{desc}{reader}{' · ' + note if note else ''}. Scroll to zoom, drag to pan.")
        if self._pending_box is not None:
            box, self._pending_box = self._pending_box, None
            self.show_box(box)

    def show_box(self, box) -> None:
        """Centre the view on ``box`` = (x, y, w, h) scene px and outline it."""
        x, y, w, h = (float(v) for v in box)
        self.view.center_on_box(x, y, w, h)
        self._draw_regions([[[[x, y], [x + w, y], [x + w, y + h], [x, y + h]]]], ["hit"])

    def coords_text(self, x: float, y: float) -> str:
        sc = self.scene_obj
        if sc is None:
            return ""
        W, H = sc.size
        if not (0 <= x < W and 0 <= y < H):
            return ""
        parts = [f"pixel {int(x):,}, {int(y):,}"]
        g = getattr(sc, "georef", None)
        if g is not None and g.has_crs:
            mx, my = g.pixel_to_map(x, y)
            parts.append(f"{g.crs_label()} {mx:,.2f}, {my:,.2f}")
            ll = g.lonlat_or_none(x, y)
            parts.append(f"lon {ll[0]:.6f}, lat {ll[1]:.6f}" if ll else "lon/lat: CRS not transformable")
        elif g is not None:
            parts.append("no CRS (pixel space)")
        if self.result is not None:
            gh, gw = self.result.prob.shape
            i, j = min(gh - 1, int(y // self.result.cell)), min(gw - 1, int(x // self.result.cell))
            parts.append(f"score {float(self.result.prob[i, j]):.2f}")
        return " · ".join(parts)

    def _hovered(self, x: float, y: float) -> None:
        self.coords.setText(self.coords_text(x, y))

    def _draw_regions(self, polys_px: list, labels: list, source: str = "user") -> None:
        """Outline regions given as lists of rings of scene-pixel (x, y); ``source`` says
        whose they are ("result": the localization's, cleared with it)."""
        for it in self.region_items:
            self.gscene.removeItem(it)
        self.region_items = []
        self._regions_source = source
        pen = QPen(QColor("#facc15"), 2, Qt.DashLine)
        pen.setCosmetic(True)
        for rings, label in zip(polys_px, labels):
            for ring in rings[:1]:  # the outer ring
                item = QGraphicsPolygonItem(QPolygonF([QPointF(float(a), float(b)) for a, b in ring]))
                item.setPen(pen)
                item.setZValue(6)
                item.setToolTip(str(label))
                self.gscene.addItem(item)
                self.region_items.append(item)

    def show_result_regions(self, threshold: float = 0.5, top: int = 5) -> int:
        if self.result is None or not hasattr(self.result, "regions"):
            return 0
        regs = self.result.regions(threshold, top)
        self._draw_regions([r["rings"][0] for r in regs if r["rings"]],
                           [f"#{r['rank']}: max {r['score_max']:.2f}, mean {r['score_mean']:.2f}" for r in regs],
                           source="result")
        return len(regs)

    def load_geojson(self, path) -> int:
        """Draw the polygons of a GeoJSON file over the scene (lon/lat per RFC 7946, or
        the scene's CRS when the file names it). Returns the number of features drawn."""
        from ..raster.georef import GeorefError

        sc = self.scene_obj
        if sc is None:
            raise GeorefError("open a scene first")
        fc = json.loads(Path(path).read_text())
        g = getattr(sc, "georef", None)
        if g is None or not g.has_crs:
            raise GeorefError(f"{sc.path.name} has no CRS: GeoJSON regions cannot be placed on it")
        named = (fc.get("crs") or {}).get("properties", {}).get("name")
        from rasterio.crs import CRS
        from rasterio.warp import transform as warp

        src = CRS.from_user_input(named.replace("urn:ogc:def:crs:", "").replace("::", ":")) if named else \
            CRS.from_epsg(4326)
        polys, labels = [], []
        for k, f in enumerate(fc.get("features", [])):
            geom = f.get("geometry") or {}
            parts = [geom.get("coordinates", [])] if geom.get("type") == "Polygon" else \
                geom.get("coordinates", []) if geom.get("type") == "MultiPolygon" else []
            for rings in parts:
                out = []
                for ring in rings:
                    xs, ys = warp(src, g.crs, [p[0] for p in ring], [p[1] for p in ring])
                    out.append([g.map_to_pixel(a, b) for a, b in zip(xs, ys)])
                polys.append(out)
                props = f.get("properties") or {}
                labels.append(props.get("query") or props.get("id") or f"feature {k + 1}")
        self._draw_regions(polys, labels)
        return len(polys)

    def _geojson_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open regions", "", "GeoJSON (*.geojson *.json)")
        if path:
            try:
                n = self.load_geojson(path)
                self.info.setText(f"{Path(path).name}: {n} region(s) drawn")
            except Exception as e:  # noqa: BLE001
                from .workers import plain_message

                self.info.setText(f"could not draw {Path(path).name}: {plain_message(e)}")

    def load_anno(self, path) -> None:
        """Replace the session's annotations with a SeLo anno.json; a file that does not
        parse raises and leaves the old ones in place."""
        mod, _ = localize_module()
        if mod is not None and hasattr(mod, "load_anno"):
            entries = list(mod.load_anno(path))
        else:
            entries = json.loads(Path(path).read_text())
        self.session.set_anno(entries)  # → _fill_anno_combo

    def _anno_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open SeLo annotations", "", "JSON (*.json)")
        if path:
            try:
                self.load_anno(path)
            except Exception as e:  # noqa: BLE001
                from .workers import plain_message

                self.info.setText(f"Could not read the annotations: {plain_message(e)}")

    def scene_anno(self) -> list[dict]:
        return self.session.scene_anno()

    def _fill_anno_combo(self) -> None:
        entries = self.scene_anno()
        self.anno_combo.clear()
        self.anno_combo.addItem(f"{len(entries)} annotated queries…" if entries else "no annotations", None)
        for a in entries:
            self.anno_combo.addItem(a["caption"], a["caption"])
        self.anno_combo.setVisible(bool(entries))

    def _anno_chosen(self, i: int) -> None:
        cap = self.anno_combo.itemData(i)
        if cap:
            self.query.setText(cap)
            self.query.setCursorPosition(0)
            self.show_polygons(cap)

    def polygons_for(self, caption: str) -> list:
        return self.session.polygons_for(caption)

    def show_polygons(self, caption: str) -> None:
        for it in self.poly_items:
            self.gscene.removeItem(it)
        self.poly_items = []
        pen = QPen(QColor("#22c55e"), 3)
        pen.setCosmetic(True)
        for poly in self.polygons_for(caption):
            item = QGraphicsPolygonItem(QPolygonF([QPointF(float(x), float(y)) for x, y in poly]))
            item.setPen(pen)
            item.setZValue(5)
            self.gscene.addItem(item)
            self.poly_items.append(item)

    # ---- localization
    def run_localize(self) -> None:
        mod, reason = localize_module()
        text = self.query.text().strip()
        if mod is None:
            self.info.setText(f"Localization: {reason}. The scene viewer works; localization appears when the "
                              "engine is installed.")
            return
        if self.scene_obj is None:
            self.info.setText("Open a scene first.")
            return
        if not text:
            self.info.setText("Type what to look for, e.g. “many cars in a parking lot”.")
            return
        if self.model is None:
            self.info.setText("The model is still loading…")
            return
        ses = self.session
        model, sc, windows = ses.model, ses.scene, WINDOW_PRESETS[self.windows.currentText()]
        th_h, th_w = self.thumb_rgb.shape[:2]
        polys = ses.polygons_for(text)
        key = ses.localize_key(text, windows)
        ticket = ses.begin("localize", key)

        def work(progress, cancel):
            res = mod.localize(model, sc, text, window_sizes=windows, progress=progress, cancel=cancel)
            heat = np.asarray(res.upsample((th_w, th_h)), np.float32)
            metrics = None
            if polys and hasattr(mod, "selo_metrics"):
                metrics = mod.selo_metrics(res.prob, polys, res.scene_size)
            return res, heat, metrics

        def done(out):
            if not ses.accepts(ticket, ses.localize_key(text, windows)):
                return  # another scene or model by now: dropped silently
            ses.end(ticket)
            res, heat, metrics = out
            ses.localized(Localization(res, heat, metrics, text, tuple(windows), getattr(model, "name", None), key))

        def ended(line):
            if ses.accepts(ticket, ses.localize_key(text, windows)):
                ses.end(ticket)
                self.info.setText(line)

        self.info.setText(f"localizing “{text}”…")
        self.show_polygons(text)
        self.jobs.start("Localize", work, done, lambda msg: ended(f"Localization failed: {msg}"), slot="localize",
                        on_cancel=lambda: ended("localization cancelled"))

    def _render_localization(self, loc) -> None:
        if loc is None:
            if self.heat_item is not None:
                self.gscene.removeItem(self.heat_item)
                self.heat_item = None
            if self._regions_source == "result":
                self._draw_regions([], [])  # a hit's box or a GeoJSON stays
            self.save_button.setEnabled(False)
            return
        res, metrics = loc.result, loc.metrics
        self._draw_heat()
        m = ""
        if metrics:
            m = " · SeLo: " + ", ".join(f"{k} {float(v):.3f}" for k, v in metrics.items() if k in ("Rsu", "Ras", "Rda",
                                                                                                   "Rmi"))
        cache = " (window embeddings cached)" if getattr(res, "cached", False) else ""
        self.info.setText(f"“{res.text if isinstance(res.text, str) else ' | '.join(res.text)}”: "
                          f"{res.n_windows:,} windows in {res.seconds:.1f} s{cache}{m}")
        self.save_button.setEnabled(True)
        n = self.show_result_regions()
        if n:
            self.info.setText(self.info.text() + f" · {n} region(s) ≥ 0.5 outlined")

    def _draw_heat(self) -> None:
        if self.heat_item is not None and self.heat_item.scene() is self.gscene:
            self.gscene.removeItem(self.heat_item)
        col = colorize(self.heat, "jet")
        self.heat_item = QGraphicsPixmapItem(QPixmap.fromImage(rgb_to_qimage(col)))
        W, H = self.scene_obj.size
        self.heat_item.setTransform(QTransform.fromScale(W / col.shape[1], H / col.shape[0]))
        self.heat_item.setTransformationMode(Qt.SmoothTransformation)
        self.heat_item.setOpacity(self.opacity.value() / 100)
        self.heat_item.setZValue(2)
        self.heat_item.setVisible(self.overlay_check.isChecked())
        self.gscene.addItem(self.heat_item)

    def _overlay_visible(self, on: bool) -> None:
        if self.heat_item is not None:
            self.heat_item.setVisible(on)

    def toggle_overlay(self) -> None:
        self.overlay_check.setChecked(not self.overlay_check.isChecked())

    # ---- saving
    def save_overlay(self, path) -> Path:
        """By suffix: .tif/.tiff COG of the map in the scene's CRS, .geojson regions
        (WGS 84), else the overlay image."""
        path = Path(path)
        loc = self.session.localization
        if loc is None:
            raise ValueError("no localization to save")
        from ..raster.write import check_output_path
        from ..utils.atomic import save_image

        check_output_path(path, None, "the output")
        res = loc.result  # named after the model and text it was computed with, not what is loaded now
        if path.suffix.lower() in (".tif", ".tiff") and hasattr(res, "write_cog"):
            return res.write_cog(path, model=loc.model_name)
        if path.suffix.lower() in (".geojson", ".json") and hasattr(res, "write_geojson"):
            return res.write_geojson(path, model=loc.model_name)
        polys = self.session.polygons_for(loc.text)
        try:
            img = res.overlay(max_side=THUMB_SIDE, polygons=polys or None, image=Image.fromarray(self.thumb_rgb))
        except Exception:  # noqa: BLE001 - fall back to our own JET 0.7/0.3 blend
            from .util import blend

            img = Image.fromarray(blend(self.thumb_rgb, loc.heat, "jet", 0.3))
        return save_image(img, path)

    def save_dialog(self, report=None) -> None:
        """Ask for a path and save; every outcome goes to ``report(line, error)`` (the
        status line) or, without one, to this tab's info line."""
        from .util import save_file

        path, _ = QFileDialog.getSaveFileName(self, "Save localization", "localization.png",
                                              "Overlay (*.png *.jpg);;Probability map, COG (*.tif);;"
                                              "Regions, GeoJSON (*.geojson)")
        if path:
            save_file(self.save_overlay, path, report or (lambda line, error: self.info.setText(line)))

