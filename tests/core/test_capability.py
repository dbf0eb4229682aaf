"""Capability records from /proc/cpuinfo samples, the dtype/threads decision on hand-written records
of machines we do not have, and its bad input (float16 on a CPU, forced bf16 without native bf16)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from toolkit.core import capability as C
from toolkit.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]

_COMMON = ("fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr sse sse2 ht "
           "syscall nx pdpe1gb rdtscp lm constant_tsc rep_good nopl xtopology nonstop_tsc cpuid pni pclmulqdq "
           "ssse3 fma cx16 pcid sse4_1 sse4_2 x2apic movbe popcnt aes xsave avx f16c rdrand hypervisor lahf_lm abm")


def _proc(n, model, flags, physical_id, core_id, siblings, cores):
    return (f"processor\t: {n}\nvendor_id\t: x\nmodel name\t: {model}\nphysical id\t: {physical_id}\n"
            f"siblings\t: {siblings}\ncore id\t\t: {core_id}\ncpu cores\t: {cores}\nflags\t\t: {flags}\n"
            "bogomips\t: 4890.80\n")


# This machine (a 2-core AMD EPYC VM): AVX2 + FMA, no AVX-512.
EPYC_AVX2 = "\n".join(_proc(i, "AMD EPYC", _COMMON + " sse4a misalignsse 3dnowprefetch topoext bmi1 avx2 smep bmi2 "
                            "erms invpcid rdseed adx smap clflushopt clwb sha_ni xsaveopt xsavec vaes vpclmulqdq "
                            "rdpid fsrm", 0, i, 2, 2) for i in range(2))
# Sapphire Rapids (Xeon Platinum 8480+), 2 cores with SMT: processors 0/2 and 1/3 are siblings.
SPR_FLAGS = (_COMMON + " bmi1 hle avx2 smep bmi2 erms invpcid rtm avx512f avx512dq rdseed adx smap avx512ifma "
             "clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt avx_vnni avx512_bf16 wbnoinvd avx512vbmi "
             "umip pku ospke waitpkg avx512_vbmi2 gfni vaes vpclmulqdq avx512_vnni avx512_bitalg "
             "avx512_vpopcntdq la57 rdpid movdiri movdir64b serialize tsxldtrk amx_bf16 avx512_fp16 amx_tile "
             "amx_int8 flush_l1d arch_capabilities")
SPR = "\n".join(_proc(i, "Intel(R) Xeon(R) Platinum 8480+", SPR_FLAGS, 0, i % 2, 4, 2) for i in range(4))
# Zen 4 (EPYC 9654): AVX-512 with the BF16 extension, no AMX; two sockets, one core each.
ZEN4_FLAGS = (_COMMON + " bmi1 avx2 smep bmi2 erms invpcid cqm rdt_a avx512f avx512dq rdseed adx smap avx512ifma "
              "clflushopt clwb avx512cd sha_ni avx512bw avx512vl xsaveopt xsavec xgetbv1 xsaves avx512_bf16 clzero "
              "irperf xsaveerptr rdpru wbnoinvd avx512vbmi umip pku ospke avx512_vbmi2 gfni vaes vpclmulqdq "
              "avx512_vnni avx512_bitalg avx512_vpopcntdq la57 rdpid fsrm")
ZEN4 = "\n".join(_proc(i, "AMD EPYC 9654 96-Core Processor", ZEN4_FLAGS, i, 0, 1, 1) for i in range(2))
# Graviton 3 style ARM: "Features", no core ids.
ARM = "\n".join(f"processor\t: {i}\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 "
                f"atomics fphp asimdhp cpuid asimdrdm sve bf16 i8mm\nCPU part\t: 0xd40\n" for i in range(4))


def test_cpuinfo_samples_parse_to_isa_cores_and_bf16():
    got = {name: C.cpu_record(text) for name, text in
           (("epyc", EPYC_AVX2), ("spr", SPR), ("zen4", ZEN4), ("arm", ARM))}
    assert [(r.isa, r.physical_cores, r.native_bf16, r.native_fp16) for r in got.values()] == [
        ("avx2", 2, False, False), ("amx", 2, True, True), ("avx512_bf16", 2, True, False), ("sve", 4, True, False)]
    assert got["epyc"].name == "AMD EPYC" and got["epyc"].flags == ("avx2", "fma")
    assert got["spr"].flags == ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
    assert got["zen4"].name == "AMD EPYC 9654 96-Core Processor"
    assert got["arm"].model_id == "part 0xd40" and got["epyc"].model_id == ""


def test_model_numbers_tell_apart_cpus_a_vm_names_alike():
    # A KVM guest names Zen 4 and Zen 5 both "AMD EPYC"; fp32 matmuls measured ~2x apart on the two.
    zen = {fam: C.cpu_record(EPYC_AVX2.replace("model name\t: AMD EPYC\n",
                                               f"cpu family\t: {fam}\nmodel\t\t: {m}\nmodel name\t: AMD EPYC\n"
                                               "stepping\t: 1\n"))
           for fam, m in ((25, 17), (26, 2))}
    assert zen[25].name == zen[26].name == "AMD EPYC"
    assert (zen[25].model_id, zen[26].model_id) == ("family 25 model 17 stepping 1", "family 26 model 2 stepping 1")


def test_this_machine_is_detected():
    cap = C.detect("cpu")
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert cap.kind == "cpu" and cap.physical_cores >= 1 and C.threads(cap) >= 1
    assert replace(C.detect("cpu", use_torch=False), torch_capability=cap.torch_capability) == cap
    if text:
        assert cap.isa == C.isa_level(C.parse_cpuinfo(text)["flags"])
        assert cap.native_bf16 == (cap.isa in ("amx", "avx512_bf16")) or cap.isa in ("neon", "sve")


def _Cal(f32, b16, packed=None, gain=None):
    """A toolkit.core.calibration.Calibration with the rates choose_dtype and packed_matmuls read."""
    from toolkit.core.calibration import Calibration

    return Calibration(key="test", device="cpu test", matmul_flops={"float32": f32, "bfloat16": b16},
                       bandwidth_bytes_per_s=10e9, seconds=1.0, torch="test", packed_flops=packed or {},
                       packed_gain=gain or {})


AVX2 = C.cpu_record(EPYC_AVX2)
AVX512_BF16 = C.cpu_record(ZEN4)
AMX = C.cpu_record(SPR)
T4 = C.cuda_record("Tesla T4", (7, 5))
RTX3060 = C.cuda_record("NVIDIA GeForce RTX 3060", (8, 6))
A100 = C.cuda_record("NVIDIA A100-SXM4-40GB", (8, 0))
GTX1080TI = C.cuda_record("NVIDIA GeForce GTX 1080 Ti", (6, 1))
P100 = C.cuda_record("Tesla P100-PCIE-16GB", (6, 0))


@pytest.mark.parametrize("cap, train, infer", [
    (AVX2, "float32", "float32"),
    (AVX512_BF16, "bfloat16", "float32"),
    (AMX, "bfloat16", "float32"),
    (T4, "float16", "float16"),
    (RTX3060, "bfloat16", "bfloat16"),
    (A100, "bfloat16", "bfloat16"),
    (GTX1080TI, "float32", "float32"),  # fp16 at 1/64 of fp32 there
    (P100, "float16", "float16"),
])
def test_dtype_choice_per_machine(cap, train, infer):
    assert C.choose_dtype(cap, "train")[0] == train
    assert C.choose_dtype(cap, "eval")[0] == train
    assert C.choose_dtype(cap, "infer")[0] == infer


def test_reasons_say_why():
    assert C.choose_dtype(AVX2, "train")[1] == "fp32: this CPU has no native bf16 (avx2)"
    assert "sm75" in C.choose_dtype(T4, "train")[1] and "no bf16" in C.choose_dtype(T4, "train")[1]
    assert C.choose_dtype(GTX1080TI, "train")[1].startswith("fp32: NVIDIA GeForce GTX 1080 Ti (sm61) has no bf16")
    assert "llama.cpp" in C.choose_dtype(AMX, "infer")[1]


def test_calibration_decides_between_native_bf16_and_fp32():
    assert C.choose_dtype(AMX, "train", _Cal(100e9, 400e9)) == (
        "bfloat16", "bf16: native bf16 (amx), matmul measured 4.0x fp32")
    dtype, why = C.choose_dtype(AVX512_BF16, "train", _Cal(100e9, 80e9))
    assert dtype == "float32" and "80 vs 100 GFLOP/s" in why
    # No native bf16: fp32 whatever a calibration says.
    assert C.choose_dtype(AVX2, "train", _Cal(1e9, 100e9))[0] == "float32"
    with pytest.raises(ValueError):
        C.choose_dtype(AVX2, "training")


def test_dtype_choice_compares_each_dtype_at_its_faster_way():
    # fp32 pre-packed (300) beats bf16's best (250): fp32, though bf16 beats fp32's plain matmul.
    dtype, why = C.choose_dtype(AVX512_BF16, "train", _Cal(100e9, 250e9, {"float32": 300e9, "bfloat16": 240e9}))
    assert dtype == "float32" and "250 vs 300 GFLOP/s" in why
    assert C.choose_dtype(AVX512_BF16, "train", _Cal(150e9, 380e9, {"float32": 190e9}))[1].endswith("2.0x fp32")


def test_forced_bf16_warning_quotes_the_measured_slowdown_or_says_it_measured_none():
    field = "method.compute_dtype"
    # The AVX2 EPYC of issue 11: fp32 127, bf16 1.0 GFLOP/s.
    msg = C.forced_bf16_warning(AVX2, _Cal(127e9, 1.0e9), field)
    assert msg == ("warning: method.compute_dtype: bfloat16 on a CPU without native bf16 (avx2): bf16 training "
                   "matmuls measured 127x slower than fp32 on this CPU; `auto` would pick float32")
    assert "2.5x slower" in C.forced_bf16_warning(AVX2, _Cal(100e9, 40e9), field)
    # Each dtype at its faster way: the Zen 5 capped at AVX2 (2026-12-05), fp32 pre-packed 281 against
    # bf16's two products 7.4.
    assert "38x slower" in C.forced_bf16_warning(AVX2, _Cal(236e9, 7.4e9, {"float32": 281e9}), field)
    # The Zen 5 forced to avx2 (its bf16 native, the libraries not capped): no "0x slower".
    forced = replace(AVX512_BF16, isa="avx2", native_bf16=False, forced="avx2")
    msg = C.forced_bf16_warning(forced, _Cal(235e9, 928e9, {"float32": 558e9, "bfloat16": 1056e9}), field)
    assert ("no slower than fp32 on this CPU (1056 vs 558 GFLOP/s, the record forced by "
            "TOOLKIT_CPU_CAPABILITY=avx2)") in msg
    assert "0x" not in msg and C.BF16_EMULATED_SLOWDOWN in msg
    assert "were not measured" in C.forced_bf16_warning(AVX2, None, field)


def test_packed_matmuls_only_where_measured_faster_for_the_use_on_a_cpu():
    # Measured on the 2-core Zen 5 EPYC, torch 2.13 (toolkit.core.probes.packed_gains, 2026-12-04):
    # the hot 2048-row product read bf16 packing ~1.0x at moments when a step's own matmuls read 1.03-1.14x.
    zen5 = _Cal(241e9, 930e9, {"float32": 564e9, "bfloat16": 1075e9},
                {"float32 train": 2.32, "float32 infer": 2.73, "bfloat16 train": 1.135, "bfloat16 infer": 1.838})
    use, why = C.packed_matmuls(AVX512_BF16, "bfloat16", zen5)
    assert use and why == ("matmuls: oneDNN, frozen weights pre-packed (bfloat16 a layer's forward and input "
                           "gradient measured 1.14x torch's matmul)")
    assert C.packed_matmuls(AVX512_BF16, "float32", zen5, "infer")[1].endswith("a 32-row decode forward measured "
                                                                                "2.73x torch's matmul)")
    # The same Zen 5 with oneDNN, MKL and ATen capped at AVX2: fp32 still gains, by less.
    capped = _Cal(241e9, 2.9e9, {"float32": 282e9}, {"float32 train": 1.175, "float32 infer": 1.586})
    assert C.packed_matmuls(AVX2, "float32", capped)[0] and C.packed_matmuls(AVX2, "float32", capped, "infer")[0]
    # Under the bar for one use only: decided per use.
    split = _Cal(200e9, 400e9, gain={"bfloat16 train": 1.01, "bfloat16 infer": 1.9})
    use, why = C.packed_matmuls(AVX512_BF16, "bfloat16", split)
    assert not use and why.endswith("measured 1.01x, under 1.02x)")
    assert C.packed_matmuls(AVX512_BF16, "bfloat16", split, "infer")[0]
    # The Zen 3 (AVX2 only, 2026-12-06): packing lost in a step's shapes and won in a decode step's; the
    # report's loss passes, forwards of ~700 rows, ran 11% slower packed. They follow the training probe.
    zen3 = _Cal(182e9, 3.9e9, {"float32": 168e9}, {"float32 train": 0.88, "float32 infer": 1.28})
    assert C.packed_matmuls(AVX2, "float32", zen3, "infer")[0]
    use, why = C.packed_matmuls(AVX2, "float32", zen3, "score")
    assert not use and why == ("matmuls: torch's (pre-packed float32 a layer's forward and input gradient "
                               "measured 0.88x, under 1.02x)")
    assert C.packed_matmuls(AVX512_BF16, "bfloat16", split, "score")[0] is False
    assert C.packed_matmuls(AVX2, "float32", None) == (False, "matmuls: torch's (pre-packed float32 not measured "
                                                             "on this CPU)")
    # Rates alone (no gain timed in the use's forms) are not enough.
    assert C.packed_matmuls(AMX, "bfloat16", _Cal(100e9, 400e9, {"bfloat16": 800e9}))[0] is False
    for gpu in (T4, C.cuda_record("NVIDIA A100-SXM4-40GB", (8, 0))):
        assert C.packed_matmuls(gpu, "bfloat16", zen5) == (False, "matmuls: cuBLAS")
    with pytest.raises(ValueError):
        C.packed_matmuls(AVX512_BF16, "bfloat16", zen5, "training")
    # The time model takes the rate of the path training takes; MFU the faster of the two.
    assert C.matmul_rate(AVX512_BF16, "bfloat16", zen5) == 1075e9
    assert C.matmul_rate(AVX512_BF16, "bfloat16", split) == 400e9
    assert C.matmul_rate(AVX2, "float32", _Cal(120e9, 1e9)) == 120e9


def test_forced_capability_overrides_flags_and_calibration():
    forced_bf16 = C.cpu_record(EPYC_AVX2, forced="avx512_bf16")
    assert forced_bf16.isa == "avx512_bf16" and forced_bf16.native_bf16 and forced_bf16.flags == ("avx2", "fma")
    # The point of forcing: measure the bf16 path on a machine where it is slow, and vice versa.
    assert C.choose_dtype(forced_bf16, "train", _Cal(100e9, 1e9))[0] == "bfloat16"
    forced_fp32 = C.cpu_record(SPR, forced="avx2")
    dtype, why = C.choose_dtype(forced_fp32, "train")
    assert dtype == "float32" and "TOOLKIT_CPU_CAPABILITY=avx2" in why
    with pytest.raises(UserError, match="TOOLKIT_CPU_CAPABILITY must be one of"):
        C.cpu_record(EPYC_AVX2, forced="avx9000")


def test_threads_are_physical_cores_within_the_allowed_cpus():
    assert C.threads(C.cpu_record(SPR, logical_cpus=4)) == 2  # SMT siblings don't count
    assert C.threads(C.cpu_record(SPR, logical_cpus=1)) == 1  # a container allowed one CPU
    assert C.threads(replace(AVX2, physical_cores=16, logical_cpus=32)) == 16


def _hybrid_cpuinfo() -> str:
    """An Alder Lake laptop as Linux lists it: 6 P-cores with SMT (CPUs 0-11), 8 E-cores (12-19)."""
    blocks = []
    for cpu in range(20):
        core = cpu // 2 * 4 if cpu < 12 else 24 + (cpu - 12)
        blocks.append(f"processor\t: {cpu}\nmodel name\t: 12th Gen Intel(R) Core(TM) i7-12700H\ncpu family\t: 6\n"
                      f"model\t\t: 154\nphysical id\t: 0\ncore id\t\t: {core}\nflags\t\t: fpu avx avx2 fma f16c\n")
    return "\n".join(blocks)


def test_a_hybrid_cpus_threads_are_its_performance_cores():
    """llama.cpp's default counts a hybrid CPU's P-cores only; torch's threads and llama.cpp's here do
    too: E-cores (listed in /sys/devices/cpu_atom/cpus) would hold every matmul's barrier."""
    assert C.parse_cpulist("12-19") == frozenset(range(12, 20))
    assert C.parse_cpulist("0-3,8,10-11\n") == frozenset({0, 1, 2, 3, 8, 10, 11}) and C.parse_cpulist("") == frozenset()
    text = _hybrid_cpuinfo()
    flat = C.cpu_record(text, logical_cpus=20)  # no cpu_atom list (an older kernel): every core counts
    assert (flat.physical_cores, flat.efficiency_cores, C.threads(flat)) == (14, 0, 14)
    hybrid = C.cpu_record(text, logical_cpus=20, efficiency_cpus=C.parse_cpulist("12-19"))
    assert (hybrid.physical_cores, hybrid.efficiency_cores, C.threads(hybrid)) == (6, 8, 6)
    assert hybrid.isa == "avx2" and not hybrid.native_bf16
    # A process allowed only E-cores (taskset): they are what it has.
    e_only = "\n\n".join(b for b in text.split("\n\n") if int(b.split(":")[1].split()[0]) >= 12)
    assert C.threads(C.cpu_record(e_only, logical_cpus=8, efficiency_cpus=C.parse_cpulist("12-19"))) == 8
    # Not hybrid (the Zen 3 EPYC guest): nothing changes.
    assert C.cpu_record(EPYC_AVX2, efficiency_cpus=frozenset()).efficiency_cores == 0


