"""The Evaluate tab: where a model fails, query by query (issue 15).

One or two models on the current gallery (any gallery with captions: its ground truth),
one rerank. A worker scores the gallery (``retrieval.per_query``; pairwise models score
every pair there), the result is cached per model, gallery and rerank. The tab shows

* R@1/5/10 both ways and mR per model, B − A, and the gallery's mR ceiling (a model
  perfect except among identical caption strings);
* a sortable, filterable table of queries (captions for text→image, images for
  image→text) with each model's rank of the ground truth and their difference;
* per-class recall (bars), the ground-truth × top-1 label confusion (heatmap; a click
  lists those queries) and the rank distribution (histogram), each exportable as PNG.

Selecting a row asks the main window (``query_requested``) to run that query in the
Results tab, where the ground truth is marked.
"""
from __future__ import annotations

import csv
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QAbstractTableModel, QBuffer, QByteArray, QIODevice, QModelIndex, QSortFilterProxyModel, \
    Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (QAbstractItemView, QCheckBox, QComboBox, QFileDialog, QFrame, QHBoxLayout, QHeaderView,
                               QLabel, QPushButton, QSpinBox, QSplitter, QTableView, QTableWidget, QTableWidgetItem,
                               QTabWidget, QVBoxLayout, QWidget)

from ..retrieval.per_query import (KS, Scores, class_recall, confusion, per_query, query_labels, score_index,
                                   seen_in_training, top1_labels)
from ..utils.atomic import atomic_file
from . import state, theme

TIES_NOTE = ("Ties: identical captions get identical scores; R@K counts a tie as its expected value under random "
             "tie-breaking (a caption whose image is tied with one other image scores R@1 = 0.5), as rsviewer eval does.")
DIRECTIONS = {"t2i": "text → image (captions)", "i2t": "image → text (images)"}
SHOW = [("all", "all queries"), ("fail_a", "failures of A (rank > K)"), ("fail_b", "failures of B (rank > K)"),
        ("a_wins", "A wins (A ranks the truth higher)"), ("b_wins", "B wins"), ("same", "A and B equal")]

# ---------------------------------------------------------------------------- worker side (no widgets)
_lock = threading.Lock()
_scores: dict[tuple, object] = {}  # (model folder, gallery) -> Scores before rerank
_results: dict[tuple, object] = {}  # (model folder, gallery, rerank) -> PerQuery


def _gallery_key(gallery: Optional[str]) -> str:
    p = Path(gallery).expanduser() if gallery else state.DEMO_GALLERY
    return str(p.resolve()) if p.exists() else str(p)


def evaluate_model(spec: str, gallery: Optional[str], rerank: str, progress=None, cancel=None):
    """The PerQuery of one model on a gallery (cached per model, gallery and rerank), and
    whether it came from the cache. Runs in a worker thread."""
    model = state.get_model(spec, progress=progress)
    key = (str(getattr(model, "model_dir", spec)), getattr(model, "fingerprint", ""), _gallery_key(gallery))
    with _lock:
        hit = _results.get(key + (rerank,))
        scores = _scores.get(key)
    if hit is not None:
        return hit, True
    if scores is None:
        index = state.open_gallery(gallery, model, progress, cancel)
        scores = _pairwise_from_disk(model, index) or score_index(model, index, "none", progress, cancel)
        if model.pairwise:
            _pairwise_to_disk(model, index, scores)
        with _lock:
            _scores[key] = scores
    if progress:
        progress(0, 0, f"{scores.model}: ranking ({rerank})")
    pq = per_query(scores.reranked(rerank))
    with _lock:
        _results[key + (rerank,)] = pq
    return pq, False


def _sim_cache_path(model, index) -> Path:
    """Where a pairwise model's full score matrix of an index is kept: scoring every pair
    is the slow part for MSSA (minutes on a CPU); the matrix itself is small (N × M float32)."""
    import hashlib
    import json

    payload = {"fp": getattr(model, "fingerprint", ""), "index": str(index.folder or ""),
               "created": index.meta.get("created"), "n": len(index), "m": int(len(index.caption_image))}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]
    return state.cache_root() / "scores" / f"{key}.npy"


def _pairwise_from_disk(model, index):
    if not model.pairwise:
        return None
    path = _sim_cache_path(model, index)
    try:
        sim = np.load(path)
    except (OSError, ValueError):
        return None
    if sim.shape != (len(index), len(index.caption_image)):
        return None
    return Scores(getattr(model, "name", model.arch), "none", sim, sim, sim, index.captions,
                  np.asarray(index.caption_image, np.int64), [it["id"] for it in index.items],
                  [it.get("label") for it in index.items], [it["path"] for it in index.items])


