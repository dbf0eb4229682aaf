"""bench_train's AVX2 emulation: what its child process is started with, and how its rows are labelled."""

from toolkit.core import calibration, capability

from benchmarks import bench_train


def test_emulation_forces_the_record_and_caps_every_library_the_calibration_keys_on():
    assert bench_train.EMULATE_AVX2[capability.ENV_FORCE] == "avx2"
    # Each cap it sets is one the calibration cache keys on, so its numbers never stand for the uncapped CPU's.
    caps = {k for k in bench_train.EMULATE_AVX2 if k != capability.ENV_FORCE}
    assert caps and caps <= set(calibration.ISA_CAPS)


def test_cpu_label_names_the_forced_level_the_caps_and_the_allocator(monkeypatch):
    from toolkit.core import allocator

    block = "processor\t: {}\nmodel name\t: AMD EPYC\nflags\t\t: avx2 fma avx512f avx512_bf16\n"
    cap = capability.cpu_record("\n".join(block.format(i) for i in range(2)), forced="avx2")
    for name in calibration.ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv(allocator.ENV, raising=False)
    monkeypatch.setattr(allocator, "loaded_tcmalloc", lambda: "")
    assert bench_train.cpu_label(cap) == "AMD EPYC (avx2, forced), 2 cores, glibc"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert bench_train.cpu_label(cap) == "AMD EPYC (avx2, forced; ONEDNN_MAX_CPU_ISA=AVX2), 2 cores, glibc"
    monkeypatch.setenv(allocator.ENV, allocator.HUGETLB)
    assert bench_train.cpu_label(cap).endswith(", 2 cores, glibc huge pages")
    monkeypatch.setattr(allocator, "loaded_tcmalloc", lambda: "/usr/lib/libtcmalloc_minimal.so.4")
    assert bench_train.cpu_label(cap).endswith(", 2 cores, tcmalloc")