# --- through toolkit.core.hardware on this machine -----------------------------------------


@pytest.fixture
def as_avx2(monkeypatch, tmp_path):
    """This machine seen as an AVX2-only CPU, with its own calibration cache and warning memory."""
    from toolkit.core import hardware

    monkeypatch.setenv("TOOLKIT_CPU_CAPABILITY", "avx2")
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(hardware, "_warned", set())
    return hardware


def test_hardware_dtype_choice_and_dtype_for(as_avx2, monkeypatch, tmp_path):
    hw = as_avx2
    assert hw.dtype_choice("cpu", "train") == ("float32", "fp32: this CPU has no native bf16 "
                                                          "(avx2, forced by TOOLKIT_CPU_CAPABILITY=avx2)")
    assert hw.dtype_for("cpu", "infer") == "float32"
    assert hw.dtype_choice("cpu", "train", "float32", "method.compute_dtype") == (
        "float32", "set by method.compute_dtype")
    monkeypatch.setenv("TOOLKIT_CPU_CAPABILITY", "amx")
    assert hw.dtype_for("cpu", "train") == "bfloat16"  # forced: no calibration consulted or run
    assert not (tmp_path / "calibration.json").exists()


def test_float16_on_cpu_is_an_error_naming_the_key(as_avx2):
    with pytest.raises(UserError, match=r"^method\.compute_dtype: float16 is not supported on CPU"):
        as_avx2.dtype_choice("cpu", "train", "float16", "method.compute_dtype")


