"""utils.gc_pause: imports without garbage collection, their survivors frozen."""
from __future__ import annotations

import gc
import threading

from rsviewer.utils.gc_pause import import_all, imports_without_collection


class _Cycle:
    def __init__(self):
        self.me = self


def test_no_collection_inside_and_survivors_frozen_after():
    assert gc.isenabled()
    before = gc.get_freeze_count()
    with imports_without_collection():
        assert not gc.isenabled()
        with imports_without_collection():  # nested (a second worker): one pause
            assert not gc.isenabled()
        assert not gc.isenabled()
        kept = _Cycle()
    assert gc.isenabled()
    assert gc.get_freeze_count() > before  # kept, and everything alive, moved out of the collector's sight
    assert kept.me is kept


def test_objects_created_after_the_pause_stay_collectable():
    with imports_without_collection():
        pass
    import weakref

    ref = weakref.ref(_Cycle())  # a cycle: only the collector frees it
    gc.collect()
    assert ref() is None


def test_a_disabled_collector_stays_disabled():
    gc.disable()
    try:
        with imports_without_collection():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_concurrent_pauses_end_when_the_last_one_ends():
    inside, release = threading.Event(), threading.Event()

    def other():
        with imports_without_collection():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    t.start()
    inside.wait(10)
    with imports_without_collection():
        pass
    assert not gc.isenabled()  # the other thread's pause is still on
    release.set()
    t.join(10)
    assert gc.isenabled()


def test_import_all_reports_missing_modules():
    assert import_all(["json", "rsviewer_no_such_module_zz"]) == ["rsviewer_no_such_module_zz"]
    assert gc.isenabled()
