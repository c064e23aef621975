"""The main window: query panel | tabs (Results, Embedding map, Scene, Compare) | details dock."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

from PySide6.QtCore import QEvent, QMimeData, Qt, QTimer, Signal
from PySide6.QtGui import QAction, QKeySequence, QShortcut
from PySide6.QtWidgets import (QDockWidget, QFileDialog, QHBoxLayout, QLabel, QMainWindow, QMessageBox, QTabWidget,
                               QWidget)

from ..data import is_image_file
from ..errors import RsviewerError
from . import state
from .compare import CompareWidget, metrics_text
from .details import DetailsPanel
from .map_view import MapWidget
from .query_panel import QueryPanel
from .results import ResultsGrid
from .scene_view import SceneWidget
from .state import Query, Session
from .util import remember, save_file, shutdown_thumbs
from .workers import JobManager, log, plain_message

TABS = ("results", "map", "scene", "compare")
SHORTCUTS = [
    ("Ctrl+L", "focus the query box"),
    ("Enter", "run the query"),
    ("Alt+Right / J", "next result"),
    ("Alt+Left / K", "previous result"),
    ("O", "toggle the heatmap overlay (details or scene)"),
    ("Ctrl+E", "explain the selected result"),
    ("Ctrl+S", "save: results (CSV/JSON), map (PNG) or scene overlay (PNG), by tab"),
    ("Ctrl+1…5", "switch tab"),
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
        self.session = Session(model, gallery)  # all session state lives there; widgets render it
        self.stopped_cleanly = True

        # ---- widgets
        self.panel = QueryPanel()
        self.results = ResultsGrid()
        self.map = MapWidget(self.jobs, self.session)
        self.map.status.connect(self.report)
        self.scene = SceneWidget(self.jobs, self.session)
        self.compare = CompareWidget(self.jobs)
        self.tabs = QTabWidget()
        self.tabs.setDocumentMode(False)
        self.tabs.addTab(self.results, "Results")
        self.tabs.addTab(self.map, "Embedding map")
        self.tabs.addTab(self.scene, "Scene")
        self.tabs.addTab(self.compare, "Compare")
        # Evaluate tab (issue 15): all of its logic lives in evaluate_view.py
        from .evaluate_view import EvaluateWidget
        self.evaluate = EvaluateWidget(self.jobs)
        self.tabs.addTab(self.evaluate, "Evaluate")
        self.evaluate.query_requested.connect(self.show_eval_query)
        self.ready.connect(lambda: self.evaluate.set_context(self.gallery_spec, self.model_spec))
        central = QWidget()
        hl = QHBoxLayout(central)
        hl.setContentsMargins(0, 0, 0, 0)
        hl.setSpacing(0)
        hl.addWidget(self.panel)
        hl.addWidget(self.tabs, 1)
        self.setCentralWidget(central)
        self.details = DetailsPanel(self.jobs, self.session)
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
        self.results.selected.connect(self.session.select)
        self.session.events.connect("selection", self.details.show_hit)
        self.results.activated.connect(self._activate_hit)
        self.results.filter_cleared.connect(self._filter_cleared)
        self.compare.activated.connect(self._activate_hit)
        self.map.query_image.connect(self.run_image)
        self.map.open_tile.connect(self.open_tile)
        self.map.query_text.connect(self._map_text)
        self.map.selection_changed.connect(self._map_selection)
        self.tabs.currentChanged.connect(self._tab_changed)
        self._menus()
        self._shortcuts()
        self._first_load_pending = start
        if start:
            self.installEventFilter(self)  # the first paint starts the first load
            QTimer.singleShot(0, self._first_load_unless_unpainted)

    # the first load's worker imports for seconds and contends for the GIL: started before the
    # window's first paint, it made that paint take 100–160 ms instead of ~40 (bench/gui_stall.py)
    def _first_load_unless_unpainted(self) -> None:
        if self.isVisible() and not self._painted:
            QTimer.singleShot(500, self._start_first_load)  # the paint starts it, or this at the latest
        else:
            self._start_first_load()

    def _start_first_load(self) -> None:
        if self._first_load_pending:
            self._first_load_pending = False
            self.removeEventFilter(self)
            self.load(self.session.model_spec, self.session.gallery_spec)

    _painted = False

    def eventFilter(self, obj, event) -> bool:
        if obj is self and event.type() == QEvent.Paint and self._first_load_pending:
            self._painted = True
            QTimer.singleShot(0, self._start_first_load)  # after this paint, children included
        return super().eventFilter(obj, event)

    # read-only views of the session (scripts, tests, the screenshot driver)
    model = property(lambda self: self.session.model)
    index = property(lambda self: self.session.index)
    query = property(lambda self: self.session.query)
    last_result = property(lambda self: self.session.result)
    last_gt = property(lambda self: self.session.gt)
    last_error = property(lambda self: self.session.error)
    map_filter = property(lambda self: self.session.map_filter)
    model_spec = property(lambda self: self.session.model_spec)
    gallery_spec = property(lambda self: self.session.gallery_spec)

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
        for i, name in enumerate(("Results", "Embedding map", "Scene", "Compare", "Evaluate")):
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
        ticket = self.session.begin("load", (str(model_spec), gallery_spec))

        def work(progress, cancel):
            t0 = time.perf_counter()
            state.warm_up(progress)  # the first load imports the heavy libraries here, off the GUI thread
            model = state.get_model(model_spec, progress=progress)
            index = state.open_gallery(gallery_spec, model, progress, cancel)
            return model, index, model_spec, gallery_spec, time.perf_counter() - t0

        # a newer load replaces this one (the job manager drops what it still reports);
        # only the user's Cancel reaches on_cancel
        self.jobs.start("Loading model and gallery", work, lambda out: self._loaded(ticket, out),
                        lambda msg: self._load_failed(ticket, msg), slot="load",
                        on_cancel=lambda: self._load_failed(ticket, "cancelled (the previous model and gallery "
                                                                    "stay)"))

    def _loaded(self, ticket, out) -> None:
        model, index, model_spec, gallery_spec, secs = out
        if not self.session.accepts(ticket, (str(model_spec), gallery_spec)):
            return
        self.session.end(ticket)
        again = self.session.loaded(model, index, model_spec, gallery_spec)
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
        self.map.set_index(index)
        self.results.set_result(None, None, f"Ready: {len(index):,} images. Type a query or drop an image.")
        self.show_message(f"loaded {name} and {state.gallery_label(gallery_spec)} in {secs:.1f} s")
        self.ready.emit()
        if again is not None:
            self._run(again)

    def _model_info(self, model) -> str:
        from ..checkpoint import model_figures, read_metrics

        md = getattr(model, "model_dir", None)
        try:
            m = read_metrics(md) if md else {}
        except (OSError, ValueError, RsviewerError):  # metrics are optional: the info line just omits them
            m = {}
        f = model_figures(m)
        extra = f" · val mR {f['val_mR']:.1f}" if f["val_mR"] is not None else ""
        if f["cv_mR"] is not None:  # retrained on train+val: no val figure, a CV estimate
            extra = f" · CV mR {f['cv_mR']:.1f}" + (f" ± {f['cv_se']:.1f}" if f["cv_se"] is not None else "")
        return f"{getattr(model, 'name', model.arch)}: {model.arch}, {model.embed_dim}-d embeddings{extra}"

    def _load_failed(self, ticket, msg: str) -> None:
        if self.session.jobs.get("load") is not ticket:
            return
        self.session.end(ticket)
        self.show_error(f"Could not open: {msg}")
        waiting = self.session.load_failed()
        model = self.session.model
        if model is not None:  # keep working with what was loaded before
            self.model_label.setText(f"model: {getattr(model, 'name', model.arch)} ({model.arch})")
            self.panel.select_model(str(getattr(model, "model_dir", self.session.model_spec)))
            if self.session.gallery_spec:
                self.panel.select_gallery(self.session.gallery_spec)
        else:
            self.model_label.setText("model: not loaded")
        if waiting is not None:
            self._run(waiting)

    def _wanted(self) -> tuple[str, Optional[str]]:
        """(model, gallery) the user asked for last: the load in flight, else what is loaded."""
        t = self.session.jobs.get("load")
        return t.key if t is not None else (self.session.model_spec, self.session.gallery_spec)

    def set_model(self, spec: str) -> None:
        self.load(spec, self._wanted()[1])

    def set_gallery(self, spec: str) -> None:
        self.load(self._wanted()[0], spec)

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
        self._run(Query("text", text))  # the history gets it once the engine accepted it

    def run_image(self, path: str) -> None:
        self._run(Query("image", str(path)))

    def _map_text(self, text: str) -> None:
        self.panel.query.setEditText(text)
        self.run_text(text)

    def _rerun(self) -> None:
        self.session.set_options(self.panel.options())
        if self.session.query is not None and self.session.ready():
            self._run(self.session.query)

    def _run(self, q: Query) -> None:
        q = Query(*q)
        ses = self.session
        ses.set_options(self.panel.options())
        if q.kind == "image":
            self.panel.drop.show_image(q.value)  # preview while it runs; restored if it fails
            from ..data import read_hint

            hint = read_hint(q.value)  # header only: cheap on the GUI thread
            if hint:
                self.show_message(hint)
        if not ses.ask(q):
            self.results.set_message("waiting for the model and gallery to load…")
            return
        model, index, opts = ses.model, ses.index, dict(ses.options)
        k = opts["k"]
        if ses.map_filter is not None:
            k = min(len(index), max(k * 10, 500))  # search wider, then keep the selection
        ticket = ses.begin("search", ses.search_key(q))

        def work(progress, cancel):
            from ..retrieval.search import search_image, search_text

            t0 = time.perf_counter()
            if q.kind == "text":
                res = search_text(model, index, q.value, max(k, 10), rerank=opts["rerank"], labels=opts["labels"])
                state.check_text_query(model, q.value)  # after the engine's own checks (length, empty)
                gt, qrow = state.text_ground_truth(index, q.value), None
            else:
                from .util import load_plain

                image = load_plain(q.value, model.image_size) or q.value
                res = search_image(model, index, image, max(k, 10), labels=opts["labels"])
                res.query = q.value
                gt, qrow = state.image_ground_truth(index, q.value), state.gallery_row_of(index, q.value)
            return res, gt, qrow, time.perf_counter() - t0

        self.results.set_message("searching…")
        self.jobs.start("Search", work, lambda out: self._searched(ticket, q, out),
                        lambda msg: self._search_failed(ticket, q, msg), slot="search",
                        on_cancel=lambda: self._search_failed(ticket, q, "cancelled"))

    def _searched(self, ticket, q: Query, out) -> None:
        ses = self.session
        if not ses.accepts(ticket, ses.search_key(q)):
            return  # computed for another model, gallery, query or options: dropped
        ses.end(ticket)
        res, gt, qrow, secs = out
        ses.search_succeeded(q, res, gt, qrow)
        if q.kind == "text":
            self.panel.add_history(q.value)
        self.details.set_query(q.value if q.kind == "text" else None, q.value if q.kind == "image" else None)
        self.compare.set_context(ses.model, ses.index, ses.gallery_spec, q, ses.options)
        self._render_results()
        self.time_label.setText(f"last query: {sum(res.seconds.values()):.0f} ms")
        self.searched.emit(res)
        if self.tabs.currentWidget() is self.compare:
            self.compare.run()

    def _render_results(self) -> None:
        """Draw the session's result: the top K (inside the map selection if there is one)."""
        ses = self.session
        res, q = ses.result, ses.query
        if res is None or q is None:
            return
        hits = ses.visible_hits()
        metrics = f" · {metrics_text([h.row for h in res.hits], ses.gt, ses.qrow)}" if ses.gt is not None else ""
        rr = f", rerank {res.rerank}" if res.rerank != "none" else ""
        header = f"{res.mode} {q.label}: top {len(hits)} of {res.n_gallery:,} images{rr}{metrics}"
        self.results.set_result(res, ses.gt, header, hits=hits)
        self.results.header.setToolTip(ses.gt.rule if ses.gt is not None else "")
        if ses.map_filter is not None:
            self.results.show_banner(f"{ses.map_filter_desc} — showing results inside it (top {ses.options['k']})")
        else:
            self.results.show_banner(None)
        if q.kind == "image":
            self.panel.drop.show_image(q.value)

    def _search_failed(self, ticket, q: Query, msg: str) -> None:
        ses = self.session
        if ses.jobs.get("search") is not ticket:
            return
        ses.end(ticket)
        ses.search_failed(q, msg)
        prev = ses.query
        keep = f" — still showing the results for {prev.label}" if prev is not None and ses.result is not None else ""
        self.results.set_message(f"Search failed: {msg}{keep}", error=True)
        self.show_message(f"Search failed: {msg}")
        # the drop zone shows the query whose results are on screen
        self.panel.drop.show_image(prev.value if prev is not None and prev.kind == "image" else None)

    def show_eval_query(self, kind: str, value: str, switch: bool = False) -> None:
        """Evaluate tab → run its query in the Results tab, where the ground truth is marked."""
        self._map_text(value) if kind == "text" else self.run_image(value)
        if switch:
            self.tabs.setCurrentWidget(self.results)

    def _activate_hit(self, hit) -> None:
        self.dock.show()
        self.dock.raise_()
        self.session.select(hit)
        tile = getattr(hit, "tile", None)
        if tile:  # a tile of a scene index: open the scene there, centred on the hit
            self.open_tile(hit.path, tile["box"])

    def open_tile(self, path: str, box) -> None:
        """The Scene view on ``path``, centred on ``box`` (x, y, w, h scene px)."""
        self.tabs.setCurrentWidget(self.scene)
        self.scene.open_scene(path, box=box)

    # ------------------------------------------------------------------ map selection
    def _map_selection(self, rows, desc: str) -> None:
        ses = self.session
        if rows is not None and not rows:
            self.show_message("the lasso selected no images: selection cleared")
            self.map.clear_selection()
        had = ses.map_filter is not None
        ses.set_map_filter(rows, desc)
        if ses.map_filter is None:
            self.results.show_banner(None)
            if ses.result is not None:
                self._render_results()  # back to the top K of the current query
            elif had:
                self.results.set_result(None, None, "Type a query or drop an image.")
            return
        if ses.query is not None:
            self._run(ses.query)  # search wider so the selection has results
        else:
            self._show_selection_only()

    def _show_selection_only(self) -> None:
        from ..retrieval.search import Hit, SearchResult

        index = self.session.index
        rows = sorted(self.session.map_filter)[:500]
        hits = []
        for i, r in enumerate(rows):
            it = index.items[r]
            hits.append(Hit(i + 1, r, 0.0, it["id"], it["path"], it.get("label"), list(it.get("captions", []))))
        res = SearchResult("map selection", "selection", hits, {}, "none", len(index))
        self.results.set_result(res, None, f"{self.session.map_filter_desc} (no query yet: all selected images)")
        self.results.show_banner(self.session.map_filter_desc)

    def _filter_cleared(self) -> None:
        self.map.clear_selection()
        self._map_selection(None, "")

    def _tab_changed(self, i: int) -> None:
        ses = self.session
        if self.tabs.widget(i) is self.compare and ses.query is not None and ses.ready():
            if not self.jobs.busy("compare"):
                self.compare.set_context(ses.model, ses.index, ses.gallery_spec, ses.query, ses.options)
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
        """Route dropped files: image → query (or scene on the Scene tab), dataset/folder/index → gallery,
        anno.json → the scene's annotations. Anything else: one line, the session unchanged."""
        urls = list(mime.urls())
        paths = [Path(u.toLocalFile()) for u in urls if u.isLocalFile()]
        if not paths:
            if urls:
                self.show_error(f"{urls[0].toString()[:80]}: web addresses are not supported; download the file "
                                "and drop it from disk")
            return ""
        p = paths[0]
        note = f" ({len(paths)} files dropped: using {p.name}, one at a time)" if len(paths) > 1 else ""
        kind = self._route_drop(p)
        if note and kind:
            self.show_message(f"{kind}: {p.name}{note}")
        return kind

    def _route_drop(self, p: Path) -> str:
        from ..checkpoint import format_of

        on_scene = self.tabs.currentWidget() is self.scene
        if not p.exists():
            self.show_error(f"{p.name}: no such file")
            return ""
        if format_of(p) is not None:  # a model folder, a Hugging Face folder or a CLIP checkpoint file
            self.set_model(str(p))
            return "model"
        if p.is_dir():
            self.set_gallery(str(p))
            return "gallery"
        if is_image_file(p):
            if on_scene:
                self.scene.open_scene(p)
                return "scene"
            if self.tabs.currentWidget() is not self.compare:
                self.tabs.setCurrentWidget(self.results)
            self.run_image(str(p))
            return "image"
        if p.suffix.lower() in (".json", ".csv"):
            if p.name == "anno.json" or (on_scene and "anno" in p.name):
                return "anno" if self.open_anno(p) else ""
            self.set_gallery(str(p))
            return "gallery"
        self.show_error(f"{p.name}: drop an image, a dataset JSON/CSV, an image folder, an index folder or a model")
        return ""

    def open_anno(self, path: Path) -> bool:
        """Load a SeLo anno.json for the scene; a malformed file is one line, the old annotations stay."""
        try:
            self.scene.load_anno(path)  # parsed in full before it replaces the session's annotations
        except Exception as e:  # noqa: BLE001 - any parse/shape error of a user's file is reported, not raised
            if not isinstance(e, (RsviewerError, OSError, ValueError)):
                log.warning("reading %s failed", path, exc_info=True)
            self.show_error(f"Could not read the annotations {Path(path).name}: {plain_message(e)}")
            return False
        return True

    # ------------------------------------------------------------------ saving
    def save_current(self) -> None:
        w = self.tabs.currentWidget()
        if w is self.map:
            if self.map.proj is not None:
                self.map._save_png_dialog()
        elif w is self.scene:
            if self.scene.result is not None:
                self.scene.save_dialog(self.report)
        elif self.details.expl is not None and self.dock.isVisible() and self.details.isAncestorOf(
                self.focusWidget() or self):
            self.details.save_dialog()
        else:
            self._export_results_dialog()

    def _export_results_dialog(self) -> None:
        grid = self.compare.grid_a if self.tabs.currentWidget() is self.compare else self.results
        if not grid.hits():
            self.show_message("no results to export")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export results", "results.csv", "CSV (*.csv);;JSON (*.json)")
        if path:
            save_file(grid.export, path, self.report)

    # ------------------------------------------------------------------ messages
    def show_message(self, msg: str) -> None:
        self.statusBar().showMessage(msg, 15000)

    def show_error(self, msg: str) -> None:
        self.session.fail(msg)
        self.statusBar().showMessage(msg, 30000)
        if self.session.result is None:
            self.results.set_message(msg, error=True)

    def report(self, msg: str, error: bool = False) -> None:
        """Status-line reporter handed to widgets and to :func:`util.save_file`."""
        (self.show_error if error else self.show_message)(msg)

    def closeEvent(self, e):  # noqa: N802
        # cancel everything, wait briefly; a job that cannot stop (a model being read)
        # is left to the process exit (run_app), its late result is never applied
        self.stopped_cleanly = self.jobs.shutdown(300) and shutdown_thumbs(200)
        super().closeEvent(e)