def _pairwise_to_disk(model, index, scores) -> None:
    path = _sim_cache_path(model, index)
    if path.exists():
        return
    try:
        with atomic_file(path, "wb") as fh:
            np.save(fh, np.ascontiguousarray(scores.sim, np.float32))
    except OSError:
        pass  # a cache that cannot be written only costs time next session


def evaluate_models(specs, gallery, rerank, progress=None, cancel=None) -> dict:
    """What the Compute button runs: each model's PerQuery and seconds."""
    out = {"pqs": [], "seconds": [], "cached": [], "seen": []}
    for spec in specs:
        t0 = time.perf_counter()
        pq, cached = evaluate_model(spec, gallery, rerank, progress, cancel)
        out["pqs"].append(pq)
        out["seconds"].append(time.perf_counter() - t0)
        out["cached"].append(cached)
        model = state.get_model(spec)
        items = state.open_gallery(gallery, model).items  # in memory after evaluate_model
        out["seen"].append(seen_in_training(model, [it.get("split") for it in items]))
    return out


# ---------------------------------------------------------------------------- the query table
class QueryTable(QAbstractTableModel):
    """Rows: the queries of one direction. ``Qt.UserRole`` gives the sort key."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.cols: list[tuple[str, list]] = []
        self.n = 0

    def set_run(self, pqs: list, direction: str) -> None:
        self.beginResetModel()
        a = pqs[0]
        da = getattr(a, direction)
        ci = a.caption_image
        best = a.i2t["best_caption"]
        if direction == "t2i":
            texts, images = list(a.captions), [a.ids[i] for i in ci]
            groups, sizes, text_name = a.dup_group, a.dup_size, "caption"
        else:
            texts, images = [a.captions[c] for c in best], list(a.ids)
            groups, sizes, text_name = a.dup_group[best], a.dup_size[best], "best own caption (A)"
        cols = [("label", query_labels(a, direction))]
        tags = list(zip("AB", pqs))
        cols += [(f"rank {tag}", getattr(pq, direction)["rank"].tolist()) for tag, pq in tags]
        if len(pqs) == 2:
            diff = getattr(pqs[1], direction)["exp_rank"] - da["exp_rank"]
            cols.append(("Δ rank (B − A)", diff.tolist()))
        cols += [(f"ties {tag}", getattr(pq, direction)["ties"].tolist()) for tag, pq in tags]
        cols += [(f"top-1 {tag}", top1_labels(pq, direction)) for tag, pq in tags]
        cols += [("dup group", groups.tolist()), ("dup size", sizes.tolist()), ("image", images), (text_name, texts)]
        self.cols = cols
        self.n = len(da["rank"])
        self.endResetModel()

    def clear(self) -> None:
        self.beginResetModel()
        self.cols, self.n = [], 0
        self.endResetModel()

    def column(self, name: str) -> Optional[list]:
        for n, v in self.cols:
            if n == name:
                return v
        return None

    def rowCount(self, parent=QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else self.n

    def columnCount(self, parent=QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(self.cols) + 1

    def headerData(self, section, orientation, role=Qt.DisplayRole):  # noqa: N802
        if role != Qt.DisplayRole:
            return None
        if orientation == Qt.Horizontal:
            return "#" if section == 0 else self.cols[section - 1][0]
        return None

    def data(self, index, role=Qt.DisplayRole):
        if not index.isValid():
            return None
        r, c = index.row(), index.column()
        if c == 0:
            return r if role in (Qt.DisplayRole, Qt.UserRole) else None
        name, vals = self.cols[c - 1]
        v = vals[r]
        if role == Qt.UserRole:
            return v
        if role == Qt.DisplayRole:
            return f"{v:+.1f}" if name.startswith("Δ") else v
        if role == Qt.ForegroundRole and name.startswith("Δ") and v:
            return QColor(theme.GOOD if v > 0 else theme.BAD)
        if role == Qt.ToolTipRole and name in ("caption", "best own caption (A)"):
            return v
        return None


class QueryFilter(QSortFilterProxyModel):
    """Accepts the rows of a boolean mask (computed with numpy by the tab)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.mask: Optional[np.ndarray] = None
        self.setSortRole(Qt.UserRole)

    def set_mask(self, mask: Optional[np.ndarray]) -> None:
        if hasattr(self, "beginFilterChange"):  # Qt >= 6.9 (invalidateFilter is deprecated there)
            self.beginFilterChange()
            self.mask = mask
            self.endFilterChange(QSortFilterProxyModel.Direction.Rows)
        else:
            self.mask = mask
            self.invalidateFilter()

    def drop_mask(self) -> None:
        """Forget the mask without re-filtering: call just before the source model resets."""
        self.mask = None

    def filterAcceptsRow(self, row, parent) -> bool:  # noqa: N802
        # a mask of the other direction (1,050 captions vs 210 images) must never index these rows
        return self.mask is None or (row < len(self.mask) and bool(self.mask[row]))