def test_forced_bf16_without_native_bf16_warns_once_with_the_measured_slowdown(as_avx2, capsys, tmp_path):
    from toolkit.core import calibration as K

    cap = C.detect("cpu")
    k = K.key(cap, K.torch_version())
    rec = {"key": k, "device": "cpu test", "matmul_flops": {"float32": 120e9, "bfloat16": 1e9},
           "bandwidth_bytes_per_s": 10e9, "seconds": 1.0, "torch": K.torch_version()}
    (tmp_path / "calibration.json").write_text(json.dumps({"format": K.FORMAT, "records": {k: rec}}))
    assert as_avx2.dtype_choice("cpu", "train", "bfloat16", "method.compute_dtype")[0] == "bfloat16"
    assert as_avx2.dtype_choice("cpu", "train", "bfloat16", "method.compute_dtype")[0] == "bfloat16"
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert "method.compute_dtype" in warnings[0] and "bf16 training matmuls measured 120x slower than fp32" in warnings[0]


def test_cli_float16_on_cpu_exits_2_naming_the_key_and_leaves_nothing(as_avx2, monkeypatch, tmp_path, capsys):
    from toolkit.cli import main

    monkeypatch.setenv("TOOLKIT_DEVICE", "cpu")
    runs = tmp_path / "runs"
    argv = ["finetune", str(ROOT / "recipes" / "finance"), "--set", "method.compute_dtype=float16",
            "--runs-dir", str(runs)]
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "method.compute_dtype: float16 is not supported on CPU" in err[0]
    assert not runs.exists()


