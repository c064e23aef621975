"""Background jobs: a small ``Worker(QRunnable)`` with signals and a cancel token.

Every engine call that can take more than a moment runs in a :class:`Worker` on a
``QThreadPool``; the GUI thread never waits on the engine. The worker passes its own
``progress`` callback (throttled, emitted as a queued Qt signal) and ``cancel`` token
(a ``threading.Event``) to the engine function, which polls it. Errors arrive as one
plain line (``RsviewerError`` messages as they are; anything else as
``"<Type>: message"`` with the traceback logged, never shown); the line is a
:class:`JobError` (a ``str``) that also carries the exception object as ``.exc``.

A job started in a busy ``slot`` *replaces* the older one there: the older job is
stopped and everything it still reports (result, error, cancel) is dropped silently.
Only the user's Cancel (``cancel(slot)``, the status-bar button) says "cancelled".
"""
from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional

from PySide6.QtCore import QObject, QRunnable, QThreadPool, QTimer, Signal, Slot
from PySide6.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QWidget

from ..errors import Cancelled, RsviewerError

log = logging.getLogger("rsviewer.gui")


def plain_message(exc: BaseException) -> str:
    """One line a user can read, for any exception."""
    if isinstance(exc, RsviewerError):
        msg = str(exc) or type(exc).__name__
    elif isinstance(exc, MemoryError):
        msg = "out of memory"
    elif isinstance(exc, OSError) and exc.strerror:
        msg = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    else:
        first = (str(exc).strip().splitlines() or [""])[0]
        msg = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return msg[:300]


_BACKGROUND_NICE = 10
_niced = threading.local()


def background_priority() -> None:
    """Run the calling pool thread below the GUI thread's CPU priority (Linux: a per-thread
    nice of 10; threads it starts later — OpenMP, ONNX Runtime — inherit it). Elsewhere a
    thread id is not a process id, so nothing is changed.

    On a 2-core machine a search or decode plus its intra-op threads take every core,
    and the GUI thread, runnable, waited for one: repaints that take 30 ms idle took
    150–300 ms. Workers still get all the CPU the GUI thread leaves them."""
    if getattr(_niced, "done", False):
        return
    _niced.done = True
    if not sys.platform.startswith("linux"):
        return
    try:

        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(os.getpriority(os.PRIO_PROCESS, tid), _BACKGROUND_NICE))
    except OSError:  # not permitted: the default priority is kept
        pass


class JobError(str):
    """The one-line message of a failed job, with the exception itself as ``.exc``."""

    exc: Optional[BaseException] = None

    @classmethod
    def of(cls, exc: BaseException) -> "JobError":
        out = cls(plain_message(exc))
        out.exc = exc
        return out


class WorkerSignals(QObject):
    progress = Signal(int, int, str)
    result = Signal(object)
    error = Signal(object)  # the exception object
    cancelled = Signal()
    finished = Signal()


class Worker(QRunnable):
    """Runs ``fn(progress, cancel)`` on a pool thread; results come back as signals."""

    def __init__(self, fn: Callable[[Callable, threading.Event], Any], name: str = "job"):
        super().__init__()
        self.setAutoDelete(False)  # the JobManager keeps the Python object alive
        self.fn = fn
        self.name = name
        self.cancel = threading.Event()
        self.signals = WorkerSignals()
        self._last_emit = 0.0
        self.started_at = 0.0
        self.done = False
        self.replaced = False  # superseded by a newer job of its slot: reports nothing

    def progress(self, done: int, total: int, message: str = "") -> None:
        now = time.monotonic()
        final = total > 0 and done >= total
        if final or now - self._last_emit > 0.05:  # at most ~20 updates a second
            self._last_emit = now
            self.signals.progress.emit(int(done), int(total), str(message))

    @Slot()
    def run(self) -> None:
        background_priority()
        self.started_at = time.monotonic()
        try:
            if self.cancel.is_set():
                raise Cancelled("cancelled")
            out = self.fn(self.progress, self.cancel)
            if self.cancel.is_set():
                raise Cancelled("cancelled")
            self.signals.result.emit(out)
        except Cancelled:
            self.signals.cancelled.emit()
        except BaseException as e:  # noqa: BLE001 - every error becomes a message
            if not isinstance(e, RsviewerError):
                log.error("%s failed:\n%s", self.name, traceback.format_exc())
            self.signals.error.emit(e)
        finally:
            self.done = True
            self.signals.finished.emit()


