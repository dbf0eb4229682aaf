"""peak_memory: /proc's status lines read, and the CPU peak that follows a buffer's pages (Linux)."""

from __future__ import annotations

import os

import pytest

from toolkit.core import peak_memory as P

MIB = 2**20


def test_status_lines():
    text = "Name:\tpython\nVmPeak:\t 3000 kB\nVmHWM:\t  2416284 kB\nVmRSS:\t 1200 kB\nThreads:\t4\n"
    assert P.status_bytes(text, "VmHWM") == 2416284 * 1024
    assert P.status_bytes(text, "Threads") == 4
    assert P.status_bytes(text, "VmSwap") is None


@pytest.mark.skipif(not os.access(P.CLEAR_REFS, os.W_OK), reason="needs Linux's /proc/self/clear_refs")
def test_cpu_peak_follows_a_buffer_and_resets():
    import mmap

    P.reset("cpu")
    before = P.peak("cpu")
    assert before["measure"].endswith("(VmHWM)")
    buf = mmap.mmap(-1, 256 * MIB)  # its own mapping, whatever the C allocator keeps
    buf.write(b"\1" * (256 * MIB))  # every page touched
    grown = P.peak("cpu")["peak_bytes"]
    buf.close()
    P.reset("cpu")
    after = P.peak("cpu")["peak_bytes"]
    assert grown - before["peak_bytes"] >= 240 * MIB
    assert grown - after >= 200 * MIB  # freed and reset: the peak is today's again
