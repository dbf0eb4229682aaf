"""toolkit.core.signals: a stop that lands in a C-to-Python callback is not lost.

The callback is real: libc's qsort calls a ctypes comparator, as llama.cpp calls llama-cpp-python's
log callback, and the signal is raised from inside it."""

import ctypes
import ctypes.util
import signal

import pytest

from toolkit.core import signals

libc = ctypes.CDLL(ctypes.util.find_library("c") or None)
COMPARE = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))


@pytest.fixture(autouse=True)
def _ctrl_c_as_in_a_terminal():
    """Python's own SIGINT handler, as a program started from a terminal has: a shell's background job
    (`make test &`) starts with SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _c_call_with_callback(signum, calls: list) -> list[int]:
    """Sort 5 ints with qsort; the comparator raises `signum` (if any) at its first call, so that
    comparison's result is ctypes' default and the order may come out wrong."""
    def compare(a, b):
        calls.append(1)
        if len(calls) == 1 and signum is not None:
            signal.raise_signal(signum)
        return a[0] - b[0]

    values = (ctypes.c_int * 5)(5, 3, 4, 1, 2)
    libc.qsort(values, 5, ctypes.sizeof(ctypes.c_int), COMPARE(compare))
    return list(values)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_without_it_the_interrupt_is_dropped_by_ctypes():
    """What the module exists for: ctypes drops the KeyboardInterrupt and C goes on calling."""
    calls = []
    _c_call_with_callback(signal.SIGINT, calls)  # no KeyboardInterrupt comes out
    assert len(calls) > 1


def test_held_raises_the_interrupt_after_the_call():
    calls, after = [], []
    with pytest.raises(KeyboardInterrupt):
        with signals.held():
            _c_call_with_callback(signal.SIGINT, calls)
            after.append(len(calls))
    assert after and after[0] > 1  # the C call finished, then the stop came
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_held_hands_sigterm_to_the_handler_in_place():
    """`toolkit export` turns SIGTERM into SystemExit(143); it must reach that handler after the call."""
    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        with pytest.raises(SystemExit) as exc:
            with signals.held():
                _c_call_with_callback(signal.SIGTERM, [])
        assert exc.value.code == 143
        assert signal.getsignal(signal.SIGTERM) is stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_held_keeps_an_ignored_signal_ignored():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    with signals.held():
        _c_call_with_callback(signal.SIGINT, [])
    assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN  # and nothing was raised


def test_held_without_a_signal_changes_nothing():
    with signals.held():
        assert _c_call_with_callback(None, []) == [1, 2, 3, 4, 5]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_quantize_raises_an_interrupt_its_log_callback_got(tmp_path, monkeypatch):
    """The quantize step: a Ctrl-C during llama.cpp's quantizer stops the export, leaving no temp file."""
    import llama_cpp

    from toolkit.export import convert

    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF")

    def quantize(src_b, dst_b, params):  # the real call logs through a Python callback the same way
        _c_call_with_callback(signal.SIGINT, [])
        open(dst_b, "wb").write(b"partial")
        return 0

    monkeypatch.setattr(llama_cpp, "llama_model_quantize", quantize)
    with pytest.raises(KeyboardInterrupt):
        convert.quantize_with_log(src, tmp_path / "out" / "m-q8_0.gguf", "q8_0")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["m.gguf", "out"]