# ---------------------------------------------------------------------------- charts
def _title(text: str) -> QLabel:
    """A chart's title as a word-wrapped label above the plot. pyqtgraph's own title sets
    the plot's minimum width to the text's, so a long title (two model names) made the
    plot wider than a narrow pane and cut its right-hand columns off."""
    lab = QLabel(text)
    lab.setWordWrap(True)
    lab.setAlignment(Qt.AlignHCenter)
    lab.setStyleSheet(f"color: {theme.TEXT}; background: {theme.PANEL}; padding: 4px;")
    return lab


def _plot() -> pg.PlotWidget:
    w = pg.PlotWidget(background=theme.PANEL)
    w.setMenuEnabled(False)
    for ax in ("left", "bottom"):
        w.getAxis(ax).setTextPen(theme.TEXT)
        w.getAxis(ax).setPen(theme.BORDER)
    return w


COLORS = (theme.ACCENT, "#f59e0b")


def _fit_axis(axis, labels) -> None:
    """Make a left axis wide enough for its longest tick label (pyqtgraph does not)."""
    from PySide6.QtGui import QFontMetrics

    fm = QFontMetrics(axis.style.get("tickFont") or axis.font())
    axis.setWidth(max((fm.horizontalAdvance(t) for t in labels), default=0) + 40)


class ClassRecallChart(QWidget):
    """Horizontal bars: R@K per ground-truth scene label, one bar per model."""

    def __init__(self, parent=None):
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        self.title = _title("per-class recall")
        lay.addWidget(self.title)
        self.plot = _plot()
        self.plot.getViewBox().setMouseEnabled(False, False)
        lay.addWidget(self.plot)
        self.values: dict[str, list[float]] = {}

    def show_run(self, pqs, names, direction: str, k: int) -> None:
        self.plot.clear()
        recs = [class_recall(pq, direction, k) for pq in pqs]
        labels = list(recs[0])
        self.values = {lab: [r[lab] for r in recs] for lab in labels}
        h = 0.8 / len(pqs)
        for j, (r, name) in enumerate(zip(recs, names)):
            y = np.arange(len(labels)) - 0.4 + h * (j + 0.5)
            self.plot.addItem(pg.BarGraphItem(x0=0, y=y, height=h * 0.9, width=[r[lab] for lab in labels],
                                              brush=COLORS[j], pen=None, name=name))
        ax = self.plot.getAxis("left")
        ax.setTicks([[(i, lab) for i, lab in enumerate(labels)]])
        _fit_axis(ax, labels)
        self.plot.setXRange(0, 100, padding=0.02)
        self.plot.setYRange(-0.6, len(labels) - 0.4, padding=0)
        self.plot.getViewBox().invertY(True)
        self.plot.setLabel("bottom", f"{'text→image' if direction == 't2i' else 'image→text'} R@{k} (%)", color=theme.TEXT)
        legend = "  ".join(f"<span style='color:{COLORS[j]}'>■</span> {n}" for j, n in enumerate(names))
        self.title.setText(f"per-class R@{k} — {legend}")


