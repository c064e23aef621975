"""The details dock: the selected result large, its captions, and the explain panel."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QPixmap
from PySide6.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QGridLayout, QGroupBox, QHBoxLayout,
                               QLabel, QPushButton, QScrollArea, QSizePolicy, QSlider, QVBoxLayout, QWidget)

from . import theme
from .util import COLORMAPS, blend, rgb_to_qimage

DISPLAY = 768  # longest side of the image kept for display/overlays
GRADCAM_FAMILY = ("gradcam", "gradcam++", "scorecam")


def explain_module():
    """``(rsviewer.explain, "")``, or ``(None, reason)`` when the engine is genuinely
    missing (the module or one of its entry points is not there). Any other error
    while importing it is a bug in the engine: it is logged with its traceback and
    the reason says "failed to load", never "not available"."""
    return engine_module("rsviewer.explain", ("explain", "available_methods"), "explain")


def engine_module(name: str, entry_points: tuple[str, ...], what: str):
    from ..errors import NotAvailable
    from .workers import log, plain_message

    try:
        mod = importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".") or e.name.startswith(name)):
            return None, f"the {what} engine is not available ({e.name} is not installed)"
        log.error("importing %s failed", name, exc_info=True)
        return None, f"the {what} engine failed to load ({plain_message(e)})"
    except NotAvailable as e:
        return None, f"the {what} engine is not available ({e})"
    except Exception as e:  # noqa: BLE001 - a broken engine is shown as an error, not hidden
        log.error("importing %s failed", name, exc_info=True)
        return None, f"the {what} engine failed to load ({plain_message(e)})"
    for attr in entry_points:
        if not hasattr(mod, attr):
            return None, f"the {what} engine is not available ({name} has no {attr}())"
    return mod, ""


class ImageLabel(QLabel):
    """A QLabel that keeps an RGB array scaled to its width."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setAlignment(Qt.AlignCenter)
        self.setMinimumSize(200, 200)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Expanding)
        self._pm: Optional[QPixmap] = None
        self._shown: tuple = ()  # (pixmap key, w, h) on screen: a relayout of the dock rescaled it each time

    def set_rgb(self, arr: Optional[np.ndarray]) -> None:
        self._pm = QPixmap.fromImage(rgb_to_qimage(arr)) if arr is not None else None
        self._rescale()

    def resizeEvent(self, e):  # noqa: N802
        super().resizeEvent(e)
        self._rescale()

    def _rescale(self) -> None:
        if self._pm is None:
            self._shown = ()
            self.clear()
            return
        w, h = max(50, self.width() - 4), max(50, self.height() - 4)
        key = (self._pm.cacheKey(), w, h)
        if key != self._shown:  # smooth scaling is a GUI-thread cost: once per image and size
            self._shown = key
            self.setPixmap(self._pm.scaled(w, h, Qt.KeepAspectRatio, Qt.SmoothTransformation))


