"""Calibration cache: keys, round trip, `toolkit estimate --calibrate`, a corrupt cache rebuilt
(real measurements, ~1.5 s each on 2 cores)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, replace

import pytest

from toolkit.core import calibration as K
from toolkit.core import capability as C


def test_key_changes_with_torch_version_cpu_name_model_flags_and_gpu():
    cpu = C.Capability(kind="cpu", name="AMD EPYC", isa="avx2", physical_cores=2, logical_cpus=2)
    keys = {K.key(cpu, "2.13.0"), K.key(cpu, "2.14.0"), K.key(replace(cpu, name="Intel Xeon"), "2.13.0"),
            K.key(replace(cpu, physical_cores=8, logical_cpus=16), "2.13.0"),
            K.key(C.cuda_record("Tesla T4", (7, 5)), "2.13.0"),
            K.key(replace(cpu, model_id="family 26 model 2 stepping 1"), "2.13.0"),
            K.key(replace(cpu, flags=("avx2", "fma")), "2.13.0")}
    assert len(keys) == 7
    # A forced record measures the same hardware: same key.
    assert K.key(replace(cpu, isa="amx", native_bf16=True, forced="amx"), "2.13.0") == K.key(cpu, "2.13.0")


def test_key_changes_with_the_library_isa_caps_only():
    cpu = C.Capability(kind="cpu", name="AMD EPYC", isa="avx512_bf16", physical_cores=2, logical_cpus=2)
    plain = K.key(cpu, "2.13.0", K.isa_caps({"OMP_NUM_THREADS": "2", "HOME": "/root"}))
    assert plain == K.key(cpu, "2.13.0")  # no cap set: the key caches written before caps counted still match
    capped = {K.key(cpu, "2.13.0", K.isa_caps({name: "AVX2"})) for name in K.ISA_CAPS}
    assert len(capped) == len(K.ISA_CAPS) and plain not in capped
    assert K.isa_caps({"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": ""}) \
        == "ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2"


@pytest.mark.skipif(os.uname().machine != "x86_64" or "avx2" not in C.detect("cpu").flags,
                    reason="the caps name x86 ISA levels, AVX2 the lowest one kept here")
def test_libraries_capped_at_avx2_calibrate_apart_and_train_in_fp32(tmp_path):
    """With oneDNN, MKL and ATen capped at AVX2 the machine measures like an AVX2 CPU: on one with
    AVX512-BF16 its bf16 matmuls run emulated. That calibration gets a key of its own (it would
    otherwise be read back uncapped, and the reverse) and the dtype choice follows it. Its bf16 rate
    is that of a frozen layer's two training products, timed here on their own as the reference: an
    emulated `x @ W.T` runs ~15x faster than `g @ W` or `a @ b`, and timing `a @ b` alone had put
    bf16 ~2.5x slower than a layer's products run."""
    import subprocess
    import sys

    env = dict(os.environ, TOOLKIT_CACHE=str(tmp_path), ONEDNN_MAX_CPU_ISA="AVX2", MKL_ENABLE_INSTRUCTIONS="AVX2",
               ATEN_CPU_CAPABILITY="avx2")
    env.pop(C.ENV_FORCE, None)
    code = ("import torch, json\n"
            "from toolkit.core import calibration as K, capability as C, probes as P\n"
            "cap = C.detect('cpu')\n"
            "cal = K.load(cap)\n"
            "m, k, n = P.CPU_SHAPE\n"
            "rows = max(16, m // 16)\n"
            "x, g, w = (torch.randn(*s).bfloat16() for s in ((rows, k), (rows, n), (n, k)))\n"
            "best = lambda fn: min(P.timed(torch, 'cpu', fn) for _ in range(3))\n"
            "ref = 2 * 2 * rows * k * n / (best(lambda: x @ w.t()) + best(lambda: g @ w))\n"
            "dtype = C.choose_dtype(cap, 'train', cal)[0]\n"
            "print(json.dumps([torch.backends.cpu.get_cpu_capability(), cal.key, dtype,\n"
            "                  cal.matmul_flops['bfloat16'] / ref]))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    torch_isa, cal_key, dtype, bf16_over_reference = json.loads(out.stdout.strip().splitlines()[-1])
    assert torch_isa == "AVX2"
    assert 0.67 < bf16_over_reference < 1.5
    assert cal_key.endswith("|ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2")
    assert dtype == "float32"
    cached = json.loads((tmp_path / K.FILE_NAME).read_text())["records"]
    assert list(cached) == [cal_key]


def test_from_dict_rejects_what_is_not_a_record():
    good = {"key": "k", "device": "cpu x", "matmul_flops": {"float32": 1e10, "bfloat16": 1e9},
            "bandwidth_bytes_per_s": 1e10, "seconds": 1.0, "torch": "2.13.0", "packed_flops": {"float32": 2e10},
            "attention_s": {"float32 sdpa": 0.008, "float32 bmm": 0.009},
            "packed_gain": {"float32 train": 2.3, "float32 infer": 2.7}, "host_layer_s": 0.0004, "cpu_share": 0.95,
            "packed_gain_seen": {"float32 train": [2.2, 2.3, 2.4], "float32 infer": [2.7]}}
    assert asdict(K.Calibration.from_dict(good)) == good
    for bad in ({**good, "matmul_flops": {"bfloat16": 1e9}}, {**good, "bandwidth_bytes_per_s": "fast"},
                {k: v for k, v in good.items() if k != "torch"}, {**good, "matmul_flops": [1, 2]},
                {**good, "matmul_flops": {"float32": 0.0}}, {**good, "packed_flops": {"float32": -1.0}},
                {**good, "attention_s": {"float32 bmm": 0.0}}, {**good, "packed_gain": {"float32 train": -2.3}},
                {**good, "host_layer_s": -1e-4}, {**good, "host_layer_s": "slow"}, {**good, "cpu_share": 0.0},
                {**good, "cpu_share": "busy"}, {**good, "packed_gain_seen": {"float32 train": [2.2, 0.0]}},
                {**good, "packed_gain_seen": {"float32 train": 2.3}}):
        with pytest.raises(ValueError):
            K.Calibration.from_dict(bad)


def test_the_packing_decision_reads_the_median_of_the_machines_last_gain_readings():
    """One reading over the bar among lower ones (the Zen 3's five benches of 2026-12-07: 0.96, 0.95,
    0.91, 1.07, 0.89) no longer sends training through the packs; a machine where packing pays keeps it
    through one low reading; the last GAIN_READINGS readings count, and a record from before the history
    counts as its one reading."""
    cap = C.detect("cpu")
    blank = K.Calibration(key="k", device="cpu x", matmul_flops={"float32": 1.8e11}, bandwidth_bytes_per_s=2e10,
                          seconds=2.0, torch="t")

    def reading(gain, earlier):
        return K.with_earlier_gains(replace(blank, packed_gain={"float32 train": gain}), earlier)

    def packs(c):
        return C.packed_matmuls(cap, "float32", c, "train")[0]

    assert packs(reading(1.07, None))  # alone, a reading decides as before
    cal = None
    for gain in (0.96, 0.95, 0.91, 1.07, 0.89, 0.93):
        cal = reading(gain, cal)
        assert not packs(cal)
    assert cal.packed_gain_seen == {"float32 train": [0.95, 0.91, 1.07, 0.89, 0.93]} == {
        "float32 train": cal.packed_gain_seen["float32 train"][-K.GAIN_READINGS:]}
    assert cal.packed_gain == {"float32 train": 0.93}
    fast = reading(2.2, reading(2.3, None))
    assert packs(reading(0.9, fast)) and reading(0.9, fast).packed_gain == {"float32 train": 2.2}
    older = replace(blank, packed_gain={"float32 train": 0.9, "bfloat16 train": 1.5})  # no history kept
    assert reading(1.07, older).packed_gain_seen == {"float32 train": [0.9, 1.07]}
    assert not reading(1.07, older).packed_gain.get("bfloat16 train")  # not measured now: not carried over
    assert "(median of 2 readings)" in reading(1.07, older).summary()


def test_cache_round_trip_keeps_other_machines_and_rebuilds_a_corrupt_file(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path))
    path = tmp_path / K.FILE_NAME
    cap = C.detect("cpu")
    other = {"key": "cpu|other|4 threads|torch 0", "device": "cpu other", "matmul_flops": {"float32": 1e10},
             "bandwidth_bytes_per_s": 1e10, "seconds": 1.0, "torch": "0"}
    path.write_text(json.dumps({"format": K.FORMAT, "records": {other["key"]: other}}))

    from toolkit.cli import main

    capsys.readouterr()
    assert main(["estimate", "--calibrate", "--json"]) == 0  # a real measurement (~1.5 s on 2 cores)
    printed = json.loads(capsys.readouterr().out)
    cal = K.load(cap)
    assert asdict(cal) == printed
    assert cal.key == K.current_key(cap) and cal.torch == K.torch_version()
    assert set(cal.matmul_flops) == {"float32", "bfloat16"} and min(cal.matmul_flops.values()) > 0
    from toolkit.core import packed_linear

    if packed_linear.available():  # fp32 is never an emulation: its pre-packed rate is always measured
        assert "float32" in cal.packed_flops and min(cal.packed_flops.values()) > 0
        assert cal.best_flops("float32") == max(cal.matmul_flops["float32"], cal.packed_flops["float32"])
        # and what packing gains in each use's own matmuls
        assert {"float32 train", "float32 infer"} <= set(cal.packed_gain) and min(cal.packed_gain.values()) > 0
    assert cal.bandwidth_bytes_per_s > 0
    # every packed-row attention kernel timed in fp32 (never emulated), forward and backward
    assert set(cal.attention_s) >= {"float32 sdpa", "float32 bmm"} and min(cal.attention_s.values()) > 0
    assert 0 < cal.host_layer_s < 0.05  # a decoding step's host work a layer: well under a millisecond here
    records = json.loads(path.read_text())["records"]
    assert records[other["key"]] == other and records[cal.key] == asdict(cal)
    mtime = path.stat().st_mtime_ns
    assert K.cached(cap) and not K.cached(replace(cap, model_id="family 0 model 0"))
    assert K.load(cap) == cal and path.stat().st_mtime_ns == mtime  # read back, not measured again
    assert main(["estimate", "--calibrate"]) == 0
    assert capsys.readouterr().out.startswith(f"{cal.device}: matmul GFLOP/s float32 ")
    assert path.stat().st_mtime_ns != mtime  # --calibrate measures again
    again = K.load(cap)
    for name, seen in again.packed_gain_seen.items():  # the gains decide by both readings now
        assert len(seen) == 2 and seen[0] == cal.packed_gain[name] and again.packed_gain[name] == sum(seen) / 2
    assert not list(tmp_path.glob(".*tmp*"))  # the atomic write left no temp file

    path.write_text('{"format": 1, "records": {"cpu|AMD')  # a write cut short
    assert not K.cached(cap)
    capsys.readouterr()
    rebuilt = K.load(cap)
    assert rebuilt.key == cal.key and rebuilt.seconds > 0
    assert json.loads(path.read_text())["records"][cal.key] == asdict(rebuilt)
    assert "unreadable" in capsys.readouterr().err