class ConfusionChart(QWidget):
    """Heatmap of ground-truth label (rows) × top-1 label (columns); a click emits the cell."""

    cell_clicked = Signal(str, str)

    def __init__(self, parent=None):
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        self.title = _title("label confusion")
        lay.addWidget(self.title)
        self.plot = _plot()
        self.plot.getViewBox().setMouseEnabled(False, False)
        self.plot.getViewBox().invertY(True)
        self.plot.getViewBox().setAspectLocked(True)  # square cells, whatever the pane's shape
        self.image = pg.ImageItem(axisOrder="row-major")
        self.plot.addItem(self.image)
        self.plot.scene().sigMouseClicked.connect(self._clicked)
        lay.addWidget(self.plot)
        self.names: list[str] = []
        self.matrix = np.zeros((0, 0), np.int64)
        self._texts: list = []

    def show_run(self, pq, direction: str, model_name: str) -> None:
        self.names, self.matrix = confusion(pq, direction)
        m = self.matrix.astype(np.float64)
        frac = m / np.maximum(m.sum(1, keepdims=True), 1)  # row-normalised: share of each true label
        # square root: the off-diagonal shares (the confusions) stay visible next to a strong diagonal
        self.image.setImage(np.sqrt(frac), levels=(0, 1))
        self.image.setColorMap(pg.ColorMap([0.0, 1.0], [(255, 255, 255), QColor(theme.ACCENT).getRgb()[:3]]))
        self.image.setRect(0, 0, len(self.names), len(self.names))
        for t in self._texts:
            self.plot.removeItem(t)
        self._texts = []
        for (i, j), v in np.ndenumerate(self.matrix):
            if v:
                t = pg.TextItem(str(v), color="white" if frac[i, j] > 0.3 else theme.TEXT, anchor=(0.5, 0.5))
                t.setPos(j + 0.5, i + 0.5)
                self.plot.addItem(t)
                self._texts.append(t)
        left = [f"{n} {i + 1}" for i, n in enumerate(self.names)]
        self.plot.getAxis("left").setTicks([[(i + 0.5, t) for i, t in enumerate(left)]])
        _fit_axis(self.plot.getAxis("left"), left)
        self.plot.getAxis("bottom").setTicks([[(i + 0.5, str(i + 1)) for i in range(len(self.names))]])
        self.plot.setLabel("left", "ground-truth label", color=theme.TEXT)
        self.plot.setLabel("bottom", "top-1 label (numbered as the rows)", color=theme.TEXT)
        off = int(m.sum() - np.trace(m))
        self.title.setText(f"{model_name}, {'text→image' if direction == 't2i' else 'image→text'}: {off}/"
                           f"{int(m.sum())} top-1 off-label · click a cell")
        self._fit()

    def _fit(self) -> None:
        n = len(self.names)
        self.plot.getViewBox().setRange(xRange=(0, n), yRange=(0, n), padding=0.01, disableAutoRange=True)

    def showEvent(self, e):  # noqa: N802 - a hidden plot has no size yet: fit again when shown
        super().showEvent(e)
        self._fit()

    def resizeEvent(self, e):  # noqa: N802
        super().resizeEvent(e)
        self._fit()

    def cell_at(self, scene_pos) -> Optional[tuple[str, str]]:
        p = self.plot.getViewBox().mapSceneToView(scene_pos)
        i, j = int(np.floor(p.y())), int(np.floor(p.x()))
        if 0 <= i < len(self.names) and 0 <= j < len(self.names):
            return self.names[i], self.names[j]
        return None

    def cell_center(self, gt: str, top: str):
        """Scene position of a cell's centre (for tests and keyboard-free automation)."""
        from PySide6.QtCore import QPointF

        return self.plot.getViewBox().mapViewToScene(QPointF(self.names.index(top) + 0.5, self.names.index(gt) + 0.5))

    def _clicked(self, ev) -> None:
        cell = self.cell_at(ev.scenePos())
        if cell is not None:
            self.cell_clicked.emit(*cell)


HIST_EDGES = list(range(1, 12)) + [21, 51, 10**9]  # ranks 1..10 one by one, then wider bins


def hist_labels() -> list[str]:
    out = []
    for lo, hi in zip(HIST_EDGES[:-1], HIST_EDGES[1:]):
        out.append(str(lo) if hi == lo + 1 else (f"{lo}–{hi - 1}" if hi < 10**9 else f">{lo - 1}"))
    return out


class RankHistogram(QWidget):
    """How many queries put the ground truth at rank 1, 2, … (bins widen with the rank)."""

    def __init__(self, parent=None):
        super().__init__(parent)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(0)
        self.title = _title("rank distribution")
        lay.addWidget(self.title)
        self.plot = _plot()
        self.plot.getViewBox().setMouseEnabled(False, False)
        lay.addWidget(self.plot)
        self.counts: list[np.ndarray] = []

    def show_run(self, pqs, names, direction: str) -> None:
        self.plot.clear()
        self.counts = [np.histogram(getattr(pq, direction)["rank"], bins=HIST_EDGES)[0] for pq in pqs]
        w = 0.8 / len(pqs)
        for j, c in enumerate(self.counts):
            x = np.arange(len(c)) - 0.4 + w * (j + 0.5)
            self.plot.addItem(pg.BarGraphItem(x=x, height=c, width=w * 0.9, brush=COLORS[j], pen=None))
        self.plot.getAxis("bottom").setTicks([list(enumerate(hist_labels()))])
        self.plot.setLabel("bottom", "rank of the ground truth (ties in its favour)", color=theme.TEXT)
        self.plot.setLabel("left", "queries", color=theme.TEXT)
        legend = "  ".join(f"<span style='color:{COLORS[j]}'>■</span> {n}" for j, n in enumerate(names))
        self.title.setText(f"rank of the ground truth, {'text→image' if direction == 't2i' else 'image→text'} — {legend}")


# ---------------------------------------------------------------------------- the tab
def write_png(widget: QWidget, path: str | Path) -> Path:
    """Grab a widget and write it as PNG atomically."""
    buf = QBuffer()
    buf.open(QIODevice.WriteOnly)
    if not widget.grab().save(buf, "PNG"):
        raise OSError(f"could not encode {Path(path).name} as PNG")
    data: QByteArray = buf.data()
    with atomic_file(path, "wb") as fh:
        fh.write(bytes(data))
    return Path(path)


