"""The app under a hurried user (issue 16): each case a fresh window on the shipped
default model and the demo gallery (its prebuilt index, so nothing is indexed), driven
through the real widgets with pytest-qt, offscreen.

Every test asserts the right image, the right message, that nothing escaped to stderr
and that the window still answers a query afterwards.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytestqt")

from PySide6.QtCore import QMimeData, Qt, QTimer, QUrl  # noqa: E402
from PySide6.QtWidgets import QFileDialog  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "assets" / "gallery" / "gallery.json"
WAIT = 300_000  # ms; every wait ends as soon as its condition holds
PLANES = "many planes parked at the airport"


@pytest.fixture(autouse=True)
def _settings(tmp_path, monkeypatch):
    monkeypatch.setenv("RSVIEWER_CONFIG_DIR", str(tmp_path / "config"))


@pytest.fixture
def win(qtbot):
    from rsviewer.gui.app import make_app
    from rsviewer.gui.main_window import MainWindow

    make_app()
    w = MainWindow(model="default")
    qtbot.addWidget(w)
    w.resize(1400, 900)
    w.show()
    qtbot.waitUntil(lambda: w.index is not None or bool(w.last_error), timeout=WAIT)
    assert w.index is not None and len(w.index) == 210, w.last_error
    w.messages = []
    w.statusBar().messageChanged.connect(lambda m: m and w.messages.append(m))
    yield w
    w.jobs.cancel()
    w.jobs.wait_all(10_000)


@pytest.fixture(scope="session")
def tiny_gallery(tmp_path_factory) -> Path:
    """Twelve demo images as a second gallery (indexing it takes a few seconds)."""
    data = json.loads(DEMO.read_text())
    folder = tmp_path_factory.mktemp("tiny")
    (folder / "images").symlink_to(DEMO.parent / "images")
    out = folder / "tiny.json"
    out.write_text(json.dumps({"images": data["images"][::18][:12]}))
    return out


@pytest.fixture(scope="session")
def model_copy(tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("models") / "default-copy"
    shutil.copytree(REPO / "models" / "default", dst)
    return dst


def idle(w):
    return lambda: not w.jobs.busy()


def search(w, qtbot, text=PLANES):
    w.panel.query.setEditText(text)
    w.run_text(text)
    qtbot.waitUntil(lambda: w.last_result is not None and w.last_result.query == text and not w.jobs.busy("search"),
                    timeout=WAIT)


def still_usable(w, qtbot):
    search(w, qtbot, "a baseball field")
    assert len(w.results.hits()) == min(20, len(w.index))


# Qt's offscreen platform says this about every top-level window; it is not ours
QT_NOISE = ("This plugin does not support propagateSizeHints()",)


def clean_stderr(err: str) -> str:
    return "\n".join(line for line in err.splitlines() if line.strip() and line.strip() not in QT_NOISE)


def no_traceback(capfd):
    err = capfd.readouterr().err
    assert "Traceback" not in err, err


def drop(w, *paths_or_urls) -> str:
    mime = QMimeData()
    mime.setUrls([u if isinstance(u, QUrl) else QUrl.fromLocalFile(str(u)) for u in paths_or_urls])
    return w.handle_drop(mime)


def record_text(monkeypatch, label) -> list[str]:
    seen: list[str] = []
    orig = label.setText

    def rec(text):
        seen.append(text)
        orig(text)

    monkeypatch.setattr(label, "setText", rec)
    return seen


class Heartbeat:
    """A 10 ms QTimer on the GUI thread; ``max_gap`` is the longest time it could not run."""

    def __init__(self):
        self.ticks: list[float] = []
        self.timer = QTimer()
        self.timer.setInterval(10)
        self.timer.timeout.connect(lambda: self.ticks.append(time.perf_counter()))

    def __enter__(self):
        self.ticks.clear()
        self.timer.start()
        self.ticks.append(time.perf_counter())
        return self

    def __exit__(self, *exc):
        self.ticks.append(time.perf_counter())
        self.timer.stop()

    @property
    def max_gap(self) -> float:
        return float(np.diff(self.ticks).max()) if len(self.ticks) > 1 else 0.0


def idle_jitter(qtbot, secs: float = 0.6) -> float:
    """The heartbeat's longest gap with no job running: this run's calibration."""
    with Heartbeat() as hb:
        qtbot.wait(int(secs * 1000))
    return hb.max_gap


GUARD = 0.300  # s over the idle jitter: a regression guard. Decoding on the GUI thread stalled 0.65–1.35 s;
# the 100 ms target itself is a figure to measure (printed here with -s), not a timed test on a shared CPU


def assert_no_stall(gap: float, calib: float, what: str, capfd) -> None:
    with capfd.disabled():
        print(f"\nstall {what}: {gap * 1000:.0f} ms (idle jitter {calib * 1000:.0f} ms, same run)")
    assert gap <= GUARD + calib, f"{what}: GUI thread stalled {gap * 1000:.0f} ms (idle jitter {calib * 1000:.0f} ms)"


# ------------------------------------------------------------------ 1. the right image


def test_explanation_is_never_drawn_on_another_image(win, qtbot, capfd):
    search(win, qtbot)
    hits = win.results.hits()
    qtbot.waitUntil(lambda: win.details.image_rgb is not None, timeout=WAIT)
    panel = win.details.panel
    methods = [panel.method.itemData(i) for i in range(panel.method.count())]
    panel.method.setCurrentIndex(methods.index("gradcam") if "gradcam" in methods else 0)
    qtbot.keyClick(win, Qt.Key_E, Qt.ControlModifier)  # explain #1 ...
    qtbot.keyClick(win, Qt.Key_J)  # ... and move on before it finishes
    assert win.details.hit.rank == 2
    qtbot.waitUntil(lambda: not win.jobs.busy("explain"), timeout=WAIT)
    qtbot.wait(50)
    assert win.details.expl is None, "an explanation of #1 is shown for #2"
    assert not panel.save_button.isEnabled()
    assert "explained score" not in panel.status.text()
    assert win.details.title.text().startswith("#2")
    # explaining #2 now gives #2's own score
    qtbot.keyClick(win, Qt.Key_E, Qt.ControlModifier)
    qtbot.waitUntil(lambda: win.details.expl is not None or "Could not" in panel.status.text(), timeout=WAIT)
    assert win.details.expl is not None, panel.status.text()
    assert abs(win.details.expl.score - hits[1].score) < 5e-3, (win.details.expl.score, hits[1].score)
    no_traceback(capfd)


# ------------------------------------------------------------------ 2. errors reach the status line


def test_every_file_write_reports_oserror_in_status_line(win, qtbot, tmp_path, monkeypatch, capfd):
    from rsviewer.project import project_index

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    target = {"path": ""}
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: (target["path"], "")))
    search(win, qtbot)
    # File ▸ Export results… into a folder that cannot be written
    target["path"] = str(blocker / "results.csv")
    win._export_results_dialog()
    assert "could not save" in win.last_error and "results.csv" in win.last_error
    # the map's Save PNG… and Export CSV…
    win.map.set_projection(project_index(win.index, "pca", max_points=None))
    for fn, name in ((win.map._save_png_dialog, "map.png"), (win.map._save_csv_dialog, "map.csv")):
        target["path"] = str(blocker / name)
        win.session.error = ""
        fn()
        assert "could not save" in win.last_error and name in win.last_error
    # a good path still works, and says so
    target["path"] = str(tmp_path / "ok.csv")
    win._export_results_dialog()
    assert (tmp_path / "ok.csv").read_text().startswith("rank,")
    assert any("saved" in m for m in win.messages)
    no_traceback(capfd)


@pytest.mark.parametrize("tab", ["results", "scene"])
def test_malformed_anno_json_drop_is_one_line(win, qtbot, tmp_path, capfd, tab):
    bad = tmp_path / "anno.json"
    bad.write_text("{not json")
    win.tabs.setCurrentWidget(win.scene if tab == "scene" else win.results)
    assert drop(win, bad) == ""
    assert "anno.json" in win.last_error and "Traceback" not in win.last_error
    assert win.scene.anno == []
    still_usable(win, qtbot)
    no_traceback(capfd)


# ------------------------------------------------------------------ 3. an empty lasso


def test_empty_lasso_keeps_top_k(win, qtbot, capfd):
    from rsviewer.project import project_index

    search(win, qtbot, "green trees")
    win.map.set_projection(project_index(win.index, "pca", max_points=None))
    xy = win.map.proj.xy
    cx = float(np.median(xy[:, 0]))
    lo, hi = xy.min(0) - 1, xy.max(0) + 1
    rows = win.map.select_polygon(np.array([[lo[0], lo[1]], [cx, lo[1]], [cx, hi[1]], [lo[0], hi[1]]]))
    assert 0 < len(rows) < 210
    qtbot.waitUntil(lambda: not win.jobs.busy("search") and win.results.banner.isVisible(), timeout=WAIT)
    assert all(h.row in rows for h in win.results.hits())
    far = hi + 1000
    assert win.map.select_polygon(np.array([far, far + [1, 0], far + [1, 1]])) == set()
    qtbot.waitUntil(lambda: not win.jobs.busy("search"), timeout=WAIT)
    assert len(win.results.hits()) == 20, "the grid shows more than K results"
    assert "top 20 of 210" in win.results.header.text()
    assert not win.results.banner.isVisible()
    no_traceback(capfd)


# ------------------------------------------------------------------ 4. a failed query


def test_failed_query_never_sticks(win, qtbot, tmp_path, tiny_gallery, monkeypatch, capfd):
    search(win, qtbot)
    good = win.query
    bad = tmp_path / "broken.jpg"
    bad.write_text("this is not an image")
    assert drop(win, bad) == "image"
    qtbot.waitUntil(lambda: not win.jobs.busy("search"), timeout=WAIT)
    assert "Search failed" in win.results.header.text() and "broken.jpg" in win.last_error
    assert win.query == good, "the failed query became the current one"
    assert PLANES in win.results.header.text()  # says whose results are still on screen
    # Ctrl+S exports the results that are shown, labelled with their own query
    out = tmp_path / "r.json"
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: (str(out), "")))
    win._export_results_dialog()
    assert json.loads(out.read_text())["query"] == PLANES
    # another gallery: the good query runs again there, not the failed one
    win.set_gallery(str(tiny_gallery))
    qtbot.waitUntil(lambda: len(win.index) == 12 and win.last_result is not None and not win.jobs.busy(),
                    timeout=WAIT)
    assert win.query == good and win.last_result.query == PLANES
    assert len(win.results.hits()) == 12
    paths = {it["path"] for it in win.index.items}
    qtbot.waitUntil(lambda: win.details.hit is not None, timeout=WAIT)
    assert win.details.hit.path in paths, "the dock shows an image of the old gallery"
    no_traceback(capfd)


# ------------------------------------------------------------------ 5. replaced is not cancelled


def test_replaced_model_load_never_says_cancelled(win, qtbot, model_copy, tmp_path, capfd):
    win.set_model(str(model_copy))
    qtbot.wait(100)
    win.set_model("default")
    assert "loading default" in win.model_label.text()
    qtbot.waitUntil(lambda: not win.jobs.busy("load"), timeout=WAIT)
    assert not any("cancelled" in m for m in win.messages), win.messages
    assert win.model.model_dir.name == "default" and "default" in win.model_label.text()
    # a good model, then a bad one: the real reason, not "cancelled"
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    win.set_model(str(model_copy))
    win.set_model(str(empty))
    qtbot.waitUntil(lambda: not win.jobs.busy("load"), timeout=WAIT)
    assert "config.json" in win.last_error, win.last_error
    assert not any("cancelled" in m for m in win.messages), win.messages
    still_usable(win, qtbot)
    no_traceback(capfd)


def test_fast_searches_map_and_steps_never_say_cancelled(win, qtbot, monkeypatch, capfd):
    win.panel.query.setEditText(PLANES)
    for _ in range(10):
        qtbot.mouseClick(win.panel.search_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not win.jobs.busy("search") and win.last_result is not None, timeout=WAIT)
    assert len(win.results.hits()) == 20
    # a map replaced by another
    seen = record_text(monkeypatch, win.map.info)
    win.map.compute("pca")
    win.map.compute("pca")
    qtbot.waitUntil(lambda: win.map.proj is not None and not win.jobs.busy("map"), timeout=WAIT)
    qtbot.wait(50)
    assert not any("cancelled" in t for t in seen), seen
    # fast J through the results
    for _ in range(6):
        qtbot.keyClick(win, Qt.Key_J)
    qtbot.waitUntil(lambda: not win.jobs.busy(), timeout=WAIT)
    assert win.details.hit.rank == 7 and win.details.image_rgb is not None
    assert not any("cancelled" in m for m in win.messages), win.messages
    no_traceback(capfd)


def test_user_cancel_says_cancelled_within_a_bound(win, qtbot, capfd):
    """Only the user's Cancel says "cancelled" — and it does, promptly."""
    import threading

    started = threading.Event()

    def slow(progress, cancel):
        started.set()
        for i in range(3000):
            if cancel.is_set():
                from rsviewer.errors import Cancelled

                raise Cancelled("cancelled")
            progress(i, 3000, "working")
            time.sleep(0.01)
        return "finished"

    got = []
    win.jobs.start("Slow job", slow, on_result=got.append, slot="slow")
    qtbot.waitUntil(started.is_set, timeout=WAIT)
    win.jobs.widget._refresh()
    t0 = time.perf_counter()
    win.jobs.widget.cancel_current()
    qtbot.waitUntil(lambda: any("Slow job: cancelled" in m for m in win.messages), timeout=5_000)
    assert time.perf_counter() - t0 < 2.0 and got == []
    no_traceback(capfd)


