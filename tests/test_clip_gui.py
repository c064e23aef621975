"""The app with a CLIP checkpoint (issue 11): drop a tiny OpenAI-layout file on the
window, query, explain with a transformer method, compare with the default model."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("pytestqt")

from PySide6.QtCore import QMimeData, Qt, QUrl  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from clip_reference import RefCLIP  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "gallery" / "gallery.json"
WAIT = 600_000


@pytest.fixture
def gallery(tmp_path) -> Path:
    data = json.loads(DEMO.read_text())
    keep, seen = [], set()
    for im in data["images"]:  # one image per scene label: 21 images
        if im.get("label") not in seen:
            seen.add(im.get("label"))
            keep.append(im)
    (tmp_path / "images").symlink_to(DEMO.parent / "images")
    out = tmp_path / "one-per-label.json"
    out.write_text(json.dumps({"images": keep}))
    return out


def test_drop_a_clip_checkpoint_query_explain_compare(qtbot, tmp_path, gallery, monkeypatch):
    from rsviewer.gui.app import make_app
    from rsviewer.gui.main_window import MainWindow

    monkeypatch.setenv("RSVIEWER_CONFIG_DIR", str(tmp_path / "config"))
    torch.manual_seed(0)
    ckpt = tmp_path / "RemoteCLIP-tiny.pt"
    torch.save(RefCLIP(vision="vit", vwidth=64, vheads=1, theads=1, size=64, patch=16).state_dict(), ckpt)
    make_app()
    w = MainWindow(model="default", gallery=str(gallery))
    qtbot.addWidget(w)
    w.resize(1400, 900)
    w.show()
    qtbot.waitUntil(lambda: w.index is not None or bool(w.last_error), timeout=WAIT)
    default_dir = w.model.model_dir
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(ckpt))])
    assert w.handle_drop(mime) == "model"
    qtbot.waitUntil(lambda: (w.model is not None and w.model.arch == "clip" and w.index is not None
                             and len(w.index) == 21) or bool(w.last_error), timeout=WAIT)
    assert w.model.arch == "clip", w.last_error
    assert "RemoteCLIP-tiny" in w.model_label.text()
    # the foreign model's index of this gallery is kept on disk: a later session reopens it
    # without encoding a single image
    from rsviewer.gui import state
    from rsviewer.retrieval.index import is_index

    assert is_index(state.index_cache_dir(w.model, gallery))
    with state._lock:
        state._indexes.clear()  # forget the in-memory copy, as a new session would
    msgs: list[str] = []
    again = state.open_gallery(str(gallery), w.model, progress=lambda d, t, m="": msgs.append(m))
    assert len(again) == 21 and not any("encod" in m for m in msgs), msgs
    w.run_text("two tennis courts")  # the session owns last_result: wait for this query's result
    qtbot.waitUntil(lambda: (w.last_result is not None and w.last_result.query == "two tennis courts")
                    or bool(w.last_error), timeout=WAIT)
    assert w.results.hits() and not w.last_error
    # explain the selected hit with Chefer et al.'s gradient-weighted attention
    qtbot.waitUntil(lambda: w.details.image_rgb is not None, timeout=WAIT)
    panel = w.details.panel
    methods = [panel.method.itemData(i) for i in range(panel.method.count())]
    assert {"chefer", "maskclip", "surgery", "rollout"} <= set(methods), methods
    names = {panel.method.itemData(i): panel.method.itemText(i) for i in range(panel.method.count())}
    assert names["maskclip"] == "Dense patch–text similarity (MaskCLIP)" and names["chefer"].endswith("(Chefer)")
    panel.method.setCurrentIndex(methods.index("chefer"))
    qtbot.keyClick(w, Qt.Key_E, Qt.ControlModifier)
    qtbot.waitUntil(lambda: w.details.expl is not None or "Could not" in panel.status.text(), timeout=WAIT)
    assert w.details.expl is not None and w.details.expl.method == "chefer", panel.status.text()
    w.grab().save(str(tmp_path / "clip-window.png"))
    # compare the dropped CLIP with the default model on the same query
    w.compare.set_model_b(str(default_dir))
    w.tabs.setCurrentWidget(w.compare)
    qtbot.waitUntil(lambda: bool(w.compare.grid_b.hits()) or "failed" in w.compare.info.text(), timeout=WAIT)
    assert w.compare.grid_a.hits() and w.compare.grid_b.hits(), w.compare.info.text()
    assert "default" in w.compare.grid_b.header.text()
    w.jobs.cancel()
    w.jobs.wait_all(10_000)
