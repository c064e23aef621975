"""The results grid: thumbnails with rank, score, label, caption and ground-truth marks."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

from PySide6.QtCore import QAbstractListModel, QModelIndex, QPoint, QRect, QSize, Qt, Signal
from PySide6.QtGui import QColor, QFont, QFontMetrics, QPainter, QPen
from PySide6.QtWidgets import (QAbstractItemView, QFrame, QHBoxLayout, QLabel, QListView, QPushButton,
                               QStyle, QStyledItemDelegate, QVBoxLayout, QWidget)

from ..utils.atomic import atomic_file
from . import theme
from .util import thumb_key, thumbs


def tile_caption(tile: dict) -> str:
    from ..localize.tiles import tile_caption as caption  # rasterio only once a tile index is open

    return caption(tile)

THUMB = 160
CELL_W, CELL_H = THUMB + 12, THUMB + 70


class ResultsModel(QAbstractListModel):
    """Rows are search hits (``rsviewer.retrieval.search.Hit``) plus a GT flag."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.hits: list = []
        self.all_hits: list = []
        self.gt_rows: Optional[set[int]] = None
        self.gt_rule = ""
        self.row_filter: Optional[set[int]] = None
        thumbs().updated.connect(self._thumb_ready)

    def set_hits(self, hits, gt=None) -> None:
        self.beginResetModel()
        self.all_hits = list(hits)
        self.gt_rows = set(int(r) for r in gt.rows) if gt else None
        self.gt_rule = gt.rule if gt else ""
        self._apply()
        self.endResetModel()

    def set_filter(self, rows: Optional[set[int]]) -> None:
        self.beginResetModel()
        self.row_filter = rows
        self._apply()
        self.endResetModel()

    def _apply(self) -> None:
        f = self.row_filter
        self.hits = [h for h in self.all_hits if f is None or h.row in f]

    def rowCount(self, parent=QModelIndex()) -> int:  # noqa: N802
        return 0 if parent.isValid() else len(self.hits)

    def data(self, index, role=Qt.DisplayRole):
        if not index.isValid():
            return None
        h = self.hits[index.row()]
        if role == Qt.DisplayRole:
            return h.id
        if role == Qt.UserRole:
            return h
        if role == Qt.ToolTipRole:
            caps = "<br>".join(f"• {c}" for c in h.captions[:5]) or (
                f"{tile_caption(h.tile)}<br><i>double-click: open in the Scene view</i>" if getattr(h, "tile", None) else "<i>no captions</i>")
            gt = self.is_gt(h)
            mark = "" if gt is None else (f"<br><b style='color:{theme.GOOD}'>✓ correct</b>" if gt else
                                          f"<br><b style='color:{theme.BAD}'>✗ not ground truth</b>")
            rule = f"<br><small>{self.gt_rule}</small>" if self.gt_rule else ""
            return (f"<b>#{h.rank}</b> {h.id} — {h.label or 'no label'} — score {h.score:.3f}"
                    f"{mark}{rule}<br>{caps}")
        return None

    def is_gt(self, h) -> Optional[bool]:
        if self.gt_rows is None:
            return None
        return h.row in self.gt_rows

    def _thumb_ready(self, path: str) -> None:
        for i, h in enumerate(self.hits):
            if thumb_key(h) == path:
                ix = self.index(i)
                self.dataChanged.emit(ix, ix)