class JobManager(QObject):
    """Starts workers, keeps them alive, and drives the status-bar progress widget.

    ``start(name, fn, on_result, on_error, slot=...)``: a job started in a ``slot``
    that is still busy cancels the older job there (a new search supersedes the last).
    """

    job_started = Signal(str)
    job_finished = Signal(str)
    message = Signal(str)

    def __init__(self, parent=None, max_threads: int = 3):
        super().__init__(parent)
        self.pool = QThreadPool(self)
        self.pool.setMaxThreadCount(max_threads)
        self.jobs: dict[Worker, str] = {}
        self.slots: dict[str, Worker] = {}
        self.closing = False  # set on shutdown: late results are not applied to a closing window
        self.widget = ProgressWidget(self)

    def start(
        self,
        name: str,
        fn: Callable,
        on_result: Optional[Callable[[Any], None]] = None,
        on_error: Optional[Callable[[str], None]] = None,
        slot: Optional[str] = None,
        on_cancel: Optional[Callable[[], None]] = None,
        quiet: bool = False,
    ) -> Worker:
        if slot and slot in self.slots:
            old = self.slots[slot]
            old.replaced = True  # superseded, not cancelled: it reports nothing more
            old.cancel.set()
        w = Worker(fn, name)
        self.jobs[w] = slot or ""
        if slot:
            self.slots[slot] = w
        on_error = on_error or (lambda msg, n=name: self.message.emit(f"{n} failed: {msg}"))
        on_cancel = on_cancel or (lambda n=name: self.message.emit(f"{n}: cancelled"))

        def live(fn):  # deliver only while the job has not been replaced
            return lambda *a, w=w: None if w.replaced or self.closing else fn(*a)

        if on_result is not None:
            w.signals.result.connect(live(on_result))
        w.signals.error.connect(live(lambda e: on_error(JobError.of(e))))
        w.signals.cancelled.connect(live(on_cancel))
        w.signals.finished.connect(lambda w=w: self._finished(w))
        if not quiet:
            w.signals.progress.connect(lambda d, t, m, w=w: self.widget.on_progress(w, d, t, m))
            self.widget.track(w)
        self.job_started.emit(name)
        self.pool.start(w)
        return w

    def _finished(self, w: Worker) -> None:
        slot = self.jobs.pop(w, "")
        if slot and self.slots.get(slot) is w:
            del self.slots[slot]
        self.widget.untrack(w)
        self.job_finished.emit(w.name)

    def busy(self, slot: Optional[str] = None) -> bool:
        if slot is None:
            return bool(self.jobs)
        # the slot is freed in _finished, on the GUI thread, after the job's result /
        # error / cancelled signal was delivered (w.done is set earlier, on the worker)
        return slot in self.slots

    def cancel(self, slot: Optional[str] = None) -> None:
        for w, s in list(self.jobs.items()):
            if slot is None or s == slot:
                w.cancel.set()

    def drop(self, slot: str) -> None:
        """Stop the job in ``slot`` silently: what it computes is no longer wanted (the
        session moved on), so it reports nothing, not even "cancelled"."""
        w = self.slots.get(slot)
        if w is not None:
            w.replaced = True
            w.cancel.set()

    def wait_all(self, msecs: int = 5000) -> bool:
        return self.pool.waitForDone(msecs)

    def shutdown(self, msecs: int = 400) -> bool:
        """Cancel everything, drop what is still reported, wait up to ``msecs``;
        True if every job stopped (a job that never polls its token may still run)."""
        self.closing = True
        self.cancel()
        self.pool.clear()  # queued jobs never start
        return self.pool.waitForDone(msecs)


class ProgressWidget(QWidget):
    """Status-bar progress: the newest running job's name, bar, and a Cancel button."""

    def __init__(self, manager: JobManager):
        super().__init__()
        self.manager = manager
        self.tracked: list[Worker] = []
        lay = QHBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.setSpacing(6)
        self.label = QLabel()
        self.label.setObjectName("progressLabel")
        self.bar = QProgressBar()
        self.bar.setFixedWidth(180)
        self.bar.setTextVisible(False)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setObjectName("cancelButton")
        self.cancel_button.setToolTip("Stop the running job (nothing half-written is left behind)")
        self.cancel_button.clicked.connect(self.cancel_current)
        lay.addWidget(self.label)
        lay.addWidget(self.bar)
        lay.addWidget(self.cancel_button)
        self._show_timer = QTimer(self)
        self._show_timer.setSingleShot(True)
        self._show_timer.timeout.connect(self._refresh)
        self.setVisible(False)

    def current(self) -> Optional[Worker]:
        return self.tracked[-1] if self.tracked else None

    def track(self, w: Worker) -> None:
        self.tracked.append(w)
        self.label.setText(w.name + "…")
        self.bar.setRange(0, 0)  # busy until the first progress report
        self._show_timer.start(250)  # quick jobs never flash the bar

    def untrack(self, w: Worker) -> None:
        if w in self.tracked:
            self.tracked.remove(w)
        self._refresh()

    def _refresh(self) -> None:
        w = self.current()
        self.setVisible(w is not None)
        if w is not None:
            self.label.setText(w.name + "…")

    def on_progress(self, w: Worker, done: int, total: int, msg: str) -> None:
        if w is not self.current():
            return
        if total > 0:
            self.bar.setRange(0, total)
            self.bar.setValue(min(done, total))
        else:
            self.bar.setRange(0, 0)
        self.label.setText(f"{w.name}: {msg}" if msg else w.name + "…")

    def cancel_current(self) -> None:
        w = self.current()
        if w is not None:
            w.cancel.set()
            self.label.setText(f"{w.name}: cancelling…")
