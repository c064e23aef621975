"""utils/altstack: a call that installs its own alternate signal stack leaves the thread's as it was."""
import ctypes
import signal
import threading

from rsviewer.utils import altstack


def _install(buf) -> None:
    st = altstack.StackT(ctypes.cast(buf, ctypes.c_void_p), 0, len(buf))
    assert altstack._sigaltstack(ctypes.byref(st), None) == 0


def test_a_stack_installed_inside_the_block_is_undone():
    before = altstack.current()
    assert before is not None  # Linux: libc has sigaltstack
    buf = ctypes.create_string_buffer(64 * 1024)
    with altstack.keep_sigaltstack():
        _install(buf)
        assert altstack.current()[0] == ctypes.addressof(buf)
    assert altstack.current() == before


def test_the_threads_own_stack_survives_and_signals_still_arrive():
    mine = ctypes.create_string_buffer(64 * 1024)
    theirs = ctypes.create_string_buffer(64 * 1024)
    hits = []
    old_handler = signal.signal(signal.SIGUSR1, lambda s, f: hits.append(s))
    before = altstack.current()
    try:
        _install(mine)
        with altstack.keep_sigaltstack():
            _install(theirs)
        assert altstack.current()[0] == ctypes.addressof(mine)
        del theirs  # what OpenVINO did: the stack it had installed goes away
        signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)
        assert hits == [signal.SIGUSR1]
    finally:
        st = altstack.StackT(None, 2, 0)  # SS_DISABLE, then whatever was there before
        altstack._sigaltstack(ctypes.byref(st), None)
        if before and not before[1] & 2:
            altstack._sigaltstack(ctypes.byref(altstack.StackT(before[0], 0, before[2])), None)
        signal.signal(signal.SIGUSR1, old_handler)
