"""``rsviewer`` without a sub-command: the desktop app (and ``--screenshot`` for docs/CI)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

DEFAULT_QUERY = "many planes parked at the airport"
SCREENSHOT_SIZE = (1400, 900)


def make_app():
    """The QApplication (created once), themed."""
    if os.environ.get("QT_QPA_PLATFORM") is None and sys.platform.startswith("linux") and not (
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ["QT_QPA_PLATFORM"] = "offscreen"
    from PySide6.QtWidgets import QApplication

    from .theme import apply_theme

    from ..runtime.export import isolate_exports

    # a first launch exports the model's towers to ONNX; in this process the exporter would
    # hold the GIL for seconds and the window could not repaint
    isolate_exports()
    app = QApplication.instance()
    if app is None:
        app = QApplication(sys.argv[:1])
        app.setApplicationName("rsviewer")
        app.setOrganizationName("rsviewer")
        apply_theme(app)
    return app


def run_app(args) -> int:
    screenshot = getattr(args, "screenshot", None)
    if screenshot:  # checked before any work: never replace a file without --force, a bad tab is one line
        from ..errors import OutputError
        from ..utils.atomic import check_output_file

        tab = (getattr(args, "tab", None) or "results").lower()
        try:
            if tab not in TABS:
                raise OutputError(f"--tab must be {', '.join(TABS[:-1])} or {TABS[-1]}, not {tab!r}")
            if Path(screenshot).suffix.lower() not in (".png", ".jpg", ".jpeg", ".bmp", ".webp"):
                raise OutputError(f"--screenshot {screenshot}: name a .png (or .jpg/.bmp/.webp) file")
            check_output_file(screenshot, getattr(args, "force", False), label="screenshot")
        except OutputError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    if screenshot and os.environ.get("QT_QPA_PLATFORM") is None:
        os.environ["QT_QPA_PLATFORM"] = "offscreen"  # a screenshot never needs a display
    try:
        import torch

        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    except ImportError:
        pass
    app = make_app()
    from ..utils.gc_pause import freeze_long_lived
    from .main_window import MainWindow

    freeze_long_lived()  # the imports so far live as long as the process: no collection walks them again
    win = MainWindow(model=getattr(args, "model", None) or "default", gallery=getattr(args, "gallery", None))
    if screenshot:
        return take_screenshot(app, win, Path(screenshot), getattr(args, "query", None), getattr(args, "tab", None))
    win.show()
    rc = int(app.exec())
    return finish(win, rc)


def finish(win, rc: int) -> int:
    """Leave promptly once the window is closed. ``closeEvent`` cancelled every job and
    waited briefly; a job that cannot be interrupted (reading model weights) would keep
    the interpreter alive for seconds and then die with tracebacks at shutdown, so the
    process ends here with ``os._exit`` after flushing stdout/stderr (nothing rsviewer
    writes is left half-done: writes are atomic, settings are synced when written, and
    the cancelled writers have already cleaned up). Interpreter teardown of torch and Qt
    alone took ~5 s. ``RSVIEWER_FAST_EXIT=0`` returns normally when every job stopped."""
    from ..runtime.export import stop_export_children
    from .util import shutdown_thumbs

    if not win.isHidden():
        win.close()
    clean = win.jobs.shutdown(100) and shutdown_thumbs(100)
    if stop_export_children():  # a first load's ONNX export would otherwise run on after the app left
        clean = False
    sys.stdout.flush()
    sys.stderr.flush()
    if not clean or os.environ.get("RSVIEWER_FAST_EXIT", "1") == "1":
        os._exit(rc)
    return rc


# ---------------------------------------------------------------------- screenshots


TABS = ("results", "map", "scene", "explain", "compare", "evaluate")


def demo_steps(win, query: Optional[str], tab: Optional[str]) -> Iterator[tuple[str, Callable[[], bool], float]]:
    """Drive the window like a user; each yield waits for ``(what, condition, timeout_s)``."""
    from . import state
    from .util import thumbs

    tab = (tab or "results").lower()
    if tab not in TABS:
        raise SystemExit(f"error: --tab must be {', '.join(TABS[:-1])} or {TABS[-1]}, not {tab!r}")
    yield "model and gallery", lambda: win.model is not None and win.index is not None or bool(win.last_error), 900
    if win.model is None:
        return
    if tab == "evaluate":
        win.tabs.setCurrentWidget(win.evaluate)
        ev = win.evaluate
        ev.select_models(str(getattr(win.model, "model_dir", None) or "default"))
        ev.compute()
        yield "evaluation", lambda: bool(ev.pqs) or ev.compute_button.isEnabled(), 900
        return
    if tab == "scene":
        scene_path = next((p for p in state.DEMO_SCENES if p.exists()), None)
        win.tabs.setCurrentWidget(win.scene)
        if scene_path is None:
            win.scene.info.setText("no demo scene found (../shared/scenes/ucm-mosaics or assets/scenes)")
            return
        win.scene.open_scene(scene_path)
        yield "scene", lambda: win.scene.item is not None or "Could not" in win.scene.info.text(), 120
        anno = win.scene.scene_anno()
        text = query or (anno[0]["caption"] if anno else DEFAULT_QUERY)
        win.scene.query.setText(text)
        win.scene.query.setCursorPosition(0)
        win.scene.show_polygons(text)
        win.scene.run_localize()
        yield "localization", lambda: win.scene.result is not None or not win.jobs.busy("localize"), 900
        yield "tiles", lambda: win.scene.item is None or win.scene.item.loading() == 0, 30
        return
    text = query or DEFAULT_QUERY
    if Path(text).exists() and Path(text).suffix:
        win.run_image(text)
    else:
        win.panel.query.setEditText(text)
        win.run_text(text)
    yield "search", lambda: win.last_result is not None or bool(win.last_error), 300
    yield "thumbnails", lambda: thumbs().idle() and win.panel.drop.cache.idle(), 60
    if tab == "map":
        win.tabs.setCurrentWidget(win.map)
        win.map.compute()
        yield "map", lambda: win.map.proj is not None or not win.jobs.busy("map"), 900
        yield "thumbnails", lambda: thumbs().idle(), 30
    elif tab == "explain":
        hits = win.results.hits()
        if hits:
            win.results.view.setCurrentIndex(win.results.model.index(0))
        yield "image", lambda: win.details.image_rgb is not None, 60
        win.details.run_explain()
        yield "explanation", lambda: win.details.expl is not None or not win.jobs.busy("explain"), 600
    elif tab == "compare":
        win.tabs.setCurrentWidget(win.compare)  # starts the comparison
        yield "compare", lambda: not win.jobs.busy("compare"), 900
        yield "thumbnails", lambda: thumbs().idle(), 60


def take_screenshot(app, win, out: Path, query: Optional[str], tab: Optional[str], timeout: float = 1800) -> int:
    from PySide6.QtCore import QEventLoop, QTimer

    win.resize(*SCREENSHOT_SIZE)
    win.show()
    steps = demo_steps(win, query, tab)
    status = {"rc": None, "what": "", "deadline": 0.0, "cond": None}
    t_end = time.monotonic() + timeout

    def advance() -> None:
        try:
            what, cond, secs = next(steps)
            status.update(what=what, cond=cond, deadline=time.monotonic() + secs)
        except StopIteration:
            status["rc"] = 0

    def tick() -> None:
        if status["rc"] is not None:
            return
        cond = status["cond"]
        if cond is None or cond():
            advance()
        elif time.monotonic() > status["deadline"] or time.monotonic() > t_end:
            print(f"warning: gave up waiting for {status['what']}", file=sys.stderr)
            advance()
        if status["rc"] is not None:
            loop.quit()

    loop = QEventLoop()
    timer = QTimer()
    timer.timeout.connect(tick)
    timer.start(100)
    loop.exec()
    timer.stop()
    for _ in range(5):  # let the last repaints land
        app.processEvents()
        time.sleep(0.05)
    out.parent.mkdir(parents=True, exist_ok=True)  # like every rsviewer output (checked writable at start)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp{out.suffix}")  # atomic: a whole PNG or none
    ok = win.grab().save(str(tmp))
    if ok:
        os.replace(tmp, out)
    else:
        tmp.unlink(missing_ok=True)
    msg = win.last_error
    win.jobs.cancel()
    win.jobs.wait_all(5000)
    win.close()
    if not ok:
        print(f"error: could not write {out}", file=sys.stderr)
        return 2
    print(f"saved {out}" + (f" (note: {msg})" if msg else ""))
    return 0
