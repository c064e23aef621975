"""Compare mode: two models on the same query, side by side, with per-query R@K."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QPushButton, QSplitter, QVBoxLayout, QWidget

from . import state
from .results import ResultsGrid


def metrics_text(hit_rows: list[int], gt, query_row: Optional[int] = None) -> str:
    if gt is None:
        return "no ground truth for this query"
    if query_row is None:
        m = state.recall_at(hit_rows, gt)
    else:
        m = state.precision_at(hit_rows, gt, exclude=query_row)
    return " · ".join(f"{k} {v:.0f}" for k, v in m.items())


class CompareWidget(QWidget):
    activated = Signal(object)

    def __init__(self, jobs, parent=None):
        super().__init__(parent)
        self.jobs = jobs
        self.query = None  # ("text", str) | ("image", path)
        self.model_a = None
        self.index_a = None
        self.gallery_spec = None
        self.options = {"k": 20, "rerank": "none", "labels": None}
        lay = QVBoxLayout(self)
        lay.setContentsMargins(8, 8, 8, 8)
        top = QHBoxLayout()
        top.addWidget(QLabel("Compare with"))
        self.model_b = QComboBox()
        self.model_b.setMinimumWidth(200)
        self._user_choice = False
        self.fill_models()
        self.model_b.activated.connect(lambda *_: setattr(self, "_user_choice", True))
        top.addWidget(self.model_b)
        self.run_button = QPushButton("Compare")
        self.run_button.setObjectName("primary")
        self.run_button.clicked.connect(self.run)
        top.addWidget(self.run_button)
        top.addStretch(1)
        lay.addLayout(top)
        self.info = QLabel("Pick a second model; the current query runs on both (same gallery, same K).")
        self.info.setObjectName("hint")
        self.info.setWordWrap(True)
        lay.addWidget(self.info)
        split = QSplitter(Qt.Horizontal)
        self.grid_a = ResultsGrid(title="model A", thumb=128)
        self.grid_b = ResultsGrid(title="model B", thumb=128)
        for g in (self.grid_a, self.grid_b):
            g.activated.connect(self.activated.emit)
            split.addWidget(g)
        lay.addWidget(split, 1)

    def fill_models(self) -> None:
        cur = self.model_b.currentData()
        self.model_b.clear()
        for p in state.model_choices():
            self.model_b.addItem(p.name, str(p.resolve()))
        if cur:
            i = self.model_b.findData(cur)
            self.model_b.setCurrentIndex(max(0, i))

    def set_model_b(self, path: str) -> None:
        self._user_choice = True
        rp = str(Path(path).resolve())
        i = self.model_b.findData(rp)
        if i < 0:
            self.model_b.addItem(Path(path).name, rp)
            i = self.model_b.count() - 1
        self.model_b.setCurrentIndex(i)

    def set_context(self, model_a, index_a, gallery_spec, query, options) -> None:
        if model_a is not None and model_a is not self.model_a and not self._user_choice:
            # default partner: the first other model in the list
            a = str(Path(getattr(model_a, "model_dir", "")).resolve())
            for i in range(self.model_b.count()):
                if self.model_b.itemData(i) != a:
                    self.model_b.setCurrentIndex(i)
                    break
        self.model_a, self.index_a, self.gallery_spec = model_a, index_a, gallery_spec
        self.query, self.options = query, dict(options)

    def run(self) -> None:
        if self.model_a is None or self.index_a is None:
            self.info.setText("The main model and gallery are still loading…")
            return
        if self.query is None:
            self.info.setText("Run a query first (type one or drop an image).")
            return
        spec_b = self.model_b.currentData()
        if not spec_b:
            self.info.setText("No second model to compare with.")
            return
        model_a, index_a, gallery, query, opts = self.model_a, self.index_a, self.gallery_spec, self.query, self.options

        def work(progress, cancel):
            from ..retrieval.search import search_image, search_text

            model_b = state.get_model(spec_b, progress=progress)
            index_b = state.open_gallery(gallery, model_b, progress, cancel)
            k = max(opts["k"], 10)
            out = []
            for m, ix in ((model_a, index_a), (model_b, index_b)):
                if query[0] == "text":
                    res = search_text(m, ix, query[1], k, rerank=opts["rerank"], labels=opts["labels"])
                    gt, qrow = state.text_ground_truth(ix, query[1]), None
                else:
                    res = search_image(m, ix, query[1], k, labels=opts["labels"])
                    gt, qrow = state.image_ground_truth(ix, query[1]), state.gallery_row_of(ix, query[1])
                out.append((m, res, gt, qrow))
            return out

        def current():  # still the query and main model on screen
            return self.query == query and self.model_a is model_a and self.model_b.currentData() == spec_b

        self.info.setText("running the query on both models…")
        self.jobs.start("Compare", work, lambda out: current() and self._done(out),
                        lambda msg: current() and self.info.setText(f"Compare failed: {msg}"),
                        slot="compare", on_cancel=lambda: current() and self.info.setText("compare cancelled"))

    def _done(self, out) -> None:
        k = self.options["k"]
        for grid, (m, res, gt, qrow) in zip((self.grid_a, self.grid_b), out):
            rows = [h.row for h in res.hits]
            name = getattr(m, "name", m.arch)
            header = (f"<b>{name}</b> ({m.arch}) · {metrics_text(rows, gt, qrow)} · "
                      f"{sum(res.seconds.values()):.0f} ms")
            res.hits = res.hits[:k]
            grid.set_result(res, gt, header)
            grid.header.setTextFormat(Qt.RichText)
            if gt is not None:
                grid.header.setToolTip(gt.rule + ("" if qrow is None else "; P@K excludes the query image itself")
                                       + ("" if qrow is not None else "; R@K = 100 when a correct image is in the "
                                                                      "top K"))
        q = self.query[1] if self.query[0] == "text" else Path(self.query[1]).name
        self.info.setText(f"“{q}” on both models")
