"""Median repaint time of the embedding-map widget with 100,000 points (issue target ≤ 50 ms).

Usage: python bench/map_repaint.py [--json] [--n 100000] [--repeats 15] [--size 1000x700]

Builds the app's real ``MapWidget`` offscreen (``QT_QPA_PLATFORM=offscreen``) with a
synthetic projection: ``--n`` points (half images, half captions) in 21 labelled
clusters, one brush per label, exactly as the app draws a gallery. Each repeat pans the
view slightly, drops the points item's cached frame and times a synchronous
``repaint()`` of the plot's viewport (full re-rasterization of all points). Prints ``{"n", "median_ms", "p90_ms", ...}``.
Runs from a clean clone without installing the package.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import numpy as np  # noqa: E402


class _FakeIndex:
    """Just what MapWidget reads from a GalleryIndex."""

    def __init__(self, n_images: int, n_captions: int, labels: list[str]):
        self.items = [{"id": f"{i}.jpg", "path": f"/nonexistent/{i}.jpg", "label": labels[i], "captions": []}
                      for i in range(n_images)]
        self.image_emb = np.zeros((n_images, 2), np.float32)
        self.caption_emb = np.zeros((n_captions, 2), np.float32)
        self.caption_image = np.arange(n_captions) % n_images
        self.captions = [f"caption {i}" for i in range(n_captions)]

    @property
    def labels(self):
        return [it["label"] for it in self.items]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--size", default="1000x700")
    args = ap.parse_args(argv)
    w, h = (int(v) for v in args.size.lower().split("x"))

    from rsviewer.gui.app import make_app
    from rsviewer.gui.workers import JobManager
    from rsviewer.gui.map_view import MapWidget
    from rsviewer.project import CAPTION, IMAGE, Projection

    app = make_app()
    rng = np.random.default_rng(0)
    n_img = args.n // 2
    n_cap = args.n - n_img
    label_names = [f"label{i:02d}" for i in range(21)]
    img_lab = rng.integers(0, 21, n_img)
    centres = rng.normal(0, 40, (21, 2))
    cap_lab = img_lab[np.arange(n_cap) % n_img]
    xy = np.concatenate([centres[img_lab], centres[cap_lab]]) + rng.normal(0, 6, (args.n, 2))
    kind = np.concatenate([np.full(n_img, IMAGE, np.int8), np.full(n_cap, CAPTION, np.int8)])
    row = np.concatenate([np.arange(n_img), np.arange(n_cap)]).astype(np.int64)
    index = _FakeIndex(n_img, n_cap, [label_names[i] for i in img_lab])
    proj = Projection("tsne", xy.astype(np.float32), kind, row, args.n)

    jobs = JobManager()
    widget = MapWidget(jobs)
    widget.resize(w + 200, h + 80)
    widget.show()
    widget.set_index(index)
    t = time.perf_counter()
    widget.set_projection(proj)
    set_ms = (time.perf_counter() - t) * 1000
    app.processEvents()
    vp = widget.plot.viewport()
    vp.repaint()  # first paint builds the symbol atlas
    times = []
    for i in range(args.repeats):
        widget.vb.translateBy(x=0.5 if i % 2 else -0.5)
        app.processEvents()
        widget.points._cache_key = None  # time a full re-rasterization, never a cached frame
        t = time.perf_counter()
        vp.repaint()
        times.append((time.perf_counter() - t) * 1000)
    out = {
        "n": args.n,
        "median_ms": round(statistics.median(times), 1),
        "p90_ms": round(sorted(times)[int(0.9 * (len(times) - 1))], 1),
        "set_data_ms": round(set_ms, 1),
        "viewport": [vp.width(), vp.height()],
        "repeats": args.repeats,
        "platform": os.environ.get("QT_QPA_PLATFORM"),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.n:,} points: median repaint {out['median_ms']} ms (p90 {out['p90_ms']} ms), "
              f"setData {out['set_data_ms']} ms, viewport {vp.width()}x{vp.height()}")
    widget.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