def test_invalid_entry_is_measured_again_and_an_unwritable_cache_is_no_crash(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path))
    cap = C.detect("cpu")
    k = K.current_key(cap)
    bad = {"key": k, "device": "cpu", "matmul_flops": {"float32": -1.0}, "bandwidth_bytes_per_s": 1e9,
           "seconds": 1.0, "torch": K.torch_version()}
    path = tmp_path / K.FILE_NAME
    path.write_text(json.dumps({"format": K.FORMAT, "records": {k: bad}}))
    before = path.read_text()
    # A directory where the temp file goes: the write fails even for root (chmod would not).
    (tmp_path / f".{K.FILE_NAME}.tmp-{os.getpid()}").mkdir()
    capsys.readouterr()
    cal = K.load(cap)
    assert cal.matmul_flops["float32"] > 0 and cal.key == k
    err = capsys.readouterr().err
    assert "invalid" in err and "not cached" in err
    assert path.read_text() == before  # nothing half-written


BUSY_CALIBRATION = """
import json, os, subprocess, sys
cpus = sorted(os.sched_getaffinity(0))[:2]
os.sched_setaffinity(0, cpus)  # before torch starts its threads: they run on these two CPUs
busy = [subprocess.Popen([sys.executable, "-c", f"import os\\nos.sched_setaffinity(0, {{{c}}})\\nwhile True: pass"])
        for c in cpus]
from toolkit.core import calibration as K, capability as C

measure = K.measure

def measure_then_maybe_stop(cap):  # the real measurement; the busy processes end after the first where asked
    cal = measure(cap)
    if sys.argv[1] == "once":
        for p in busy:
            p.kill()
    return cal

K.measure = measure_then_maybe_stop
try:
    cal = K.load(C.detect("cpu"))
finally:
    for p in busy:
        p.kill()
print(json.dumps(cal.cpu_share))
"""


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPUs to pin the calibration and the busy processes to")
@pytest.mark.parametrize("busy", ["always", "once"])
def test_a_calibration_beside_busy_processes_is_measured_again_and_cached_only_when_clean(tmp_path, busy):
    """Real contention: the calibration's two threads and one busy process per CPU on the same two CPUs.
    Its threads then run about half the time (the Zen 3: 0.59 with one busy process, 0.94 alone), so
    it measures again; with the CPUs still busy nothing is cached, and once they are free that second
    measurement is."""
    import subprocess
    import sys

    env = dict(os.environ, TOOLKIT_CACHE=str(tmp_path))
    env.pop(C.ENV_FORCE, None)
    out = subprocess.run([sys.executable, "-c", BUSY_CALIBRATION, busy], env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    share = json.loads(out.stdout.strip().splitlines()[-1])
    assert "other work had the CPU while it measured" in out.stderr and "measuring again" in out.stderr
    path = tmp_path / K.FILE_NAME
    if busy == "always":
        assert share < K.MIN_CPU_SHARE and "calibration not cached" in out.stderr and not path.exists()
    else:
        assert share >= K.MIN_CPU_SHARE and "not cached" not in out.stderr
        (record,) = json.loads(path.read_text())["records"].values()
        assert record["cpu_share"] == share