class ResultDelegate(QStyledItemDelegate):
    def __init__(self, model: ResultsModel, parent=None, thumb: int = THUMB):
        super().__init__(parent)
        self.model = model
        self.thumb = thumb
        self._elided: dict[tuple, str] = {}
        self._sized: dict[tuple, QPixmap] = {}  # (pixmap, side) → scaled copy
        self._font_sets: dict[str, _CellFonts] = {}

    def _scaled(self, pm: QPixmap, side: int) -> QPixmap:
        """``pm`` fitted in side×side, smoothly, once: scaling every thumbnail on every
        repaint was a third of a repaint's cost (and repaints are what stall the GUI thread)."""
        key = (pm.cacheKey(), side)
        out = self._sized.get(key)
        if out is None:
            if len(self._sized) > 2000:
                self._sized.clear()
            out = self._sized[key] = pm.scaled(side, side, Qt.KeepAspectRatio, Qt.SmoothTransformation)
        return out

    def sizeHint(self, option, index) -> QSize:  # noqa: N802
        return QSize(self.thumb + CELL_W - THUMB, self.thumb + CELL_H - THUMB)

    def _fonts(self, base: QFont) -> "_CellFonts":
        """The cell's fonts and metrics for the view's font, made once (not per cell per paint)."""
        key = base.key()
        fonts = self._font_sets.get(key)
        if fonts is None:
            fonts = self._font_sets[key] = _CellFonts(base)
        return fonts

    def _cached_text(self, key: tuple, make) -> str:
        out = self._elided.get(key)
        if out is None:  # eliding and word wrapping are the costly part of a repaint: once per text
            if len(self._elided) > 5000:
                self._elided.clear()
            out = self._elided[key] = make()
        return out

    def paint(self, p: QPainter, option, index) -> None:
        h = index.data(Qt.UserRole)
        if h is None:
            return
        c = _COLOURS
        fonts = self._fonts(option.font)
        p.save()
        p.setRenderHint(QPainter.Antialiasing)
        r = option.rect.adjusted(4, 4, -4, -4)
        selected = bool(option.state & QStyle.State_Selected)
        gt = self.model.is_gt(h)
        p.setBrush(c["selected_bg"] if selected else c["panel"])
        p.setPen(c["selected_pen"] if selected else c["border_pen"])
        p.drawRoundedRect(r, 6, 6)  # fill and outline in one call
        # thumbnail (square, centred)
        T = self.thumb
        img_rect = QRect(r.x() + (r.width() - T) // 2, r.y() + 6, T, T)
        key = thumb_key(h)
        pm = thumbs().get(key)
        if pm is not None and not pm.isNull():
            scaled = self._scaled(pm, T)
            x = img_rect.x() + (T - scaled.width()) // 2
            y = img_rect.y() + (T - scaled.height()) // 2
            p.drawPixmap(x, y, scaled)
        else:
            p.fillRect(img_rect, c["placeholder"])
            p.setPen(c["muted"])
            failed = thumbs().failed.get(key)
            p.drawText(img_rect, Qt.AlignCenter | Qt.TextWordWrap, "unreadable image" if failed else "loading…")
        # ground-truth frame and mark
        if gt is not None:
            col = c["good"] if gt else c["bad"]
            p.setPen(QPen(col, 3))
            p.setBrush(Qt.NoBrush)
            p.drawRect(img_rect.adjusted(1, 1, -1, -1))
            badge = QRect(img_rect.right() - 24, img_rect.y() + 4, 20, 20)
            p.setBrush(col)
            p.setPen(Qt.NoPen)
            p.drawEllipse(badge)
            p.setPen(c["white"])
            p.setFont(fonts.bold)
            p.drawText(badge, Qt.AlignCenter, "✓" if gt else "✗")
        # rank badge
        p.setFont(fonts.rank)
        rank = f"#{h.rank}"
        rb = QRect(img_rect.x() + 4, img_rect.y() + 4, fonts.rank_fm.horizontalAdvance(rank) + 10, fonts.rank_fm.height() + 2)
        p.setBrush(c["rank_bg"])
        p.setPen(Qt.NoPen)
        p.drawRoundedRect(rb, 4, 4)
        p.setPen(c["white"])
        p.drawText(rb, Qt.AlignCenter, rank)
        # text lines: label + score, caption
        y = img_rect.bottom() + 6
        fh = fonts.small_fm.height()
        line = QRect(r.x() + 6, y, r.width() - 12, fh)
        p.setPen(c["text"])
        p.setFont(fonts.label)
        label = h.label or h.id
        p.drawText(line, Qt.AlignLeft | Qt.AlignVCenter, self._cached_text(
            ("label", label, line.width(), fonts.key),
            lambda: fonts.label_fm.elidedText(label, Qt.ElideRight, line.width() - 52)))
        p.setFont(fonts.small)
        p.setPen(c["muted"])
        p.drawText(line, Qt.AlignRight | Qt.AlignVCenter, f"{h.score:.3f}")
        cap = h.text or (h.captions[0] if h.captions else tile_caption(h.tile) if getattr(h, 'tile', None) else h.id)
        cap_rect = QRect(r.x() + 6, y + fh + 2, r.width() - 12, 2 * fh + 2)
        p.setPen(c["text"])
        p.drawText(cap_rect, Qt.AlignLeft | Qt.AlignTop, self._cached_text(
            (cap, cap_rect.width(), fonts.key), lambda: _elide_lines(cap, fonts.small_fm, cap_rect.width(), 2)))
        p.restore()


class _CellFonts:
    """A result cell's fonts (derived from the view's) and their metrics."""

    def __init__(self, base: QFont):
        self.key = base.key()
        size = max(8.0, base.pointSizeF() - 1)
        self.bold = QFont(base)
        self.bold.setBold(True)
        self.rank = QFont(self.bold)
        self.rank.setPointSizeF(size)
        self.small = QFont(base)
        self.small.setPointSizeF(size)
        self.label = QFont(self.small)
        self.label.setBold(True)
        self.rank_fm, self.small_fm, self.label_fm = QFontMetrics(self.rank), QFontMetrics(self.small), QFontMetrics(self.label)


_COLOURS = {
    "selected_bg": QColor("#eff6ff"), "panel": QColor(theme.PANEL), "placeholder": QColor("#e5e7eb"),
    "selected_pen": QPen(QColor(theme.ACCENT), 2), "border_pen": QPen(QColor(theme.BORDER), 1),
    "muted": QColor(theme.MUTED), "text": QColor(theme.TEXT), "good": QColor(theme.GOOD), "bad": QColor(theme.BAD),
    "white": QColor("white"), "rank_bg": QColor(0, 0, 0, 160),
}


def _elide_lines(text: str, fm: QFontMetrics, width: int, lines: int) -> str:
    words, out, cur = text.split(), [], ""
    for w in words:
        trial = f"{cur} {w}".strip()
        if fm.horizontalAdvance(trial) <= width:
            cur = trial
            continue
        out.append(cur)
        cur = w
        if len(out) == lines:
            break
    if len(out) < lines and cur:
        out.append(cur)
    if len(out) == lines and " ".join(out) != " ".join(words):
        out[-1] = fm.elidedText(out[-1] + " …", Qt.ElideRight, width)
        if not out[-1].endswith("…"):
            out[-1] = fm.elidedText(out[-1] + "………", Qt.ElideRight, width)
    return "\n".join(out[:lines])


class ResultsGrid(QWidget):
    """Header line + filter banner + the icon grid. Emits the hit on select/activate."""

    selected = Signal(object)
    activated = Signal(object)
    filter_cleared = Signal()

    def __init__(self, parent=None, title: str = "", thumb: int = THUMB):
        super().__init__(parent)
        self.model = ResultsModel(self)
        self.result = None
        lay = QVBoxLayout(self)
        lay.setContentsMargins(8, 8, 8, 8)
        lay.setSpacing(6)
        self.header = QLabel(title or "Type a query or drop an image to search the gallery.")
        self.header.setObjectName("hint")
        self.header.setWordWrap(True)
        lay.addWidget(self.header)
        self.banner = QFrame()
        self.banner.setObjectName("banner")
        bl = QHBoxLayout(self.banner)
        bl.setContentsMargins(8, 4, 8, 4)
        self.banner_label = QLabel()
        clear = QPushButton("Clear selection")
        clear.clicked.connect(self.clear_filter)
        bl.addWidget(self.banner_label, 1)
        bl.addWidget(clear)
        self.banner.setVisible(False)
        lay.addWidget(self.banner)
        self.view = QListView()
        self.view.setViewMode(QListView.IconMode)
        self.view.setResizeMode(QListView.Adjust)
        self.view.setMovement(QListView.Static)
        self.view.setUniformItemSizes(True)
        self.view.setSpacing(3)
        self.view.setSelectionMode(QAbstractItemView.SingleSelection)
        self.view.setModel(self.model)
        self.view.setItemDelegate(ResultDelegate(self.model, self.view, thumb))
        self.view.setMouseTracking(True)
        self.view.setAcceptDrops(False)
        self.view.viewport().setAcceptDrops(False)
        self.view.selectionModel().currentChanged.connect(self._current_changed)
        self.view.doubleClicked.connect(lambda ix: self.activated.emit(ix.data(Qt.UserRole)))
        lay.addWidget(self.view, 1)

    # -- content
    def set_result(self, result, gt=None, header: str = "", hits=None) -> None:
        """Show ``hits`` (default: all of ``result.hits``) under ``header``; the first is selected."""
        self.result = result
        self.model.set_hits(hits if hits is not None else (result.hits if result is not None else []), gt)
        self.set_message(header)
        if self.model.rowCount():
            self.view.setCurrentIndex(self.model.index(0))

    def show_banner(self, description: Optional[str]) -> None:
        """The "map selection" banner (the rows are filtered by whoever passes the hits)."""
        self.banner.setVisible(description is not None)
        self.banner_label.setText(description or "")

    def set_message(self, text: str, error: bool = False) -> None:
        self.header.setText(text)
        self.header.setObjectName("error" if error else "hint")
        self.header.style().unpolish(self.header)
        self.header.style().polish(self.header)

    def set_filter(self, rows: Optional[set[int]], description: str = "") -> None:
        self.model.set_filter(rows)
        self.banner.setVisible(rows is not None)
        self.banner_label.setText(description)
        if self.model.rowCount():
            self.view.setCurrentIndex(self.model.index(0))

    def clear_filter(self) -> None:
        self.set_filter(None)
        self.filter_cleared.emit()

    # -- navigation
    def hits(self) -> list:
        return list(self.model.hits)

    def current(self):
        ix = self.view.currentIndex()
        return ix.data(Qt.UserRole) if ix.isValid() else None

    def step(self, delta: int) -> None:
        n = self.model.rowCount()
        if n == 0:
            return
        row = self.view.currentIndex().row()
        row = 0 if row < 0 else max(0, min(n - 1, row + delta))
        self.view.setCurrentIndex(self.model.index(row))

    def _current_changed(self, cur, _prev) -> None:
        if cur.isValid():
            self.selected.emit(cur.data(Qt.UserRole))

    # -- export
    def export(self, path: str | Path) -> Path:
        """Write the shown results as CSV or JSON (by extension)."""
        path = Path(path)
        rows = []
        for h in self.model.hits:
            gt = self.model.is_gt(h)
            rows.append({"rank": h.rank, "row": h.row, "id": h.id, "score": round(float(h.score), 6),
                         "label": h.label or "", "correct": "" if gt is None else bool(gt), "path": h.path,
                         "caption": h.text or (h.captions[0] if h.captions else "")})
        if path.suffix.lower() == ".json":
            obj = {"query": getattr(self.result, "query", None), "mode": getattr(self.result, "mode", None),
                   "ground_truth_rule": self.model.gt_rule or None, "hits": rows}
            with atomic_file(path, "w") as fh:
                json.dump(obj, fh, indent=2, ensure_ascii=False)
        else:
            with atomic_file(path, "w") as fh:
                w = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else ["rank"])
                w.writeheader()
                w.writerows(rows)
        return path

    def pos_of(self, i: int) -> QPoint:
        return self.view.visualRect(self.model.index(i)).center()
