"""bench_estimate's choice of CPU training steps to measure: bf16 steps only where bf16 is native."""

from benchmarks import bench_estimate


def test_bf16_memory_steps_run_only_on_a_cpu_with_native_bf16():
    # Emulated, the four bf16 steps took 16 minutes of `make bench` on the AVX2-only Zen 3.
    assert bench_estimate.cpu_cases(True) == [("trl", "bf16"), ("transformers", "bf16"), ("trl", "fp32")]
    assert bench_estimate.cpu_cases(False) == [("trl", "fp32")]


def test_the_benchs_child_processes_choose_their_own_allocator():
    """A tcmalloc the bench runs under is not passed on (the steps measure glibc's heap; the runs by allocator
    each choose theirs); other preloads are."""
    env = bench_estimate._without_tcmalloc({"LD_PRELOAD": "/lib/libtcmalloc_minimal.so.4:/x/libfoo.so", "A": "1"})
    assert env == {"LD_PRELOAD": "/x/libfoo.so", "A": "1"}
    assert bench_estimate._without_tcmalloc({})["LD_PRELOAD"] == ""
