"""Keep a library from leaving the calling thread's alternate signal stack dangling.

OpenVINO's CPU plugin (2024–2025 releases, seen here) installs a 20 KB ``sigaltstack`` on
each thread that compiles or runs a model, remembering the one before; when its objects
are destroyed out of order, the thread is left pointing at an alternate stack that has
been unmapped. The next signal delivered to that thread with a handler installed (a
DataLoader's SIGCHLD, Python's SIGINT) cannot be given a frame, and the kernel kills the
process with SIGSEGV (si_code SI_KERNEL) — no faulthandler trace, since no handler can
run. That is how the test suite died after its DataLoader-worker test.

:func:`keep_sigaltstack` wraps each such call: whatever the thread's alternate stack was
before, it is again after, so the library never leaves one of its own installed (and
so never has one to restore out of order). Linux and other POSIX systems with
``sigaltstack``; a no-op where libc offers none.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from contextlib import contextmanager
from typing import Iterator, Optional

SS_ONSTACK = 1


class StackT(ctypes.Structure):
    """``stack_t`` of <signal.h> (the same layout on every Linux and BSD ABI)."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _libc_sigaltstack():
    if sys.platform == "win32":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.sigaltstack
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.POINTER(StackT), ctypes.POINTER(StackT)]
    fn.restype = ctypes.c_int
    return fn


_sigaltstack = _libc_sigaltstack()


def current() -> Optional[tuple[int, int, int]]:
    """The calling thread's alternate stack as (address, flags, size); None where unknown."""
    if _sigaltstack is None:
        return None
    old = StackT()
    if _sigaltstack(None, ctypes.byref(old)) != 0:
        return None
    return (old.ss_sp or 0, old.ss_flags, old.ss_size)


def _restore(saved: StackT) -> None:
    now = StackT()
    if _sigaltstack(None, ctypes.byref(now)) != 0 or now.ss_flags & SS_ONSTACK:
        return  # running on the alternate stack (inside a handler): it cannot be changed
    if (now.ss_sp, now.ss_flags, now.ss_size) != (saved.ss_sp, saved.ss_flags & ~SS_ONSTACK, saved.ss_size):
        _sigaltstack(ctypes.byref(saved), None)


@contextmanager
def keep_sigaltstack() -> Iterator[None]:
    """The calling thread's alternate signal stack is the same after the block as before."""
    if _sigaltstack is None:
        yield
        return
    saved = StackT()
    if _sigaltstack(None, ctypes.byref(saved)) != 0:
        yield
        return
    saved.ss_flags &= ~SS_ONSTACK
    try:
        yield
    finally:
        _restore(saved)
