"""Progress reporting and cancellation shared by every long job.

Engine functions take an optional ``progress`` callback ``(done, total, message)``
and an optional ``cancel`` object with ``is_set()`` (a ``threading.Event`` works).
The CLI passes a stderr bar, the GUI a Qt signal emitter; the engine never knows
which. ``check(cancel)`` raises :class:`~rsviewer.errors.Cancelled`.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Optional, Protocol

from ..errors import Cancelled

ProgressFn = Callable[[int, int, str], None]


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


def check(cancel: Optional[CancelToken]) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled")


def report(progress: Optional[ProgressFn], done: int, total: int, message: str = "") -> None:
    if progress is not None:
        progress(done, total, message)


class StderrBar:
    """A dependency-free progress bar on stderr, throttled to ~10 updates/s."""

    def __init__(self, stream=None, width: int = 30, enabled: bool = True):
        self.stream = stream or sys.stderr
        self.width = width
        self.enabled = enabled
        self._last = 0.0
        self._t0 = time.monotonic()
        self._msg = None
        # on a terminal redraw in place; in a log file write a line every few seconds
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.1 if self.tty else 5.0

    def __call__(self, done: int, total: int, message: str = "") -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if message != self._msg:
            self._t0 = now
            self._msg = message
        final = total > 0 and done >= total
        if not final and now - self._last < self.interval:
            return
        self._last = now
        frac = done / total if total else 0.0
        fill = int(self.width * frac)
        elapsed = now - self._t0
        eta = f" eta {elapsed / frac - elapsed:5.0f}s" if 0 < frac < 1 else f" {elapsed:5.1f}s"
        bar = "#" * fill + "-" * (self.width - fill)
        line = f"{message[:28]:<28} [{bar}] {done}/{total}{eta}"
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
