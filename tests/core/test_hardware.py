"""Memory detection where there is no /proc: macOS and Windows."""

from __future__ import annotations

import os

from toolkit.core import hardware


def test_cpu_memory_without_proc_asks_the_os(monkeypatch):
    """Windows has no /proc/meminfo and no os.sysconf; macOS has sysconf, but nothing there says
    how much RAM is free, and `estimate` and `base_model: auto` fit models into what is free."""
    import psutil

    def no_proc(path, *args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", path)

    monkeypatch.setattr(hardware, "open", no_proc, raising=False)
    monkeypatch.delattr(os, "sysconf", raising=False)
    hw = hardware.cpu_memory()
    assert hw.kind == "cpu" and hw.source == "psutil"
    assert hw.total_bytes == psutil.virtual_memory().total and 0 < hw.available_bytes <= hw.total_bytes


def test_a_mac_trains_on_the_cpu(monkeypatch):
    """Apple Silicon has MPS and no CUDA: the device is "cpu" (the Trainer gets use_cpu, so it does
    not move the model to MPS behind the dtype and kernel choices made for the CPU)."""
    import torch

    monkeypatch.delenv("TOOLKIT_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert hardware.device() == "cpu"


def test_the_cpu_is_named_by_its_cores_and_the_threads_this_process_may_use(monkeypatch):
    """A 6-core, 12-thread laptop trains on 6 threads (one per physical core): its budget line says
    both, where os.cpu_count() alone read "12 cores"; a container given 2 of a 16-core host's CPUs
    says 2 cores."""
    from dataclasses import replace

    from toolkit.core import capability

    laptop = capability.Capability("cpu", "Intel Core i5-12400", "avx2", physical_cores=6, logical_cpus=12)
    monkeypatch.setattr(capability, "detect", lambda dev=None, use_torch=True: laptop)
    assert hardware.cpu_memory().name == "CPU (6 cores, 12 threads)"
    monkeypatch.setattr(capability, "detect", lambda dev=None, use_torch=True: replace(laptop, logical_cpus=6))
    assert hardware.cpu_memory().name == "CPU (6 cores)"
    monkeypatch.setattr(capability, "detect", lambda dev=None, use_torch=True: replace(
        laptop, efficiency_cores=8, logical_cpus=20))  # an i7-12700H: 6 P-cores with SMT, 8 E-cores
    assert hardware.cpu_memory().name == "CPU (6 P-cores, 8 E-cores unused, 20 threads)"
    monkeypatch.setattr(capability, "detect", lambda dev=None, use_torch=True: replace(laptop, physical_cores=16,
                                                                                         logical_cpus=2))
    assert hardware.cpu_memory().name == "CPU (2 cores)"


def test_llama_cpp_runs_one_thread_per_physical_core_or_toolkit_threads(monkeypatch):
    """llama.cpp's threads follow torch's decision (capability.threads): a 2-core VM without SMT gets 2
    (it had 1: half the logical CPUs), an 8-core SMT desktop 8, a container allowed one CPU 1;
    TOOLKIT_THREADS=N sets N for both."""
    import pytest

    from toolkit.core import capability
    from toolkit.core.errors import UserError

    monkeypatch.delenv("TOOLKIT_THREADS", raising=False)
    seen = []
    for physical, logical, want in ((2, 2, 2), (8, 16, 8), (16, 1, 1)):
        record = capability.Capability("cpu", "x86", "avx2", physical_cores=physical, logical_cpus=logical)
        monkeypatch.setattr(capability, "detect", lambda dev=None, use_torch=True, r=record: seen.append(dev) or r)
        assert hardware.llama_threads() == want
    assert seen == ["cpu"] * 3  # the CPU's record, also on a CUDA machine
    monkeypatch.setenv("TOOLKIT_THREADS", "3")
    assert hardware.llama_threads() == 3
    monkeypatch.setenv("TOOLKIT_THREADS", "0")
    with pytest.raises(UserError, match="TOOLKIT_THREADS must be a positive integer"):
        hardware.llama_threads()
