"""The embedding map: a gallery's images and captions in one pyqtgraph scatter.

The points are drawn by :class:`RasterScatter`, a pyqtgraph item that rasterizes them
itself at screen resolution (numpy + OpenCV: centres → label image → dilation with a
disc/diamond kernel → colour lookup), one colour per scene label. pyqtgraph's own
``ScatterPlotItem`` (pxMode, useCache, per-label brushes) took 180–280 ms per repaint for
100k points here; the raster item takes a few ms (``bench/map_repaint.py``). The few
highlighted points (query, hits, selection) stay ``ScatterPlotItem`` objects. Hover shows the
thumbnail (image points) or the caption text (caption points); a click queries by that
item; the lasso selects points and filters the results grid; the current query is drawn
at the score-weighted mean position of its top hits (t-SNE has no out-of-sample map).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QPointF, QRectF, Qt, QTimer, Signal
from PySide6.QtGui import QBrush, QColor, QIcon, QPainterPath, QPen, QPixmap
from PySide6.QtWidgets import (QComboBox, QFileDialog, QFrame, QHBoxLayout, QLabel, QListWidget, QListWidgetItem,
                               QPushButton, QSpinBox, QVBoxLayout, QWidget, QGraphicsPathItem)

from ..project import IMAGE, available_methods, write_csv
from . import theme
from .util import item_thumb_key, thumbs

METHOD_LABELS = {"opentsne": "t-SNE (openTSNE)", "tsne": "t-SNE (scikit-learn)", "umap": "UMAP", "pca": "PCA"}
HOVER_PX = 9


def place_hits(proj, rows: list[int], scores: list[float], temperature: float = 0.05):
    """Score-weighted mean map position of the query's top hits that are on the map.

    Returns ``(xy or None, point indices of those hits)``."""
    img_pts = np.flatnonzero(proj.kind == IMAGE)
    where = {int(r): int(p) for r, p in zip(proj.row[img_pts].tolist(), img_pts.tolist())}
    pts, sc = [], []
    for r, s in zip(rows, scores):
        if int(r) in where:
            pts.append(where[int(r)])
            sc.append(float(s))
    if not pts:
        return None, []
    sc = np.asarray(sc, np.float32)
    w = np.exp((sc - sc.max()) / temperature)
    w /= w.sum()
    return (proj.xy[pts] * w[:, None]).sum(0), pts


def points_in_polygon(xy: np.ndarray, poly: np.ndarray) -> np.ndarray:
    """Vectorised even-odd rule: bool mask of ``xy`` (n, 2) inside polygon (m, 2)."""
    x, y = xy[:, 0], xy[:, 1]
    inside = np.zeros(len(xy), bool)
    px, py = poly[:, 0], poly[:, 1]
    j = len(poly) - 1
    for i in range(len(poly)):
        xi, yi, xj, yj = px[i], py[i], px[j], py[j]
        cond = (yi > y) != (yj > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xc = (xj - xi) * (y - yi) / (yj - yi + 1e-30) + xi
        inside ^= cond & (x < xc)
        j = i
    return inside


class LassoViewBox(pg.ViewBox):
    """A ViewBox that draws a lasso with the left button while ``lasso`` is on."""

    lasso_done = Signal(object)  # (m, 2) polygon in data coordinates

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.lasso = False
        self._pts: list[QPointF] = []
        self._path_item = QGraphicsPathItem()
        pen = QPen(QColor(theme.ACCENT), 0)
        pen.setCosmetic(True)
        pen.setWidth(2)
        self._path_item.setPen(pen)
        self._path_item.setBrush(QBrush(QColor(37, 99, 235, 30)))
        self._path_item.setZValue(1000)
        self.addItem(self._path_item, ignoreBounds=True)

    def mouseDragEvent(self, ev, axis=None):  # noqa: N802
        if not self.lasso or ev.button() != Qt.LeftButton:
            return super().mouseDragEvent(ev, axis)
        ev.accept()
        p = self.mapSceneToView(ev.scenePos())
        if ev.isStart():
            self._pts = [self.mapSceneToView(ev.buttonDownScenePos())]
        self._pts.append(p)
        path = QPainterPath(self._pts[0])
        for q in self._pts[1:]:
            path.lineTo(q)
        path.closeSubpath()
        self._path_item.setPath(path)
        if ev.isFinish():
            poly = np.array([[q.x(), q.y()] for q in self._pts], np.float64)
            self._path_item.setPath(QPainterPath())
            self._pts = []
            if len(poly) >= 3:
                self.lasso_done.emit(poly)


def _kernel(shape: str, size: int) -> np.ndarray:
    r = size // 2
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    if shape == "d":
        k = (np.abs(xx) + np.abs(yy)) <= r
    else:
        k = (xx ** 2 + yy ** 2) <= (r + 0.3) ** 2
    return k.astype(np.uint8)


class RasterScatter(pg.GraphicsObject):
    """Many points drawn as one screen-resolution image (see module doc).

    ``layers``: list of (xy (n, 2), colour index (n,) int, kernel shape, size px, alpha);
    later layers draw on top. ``colors``: (C, 3) uint8 RGB lookup, at most 255 // layers
    colours (the palette has 24; indices wrap).
    """

    def __init__(self):
        super().__init__()
        self.layers: list = []
        self.colors = np.zeros((1, 3), np.uint8)
        self._bounds = QRectF()
        self._cache_key = None
        self._cache_img = None

    def set_layers(self, layers, colors) -> None:
        self.prepareGeometryChange()
        self.layers = [(np.asarray(xy, np.float64), np.asarray(ci, np.int32), shape, int(size), int(alpha))
                       for xy, ci, shape, size, alpha in layers]
        self.colors = np.asarray(colors, np.uint8).reshape(-1, 3)[: 255 // max(1, len(self.layers))]
        self.layers = [(xy, ci % len(self.colors), *rest) for xy, ci, *rest in self.layers]
        pts = [xy for xy, *_ in self.layers if len(xy)]
        if pts:
            allp = np.concatenate(pts)
            lo, hi = allp.min(0), allp.max(0)
            self._bounds = QRectF(lo[0], lo[1], max(1e-9, hi[0] - lo[0]), max(1e-9, hi[1] - lo[1]))
        else:
            self._bounds = QRectF()
        self._cache_key = None
        self.update()

    def boundingRect(self) -> QRectF:  # noqa: N802
        return self._bounds

    def dataBounds(self, ax, frac=1.0, orthoRange=None):  # noqa: N802
        if self._bounds.isNull():
            return None, None
        if ax == 0:
            return self._bounds.left(), self._bounds.right()
        return self._bounds.top(), self._bounds.bottom()

    def render(self, t, w: int, h: int) -> np.ndarray:
        """(h, w) uint8 code image of all layers under the device transform ``t``:
        0 = empty, layer ``L`` colour ``c`` → ``1 + L * n_colors + c`` (see ``color_table``)."""
        import cv2

        out = np.zeros((h, w), np.uint8)
        nc = len(self.colors)
        for li, (xy, ci, shape, size, _alpha) in enumerate(self.layers):
            if not len(xy):
                continue
            px = t.m11() * xy[:, 0] + t.m21() * xy[:, 1] + t.dx()
            py = t.m12() * xy[:, 0] + t.m22() * xy[:, 1] + t.dy()
            ok = (px >= 0) & (px < w) & (py >= 0) & (py < h)
            lab = np.zeros((h, w), np.uint8)
            lab[py[ok].astype(np.int64), px[ok].astype(np.int64)] = (1 + li * nc + ci[ok]).astype(np.uint8)
            lab = cv2.dilate(lab, _kernel(shape, size))  # max code wins where discs overlap
            np.copyto(out, lab, where=lab > 0)  # later layers on top
        return out

    def color_table(self) -> list[int]:
        from PySide6.QtGui import qRgba

        table = [qRgba(0, 0, 0, 0)]
        for _xy, _ci, _shape, _size, alpha in self.layers:
            table += [qRgba(int(r), int(g), int(b), alpha) for r, g, b in self.colors]
        return (table + [qRgba(0, 0, 0, 0)] * 256)[:256]

    def paint(self, p, option=None, widget=None) -> None:
        if not self.layers:
            return
        # the viewport's own coordinates: the world transform, not deviceTransform (under
        # QWidget.grab the device is the whole window and a redirection offset applies)
        dev = widget if widget is not None else p.device()
        w, h = dev.width(), dev.height()
        if w <= 0 or h <= 0:
            return
        t = p.worldTransform()
        key = (w, h, t.m11(), t.m12(), t.m21(), t.m22(), t.dx(), t.dy())
        if key != self._cache_key:
            from PySide6.QtGui import QImage

            codes = np.ascontiguousarray(self.render(t, w, h))
            img = QImage(codes.data, w, h, w, QImage.Format_Indexed8)
            img.setColorTable(self.color_table())
            self._cache_img = img.convertToFormat(QImage.Format_ARGB32_Premultiplied)
            self._cache_key = key
        p.save()
        p.resetTransform()
        p.drawImage(0, 0, self._cache_img)
        p.restore()


class HoverCard(QFrame):
    def __init__(self, parent):
        super().__init__(parent)
        self.setStyleSheet(f"QFrame {{ background: {theme.PANEL}; border: 1px solid {theme.BORDER};"
                           f" border-radius: 6px; }} QLabel {{ border: none; }}")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(6, 6, 6, 6)
        self.pic = QLabel()
        self.pic.setAlignment(Qt.AlignCenter)
        self.text = QLabel()
        self.text.setWordWrap(True)
        self.text.setMaximumWidth(240)
        lay.addWidget(self.pic)
        lay.addWidget(self.text)
        self.setAttribute(Qt.WA_TransparentForMouseEvents)
        self.hide()


class MapWidget(QWidget):
    query_image = Signal(str)  # click on an image point
    query_text = Signal(str)  # click on a caption point
    open_tile = Signal(str, object)  # click on a tile of a tile index: (scene path, box)
    selection_changed = Signal(object, str)  # set of image rows (empty: nothing inside; None: cleared), description
    status = Signal(str, bool)  # (one line, is it an error) for the window's status bar

    # what the map shows is the session's (gallery, map, query result); the widget keeps
    # only what it draws from them
    index = property(lambda self: self.session.index)
    proj = property(lambda self: self.session.map)

    def __init__(self, jobs, session=None, parent=None):
        super().__init__(parent)
        from .state import Session

        self.jobs = jobs
        self.session = session if session is not None else Session()  # a map on its own has its own
        self.colors: dict[str, str] = {}
        self._hover_point: Optional[int] = None
        lay = QVBoxLayout(self)
        lay.setContentsMargins(8, 8, 8, 8)
        bar = QHBoxLayout()
        self.method = QComboBox()
        for m in available_methods():
            self.method.addItem(METHOD_LABELS.get(m, m), m)
        i = self.method.findData("opentsne")
        self.method.setCurrentIndex(i if i >= 0 else 0)
        self.max_points = QSpinBox()
        self.max_points.setRange(100, 1_000_000)
        self.max_points.setSingleStep(1000)
        self.max_points.setValue(5000)
        self.max_points.setToolTip("Larger galleries are shown as a random sample of this many points")
        self.compute_button = QPushButton("Compute map")
        self.compute_button.setObjectName("primary")
        self.compute_button.clicked.connect(self.compute)
        self.lasso_button = QPushButton("Lasso select")
        self.lasso_button.setCheckable(True)
        self.lasso_button.setToolTip("Drag to select points; the results grid then shows only those images")
        self.lasso_button.toggled.connect(self._lasso_toggled)
        self.png_button = QPushButton("Save PNG…")
        self.csv_button = QPushButton("Export CSV…")
        self.png_button.clicked.connect(self._save_png_dialog)
        self.csv_button.clicked.connect(self._save_csv_dialog)
        bar.addWidget(QLabel("Method"))
        bar.addWidget(self.method)
        bar.addWidget(QLabel("Max points"))
        bar.addWidget(self.max_points)
        bar.addWidget(self.compute_button)
        bar.addStretch(1)
        lay.addLayout(bar)
        self.info = QLabel("Compute a map of the gallery: images (●) and captions (◆), coloured by scene label.")
        self.info.setObjectName("hint")
        self.info.setWordWrap(True)
        lay.addWidget(self.info)
        body = QHBoxLayout()
        self.vb = LassoViewBox()
        self.vb.lasso_done.connect(self._lasso)
        self.plot = pg.PlotWidget(viewBox=self.vb, background=theme.PANEL)
        self.plot.setAcceptDrops(False)
        self.plot.hideAxis("left")
        self.plot.hideAxis("bottom")
        self.plot.setMenuEnabled(False)
        self.plot.setAspectLocked(True)
        self.points = RasterScatter()
        self.hits_item = pg.ScatterPlotItem(pxMode=True, size=15, symbol="o", brush=None,
                                            pen=pg.mkPen("#111827", width=2))
        self.query_item = pg.ScatterPlotItem(pxMode=True, size=24, symbol="star", brush=pg.mkBrush("#facc15"),
                                             pen=pg.mkPen("#111827", width=1.5))
        self.sel_item = pg.ScatterPlotItem(pxMode=True, size=11, symbol="o", brush=None,
                                           pen=pg.mkPen(theme.ACCENT, width=1.5))
        for z, it in enumerate((self.points, self.sel_item, self.hits_item, self.query_item)):
            it.setZValue(z)
            self.plot.addItem(it)
        self.query_text_item = pg.TextItem("", color="#111827", anchor=(0.5, -0.4))
        self.query_text_item.setZValue(10)
        self.plot.addItem(self.query_text_item)
        body.addWidget(self.plot, 1)
        side = QVBoxLayout()
        self.legend = QListWidget()
        self.legend.setFixedWidth(180)
        self.legend.setFocusPolicy(Qt.NoFocus)
        self.legend.setSelectionMode(QListWidget.NoSelection)
        self.legend.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        self.legend.setTextElideMode(Qt.ElideRight)
        self.legend.setToolTip("Scene labels (points per label); ● images, ◆ captions")
        side.addWidget(self.legend, 1)
        for b in (self.lasso_button, self.png_button, self.csv_button):
            b.setFixedWidth(180)
            side.addWidget(b)
        body.addLayout(side)
        lay.addLayout(body, 1)
        self.card = HoverCard(self.plot)
        self._move_timer = QTimer(self)
        self._move_timer.setSingleShot(True)
        self._move_timer.setInterval(30)
        self._move_timer.timeout.connect(self._hover_now)
        self._mouse_scene = None
        self.plot.scene().sigMouseMoved.connect(self._mouse_moved)
        self.plot.scene().sigMouseClicked.connect(self._clicked)
        thumbs().updated.connect(self._thumb_ready)
        self.session.events.connect("map", self._on_map)
        self.session.events.connect("result", self._on_result)
        self.set_index(None)

    # ---- data
    def set_index(self, index) -> None:
        """Draw the session's gallery afresh (a map on its own: make ``index`` its gallery)."""
        if index is not self.session.index or self.session.map is not None:
            self.session.show_index(index)
        self.points.set_layers([], np.zeros((1, 3), np.uint8))
        self.hits_item.clear()
        self.query_item.clear()
        self.sel_item.clear()
        self.query_text_item.setText("")
        self.legend.clear()
        self.compute_button.setEnabled(index is not None)
        for b in (self.png_button, self.csv_button, self.lasso_button):
            b.setEnabled(False)
        if index is not None:
            n = index.image_emb.shape[0] + index.caption_emb.shape[0]
            self.info.setText(f"{n:,} points in this gallery ({index.image_emb.shape[0]:,} images + "
                              f"{index.caption_emb.shape[0]:,} captions). Press “Compute map”.")

    def compute(self, method: Optional[str] = None) -> None:
        ses = self.session
        if ses.index is None:
            return
        index = ses.index
        method = method or self.method.currentData()
        n = self.max_points.value()
        # a newer map (or another gallery) replaces this ticket: its result is then dropped
        ticket = ses.begin("map", ses.map_key(method, n))
        self.info.setText(f"computing {METHOD_LABELS.get(method, method)} map…")

        def work(progress, cancel):
            from ..project import project_index

            return project_index(index, method, max_points=n, progress=progress, cancel=cancel)

        def current() -> bool:
            return ses.accepts(ticket, ses.map_key(method, n))

        def done(proj) -> None:
            if current():
                ses.end(ticket)
                ses.map_ready(proj)

        def failed(msg: str) -> None:
            if current():
                ses.end(ticket)
                self.info.setText(f"Map failed: {msg}")

        self.jobs.start(f"Map ({METHOD_LABELS.get(method, method)})", work, done, failed, slot="map",
                        on_cancel=lambda: current() and (ses.end(ticket), self.info.setText("map cancelled")))

    def set_projection(self, proj) -> None:
        """Show ``proj`` as the gallery's map (it becomes the session's)."""
        self.session.map_ready(proj)

    def _on_map(self, proj) -> None:
        if proj is None:
            return
        index = self.index
        labels = index.labels
        cap_img = np.asarray(index.caption_image)
        point_label = [labels[r] if k == IMAGE else labels[int(cap_img[r])]
                       for k, r in zip(proj.kind.tolist(), proj.row.tolist())]
        self.point_label = point_label
        self.colors = theme.label_colors(point_label)
        lut = np.array([QColor(c).getRgb()[:3] for c in theme.PALETTE] + [(156, 163, 175)], np.uint8)
        code = {n: theme.PALETTE.index(c) for n, c in self.colors.items()}
        ci = np.array([code.get(lab, len(theme.PALETTE)) for lab in point_label], np.int32)
        im = proj.kind == IMAGE
        self.points.set_layers([(proj.xy[~im], ci[~im], "d", 7, 170), (proj.xy[im], ci[im], "o", 9, 255)], lut)
        self.legend.clear()
        counts: dict = {}
        for lab in point_label:
            counts[lab] = counts.get(lab, 0) + 1
        for lab, c in self.colors.items():
            pm = QPixmap(12, 12)
            pm.fill(QColor(c))
            item = QListWidgetItem(QIcon(pm), f"{lab}  ({counts.get(lab, 0)})")
            self.legend.addItem(item)
        self.plot.autoRange()
        cached = " (from cache)" if proj.cached else f" in {proj.seconds:.1f} s"
        self.info.setText(f"{METHOD_LABELS.get(proj.method, proj.method)}: {proj.describe()}{cached}. "
                          "Hover for a preview, click to search by that item.")
        for b in (self.png_button, self.csv_button, self.lasso_button):
            b.setEnabled(True)
        self._on_result(self.session.result)

    def _on_result(self, result) -> None:
        """Mark the session's query on the map: its top 10 hits and their weighted centre."""
        if result is None:
            self.show_query([], [], "")
            return
        q = self.session.query
        hits = result.hits[:10]
        self.show_query([h.row for h in hits], [h.score for h in hits], q.short if q is not None else "query")

    # ---- the current query
    def show_query(self, rows: list[int], scores: list[float], label: str = "query") -> None:
        self.hits_item.clear()
        self.query_item.clear()
        self.query_text_item.setText("")
        if self.proj is None:
            return
        xy, pts = place_hits(self.proj, rows, scores)
        if xy is None:
            return
        self.hits_item.setData(pos=self.proj.xy[pts])
        self.query_item.setData(pos=[xy])
        self.query_text_item.setText(label[:40] + ("…" if len(label) > 40 else ""))
        self.query_text_item.setPos(float(xy[0]), float(xy[1]))
        self.query_item.setToolTip("query position: score-weighted mean of its top hits on this map "
                                   "(t-SNE has no out-of-sample projection)")

    # ---- hover / click
    def nearest(self, scene_pos) -> Optional[int]:
        if self.proj is None or len(self.proj) == 0:
            return None
        if not self.vb.sceneBoundingRect().contains(scene_pos):
            return None
        p = self.vb.mapSceneToView(scene_pos)
        pw, ph = self.vb.viewPixelSize()
        if pw <= 0 or ph <= 0:
            return None
        d = ((self.proj.xy[:, 0] - p.x()) / pw) ** 2 + ((self.proj.xy[:, 1] - p.y()) / ph) ** 2
        i = int(np.argmin(d))
        return i if d[i] <= HOVER_PX ** 2 else None

    def _mouse_moved(self, pos) -> None:
        self._mouse_scene = pos
        if not self._move_timer.isActive():
            self._move_timer.start()

    def _hover_now(self) -> None:
        if self._mouse_scene is None or self.vb.lasso and QApplication_mouse_down():
            return
        i = self.nearest(self._mouse_scene)
        self._hover_point = i
        if i is None:
            self.card.hide()
            return
        self._fill_card(i)
        view_pos = self.plot.mapFromScene(self._mouse_scene)
        x, y = view_pos.x() + 16, view_pos.y() + 16
        self.card.adjustSize()
        if x + self.card.width() > self.plot.width():
            x = view_pos.x() - self.card.width() - 16
        if y + self.card.height() > self.plot.height():
            y = view_pos.y() - self.card.height() - 16
        self.card.move(max(0, int(x)), max(0, int(y)))
        self.card.show()
        self.card.raise_()

    def _fill_card(self, i: int) -> None:
        index, proj = self.index, self.proj
        k, r = int(proj.kind[i]), int(proj.row[i])
        lab = self.point_label[i] or "no label"
        if k == IMAGE:
            it = index.items[r]
            pm = thumbs().get(item_thumb_key(it))
            if pm is not None:
                self.card.pic.setPixmap(pm.scaled(150, 150, Qt.KeepAspectRatio, Qt.SmoothTransformation))
            else:
                self.card.pic.setText("loading…")
            self.card.pic.setVisible(True)
            act = "open the scene here" if it.get("tile") else "search with this image"
            self.card.text.setText(f"<b>{it['id']}</b> · {lab}<br><small>click to {act}</small>")
        else:
            cap = index.captions[r]
            self.card.pic.setVisible(False)
            self.card.text.setText(f"“{cap}”<br><small>caption · {lab} · click to search with this text</small>")

    def _thumb_ready(self, path: str) -> None:
        i = self._hover_point
        if i is not None and self.proj is not None and self.card.isVisible() and int(self.proj.kind[i]) == IMAGE:
            if item_thumb_key(self.index.items[int(self.proj.row[i])]) == path:
                self._fill_card(i)
                self.card.adjustSize()

    def _clicked(self, ev) -> None:
        if ev.button() != Qt.LeftButton or self.vb.lasso or self.proj is None:
            return
        i = self.nearest(ev.scenePos())
        if i is not None:
            self.activate_point(i)

    def activate_point(self, i: int) -> None:
        k, r = int(self.proj.kind[i]), int(self.proj.row[i])
        if k == IMAGE:
            it = self.index.items[r]
            if it.get("tile"):  # a window of a big scene: show it in place, not the whole scene as a query
                self.open_tile.emit(it["path"], it["tile"]["box"])
            else:
                self.query_image.emit(it["path"])
        else:
            self.query_text.emit(self.index.captions[r])

    # ---- selection
    def _lasso_toggled(self, on: bool) -> None:
        self.vb.lasso = on
        self.vb.setMouseEnabled(not on, not on)
        self.lasso_button.setText("Lasso: drag on map" if on else "Lasso select")

    def _lasso(self, poly: np.ndarray) -> None:
        self.select_polygon(poly)

    def select_polygon(self, poly: np.ndarray) -> set[int]:
        if self.proj is None:
            return set()
        mask = points_in_polygon(self.proj.xy, np.asarray(poly, np.float64))
        cap_img = np.asarray(self.index.caption_image)
        rows = set()
        for k, r in zip(self.proj.kind[mask].tolist(), self.proj.row[mask].tolist()):
            rows.add(int(r) if k == IMAGE else int(cap_img[r]))
        self.sel_item.setData(pos=self.proj.xy[mask])
        n_pts = int(mask.sum())
        desc = f"Map selection: {n_pts:,} points → {len(rows):,} images"
        self.selection_changed.emit(rows, desc)
        self.lasso_button.setChecked(False)
        return rows

    def clear_selection(self) -> None:
        self.sel_item.clear()

    # ---- export
    def save_png(self, path) -> Path:
        from PIL import Image

        from ..utils.atomic import save_image
        from .util import qimage_to_rgb

        self.card.hide()
        return save_image(Image.fromarray(qimage_to_rgb(self.plot.grab().toImage())), path)

    def save_csv(self, path) -> Path:
        return write_csv(self.proj, self.index, path)

    def _report(self, msg: str, error: bool) -> None:
        self.status.emit(msg, error)

    def _save_png_dialog(self) -> None:
        from .util import save_file

        path, _ = QFileDialog.getSaveFileName(self, "Save map", "map.png", "PNG (*.png)")
        if path:
            save_file(self.save_png, path, self._report)

    def _save_csv_dialog(self) -> None:
        from .util import save_file

        path, _ = QFileDialog.getSaveFileName(self, "Export map points", "map.csv", "CSV (*.csv)")
        if path:
            save_file(self.save_csv, path, self._report)


def QApplication_mouse_down() -> bool:  # noqa: N802
    from PySide6.QtWidgets import QApplication

    return bool(QApplication.mouseButtons() & Qt.LeftButton)