class ExplainPanel(QGroupBox):
    explain_requested = Signal()

    def __init__(self, parent=None):
        super().__init__("Explain", parent)
        lay = QVBoxLayout(self)
        form = QFormLayout()
        form.setLabelAlignment(Qt.AlignRight)
        self.method = QComboBox()
        self.method.currentIndexChanged.connect(self._method_changed)
        self.layer = QComboBox()
        self.layer.setToolTip("Grad-CAM target layer (the first is the preset)")
        row = QHBoxLayout()
        row.addWidget(self.method, 1)
        self.run_button = QPushButton("Explain")
        self.run_button.setObjectName("primary")
        self.run_button.setToolTip("Compute the explanation for the selected result (Ctrl+E)")
        self.run_button.clicked.connect(self.explain_requested.emit)
        row.addWidget(self.run_button)
        form.addRow("Method", row)
        form.addRow("Layer", self.layer)
        self.opacity = QSlider(Qt.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(50)
        self.cmap = QComboBox()
        self.cmap.addItems(list(COLORMAPS))
        self.contour = QCheckBox("contour")
        crow = QHBoxLayout()
        crow.addWidget(self.cmap, 1)
        crow.addWidget(self.contour)
        form.addRow("Opacity", self.opacity)
        form.addRow("Colormap", crow)
        lay.addLayout(form)
        self.status = QLabel()
        self.status.setObjectName("hint")
        self.status.setWordWrap(True)
        lay.addWidget(self.status)
        # word attention bar chart (created lazily: pyqtgraph is imported on first use)
        self.words_box = QWidget()
        self.words_layout = QVBoxLayout(self.words_box)
        self.words_layout.setContentsMargins(0, 0, 0, 0)
        self.words_box.setVisible(False)
        self.plot = None
        lay.addWidget(self.words_box)
        # semantic-token grid
        self.tokens_scale = QComboBox()
        self.tokens_scale.setVisible(False)
        lay.addWidget(self.tokens_scale)
        self.tokens_area = QScrollArea()
        self.tokens_area.setWidgetResizable(True)
        self.tokens_area.setVisible(False)
        self.tokens_area.setMinimumHeight(220)
        lay.addWidget(self.tokens_area)
        save_row = QHBoxLayout()
        save_row.addStretch(1)
        self.save_button = QPushButton("Save PNG…")
        self.save_button.setEnabled(False)
        save_row.addWidget(self.save_button)
        lay.addLayout(save_row)
        self.set_methods([], "")

    def set_methods(self, methods: list[str], reason: str, layers: Optional[list[str]] = None) -> None:
        self.method.blockSignals(True)
        self.method.clear()
        for m in methods:
            self.method.addItem(METHODS_LABEL(m), m)
        self.method.blockSignals(False)
        self.layer.clear()
        for name in layers or []:
            self.layer.addItem(name)
        ok = bool(methods)
        self.method.setEnabled(ok)
        self.run_button.setEnabled(ok)
        self._method_changed()
        self.status.setText(reason if not ok else "Select a result, pick a method and press Explain (Ctrl+E).")

    def _method_changed(self, *_):
        m = self.method.currentData()
        self.layer.setEnabled(m in GRADCAM_FAMILY and self.layer.count() > 0)

    def show_words(self, words: Optional[list[str]], weights, rows: Optional[list[str]]) -> None:
        if not words or weights is None:
            self.words_box.setVisible(False)
            return
        import pyqtgraph as pg

        if self.plot is None:
            self.plot = pg.PlotWidget(background=theme.PANEL)
            self.plot.setMinimumHeight(170)
            self.plot.setMenuEnabled(False)
            self.plot.setMouseEnabled(False, False)
            self.plot.hideButtons()
            self.words_layout.addWidget(self.plot)
        self.plot.clear()
        w = np.atleast_2d(np.asarray(weights, np.float32))
        n_rows, n = w.shape
        width = 0.8 / n_rows
        legend = self.plot.addLegend(offset=(-5, 5)) if n_rows > 1 else None
        for r in range(n_rows):
            color = theme.PALETTE[r % len(theme.PALETTE)]
            x = np.arange(n) - 0.4 + width * (r + 0.5)
            bars = pg.BarGraphItem(x=x, height=w[r], width=width * 0.95, brush=color, pen=None,
                                   name=(rows[r] if rows and r < len(rows) else None))
            self.plot.addItem(bars)
            if legend is not None and rows and r < len(rows):
                legend.addItem(bars, rows[r])
        ax = self.plot.getAxis("bottom")
        ax.setTicks([[(i, wd) for i, wd in enumerate(words)]])
        self.plot.setXRange(-0.6, n - 0.4, padding=0)
        self.plot.setYRange(0, float(max(1e-6, w.max())) * 1.1, padding=0)
        self.plot.setTitle("word attention", color=theme.MUTED, size="9pt")
        self.words_box.setVisible(True)

    def show_tokens(self, image_rgb: Optional[np.ndarray], grids: dict, grid_words: dict, cmap: str) -> None:
        if not grids or image_rgb is None:
            self.tokens_scale.setVisible(False)
            self.tokens_area.setVisible(False)
            return
        self._tokens = (image_rgb, grids, grid_words)
        self.tokens_scale.blockSignals(True)
        cur = self.tokens_scale.currentText()
        self.tokens_scale.clear()
        self.tokens_scale.addItems(list(grids))
        if cur in grids:
            self.tokens_scale.setCurrentText(cur)
        self.tokens_scale.blockSignals(False)
        try:
            self.tokens_scale.currentTextChanged.disconnect()
        except (RuntimeError, TypeError):
            pass
        self.tokens_scale.currentTextChanged.connect(lambda *_: self._render_tokens(cmap))
        self.tokens_scale.setVisible(len(grids) > 1)
        self._render_tokens(cmap)

    def _render_tokens(self, cmap: str) -> None:
        image_rgb, grids, grid_words = self._tokens
        scale = self.tokens_scale.currentText() or next(iter(grids))
        maps = np.asarray(grids[scale], np.float32)
        words = grid_words.get(scale) or []
        small = np.asarray(Image.fromarray(image_rgb).resize((96, 96), Image.BILINEAR))
        holder = QWidget()
        grid = QGridLayout(holder)
        grid.setContentsMargins(2, 2, 2, 2)
        grid.setSpacing(4)
        cols = 4
        for t in range(maps.shape[0]):
            m = maps[t]
            m = (m - m.min()) / (m.max() - m.min() + 1e-8)
            tile = QLabel()
            tile.setPixmap(QPixmap.fromImage(rgb_to_qimage(blend(small, m, cmap, 0.55))))
            cap = QLabel(f"<b>{t + 1}</b> " + ", ".join((words[t] if t < len(words) else [])[:3]))
            cap.setObjectName("hint")
            cap.setWordWrap(True)
            cap.setMaximumWidth(100)
            cell = QVBoxLayout()
            cell.addWidget(tile)
            cell.addWidget(cap)
            w = QWidget()
            w.setLayout(cell)
            grid.addWidget(w, t // cols, t % cols)
        self.tokens_area.setWidget(holder)
        self.tokens_area.setVisible(True)


def METHODS_LABEL(m: str) -> str:  # noqa: N802
    """The engine's name for a method. Only called once the explain engine has loaded (a
    method list comes from it), so this import costs nothing at start-up."""
    from ..explain.core import METHOD_LABELS

    return METHOD_LABELS.get(m, m)


class DetailsPanel(QWidget):
    """Large image + metadata + explain panel; lives in the right dock."""

    status = Signal(str, bool)  # (one line, is it an error) for the window's status bar

    def __init__(self, jobs, session=None, parent=None):
        from .state import Session

        super().__init__(parent)
        self.jobs = jobs
        self.session = session if session is not None else Session()  # selection and query live there
        self.model = None
        self.hit = None
        self.query_text: Optional[str] = None
        self.query_image: Optional[str] = None
        self.image_rgb: Optional[np.ndarray] = None  # display-size RGB of the hit
        self.expl = None
        self.heat_display: Optional[np.ndarray] = None
        self.overlay_on = True
        lay = QVBoxLayout(self)
        lay.setContentsMargins(8, 8, 8, 8)
        self.title = QLabel("No result selected")
        self.title.setObjectName("title")
        self.title.setWordWrap(True)
        lay.addWidget(self.title)
        self.image = ImageLabel()
        self.image.setMinimumHeight(260)
        lay.addWidget(self.image, 3)
        self.meta = QLabel()
        self.meta.setWordWrap(True)
        self.meta.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.meta.setAlignment(Qt.AlignTop | Qt.AlignLeft)
        lay.addWidget(self.meta)
        self.panel = ExplainPanel()
        self.panel.explain_requested.connect(self.run_explain)
        self.panel.opacity.valueChanged.connect(lambda *_: self.render())
        self.panel.cmap.currentTextChanged.connect(lambda *_: self._restyle())
        self.panel.contour.toggled.connect(lambda *_: self.render())
        self.panel.save_button.clicked.connect(self.save_dialog)
        lay.addWidget(self.panel, 2)

    # ---- context
    def set_model(self, model) -> None:
        self.model = model
        mod, reason = explain_module()
        if model is None:
            self.panel.set_methods([], "No model loaded.")
            return
        if mod is None:
            self.panel.set_methods([], f"Explanations: {reason}. Search still works.")
            return
        from ..errors import NotAvailable
        from .workers import log, plain_message

        try:
            methods = list(mod.available_methods(model))
            layers = list(mod.gradcam_layer_names(model)) if hasattr(mod, "gradcam_layer_names") else []
        except NotAvailable as e:
            self.panel.set_methods([], f"Explanations are not available for this model ({e}).")
            return
        except Exception as e:  # noqa: BLE001 - a crashing engine is an error shown as such
            log.error("listing explain methods failed", exc_info=True)
            self.panel.set_methods([], f"Explanations failed: {plain_message(e)}")
            return
        self.panel.set_methods(methods, "" if methods else
                               f"{getattr(model, 'arch', 'this')} models offer no explanation methods.", layers)

    def set_query(self, text: Optional[str], image_path: Optional[str]) -> None:
        self.query_text, self.query_image = text, image_path
        self.clear_explanation()

    def show_hit(self, hit) -> None:
        self.hit = hit
        self.clear_explanation()
        if hit is None:
            self.title.setText("No result selected")
            self.image.set_rgb(None)
            self.meta.clear()
            return
        self.title.setText(f"#{hit.rank}  {hit.id}")
        caps = "".join(f"<li>{c}</li>" for c in hit.captions) or "<li><i>no captions</i></li>"
        matched = f"<p><b>matched caption:</b> {hit.text}</p>" if hit.text else ""
        self.meta.setText(f"<b>label:</b> {hit.label or '—'} &nbsp; <b>score:</b> {hit.score:.4f}"
                          f"{matched}<ul style='margin-left:-20px'>{caps}</ul>")
        self.image.set_rgb(None)
        self.image.setText("loading…")
        ses = self.session
        ticket = ses.begin("image", ses.selection_key())

        def load(progress, cancel):
            from .util import load_hit_image

            return np.asarray(load_hit_image(hit, DISPLAY).convert("RGB"))  # a tile hit: its window only

        def failed(msg):
            if ses.accepts(ticket, ses.selection_key()):
                self.image.setText(f"cannot show this image: {msg}")

        self.jobs.start("load image", load, lambda arr: self._loaded(ticket, arr), failed, slot="details-image",
                        quiet=True)

    def _loaded(self, ticket, arr) -> None:
        ses = self.session
        if not ses.accepts(ticket, ses.selection_key()):
            return  # the selection moved on
        ses.end(ticket)
        self.image_rgb = arr
        self.render()

    # ---- explanations
    def clear_explanation(self) -> None:
        if self.expl is not None or "computing" in self.panel.status.text() or "explained" in \
                self.panel.status.text():
            self.panel.status.setText("Select a result, pick a method and press Explain (Ctrl+E).")
        self.expl = None
        self.heat_display = None
        self.panel.save_button.setEnabled(False)
        self.panel.show_words(None, None, None)
        self.panel.show_tokens(None, {}, {}, "jet")
        self.render()

    def run_explain(self) -> None:
        mod, reason = explain_module()
        if mod is None:
            self.panel.status.setText(f"Explanations: {reason}.")
            return
        if self.model is None or self.hit is None:
            self.panel.status.setText("Select a result first.")
            return
        if not self.query_text and not self.query_image:
            self.panel.status.setText("Run a query first: the explanation is for (query, result).")
            return
        method = self.panel.method.currentData()
        if not method:
            self.panel.status.setText("No explanation method for this model.")
            return
        layer = self.panel.layer.currentText() if (method in GRADCAM_FAMILY and self.panel.layer.count()) else None
        model, hit, text, qimg = self.model, self.hit, self.query_text, self.query_image
        ses = self.session
        ticket = ses.begin("explain", ses.explain_key(method, layer))

        def work(progress, cancel):
            from ..data import load_image

            kw = {}
            if text is None:
                kw["query_image"] = load_image(qimg)
            from .util import load_hit_image

            return mod.explain(model, load_hit_image(hit), text, method, layer=layer, progress=progress,
                               cancel=cancel, **kw)

        self.panel.status.setText(f"computing {METHODS_LABEL(method)}…")
        def current():  # the explanation still belongs to what the dock shows
            return ses.accepts(ticket, ses.explain_key(method, layer))

        self.jobs.start(f"Explain ({METHODS_LABEL(method)})", work, lambda e: current() and self._explained(e),
                        lambda msg: current() and self._explain_failed(msg), slot="explain",
                        on_cancel=lambda: current() and self.panel.status.setText("explanation cancelled"))

    def _explain_failed(self, msg: str) -> None:
        self.panel.status.setText(f"Could not explain: {msg}")

    def _explained(self, expl) -> None:
        self.session.jobs.pop("explain", None)
        self.expl = expl
        if self.image_rgb is None:
            self.image_rgb = np.asarray(expl.image.convert("RGB"))
        h, w = self.image_rgb.shape[:2]
        if expl.heatmap is not None:
            heat = np.asarray(expl.heatmap, np.float32)
            self.heat_display = np.asarray(Image.fromarray(heat).resize((w, h), Image.BILINEAR))
        else:
            self.heat_display = None
        self.panel.show_words(expl.words, expl.word_weights, expl.word_rows)
        self.panel.show_tokens(self.image_rgb, getattr(expl, "grids", {}) or {},
                               getattr(expl, "grid_words", {}) or {}, self.panel.cmap.currentText())
        notes = "; ".join(f"{v}" for k, v in (expl.info or {}).items()
                          if isinstance(v, str) and k not in ("model", "arch", "query", "method", "layer"))
        layer = f" · layer {expl.layer}" if expl.layer else ""
        self.panel.status.setText(f"{METHODS_LABEL(expl.method)}{layer} · explained score {expl.score:.4f}"
                                  + (f" · {notes}" if notes else ""))
        self.panel.save_button.setEnabled(True)
        self.overlay_on = True
        self.render()

    def _restyle(self) -> None:
        if self.expl is not None and getattr(self.expl, "grids", None):
            self.panel.show_tokens(self.image_rgb, self.expl.grids, self.expl.grid_words or {},
                                   self.panel.cmap.currentText())
        self.render()

    def composite(self) -> Optional[np.ndarray]:
        if self.image_rgb is None:
            return None
        if self.heat_display is None or not self.overlay_on:
            return self.image_rgb
        return blend(self.image_rgb, self.heat_display, self.panel.cmap.currentText(),
                     self.panel.opacity.value() / 100.0, self.panel.contour.isChecked())

    def render(self) -> None:
        self.image.set_rgb(self.composite())

    def toggle_overlay(self) -> None:
        self.overlay_on = not self.overlay_on
        self.render()

    def save_png(self, path: str | Path) -> Path:
        path = Path(path)
        if self.expl is None:
            raise ValueError("no explanation to save")
        from rsviewer.explain.overlay import render_png

        return Path(render_png(self.expl, path, cmap=self.panel.cmap.currentText(),
                               alpha=self.panel.opacity.value() / 100.0, contour=self.panel.contour.isChecked()))

    def save_dialog(self) -> None:
        if self.expl is None:
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save explanation", f"explain-{self.expl.method}.png",
                                              "PNG (*.png)")
        if path:
            from .util import save_file

            def report(msg, error):
                self.panel.status.setText(msg)
                self.status.emit(msg, error)

            save_file(self.save_png, path, report)