class EvaluateWidget(QWidget):
    # ("text", caption) | ("image", path), switch tab: run it in the Results tab (a double-click also shows it)
    query_requested = Signal(str, str, bool)
    computed = Signal()

    def __init__(self, jobs, parent=None):
        super().__init__(parent)
        self.jobs = jobs
        self.gallery_spec: Optional[str] = None
        self.pqs: list = []
        self.names: list[str] = []
        self.cell: Optional[tuple[str, str]] = None  # confusion-cell filter (gt label, top-1 label)
        self.message = ""
        lay = QVBoxLayout(self)
        lay.setContentsMargins(8, 8, 8, 8)
        lay.addLayout(self._controls())
        self.info = QLabel("Pick one or two models and press Compute: every caption and every image of the gallery "
                           "is a query whose ground truth is known.")
        self.info.setObjectName("hint")
        self.info.setWordWrap(True)
        lay.addWidget(self.info)
        self.metrics = QTableWidget(0, 7)
        self.metrics.setHorizontalHeaderLabels(["i2t R@1", "R@5", "R@10", "t2i R@1", "R@5", "R@10", "mR"])
        self.metrics.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.metrics.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.metrics.setMaximumHeight(150)
        self.metrics.verticalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        lay.addWidget(self.metrics)
        self.dup_note = QLabel(TIES_NOTE)
        self.dup_note.setObjectName("hint")
        self.dup_note.setWordWrap(True)
        lay.addWidget(self.dup_note)
        lay.addLayout(self._filters())
        split = QSplitter(Qt.Horizontal)
        split.addWidget(self._table_pane())
        split.addWidget(self._charts_pane())
        split.setSizes([640, 560])
        lay.addWidget(split, 1)
        self.status = QLabel("")
        self.status.setObjectName("hint")
        lay.addWidget(self.status)
        self._set_enabled(False)

    # ---- layout pieces
    def _controls(self) -> QHBoxLayout:
        bar = QHBoxLayout()
        self.model_a, self.model_b = QComboBox(), QComboBox()
        self.model_a.setMinimumWidth(120)
        self.model_b.setMinimumWidth(120)
        self.fill_models()
        self.rerank = QComboBox()
        for m, label in (("none", "no rerank"), ("mr", "MR (GaLR)"), ("smr", "SMR (CMPAGL)")):
            self.rerank.addItem(label, m)
        self.compute_button = QPushButton("Compute")
        self.compute_button.setObjectName("primary")
        self.compute_button.clicked.connect(self.compute)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.clicked.connect(lambda: self.jobs.cancel("evaluate"))
        self.cancel_button.setEnabled(False)
        for w in (QLabel("Model A"), self.model_a, QLabel("Model B"), self.model_b, QLabel("Rerank"), self.rerank,
                  self.compute_button, self.cancel_button):
            bar.addWidget(w)
        bar.addStretch(1)
        return bar

    def _filters(self) -> QVBoxLayout:
        bar = QHBoxLayout()
        self.direction = QComboBox()
        for d, label in DIRECTIONS.items():
            self.direction.addItem(label, d)
        self.k = QComboBox()
        for k in KS:
            self.k.addItem(f"K = {k}", k)
        self.show = QComboBox()
        for key, label in SHOW:
            self.show.addItem(label, key)
        self.label = QComboBox()
        self.dup_only = QCheckBox("duplicated strings only")
        self.dup_only.setToolTip("Only queries whose caption string occurs more than once in the gallery")
        self.group = QSpinBox()
        self.group.setRange(-1, 10**6)
        self.group.setSpecialValueText("any group")
        self.group.setValue(-1)
        self.group.setToolTip("Only one duplicate-caption group (the 'dup group' column)")
        self.direction.currentIndexChanged.connect(self._direction_changed)
        for w in (self.k, self.show, self.label):
            w.currentIndexChanged.connect(self._refresh_view)
        self.dup_only.toggled.connect(self._apply_filter)
        self.group.valueChanged.connect(self._apply_filter)
        for w in (QLabel("Queries"), self.direction, self.k, QLabel("Show"), self.show):
            bar.addWidget(w)
        bar.addStretch(1)
        second = QHBoxLayout()  # two rows: the tab must fit next to the query panel and the details dock
        for w in (QLabel("Label"), self.label, self.dup_only, self.group):
            second.addWidget(w)
        second.addStretch(1)
        rows = QVBoxLayout()
        rows.addLayout(bar)
        rows.addLayout(second)
        return rows

    def _table_pane(self) -> QWidget:
        w = QWidget()
        lay = QVBoxLayout(w)
        lay.setContentsMargins(0, 0, 0, 0)
        self.banner = QFrame()
        self.banner.setObjectName("banner")
        bl = QHBoxLayout(self.banner)
        bl.setContentsMargins(8, 4, 8, 4)
        self.banner_label = QLabel()
        clear = QPushButton("Clear")
        clear.clicked.connect(self.clear_cell)
        bl.addWidget(self.banner_label, 1)
        bl.addWidget(clear)
        self.banner.setVisible(False)
        lay.addWidget(self.banner)
        self.table_model = QueryTable(self)
        self.proxy = QueryFilter(self)
        self.proxy.setSourceModel(self.table_model)
        self.table = QTableView()
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.sortByColumn(0, Qt.AscendingOrder)
        self.table.selectionModel().currentRowChanged.connect(self._row_changed)
        self.table.doubleClicked.connect(lambda ix: self._emit_query(ix, True))
        lay.addWidget(self.table, 1)
        row = QHBoxLayout()
        self.count_label = QLabel("")
        self.count_label.setObjectName("hint")
        self.csv_button = QPushButton("Export table CSV…")
        self.csv_button.clicked.connect(self._export_csv_dialog)
        row.addWidget(self.count_label, 1)
        row.addWidget(self.csv_button)
        lay.addLayout(row)
        return w

    def _charts_pane(self) -> QWidget:
        w = QWidget()
        lay = QVBoxLayout(w)
        lay.setContentsMargins(0, 0, 0, 0)
        self.charts = QTabWidget()
        self.class_chart = ClassRecallChart()
        self.confusion_chart = ConfusionChart()
        self.hist_chart = RankHistogram()
        self.confusion_chart.cell_clicked.connect(self.filter_cell)
        self.charts.addTab(self.class_chart, "Per-class recall")
        self.charts.addTab(self.confusion_chart, "Label confusion")
        self.charts.addTab(self.hist_chart, "Rank histogram")
        lay.addWidget(self.charts, 1)
        row = QHBoxLayout()
        self.confusion_model = QComboBox()
        self.confusion_model.setMinimumWidth(160)
        self.confusion_model.setToolTip("Whose top-1 the confusion matrix uses")
        self.confusion_model.currentIndexChanged.connect(self._refresh_charts)
        self.png_button = QPushButton("Save chart PNG…")
        self.png_button.clicked.connect(self._export_png_dialog)
        row.addWidget(QLabel("Confusion of"))
        row.addWidget(self.confusion_model)
        row.addStretch(1)
        row.addWidget(self.png_button)
        lay.addLayout(row)
        return w

    def fill_models(self) -> None:
        for combo, none in ((self.model_a, False), (self.model_b, True)):
            cur = combo.currentData()
            combo.clear()
            if none:
                combo.addItem("— none —", "")
            for p in state.model_choices():
                combo.addItem(p.name, str(p.resolve()))
            i = combo.findData(cur) if cur is not None else -1
            combo.setCurrentIndex(max(0, i))

    def _set_enabled(self, on: bool) -> None:
        for w in (self.csv_button, self.png_button, self.direction, self.k, self.show, self.label, self.dup_only,
                  self.group):
            w.setEnabled(on)

    # ---- context from the main window
    def set_context(self, gallery_spec: Optional[str], model_spec: Optional[str] = None) -> None:
        """The gallery (and the app's current model, preselected as A)."""
        changed = _gallery_key(gallery_spec) != _gallery_key(self.gallery_spec)
        self.gallery_spec = gallery_spec
        if model_spec and not self.pqs:
            try:
                folder = str(state.resolve_model_dir(model_spec).resolve())
            except Exception:  # noqa: BLE001 - a model outside the list: leave the choice alone
                folder = None
            i = self.model_a.findData(folder) if folder else -1
            if folder and i < 0:
                self.model_a.addItem(Path(folder).name, folder)
                i = self.model_a.count() - 1
            if i >= 0:
                self.model_a.setCurrentIndex(i)
        if changed and self.pqs:  # the old rows belong to another gallery
            self.pqs = []
            self.table_model.clear()
            self.proxy.set_mask(None)
            self._set_enabled(False)
            self.info.setText(f"Gallery changed to {state.gallery_label(gallery_spec)}: press Compute.")

    def select_models(self, a: str, b: Optional[str] = None, rerank: str = "none") -> None:
        for combo, spec in ((self.model_a, a), (self.model_b, b or "")):
            if spec:
                folder = str(state.resolve_model_dir(spec).resolve())
                i = combo.findData(folder)
                if i < 0:
                    combo.addItem(Path(folder).name, folder)
                    i = combo.count() - 1
                combo.setCurrentIndex(i)
            else:
                combo.setCurrentIndex(0)
        self.rerank.setCurrentIndex(max(0, self.rerank.findData(rerank)))

    # ---- computing
    def compute(self) -> None:
        a, b = self.model_a.currentData(), self.model_b.currentData()
        if not a:
            self.show_status("choose model A first")
            return
        specs = [a] + ([b] if b else [])
        rerank, gallery = self.rerank.currentData(), self.gallery_spec
        self.compute_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.info.setText(f"evaluating {' and '.join(Path(s).name for s in specs)} on "
                          f"{state.gallery_label(gallery)} (rerank {rerank})…")
        self.jobs.start("Evaluate", lambda progress, cancel: evaluate_models(specs, gallery, rerank, progress, cancel),
                        lambda out: self._computed(out, gallery), self._failed, slot="evaluate",
                        on_cancel=lambda: self._failed("cancelled"))

    def _failed(self, msg: str) -> None:
        self.compute_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.info.setText(f"Evaluation stopped: {msg}" if msg == "cancelled" else f"Evaluation failed: {msg}")
        self.show_status(self.info.text())

    def _computed(self, out: dict, gallery: Optional[str] = None) -> None:
        self.compute_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        if _gallery_key(gallery) != _gallery_key(self.gallery_spec):
            self.info.setText("The gallery changed while evaluating: press Compute again.")
            return
        self.pqs = out["pqs"]
        self.names = [f"{tag}: {pq.model}" for tag, pq in zip("AB", self.pqs)]
        secs = ", ".join(f"{pq.model} {'cached' if c else f'{s:.2f} s'}"
                         for pq, s, c in zip(self.pqs, out["seconds"], out["cached"]))
        pq = self.pqs[0]
        ce = pq.ceiling
        seen = [f"{pq.model} trained on the {'+'.join(sp)} split" for pq, sp in zip(self.pqs, out.get("seen", [])) if sp]
        self.info.setText(f"{state.gallery_label(self.gallery_spec)}: {len(pq.ids)} images, {len(pq.captions)} captions, "
                          f"{ce['n_distinct']} distinct strings; rerank {pq.rerank}. Time: {secs}."
                          + (f"\n⚠ Not held-out: {'; '.join(seen)} and these images are tagged so — "
                             "its numbers here are optimistic." if seen else ""))
        self._fill_metrics()
        self.dup_note.setText(
            f"Duplicate captions: {len(pq.captions) - ce['n_distinct']} captions repeat another string, so even a model "
            f"perfect except among identical strings reaches only mR {ce['mR']:.2f} (the ceiling row). {TIES_NOTE}")
        self.label.blockSignals(True)
        self.label.clear()
        self.label.addItem("all labels", "")
        for lab in sorted({x for x in pq.labels if x}):
            self.label.addItem(lab, lab)
        self.label.blockSignals(False)
        self.confusion_model.blockSignals(True)
        self.confusion_model.clear()
        for i, n in enumerate(self.names):
            self.confusion_model.addItem(n, i)
        self.confusion_model.blockSignals(False)
        two = len(self.pqs) == 2
        for i, (key, _) in enumerate(SHOW):
            self.show.model().item(i).setEnabled(key in ("all", "fail_a") or two)
        if not two and self.show.currentData() not in ("all", "fail_a"):
            self.show.setCurrentIndex(0)
        self.cell = None
        self.banner.setVisible(False)
        self._set_enabled(True)
        self._refresh_view()
        self.show_status(f"evaluated: {secs}")
        self.computed.emit()

    def _fill_metrics(self) -> None:
        rows = [(n, pq.metrics) for n, pq in zip(self.names, self.pqs)]
        vals = [[m[d][f"R@{k}"] for d in ("i2t", "t2i") for k in KS] + [m["mR"]] for _, m in rows]
        labels = [n for n, _ in rows]
        if len(vals) == 2:
            vals.append([b - a for a, b in zip(*vals)])
            labels.append("B − A")
        ce = self.pqs[0].ceiling
        vals.append([ce[d][f"R@{k}"] for d in ("i2t", "t2i") for k in KS] + [ce["mR"]])
        labels.append("ceiling (identical strings)")
        self.metrics.setRowCount(len(vals))
        self.metrics.setVerticalHeaderLabels(labels)
        for i, row in enumerate(vals):
            for j, v in enumerate(row):
                it = QTableWidgetItem(f"{v:+.2f}" if labels[i] == "B − A" else f"{v:.2f}")
                it.setTextAlignment(Qt.AlignRight | Qt.AlignVCenter)
                if j == 6:
                    f = it.font()
                    f.setBold(True)
                    it.setFont(f)
                self.metrics.setItem(i, j, it)
        self.metrics.resizeRowsToContents()
        self.metrics.setFixedHeight(self.metrics.horizontalHeader().sizeHint().height()
                                    + self.metrics.verticalHeader().length() + 2 * self.metrics.frameWidth())

    # ---- views and filters
    def current_direction(self) -> str:
        return self.direction.currentData()

    def current_k(self) -> int:
        return int(self.k.currentData())

    def _direction_changed(self) -> None:
        self.cell = None
        self.banner.setVisible(False)
        self._refresh_view()

    def _refresh_view(self) -> None:
        if not self.pqs:
            return
        # the two directions have different rows: drop the selection and the old mask before the
        # reset (a stale mask or current index applied to the new rows crashed Qt in endResetModel)
        sel = self.table.selectionModel()
        blocked = sel.blockSignals(True)
        try:
            sel.clear()
            self.proxy.drop_mask()
            self.table_model.set_run(self.pqs, self.current_direction())
        finally:
            sel.blockSignals(blocked)
        self.table.resizeColumnsToContents()
        self._apply_filter()
        self._refresh_charts()

    def _refresh_charts(self) -> None:
        if not self.pqs:
            return
        d, k = self.current_direction(), self.current_k()
        self.class_chart.show_run(self.pqs, self.names, d, k)
        j = self.confusion_model.currentData() or 0
        self.confusion_chart.show_run(self.pqs[j], d, self.names[j])
        self.hist_chart.show_run(self.pqs, self.names, d)

    def row_mask(self) -> np.ndarray:
        """The rows the current filters keep (in table-model order)."""
        d, k = self.current_direction(), self.current_k()
        a = getattr(self.pqs[0], d)
        mask = np.ones(len(a["rank"]), bool)
        show = self.show.currentData()
        b = getattr(self.pqs[1], d) if len(self.pqs) == 2 else None
        if show == "fail_a":
            mask &= a["rank"] > k
        elif b is not None and show == "fail_b":
            mask &= b["rank"] > k
        elif b is not None and show in ("a_wins", "b_wins", "same"):
            diff = b["exp_rank"] - a["exp_rank"]
            mask &= diff > 0 if show == "a_wins" else diff < 0 if show == "b_wins" else diff == 0
        labels = np.array(query_labels(self.pqs[0], d), dtype=object)
        if self.label.currentData():
            mask &= labels == self.label.currentData()
        groups = np.asarray(self.table_model.column("dup group"))
        sizes = np.asarray(self.table_model.column("dup size"))
        if self.dup_only.isChecked():
            mask &= sizes > 1
        if self.group.value() >= 0:
            mask &= groups == self.group.value()
        if self.cell is not None:
            j = self.confusion_model.currentData() or 0
            top = np.array(top1_labels(self.pqs[j], d), dtype=object)
            mask &= (labels == self.cell[0]) & (top == self.cell[1])
        return mask

    def _apply_filter(self) -> None:
        if not self.pqs:
            return
        mask = self.row_mask()
        self.proxy.set_mask(mask)
        n = int(mask.sum())
        self.count_label.setText(f"{n:,} of {mask.size:,} queries shown")

    def filter_cell(self, gt: str, top: str) -> None:
        """List the queries with ground-truth label ``gt`` whose top-1 has label ``top``."""
        self.cell = (gt, top)
        self.banner_label.setText(f"queries labelled {gt} whose top-1 result is {top} "
                                  f"({self.names[self.confusion_model.currentData() or 0]})")
        self.banner.setVisible(True)
        self._apply_filter()

    def clear_cell(self) -> None:
        self.cell = None
        self.banner.setVisible(False)
        self._apply_filter()

    def shown_rows(self) -> list[int]:
        """Source rows in view order."""
        return [self.proxy.mapToSource(self.proxy.index(i, 0)).row() for i in range(self.proxy.rowCount())]

    def select_row(self, view_row: int) -> None:
        self.table.selectRow(view_row)

    def _row_changed(self, cur, _prev) -> None:
        self._emit_query(cur, False)

    def _emit_query(self, ix, switch: bool) -> None:
        if not ix.isValid() or not self.pqs:
            return
        r = self.proxy.mapToSource(ix).row()
        pq = self.pqs[0]
        if self.current_direction() == "t2i":
            self.query_requested.emit("text", pq.captions[r], switch)
        else:
            self.query_requested.emit("image", pq.paths[r], switch)

    # ---- export
    def export_csv(self, path: str | Path) -> Path:
        rows = self.shown_rows()
        names = ["query"] + [n for n, _ in self.table_model.cols]
        with atomic_file(path, "w") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(names)
            for r in rows:
                w.writerow([r] + [v[r] for _, v in self.table_model.cols])
        return Path(path)

    def export_png(self, path: str | Path, chart: Optional[QWidget] = None) -> Path:
        return write_png(chart or self.charts.currentWidget(), path)

    def _export_csv_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export per-query table", "per_query.csv", "CSV (*.csv)")
        if path:
            self._guarded(lambda: self.export_csv(path))

    def _export_png_dialog(self) -> None:
        name = {0: "per_class_recall.png", 1: "confusion.png", 2: "rank_histogram.png"}[self.charts.currentIndex()]
        path, _ = QFileDialog.getSaveFileName(self, "Save chart", name, "PNG (*.png)")
        if path:
            self._guarded(lambda: self.export_png(path))

    def _guarded(self, fn) -> None:
        try:
            p = fn()
        except OSError as e:
            self.show_status(f"could not save: {e.strerror or e}")
            return
        self.show_status(f"saved {p}")

    def show_status(self, msg: str) -> None:
        self.message = msg
        self.status.setText(msg)
        self.jobs.message.emit(msg)