# ------------------------------------------------------------------ 6. nothing heavy on the GUI thread


def has_preview(w) -> bool:
    pm = w.panel.drop.preview.pixmap()
    return w.panel.drop.preview.isVisible() and pm is not None and not pm.isNull()


def previews_idle(w) -> bool:
    cache = getattr(w.panel.drop, "cache", None)  # the worker-decoded previews
    return cache is None or cache.idle()


def _big_image(path: Path, side: int) -> Path:
    from PIL import Image

    ramp = np.linspace(0, 255, side, dtype=np.float32)
    arr = np.empty((side, side, 3), np.uint8)
    arr[..., 0] = ramp[None, :]
    arr[..., 1] = ramp[:, None]
    arr[..., 2] = 128
    Image.fromarray(arr).save(path, quality=80) if path.suffix == ".jpg" else Image.fromarray(arr).save(
        path, compress_level=1)
    return path


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_big_drop_previews_without_stalling(win, qtbot, tmp_path, capfd, suffix):
    big = _big_image(tmp_path / f"big{suffix}", 7000)
    calib = idle_jitter(qtbot)
    with Heartbeat() as hb:
        assert drop(win, big) == "image"
        qtbot.waitUntil(lambda: has_preview(win) and not win.jobs.busy("search") and previews_idle(win),
                        timeout=WAIT)
    assert_no_stall(hb.max_gap, calib, f"7000² {suffix} drop", capfd)
    assert win.query.value == str(big) and win.results.hits()
    pm = win.panel.drop.preview.pixmap()
    assert max(pm.width(), pm.height()) <= 220
    no_traceback(capfd)


