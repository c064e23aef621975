"""Does OpenVINO survive the GUI's thread pool? A reproducer, not a benchmark.

    python bench/openvino_threads.py        # exit 0 and "ok": it does; a crash: it does not

Three ``QThreadPool`` workers at a time run the default model's ``Towers(model,
"openvino")`` (image batch, one-text query session, text batch), four rounds, with pool
threads expiring between rounds as the app's do; then the towers are freed and a signal
is delivered to the main thread (what a dangling alternate signal stack would kill:
docs/runtime.md). 2026-12-03, 2-core Intel Xeon (AVX-512, AMX), OpenVINO 2025: SIGSEGV
inside ``InferRequest.infer`` in a worker during the first round — why ``auto`` does not
pick OpenVINO.
"""
from __future__ import annotations

import gc
import os
import signal
import sys
import threading
import time

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def main() -> int:
    from PySide6.QtCore import QRunnable, QThreadPool
    from PySide6.QtWidgets import QApplication

    from rsviewer.checkpoint import load_model
    from rsviewer.runtime import export as rexport
    from rsviewer.runtime.towers import Towers

    app = QApplication.instance() or QApplication([])
    model = load_model("default")
    tw = Towers(model, "openvino")
    pixels = rexport.image_example(model, 4, model.image_size, 3)
    pool = QThreadPool.globalInstance()
    pool.setExpiryTimeout(50)
    done: list[int] = []

    class Job(QRunnable):
        def run(self):
            tw.image_states(pixels)
            tw.text_states(["a road"])
            tw.text_states(["a", "b", "c", "d", "e"])
            done.append(1)

    for round_ in range(4):
        for _ in range(3):
            pool.start(Job())
        pool.waitForDone()
        time.sleep(0.3)  # the pool's threads expire and exit
        app.processEvents()
        print(f"round {round_}: {len(done)} jobs done", flush=True)
    del tw
    gc.collect()
    signal.signal(signal.SIGUSR1, lambda s, f: None)
    signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
    print("ok", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