def test_apply_threads(as_avx2, monkeypatch):
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        monkeypatch.setenv("TOOLKIT_THREADS", "1")
        assert as_avx2.apply_threads("cpu") == 1 == torch.get_num_threads()
        monkeypatch.delenv("TOOLKIT_THREADS")
        want = C.threads(C.detect("cpu"))
        assert as_avx2.apply_threads("cpu") == want == torch.get_num_threads()
        assert as_avx2.apply_threads("cpu") == want  # idempotent
        monkeypatch.setenv("TOOLKIT_THREADS", "two")
        with pytest.raises(UserError, match="TOOLKIT_THREADS"):
            as_avx2.apply_threads("cpu")
    finally:
        torch.set_num_threads(before)


def test_a_cgroup_cpu_quota_caps_the_cpus_a_process_may_use(tmp_path, monkeypatch):
    """`docker --cpus=2` keeps every CPU in the affinity set and allows two: threads follow the quota (else
    the calibration's threads wait on it, and its `cpu_share` reads every measurement as a busy machine's)."""
    cases = {"200000 100000": 2, "150000 100000": 2, "50000 100000": 1, "max 100000": None, "-1\n100000\n": None,
             "0 100000": None, "": None, "fast 100000": None}
    assert {text: C.quota_cpus(text) for text in cases} == cases
    assert C._cpu_quota(tmp_path) is None  # no cgroup files: no limit
    v1 = tmp_path / "cpu,cpuacct"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("300000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert C._cpu_quota(tmp_path) == 3
    (tmp_path / "cpu.max").write_text("max 100000\n")  # v2 first: unlimited there
    assert C._cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").write_text("100000 100000\n")
    assert C._cpu_quota(tmp_path) == 1
    monkeypatch.setattr(C, "CGROUP", tmp_path)  # the process's CPUs: its affinity set within that quota
    assert C._logical_cpus() == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert C._logical_cpus() == len(os.sched_getaffinity(0))
