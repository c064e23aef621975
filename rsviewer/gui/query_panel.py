"""The query panel: text box with history, image drop zone, model/gallery/K/rerank/label."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QComboBox, QCompleter, QFileDialog, QFormLayout, QFrame, QGroupBox,
                               QLabel, QPushButton, QSpinBox, QVBoxLayout, QWidget)

from ..data import IMAGE_EXTENSIONS
from . import state
from .util import ThumbCache, recent, remember

OPEN = "__open__"
IMAGE_FILTER = "Images (" + " ".join(f"*{e}" for e in sorted(IMAGE_EXTENSIONS)) + ")"


class DropZone(QFrame):
    """Shows the current image query; click "Browse…" or drop an image onto the window."""

    browse = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("dropZone")
        self.setMinimumHeight(120)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(8, 8, 8, 8)
        self.preview = QLabel()
        self.preview.setAlignment(Qt.AlignCenter)
        self.preview.setMinimumHeight(80)
        self.text = QLabel("Drop an aerial image anywhere\nin the window to search with it")
        self.text.setObjectName("hint")
        self.text.setAlignment(Qt.AlignCenter)
        b = QPushButton("Browse…")
        b.clicked.connect(self.browse.emit)
        lay.addWidget(self.preview, 1)
        lay.addWidget(self.text)
        lay.addWidget(b, 0, Qt.AlignCenter)
        self.preview.setVisible(False)
        self.path: Optional[str] = None
        self.cache = ThumbCache(size=220, parent=self, limit=32)
        self.cache.updated.connect(self._preview_ready)

    HINT = "Drop an aerial image anywhere\nin the window to search with it"

    def show_image(self, path: Optional[str]) -> None:
        """Preview ``path`` (decoded at display size in a worker; a placeholder meanwhile)."""
        self.path = str(path) if path else None
        if self.path is None:
            self.preview.clear()
            self.preview.setVisible(False)
            self.text.setText(self.HINT)
            return
        self.text.setText(Path(self.path).name)
        self.preview.setVisible(True)
        pm = self.cache.get(self.path)
        if pm is None:
            self.preview.clear()
            failed = self.cache.failed.get(self.path)
            self.preview.setText(f"no preview: {failed}" if failed else "loading preview…")
            self.preview.setWordWrap(True)
        else:
            self.preview.setPixmap(pm.scaled(200, 110, Qt.KeepAspectRatio, Qt.SmoothTransformation))

    def _preview_ready(self, path: str) -> None:
        if path == self.path:
            self.show_image(path)

    def has_preview(self) -> bool:
        pm = self.preview.pixmap()
        return self.preview.isVisible() and pm is not None and not pm.isNull()

    def set_hover(self, on: bool) -> None:
        self.setProperty("hover", "true" if on else "false")
        self.style().unpolish(self)
        self.style().polish(self)


class QueryPanel(QWidget):
    text_query = Signal(str)
    image_query = Signal(str)
    model_chosen = Signal(str)
    gallery_chosen = Signal(str)
    options_changed = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setFixedWidth(300)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(10, 10, 10, 10)
        lay.setSpacing(10)

        # --- query
        q = QGroupBox("Query")
        ql = QVBoxLayout(q)
        self.query = QComboBox()
        self.query.setEditable(True)
        self.query.setInsertPolicy(QComboBox.NoInsert)
        self.query.setMaxVisibleItems(15)
        self.query.lineEdit().setPlaceholderText("e.g. four tennis courts next to a parking lot")
        self.query.lineEdit().setClearButtonEnabled(True)
        self.query.lineEdit().setAcceptDrops(False)
        self.query.setAcceptDrops(False)
        self.query.addItems(recent("recent/queries"))
        self.query.setCurrentIndex(-1)
        comp = QCompleter(self.query.model(), self)
        comp.setCaseSensitivity(Qt.CaseInsensitive)
        comp.setFilterMode(Qt.MatchContains)
        self.query.setCompleter(comp)
        self.query.lineEdit().returnPressed.connect(self.submit_text)
        self.query.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.query.setMinimumContentsLength(12)
        ql.addWidget(self.query)
        self.search_button = QPushButton("Search")
        self.search_button.setObjectName("primary")
        self.search_button.setToolTip("Run the text query (Enter)")
        self.search_button.clicked.connect(self.submit_text)
        ql.addWidget(self.search_button)
        self.drop = DropZone()
        self.drop.browse.connect(self.browse_image)
        ql.addWidget(self.drop)
        lay.addWidget(q)

        # --- model & gallery
        g = QGroupBox("Model and gallery")
        gl = QFormLayout(g)
        gl.setLabelAlignment(Qt.AlignRight)
        self.model_combo = QComboBox()
        self.model_combo.setToolTip("Retrieval model (a folder with config.json + model.safetensors)")
        self.gallery_combo = QComboBox()
        self.gallery_combo.setToolTip("Gallery to search: a dataset JSON, a folder of images or an index")
        for c in (self.model_combo, self.gallery_combo):
            c.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
            c.setMinimumContentsLength(8)
        self.fill_models()
        self.fill_galleries()
        self.model_combo.activated.connect(self._model_activated)
        self.gallery_combo.activated.connect(self._gallery_activated)
        gl.addRow("Model", self.model_combo)
        gl.addRow("Gallery", self.gallery_combo)
        lay.addWidget(g)

        # --- options
        o = QGroupBox("Options")
        ol = QFormLayout(o)
        ol.setLabelAlignment(Qt.AlignRight)
        self.k = QSpinBox()
        self.k.setRange(1, 500)
        self.k.setValue(20)
        self.k.setToolTip("Number of results")
        self.rerank = QComboBox()
        self.rerank.addItem("none", "none")
        self.rerank.addItem("MR (GaLR)", "mr")
        self.rerank.addItem("SMR (CMPAGL)", "smr")
        self.rerank.setToolTip("Rerank the top candidates with reverse search (text queries)")
        self.label_filter = QComboBox()
        self.label_filter.addItem("all labels", None)
        self.label_filter.setToolTip("Only show gallery images with this scene label")
        self.label_filter.setSizeAdjustPolicy(QComboBox.AdjustToMinimumContentsLengthWithIcon)
        self.label_filter.setMinimumContentsLength(8)
        for w in (self.k, self.rerank, self.label_filter):
            (w.valueChanged if isinstance(w, QSpinBox) else w.currentIndexChanged).connect(
                lambda *_: self.options_changed.emit())
        ol.addRow("Results (K)", self.k)
        ol.addRow("Rerank", self.rerank)
        ol.addRow("Scene label", self.label_filter)
        lay.addWidget(o)

        self.info = QLabel()
        self.info.setObjectName("hint")
        self.info.setWordWrap(True)
        self.info.setTextInteractionFlags(Qt.TextSelectableByMouse)
        lay.addWidget(self.info)
        lay.addStretch(1)

    # ---- model / gallery lists
    def fill_models(self, current: Optional[str] = None) -> None:
        c = self.model_combo
        c.blockSignals(True)
        c.clear()
        seen = set()
        for p in state.model_choices():
            c.addItem(p.name, str(p.resolve()))
            seen.add(str(p.resolve()))
        for r in recent("recent/models"):
            rp = str(Path(r).resolve())
            if rp not in seen and Path(r, "config.json").exists():
                c.addItem(Path(r).name, rp)
                seen.add(rp)
        c.insertSeparator(c.count())
        c.addItem("Open model folder…", OPEN)
        if current:
            self.select_model(current)
        c.blockSignals(False)

    def select_model(self, path: str) -> None:
        c = self.model_combo
        rp = str(Path(path).resolve())
        i = c.findData(rp)
        if i < 0:
            c.insertItem(max(0, c.count() - 2), Path(path).name, rp)
            i = c.findData(rp)
        c.blockSignals(True)
        c.setCurrentIndex(i)
        c.blockSignals(False)

    def fill_galleries(self) -> None:
        c = self.gallery_combo
        c.blockSignals(True)
        c.clear()
        c.addItem(state.gallery_label(None), str(state.DEMO_GALLERY))
        for r in recent("recent/galleries"):
            if Path(r).exists() and c.findData(r) < 0:
                c.addItem(state.gallery_label(r), r)
        c.insertSeparator(c.count())
        c.addItem("Open dataset file (JSON/CSV)…", OPEN + "file")
        c.addItem("Open image folder…", OPEN + "folder")
        c.addItem("Open index folder…", OPEN + "index")
        c.blockSignals(False)

    def select_gallery(self, spec: str) -> None:
        c = self.gallery_combo
        i = c.findData(spec)
        if i < 0:
            c.insertItem(1, state.gallery_label(spec), spec)
            i = 1
        c.blockSignals(True)
        c.setCurrentIndex(i)
        c.blockSignals(False)

    def set_labels(self, labels) -> None:
        cur = self.label_filter.currentData()
        self.label_filter.blockSignals(True)
        self.label_filter.clear()
        self.label_filter.addItem("all labels", None)
        for lab in sorted({lab for lab in labels if lab}):
            self.label_filter.addItem(lab, lab)
        i = self.label_filter.findData(cur)
        self.label_filter.setCurrentIndex(max(0, i))
        self.label_filter.setEnabled(self.label_filter.count() > 1)
        self.label_filter.blockSignals(False)

    def _model_activated(self, i: int) -> None:
        data = self.model_combo.itemData(i)
        if data == OPEN:
            folder = QFileDialog.getExistingDirectory(self, "Open model folder")
            if not folder:
                return
            data = folder
        self.model_chosen.emit(data)

    def _gallery_activated(self, i: int) -> None:
        data = self.gallery_combo.itemData(i)
        if isinstance(data, str) and data.startswith(OPEN):
            kind = data[len(OPEN):]
            if kind == "file":
                path, _ = QFileDialog.getOpenFileName(self, "Open dataset", "", "Datasets (*.json *.csv);;All files (*)")
            else:
                path = QFileDialog.getExistingDirectory(self, "Open image folder" if kind == "folder" else "Open index")
            if not path:
                return
            data = path
        self.gallery_chosen.emit(data)

    # ---- queries
    def current_text(self) -> str:
        return self.query.currentText().strip()

    def submit_text(self) -> None:
        text = self.current_text()
        self.text_query.emit(text)

    def add_history(self, text: str) -> None:
        items = remember("recent/queries", text, 25)
        self.query.blockSignals(True)
        self.query.clear()
        self.query.addItems(items)
        self.query.setCurrentIndex(0)
        self.query.setEditText(text)
        if self.query.lineEdit() is not None:
            self.query.lineEdit().setCursorPosition(0)  # a long query shows its start
        self.query.blockSignals(False)

    def browse_image(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Search with an image", "", IMAGE_FILTER)
        if path:
            self.image_query.emit(path)

    def options(self) -> dict:
        lab = self.label_filter.currentData()
        return {"k": self.k.value(), "rerank": self.rerank.currentData(), "labels": [lab] if lab else None}