def test_12000px_png_previews(win, qtbot, tmp_path, capfd):
    """Past Qt's image allocation limit: the preview is decoded at display size anyway."""
    big = _big_image(tmp_path / "huge.png", 12000)
    assert drop(win, big) == "image"
    assert not has_preview(win) and "loading preview" in win.panel.drop.preview.text()  # a placeholder at once
    qtbot.waitUntil(lambda: has_preview(win) and not win.jobs.busy("search"), timeout=60_000)
    assert win.panel.drop.text.text() == "huge.png"
    assert win.results.hits()
    no_traceback(capfd)


def test_first_map_and_search_do_not_stall(win, qtbot, capfd):
    calib = idle_jitter(qtbot)
    with Heartbeat() as hb:
        search(win, qtbot)
        win.tabs.setCurrentWidget(win.map)
        win.map.compute("pca")
        qtbot.waitUntil(lambda: win.map.proj is not None and not win.jobs.busy(), timeout=WAIT)
    assert_no_stall(hb.max_gap, calib, "search + first map", capfd)
    no_traceback(capfd)


# ------------------------------------------------------------------ 7. clean shutdown

CLOSE_SCRIPT = textwrap.dedent("""
    import argparse, sys, time
    from rsviewer.gui.app import make_app, run_app
    app = make_app()
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication
    when = sys.argv[1]

    def close():
        wins = [w for w in QApplication.topLevelWidgets() if type(w).__name__ == "MainWindow"]
        # the first load starts once the window has painted: "loading" waits for it to be running
        from rsviewer.runtime import export
        if not wins or (when == "idle" and wins[0].model is None) or (when == "loading" and not
                                                                      wins[0].jobs.busy("load")) \
                or (when == "exporting" and not export._children and wins[0].model is None):
            QTimer.singleShot(20, close)
            return
        w = wins[0]
        if when == "exporting":
            assert export._children, "the model loaded without an export"
        if when in ("loading", "exporting"):
            assert w.model is None
        print("closing", time.time(), flush=True)
        w.close()

    QTimer.singleShot(300, close)
    sys.exit(run_app(argparse.Namespace(model="default", gallery=None, screenshot=None)))
""")


