"""What one repaint of the result grid costs the GUI thread (the rest of a text search's stall).

    python bench/results_paint.py [--json] [--repeats 30]

The default model searches the demo gallery for six queries; for each, the grid (16
visible cells, thumbnails loaded) is painted into an image, ``cold`` with the delegate's
caches emptied first (a new result: what the stall after a search contains) and ``warm``
(a repaint of the same result: hover, selection, scrolling). The reference, measured in
the same run, is a fixed QPainter workload of the same kind (16 antialiased rounded
rectangles and 80 short texts into a QImage), so a figure can be read against this
machine's speed: ``ratio`` = grid paint / reference.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import machine  # noqa: E402

QUERIES = ["many planes parked at the airport", "four tennis courts next to a parking lot",
           "a river goes through the dense forest", "some white storage tanks near the road",
           "a baseball field surrounded by green trees", "many boats docked at the harbor"]


def reference_paint(QImage, QPainter, QColor, QRectF, Qt) -> float:
    img = QImage(900, 560, QImage.Format_ARGB32_Premultiplied)
    t0 = time.perf_counter()
    p = QPainter(img)
    p.setRenderHint(QPainter.Antialiasing)
    for i in range(16):
        r = QRectF(10 + (i % 4) * 220, 10 + (i // 4) * 135, 200, 125)
        p.setBrush(QColor("#f8fafc"))
        p.drawRoundedRect(r, 6, 6)
        for j in range(5):
            p.drawText(r.adjusted(6, 6 + 20 * j, -6, 0), Qt.AlignLeft | Qt.AlignTop, f"cell {i} line {j}: 0.{i}{j}3")
    p.end()
    return (time.perf_counter() - t0) * 1000


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()

    from PySide6.QtCore import QRectF, Qt
    from PySide6.QtGui import QColor, QImage, QPainter
    from PySide6.QtWidgets import QApplication

    from rsviewer.checkpoint import load_model
    from rsviewer.gui.results import ResultsGrid
    from rsviewer.gui.util import thumbs
    from rsviewer.retrieval.index import load_index
    from rsviewer.retrieval.search import search_text

    app = QApplication.instance() or QApplication([])
    model = load_model("default")
    index = load_index(ROOT / "assets" / "gallery" / "index", model)
    grid = ResultsGrid()
    grid.resize(900, 600)
    grid.show()
    results = [search_text(model, index, q, 16) for q in QUERIES]
    for res in results:  # every thumbnail decoded before timing
        grid.set_result(res)
        deadline = time.time() + 30
        while time.time() < deadline and any(thumbs().get(k) is None for k in _keys(res)):
            app.processEvents()
            time.sleep(0.01)
    delegate = grid.view.itemDelegate()
    vp = grid.view.viewport()
    cold, warm, ref = [], [], []
    for rep in range(args.repeats):
        res = results[rep % len(results)]
        grid.set_result(res)
        app.processEvents()
        for cache in _caches(delegate):
            cache.clear()
        img = QImage(vp.size(), QImage.Format_ARGB32_Premultiplied)
        t0 = time.perf_counter()
        vp.render(img)
        cold.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        vp.render(img)
        warm.append((time.perf_counter() - t0) * 1000)
        ref.append(reference_paint(QImage, QPainter, QColor, QRectF, Qt))
    out = {
        "bench": "results_paint", "machine": machine(), "cells": min(16, grid.model.rowCount()),
        "viewport": [vp.width(), vp.height()], "repeats": args.repeats,
        "cold_ms": round(statistics.median(cold), 2), "warm_ms": round(statistics.median(warm), 2),
        "reference_ms": round(statistics.median(ref), 2),
    }
    out["cold_ratio"] = round(out["cold_ms"] / out["reference_ms"], 2)
    out["warm_ratio"] = round(out["warm_ms"] / out["reference_ms"], 2)
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"grid repaint, new result: {out['cold_ms']} ms ({out['cold_ratio']}× reference); "
              f"same result: {out['warm_ms']} ms ({out['warm_ratio']}×); reference {out['reference_ms']} ms; "
              f"{out['machine']}")
    return 0


def _keys(res):
    from rsviewer.gui.util import thumb_key

    return [thumb_key(h) for h in res.hits]


def _caches(delegate):
    """The delegate's per-text and per-size caches (whatever it keeps): emptied for a cold paint."""
    return [v for v in vars(delegate).values() if isinstance(v, dict)]


if __name__ == "__main__":
    sys.exit(main())
