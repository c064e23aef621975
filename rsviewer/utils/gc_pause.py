"""Keep the cyclic garbage collector from pausing an interactive process.

A full (generation-2) collection walks every object the collector tracks, holding the
GIL. Once torch, transformers, scikit-learn and Qt are imported the process holds
~500,000 of them, and one collection takes 100–300 ms on a 2-core Xeon; every GUI
stall the load worker caused during the first launch was one (measured with
``gc.callbacks``: ``python bench/gui_stall.py --profile`` prints them per scenario).
Almost all of those objects — modules, functions, classes, import-time tables — live
as long as the process, so CPython's remedy applies: ``gc.freeze()`` moves them to the
permanent generation, which collections skip. Reference counting still frees frozen
objects; only *cycles* among them are never collected, so what is frozen must be
long-lived: imports, not models (a loaded model holds cycles and is replaced when the
user picks another).
"""
from __future__ import annotations

import gc
import importlib
import threading
from contextlib import contextmanager
from typing import Iterable, Iterator

_lock = threading.Lock()
_depth = 0
_was_enabled = True


def freeze_long_lived() -> None:
    """Move every object alive now out of the collector's sight (call after imports)."""
    gc.freeze()


@contextmanager
def imports_without_collection() -> Iterator[None]:
    """No automatic collection inside the block; what it leaves alive is frozen after.

    For phases that only import (the garbage they create is a few objects, left to
    reference counting). Nested or concurrent uses share one pause."""
    global _depth, _was_enabled
    with _lock:
        if _depth == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                gc.freeze()
                if _was_enabled:
                    gc.enable()


def import_all(names: Iterable[str]) -> list[str]:
    """Import ``names`` with collection paused and frozen after; the ones missing (optional
    extras) are returned, not raised."""
    missing = []
    with imports_without_collection():
        for name in names:
            try:
                importlib.import_module(name)
            except ImportError:
                missing.append(name)
    return missing
