"""The main window: query panel | tabs (Results, Embedding map, Scene, Compare) | details dock."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from PySide6.QtCore import QMimeData, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QKeySequence, QShortcut
from PySide6.QtWidgets import (QDockWidget, QFileDialog, QHBoxLayout, QLabel, QMainWindow, QMessageBox, QTabWidget,
                               QWidget)

from ..data import is_image_file
from . import state
from .compare import CompareWidget, metrics_text
from .details import DetailsPanel
from .map_view import MapWidget
from .query_panel import QueryPanel
from .results import ResultsGrid
from .scene_view import SceneWidget
from .util import remember
from .workers import JobManager

TABS = ("results", "map", "scene", "compare")
SHORTCUTS = [
    ("Ctrl+L", "focus the query box"),
    ("Enter", "run the query"),
    ("Alt+Right / J", "next result"),
    ("Alt+Left / K", "previous result"),
    ("O", "toggle the heatmap overlay (details or scene)"),
    ("Ctrl+E", "explain the selected result"),
    ("Ctrl+S", "save: results (CSV/JSON), map (PNG) or scene overlay (PNG), by tab"),
    ("Ctrl+1…4", "switch tab"),
]


class MainWindow(QMainWindow):
    ready = Signal()  # model and gallery loaded
    searched = Signal(object)  # SearchResult shown

    def __init__(self, model: str = "default", gallery: Optional[str] = None, start: bool = True):
        super().__init__()
        self.setWindowTitle("rsviewer — remote-sensing image–text retrieval")
        self.resize(1400, 900)
        self.setAcceptDrops(True)
        self.jobs = JobManager(self)
        self.jobs.message.connect(self.show_message)
        self.model = None
        self.index = None
        self.model_spec = model
        self.gallery_spec = gallery
        self.query: Optional[tuple[str, str]] = None  # ("text", text) | ("image", path)
        self.pending_query: Optional[tuple[str, str]] = None
        self.last_result = None
        self.last_gt = None
        self.last_error = ""
        self.map_filter: Optional[set[int]] = None
        self.map_filter_desc = ""

        # ---- widgets
        self.panel = QueryPanel()
        self.results = ResultsGrid()
        self.map = MapWidget(self.jobs)
        self.scene = SceneWidget(self.jobs)
        self.compare = CompareWidget(self.jobs)
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(False)
        self.tabs.addTab(self.results, "Results")
        self.tabs.addTab(self.map, "Embedding map")
        self.tabs.addTab(self.scene, "Scene")
        self.tabs.addTab(self.compare, "Compare")
        central = QWidget()
        hl = QHBoxLayout(central)
        hl.setContentsMargins(0, 0, 0, 0)
        hl.setSpacing(0)
        hl.addWidget(self.panel)
        hl.addWidget(self.tabs, 1)
        self.setCentralWidget(central)
        self.details = DetailsPanel(self.jobs)
        self.dock = QDockWidget("Details and explanation", self)
        self.dock.setObjectName("detailsDock")
        self.dock.setWidget(self.details)
        self.dock.setFeatures(QDockWidget.DockWidgetMovable | QDockWidget.DockWidgetFloatable |
                              QDockWidget.DockWidgetClosable)
        self.dock.setMinimumWidth(330)
        self.addDockWidget(Qt.RightDockWidgetArea, self.dock)
        self.resizeDocks([self.dock], [350], Qt.Horizontal)

        # ---- status bar
        sb = self.statusBar()
        self.device_label = QLabel()
        self.model_label = QLabel("model: loading…")
        self.gallery_label = QLabel("gallery: —")
        self.time_label = QLabel("")
        for w in (self.device_label, self.model_label, self.gallery_label, self.time_label):
            sb.addPermanentWidget(w)
        sb.addPermanentWidget(self.jobs.widget)

        # ---- signals
        self.panel.text_query.connect(self.run_text)
        self.panel.image_query.connect(self.run_image)
        self.panel.model_chosen.connect(self.set_model)
        self.panel.gallery_chosen.connect(self.set_gallery)
        self.panel.options_changed.connect(self._rerun)
        self.results.selected.connect(self.details.show_hit)
        self.results.activated.connect(self._activate_hit)
        self.results.filter_cleared.connect(self._filter_cleared)
        self.compare.activated.connect(self._activate_hit)
        self.map.query_image.connect(self.run_image)
        self.map.query_text.connect(self._map_text)
        self.map.selection_changed.connect(self._map_selection)
        self.tabs.currentChanged.connect(self._tab_changed)
        self._menus()
        self._shortcuts()
        if start:
            QTimer.singleShot(0, lambda: self.load(self.model_spec, self.gallery_spec))

    # ------------------------------------------------------------------ menus/keys
    def _menus(self) -> None:
        m = self.menuBar().addMenu("&File")
        for text, fn in (("Open dataset file…", lambda: self.panel._gallery_activated(
                              self.panel.gallery_combo.findData("__open__file"))),
                         ("Open image folder…", lambda: self.panel._gallery_activated(
                             self.panel.gallery_combo.findData("__open__folder"))),
                         ("Open index folder…", lambda: self.panel._gallery_activated(
                             self.panel.gallery_combo.findData("__open__index"))),
                         ("Open model folder…", self._open_model_dialog),
                         ("Open model checkpoint file…", self._open_model_file_dialog),
                         ("Search with an image…", self.panel.browse_image),
                         ("Open scene…", self._open_scene_dialog)):
            a = QAction(text, self)
            a.triggered.connect(fn)
            m.addAction(a)
        m.addSeparator()
        a = QAction("Save…", self)
        a.setShortcut(QKeySequence.Save)
        a.triggered.connect(self.save_current)
        m.addAction(a)
        a = QAction("Export results…", self)
        a.triggered.connect(self._export_results_dialog)
        m.addAction(a)
        m.addSeparator()
        a = QAction("Quit", self)
        a.setShortcut(QKeySequence.Quit)
        a.triggered.connect(self.close)
        m.addAction(a)
        v = self.menuBar().addMenu("&View")
        for i, name in enumerate(("Results", "Embedding map", "Scene", "Compare")):
            a = QAction(name, self)
            a.setShortcut(QKeySequence(f"Ctrl+{i + 1}"))
            a.triggered.connect(lambda _=False, i=i: self.tabs.setCurrentIndex(i))
            v.addAction(a)
        v.addAction(self.dock.toggleViewAction())
        h = self.menuBar().addMenu("&Help")
        a = QAction("Keyboard shortcuts", self)
        a.triggered.connect(lambda: QMessageBox.information(
            self, "Keyboard shortcuts", "\n".join(f"{k:<16} {d}" for k, d in SHORTCUTS)))
        h.addAction(a)

    def _shortcuts(self) -> None:
        def sc(key, fn):
            s = QShortcut(QKeySequence(key), self)
            s.activated.connect(fn)
            return s

        sc("Ctrl+L", self.focus_query)
        sc("Alt+Right", lambda: self.step(1))
        sc("Alt+Left", lambda: self.step(-1))
        sc("J", lambda: self.step(1))
        sc("K", lambda: self.step(-1))
        sc("O", self.toggle_overlay)
        sc("Ctrl+E", self.explain_current)

    def focus_query(self) -> None:
        self.panel.query.setFocus()
        self.panel.query.lineEdit().selectAll()

    def step(self, delta: int) -> None:
        grid = self.results
        if self.tabs.currentWidget() is self.compare:
            grid = self.compare.grid_a if self.compare.grid_a.view.hasFocus() or not \
                self.compare.grid_b.view.hasFocus() else self.compare.grid_b
        grid.step(delta)

    def toggle_overlay(self) -> None:
        if self.tabs.currentWidget() is self.scene:
            self.scene.toggle_overlay()
        else:
            self.details.toggle_overlay()

    def explain_current(self) -> None:
        self.dock.show()
        self.details.run_explain()

    # ------------------------------------------------------------------ loading
    def load(self, model_spec: str, gallery_spec: Optional[str]) -> None:
        self.model_label.setText(f"model: loading {Path(str(model_spec)).name}…")

        def work(progress, cancel):
            t0 = time.perf_counter()
            model = state.get_model(model_spec, progress=progress)
            index = state.open_gallery(gallery_spec, model, progress, cancel)
            return model, index, model_spec, gallery_spec, time.perf_counter() - t0

        self.jobs.start("Loading model and gallery", work, self._loaded, self._load_failed, slot="load",
                        on_cancel=lambda: self._load_failed("cancelled (the previous model and gallery stay)"))

    def _loaded(self, out) -> None:
        model, index, model_spec, gallery_spec, secs = out
        self.model, self.index = model, index
        self.model_spec, self.gallery_spec = model_spec, gallery_spec
        from ..utils.device import describe

        self.device_label.setText(f"device: {describe(model.device)}")
        name = getattr(model, "name", model.arch)
        self.model_label.setText(f"model: {name} ({model.arch})")
        self.gallery_label.setText(f"gallery: {state.gallery_label(gallery_spec)} · {len(index):,} images")
        self.panel.select_model(str(getattr(model, "model_dir", model_spec)))
        if gallery_spec:
            self.panel.select_gallery(gallery_spec)
            remember("recent/galleries", str(gallery_spec))
        md = getattr(model, "model_dir", None)
        if md is not None:
            remember("recent/models", str(md))
        self.panel.set_labels(index.labels)
        self.panel.info.setText(self._model_info(model))
        self.details.set_model(model)
        self.scene.set_model(model)
        self.map.set_index(index)
        self._clear_map_filter()
        self.results.set_result(None, None, f"Ready: {len(index):,} images. Type a query or drop an image.")
        self.last_result = None
        self.show_message(f"loaded {name} and {state.gallery_label(gallery_spec)} in {secs:.1f} s")
        self.ready.emit()
        q = self.pending_query or self.query
        self.pending_query = None
        if q is not None:
            self._run(q)

    def _model_info(self, model) -> str:
        from ..checkpoint import read_metrics

        md = getattr(model, "model_dir", None)
        try:
            m = read_metrics(md) if md else {}
        except Exception:  # noqa: BLE001
            m = {}
        val = m.get("val") or m.get("metrics") or {}
        mr = val.get("mR") if isinstance(val, dict) else None
        extra = f" · val mR {mr:.1f}" if isinstance(mr, (int, float)) else ""
        return f"{getattr(model, 'name', model.arch)}: {model.arch}, {model.embed_dim}-d embeddings{extra}"

    def _load_failed(self, msg: str) -> None:
        self.show_error(f"Could not open: {msg}")
        if self.model is not None:  # keep working with what was loaded before
            self.model_label.setText(f"model: {getattr(self.model, 'name', self.model.arch)} ({self.model.arch})")
            self.panel.select_model(str(getattr(self.model, "model_dir", self.model_spec)))
            if self.gallery_spec:
                self.panel.select_gallery(self.gallery_spec)
        else:
            self.model_label.setText("model: not loaded")

    def set_model(self, spec: str) -> None:
        self.load(spec, self.gallery_spec)

    def set_gallery(self, spec: str) -> None:
        self.load(self.model_spec, spec)

    def _open_model_dialog(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open model folder")
        if folder:
            self.set_model(folder)

    def _open_model_file_dialog(self) -> None:
        # OpenAI/open_clip checkpoints (RemoteCLIP, GeoRSCLIP, SkyCLIP ...); HF folders via "Open model folder…"
        path, _ = QFileDialog.getOpenFileName(self, "Open model checkpoint", "",
                                              "CLIP checkpoints (*.pt *.pth *.bin *.safetensors *.ckpt);;All files (*)")
        if path:
            self.set_model(path)

    def _open_scene_dialog(self) -> None:
        self.tabs.setCurrentWidget(self.scene)
        self.scene._open_dialog()

    # ------------------------------------------------------------------ queries
    def run_text(self, text: str) -> None:
        text = (text or "").strip()
        if not text:
            self.show_error("Type a query first (e.g. “many planes parked at the airport”).")
            return
        self.panel.add_history(text)
        self._run(("text", text))

    def run_image(self, path: str) -> None:
        self.panel.drop.show_image(path)
        self._run(("image", str(path)))

    def _map_text(self, text: str) -> None:
        self.panel.query.setEditText(text)
        self.run_text(text)

    def _rerun(self) -> None:
        if self.query is not None and self.model is not None:
            self._run(self.query)

    def _run(self, q: tuple[str, str]) -> None:
        self.query = q
        if self.model is None or self.index is None:
            self.pending_query = q
            self.results.set_message("waiting for the model and gallery to load…")
            return
        model, index = self.model, self.index
        opts = self.panel.options()
        k = opts["k"]
        if self.map_filter is not None:
            k = min(len(index), max(k * 10, 500))  # search wider, then keep the selection
        self.details.set_query(q[1] if q[0] == "text" else None, q[1] if q[0] == "image" else None)
        self.compare.set_context(model, index, self.gallery_spec, q, opts)

        def work(progress, cancel):
            from ..retrieval.search import search_image, search_text

            t0 = time.perf_counter()
            if q[0] == "text":
                res = search_text(model, index, q[1], max(k, 10), rerank=opts["rerank"], labels=opts["labels"])
                gt, qrow = state.text_ground_truth(index, q[1]), None
            else:
                res = search_image(model, index, q[1], max(k, 10), labels=opts["labels"])
                gt, qrow = state.image_ground_truth(index, q[1]), state.gallery_row_of(index, q[1])
            return q, res, gt, qrow, time.perf_counter() - t0

        self.results.set_message("searching…")
        self.jobs.start("Search", work, self._searched, self._search_failed, slot="search")
        if self.tabs.currentWidget() is self.compare:
            self.compare.run()

    def _searched(self, out) -> None:
        q, res, gt, qrow, secs = out
        if q != self.query:
            return  # superseded
        self.last_result, self.last_gt, self.last_error = res, gt, ""
        rows = [h.row for h in res.hits]
        scores = [h.score for h in res.hits]
        k = self.panel.options()["k"]
        metrics = f" · {metrics_text(rows, gt, qrow)}" if gt is not None else ""
        full_hits = list(res.hits)
        if self.map_filter is None:
            res.hits = res.hits[:k]
        what = f"“{q[1]}”" if q[0] == "text" else Path(q[1]).name
        rr = f", rerank {res.rerank}" if res.rerank != "none" else ""
        header = f"{res.mode} {what}: top {min(k, len(res.hits))} of {res.n_gallery:,} images{rr}{metrics}"
        self.results.set_result(res, gt, header)
        if gt is not None:
            self.results.header.setToolTip(gt.rule)
        if self.map_filter is not None:
            self._apply_map_filter()
        ms = sum(res.seconds.values())
        self.time_label.setText(f"last query: {ms:.0f} ms")
        self.map.show_query([h.row for h in full_hits[:10]], scores[:10], q[1] if q[0] == "text" else Path(q[1]).name)
        self.searched.emit(res)

    def _search_failed(self, msg: str) -> None:
        self.last_error = msg
        self.results.set_message(f"Search failed: {msg}", error=True)
        self.show_message(f"Search failed: {msg}")

    def _activate_hit(self, hit) -> None:
        self.dock.show()
        self.dock.raise_()
        self.details.show_hit(hit)

    # ------------------------------------------------------------------ map selection
    def _map_selection(self, rows, desc: str) -> None:
        self.map_filter, self.map_filter_desc = rows, desc
        if rows is None:
            self._clear_map_filter()
            return
        if self.query is not None:
            self._run(self.query)  # search wider so the selection has results
        else:
            self._show_selection_only()

    def _apply_map_filter(self) -> None:
        k = self.panel.options()["k"]
        self.results.set_filter(self.map_filter, f"{self.map_filter_desc} — showing results inside it (top {k})")
        hits = self.results.model.hits[:k]
        self.results.model.beginResetModel()
        self.results.model.hits = hits
        self.results.model.endResetModel()

    def _show_selection_only(self) -> None:
        from ..retrieval.search import Hit, SearchResult

        rows = sorted(self.map_filter)[:500]
        hits = []
        for i, r in enumerate(rows):
            it = self.index.items[r]
            hits.append(Hit(i + 1, r, 0.0, it["id"], it["path"], it.get("label"), list(it.get("captions", []))))
        res = SearchResult("map selection", "selection", hits, {}, "none", len(self.index))
        self.results.set_result(res, None, f"{self.map_filter_desc} (no query yet: all selected images)")
        self.results.set_filter(self.map_filter, self.map_filter_desc)

    def _filter_cleared(self) -> None:
        self.map_filter = None
        self.map.clear_selection()
        if self.query is not None:
            self._run(self.query)

    def _clear_map_filter(self) -> None:
        self.map_filter = None
        self.results.set_filter(None)

    def _tab_changed(self, i: int) -> None:
        if self.tabs.widget(i) is self.compare and self.query is not None and self.model is not None:
            if not self.jobs.busy("compare"):
                self.compare.set_context(self.model, self.index, self.gallery_spec, self.query, self.panel.options())
                self.compare.run()

    # ------------------------------------------------------------------ drops
    def dragEnterEvent(self, e):  # noqa: N802
        if e.mimeData().hasUrls():
            e.acceptProposedAction()
            self.panel.drop.set_hover(True)

    def dragLeaveEvent(self, e):  # noqa: N802
        self.panel.drop.set_hover(False)

    def dropEvent(self, e):  # noqa: N802
        self.panel.drop.set_hover(False)
        if self.handle_drop(e.mimeData()):
            e.acceptProposedAction()

    def handle_drop(self, mime: QMimeData) -> str:
        """Route dropped files: image → query (or scene on the Scene tab), dataset/folder/index → gallery."""
        paths = [Path(u.toLocalFile()) for u in mime.urls() if u.isLocalFile()]
        if not paths:
            return ""
        p = paths[0]
        from ..checkpoint import format_of

        if format_of(p) is not None:  # a model folder, a Hugging Face folder or a CLIP checkpoint file
            self.set_model(str(p))
            return "model"
        if p.is_dir():
            self.set_gallery(str(p))
            return "gallery"
        if is_image_file(p):
            if self.tabs.currentWidget() is self.scene:
                self.scene.open_scene(p)
                return "scene"
            self.tabs.setCurrentWidget(self.results) if self.tabs.currentWidget() is not self.compare else None
            self.run_image(str(p))
            return "image"
        if p.suffix.lower() in (".json", ".csv"):
            if p.name == "anno.json" or (self.tabs.currentWidget() is self.scene and "anno" in p.name):
                self.scene.load_anno(p)
                return "anno"
            self.set_gallery(str(p))
            return "gallery"
        self.show_error(f"{p.name}: drop an image, a dataset JSON/CSV, an image folder, an index folder or a model")
        return ""

    # ------------------------------------------------------------------ saving
    def save_current(self) -> None:
        w = self.tabs.currentWidget()
        try:
            if w is self.map:
                if self.map.proj is not None:
                    self.map._save_png_dialog()
            elif w is self.scene:
                if self.scene.result is not None:
                    self.scene._save_dialog()
            elif self.details.expl is not None and self.dock.isVisible() and self.details.isAncestorOf(
                    self.focusWidget() or self):
                self.details.save_dialog()
            else:
                self._export_results_dialog()
        except Exception as e:  # noqa: BLE001
            from .workers import plain_message

            self.show_error(f"could not save: {plain_message(e)}")

    def _export_results_dialog(self) -> None:
        grid = self.compare.grid_a if self.tabs.currentWidget() is self.compare else self.results
        if not grid.hits():
            self.show_message("no results to export")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export results", "results.csv", "CSV (*.csv);;JSON (*.json)")
        if path:
            grid.export(path)
            self.show_message(f"saved {path}")

    # ------------------------------------------------------------------ messages
    def show_message(self, msg: str) -> None:
        self.statusBar().showMessage(msg, 15000)

    def show_error(self, msg: str) -> None:
        self.last_error = msg
        self.statusBar().showMessage(msg, 30000)
        if self.last_result is None:
            self.results.set_message(msg, error=True)

    def closeEvent(self, e):  # noqa: N802
        self.jobs.cancel()
        self.jobs.wait_all(3000)
        super().closeEvent(e)
