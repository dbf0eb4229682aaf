"""Ctrl-C and SIGTERM that reach the program while llama.cpp's C code runs.

llama-cpp-python hands llama.cpp a Python logging callback (`llama_cpp._logger`), which C calls for
every log line: while a model loads or a GGUF is quantized, Python code runs inside the C call. A
signal handled then raises its KeyboardInterrupt (or the SystemExit of `toolkit export`'s SIGTERM
handler) inside that callback, where ctypes prints "Exception ignored on calling ctypes callback
function" and drops it: the C call goes on and the stop is lost. `toolkit export` interrupted in
its quantize step went on to the end (exit 1 instead of 130 in 2 of 25 runs with SIGINT sent at set
delays after the convert step began, 2026-12-05).

`held()` keeps the handlers from raising inside such a block: a signal that arrives is recorded and
delivered again, to the handler that was in place, as soon as the block ends. Python could not
interrupt the C call any sooner, so nothing is slower to stop than it would be without callbacks.
"""

from __future__ import annotations

import contextlib

# The signals a program is stopped with: Ctrl-C, `timeout` / `docker stop`, a closed terminal.
NAMES = ("SIGINT", "SIGTERM", "SIGHUP")


@contextlib.contextmanager
def held():
    """Within the block, SIGINT / SIGTERM / SIGHUP are recorded instead of handled; the first one
    that came is raised again on exit, to the handler in place before. Elsewhere than in the main
    thread (where Python runs signal handlers) it changes nothing."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    sigs = [getattr(signal, name) for name in NAMES if hasattr(signal, name)]
    previous = {sig: signal.signal(sig, lambda signum, frame: came.append(signum)) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if came:
            signal.raise_signal(came[0])