def _export_children_of(cache: str) -> list[int]:
    """Pids of live ONNX export children (runtime.export._child_main) working for ``cache``."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if b"_child_main" in (d / "cmdline").read_bytes() and \
                    f"RSVIEWER_CACHE={cache}".encode() in (d / "environ").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except (OSError, ValueError):
            continue
    return pids


@pytest.mark.parametrize("when", ["loading", "exporting", "idle"])
def test_close_exits_within_a_second_without_tracebacks(tmp_path, when, capfd):
    """Also during the first load's ONNX export, which runs in a child process: the child
    is stopped with the app (it used to run on for its ~10 s) and leaves no partial file."""
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", RSVIEWER_CONFIG_DIR=str(tmp_path / "cfg"),
               PYTHONPATH=str(REPO))
    if when == "exporting":  # an empty cache of its own: the first load must export
        env["RSVIEWER_CACHE"] = str(tmp_path / "cache")
    p = subprocess.Popen([sys.executable, "-c", CLOSE_SCRIPT, when], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    watchdog = threading.Timer(180, p.kill)  # a child that never closes fails the test instead of hanging it
    watchdog.start()
    try:
        line = p.stdout.readline()
    finally:
        watchdog.cancel()
    t_close = float(line.split()[1]) if line.startswith("closing") else None
    p.wait(timeout=120)
    t_exit = time.time()
    err = p.stderr.read()
    assert t_close is not None, f"never got to close: {line!r} {err}"
    assert p.returncode == 0, err
    assert clean_stderr(err) == "", err
    assert t_exit - t_close <= 1.0, f"exit took {t_exit - t_close:.2f} s after close()"
    cache = env["RSVIEWER_CACHE"]
    if sys.platform.startswith("linux"):  # /proc: the child's command line and environment
        assert _export_children_of(cache) == [], "an export child outlived the app"
    onnx = Path(cache) / "onnx"
    leftovers = [p.name for p in onnx.iterdir() if p.name.startswith(".")] if onnx.is_dir() else []
    assert leftovers == [], leftovers  # no temporary file of a stopped export
    with capfd.disabled():
        print(f"\nclose while {when}: exited {t_exit - t_close:.2f} s after close()")


# ------------------------------------------------------------------ 8. queries and drops


def test_refused_query_stays_out_of_history(win, qtbot, capfd):
    search(win, qtbot)
    win.run_text("x" * 10_000)
    qtbot.waitUntil(lambda: not win.jobs.busy("search") and "characters" in win.last_error, timeout=WAIT)
    items = [win.panel.query.itemText(i) for i in range(win.panel.query.count())]
    assert "x" * 10_000 not in items and PLANES in items
    assert win.query.value == PLANES
    no_traceback(capfd)


@pytest.mark.parametrize("text", ["😀🎉", "✨✨✨ 🚀"])
def test_all_unknown_query_says_so(win, qtbot, capfd, text):
    win.run_text(text)
    qtbot.waitUntil(lambda: not win.jobs.busy("search") and bool(win.last_error), timeout=WAIT)
    assert "[UNK]" in win.last_error and "known" in win.last_error
    assert win.last_result is None and not win.results.hits()
    items = [win.panel.query.itemText(i) for i in range(win.panel.query.count())]
    assert text not in items
    still_usable(win, qtbot)
    no_traceback(capfd)


def test_multi_file_and_url_drops_say_what_happened(win, qtbot, capfd):
    a, b = win.index.items[3]["path"], win.index.items[4]["path"]
    assert drop(win, a, b) == "image"
    assert any(f"using {Path(a).name}" in m and "2 files" in m for m in win.messages), win.messages
    qtbot.waitUntil(lambda: not win.jobs.busy("search") and win.last_result is not None, timeout=WAIT)
    assert win.results.hits()[0].row == 3
    assert drop(win, QUrl("https://example.com/airport.jpg")) == ""
    assert "not supported" in win.last_error
    no_traceback(capfd)


# ------------------------------------------------------------------ rapid fire


def test_rapid_fire_switches_while_jobs_run(win, qtbot, model_copy, tiny_gallery, capfd):
    """Switch tab, selection, model and gallery while searches, maps and explanations run."""
    search(win, qtbot)
    for i in range(4):
        win.run_text(f"a dense residential area {i}")
        qtbot.keyClick(win, Qt.Key_J)
        win.tabs.setCurrentIndex(i % win.tabs.count())
        win.map.compute("pca")
        win.explain_current()
    win.set_model(str(model_copy))
    qtbot.keyClick(win, Qt.Key_J)
    win.set_gallery(str(tiny_gallery))
    win.run_text("a beach")
    qtbot.waitUntil(lambda: not win.jobs.busy(), timeout=WAIT)
    win.tabs.setCurrentWidget(win.results)
    qtbot.waitUntil(lambda: not win.jobs.busy(), timeout=WAIT)
    assert win.model.model_dir.name == "default-copy" and len(win.index) == 12
    assert win.last_result is not None and win.last_result.query == "a beach"
    paths = {it["path"] for it in win.index.items}
    assert all(h.path in paths for h in win.results.hits())
    assert win.details.hit is None or win.details.hit.path in paths
    assert win.details.expl is None or win.details.hit is not None
    assert not any("cancelled" in m for m in win.messages), win.messages
    still_usable(win, qtbot)
    no_traceback(capfd)


def test_16bit_tiff_without_tifffile_says_how_to_read_it(win, qtbot, tmp_path, capfd, monkeypatch):
    """Pillow alone reads a 16-bit RGB TIFF by its high byte (almost black): the status line says
    so and names the extra, and the query still runs (the image is usable, only dark)."""
    import tifffile

    import rsviewer.data.images as images

    arr = (np.random.default_rng(0).random((64, 64, 3)) * 4000).astype(np.uint16)  # 12-bit data in 16 bits
    path = tmp_path / "scene16.tif"
    tifffile.imwrite(path, arr, photometric="rgb")
    monkeypatch.setattr(images, "_tifffile", lambda: None)
    assert drop(win, path) == "image"
    msg = win.statusBar().currentMessage()
    assert "scene16.tif" in msg and "rsviewer[tiff]" in msg
    qtbot.waitUntil(lambda: not win.jobs.busy("search"), timeout=WAIT)
    assert win.query is not None and win.query.value == str(path)
    monkeypatch.undo()
    assert images.read_hint(path) is None  # with tifffile installed there is nothing to say
    no_traceback(capfd)


# ------------------------------------------------------------------ the Scene tab: state in the session


def _mosaic(tmp_path, name: str, offset: int = 0) -> Path:
    """A 512² scene of four real demo images."""
    from PIL import Image

    paths = sorted((DEMO.parent / "images").glob("*.jpg"))[offset:offset + 4]
    canvas = Image.new("RGB", (512, 512))
    for i, p in enumerate(paths):
        canvas.paste(Image.open(p).convert("RGB").resize((256, 256)), ((i % 2) * 256, (i // 2) * 256))
    canvas.save(tmp_path / name)
    return tmp_path / name


def open_scene(w, qtbot, path):
    w.tabs.setCurrentWidget(w.scene)
    w.scene.open_scene(path)
    qtbot.waitUntil(lambda: w.scene.scene_path is not None and w.scene.scene_path.name == path.name
                    and not w.jobs.busy("scene-open"), timeout=WAIT)


class Gate:
    """``rsviewer.localize.localize`` held until ``release()``: the job is in flight for as
    long as the test needs (the real function then runs)."""

    def __init__(self, monkeypatch):
        import threading

        import rsviewer.localize as loc

        self.entered, self.go, real = threading.Event(), threading.Event(), loc.localize

        def gated(*a, **k):
            self.entered.set()
            self.go.wait(60)
            return real(*a, **k)

        monkeypatch.setattr(loc, "localize", gated)

    def release(self):
        self.go.set()


def start_localize(w, qtbot, text="a parking lot with many cars"):
    w.scene.query.setText(text)
    w.scene.windows.setCurrentText("256 px")
    w.scene.run_localize()
    assert w.jobs.busy("localize")


def test_localization_of_a_replaced_model_is_never_drawn(win, qtbot, tmp_path, model_copy, monkeypatch, capfd):
    open_scene(win, qtbot, _mosaic(tmp_path, "a.png"))
    gate = Gate(monkeypatch)
    start_localize(win, qtbot)
    assert gate.entered.wait(30)
    old = win.model
    win.set_model(str(model_copy))
    qtbot.waitUntil(lambda: win.model is not old and not win.jobs.busy("load"), timeout=WAIT)
    gate.release()
    qtbot.waitUntil(lambda: not win.jobs.busy("localize"), timeout=WAIT)
    qtbot.wait(200)
    assert win.scene.result is None and win.scene.heat_item is None  # the old model's map is not shown
    assert "press Localize" in win.scene.info.text(), win.scene.info.text()
    assert "cancelled" not in win.scene.info.text() and not any("cancelled" in m for m in win.messages)
    # run again: the map is the new model's, and a model change clears it (the scene stays)
    start_localize(win, qtbot)
    qtbot.waitUntil(lambda: win.scene.result is not None, timeout=WAIT)
    assert win.scene.localization.key[0] == id(win.model) and win.scene.heat_item is not None
    win.set_model("default")
    qtbot.waitUntil(lambda: win.model is old and not win.jobs.busy("load"), timeout=WAIT)
    assert win.scene.result is None and win.scene.heat_item is None and win.scene.scene_path.name == "a.png"
    assert not win.scene.save_button.isEnabled()
    no_traceback(capfd)


def test_localization_of_a_replaced_scene_is_never_drawn(win, qtbot, tmp_path, monkeypatch, capfd):
    open_scene(win, qtbot, _mosaic(tmp_path, "a.png"))
    gate = Gate(monkeypatch)
    start_localize(win, qtbot)
    assert gate.entered.wait(30)
    open_scene(win, qtbot, _mosaic(tmp_path, "b.png", offset=8))
    gate.release()
    qtbot.waitUntil(lambda: not win.jobs.busy("localize"), timeout=WAIT)
    qtbot.wait(200)
    assert win.scene.scene_path.name == "b.png"
    assert win.scene.result is None and win.scene.heat_item is None
    assert "b.png" in win.scene.info.text() and "cancelled" not in win.scene.info.text()
    no_traceback(capfd)


def test_scene_save_goes_through_the_status_line_and_names_what_was_localized(win, qtbot, tmp_path, monkeypatch,
                                                                             capfd):
    scene = _mosaic(tmp_path, "scene.png")
    polygon = [[[0, 0], [256, 0], [256, 256], [0, 256]]]
    (tmp_path / "anno.json").write_text(json.dumps([{"caption": "a parking lot with many cars", "jpg_name":
                                                     "scene.png", "label": "parking", "points": polygon}]))
    open_scene(win, qtbot, scene)
    assert win.session.scene_anno() and win.scene.anno_combo.isVisible()  # the session holds the annotations
    start_localize(win, qtbot)
    qtbot.waitUntil(lambda: win.scene.result is not None, timeout=WAIT)
    loc = win.scene.localization
    assert loc.text == "a parking lot with many cars" and loc.metrics and loc.model_name == win.model.name
    win.scene.query.setText("a river")  # edited after the run: the saved overlay is still the parking lot's
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    target = {"path": str(blocker / "overlay.png")}
    monkeypatch.setattr(QFileDialog, "getSaveFileName", staticmethod(lambda *a, **k: (target["path"], "")))
    win.save_current()  # Ctrl+S on the Scene tab
    assert "could not save" in win.last_error and "overlay.png" in win.last_error
    target["path"] = str(tmp_path / "overlay.png")
    win.save_current()
    assert (tmp_path / "overlay.png").stat().st_size > 1000 and any("saved" in m for m in win.messages)
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically, nothing left behind
    # a malformed anno.json keeps the annotations the session has
    bad = tmp_path / "other" / "anno.json"
    bad.parent.mkdir()
    bad.write_text('[{"caption": 3}]')
    assert not win.open_anno(bad)
    assert win.session.scene_anno() and "anno.json" in win.last_error
    no_traceback(capfd)
