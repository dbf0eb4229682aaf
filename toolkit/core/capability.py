"""What this machine can do, as one record, and the dtype decision made from it.

`detect()` reads the CPU's ISA from /proc/cpuinfo (plus torch's own dispatch level when torch is
importable) or the GPU's compute capability; `choose_dtype()` is a pure function of that record
(and optionally of the measured `toolkit.core.calibration`), so every default can be tested with
hand-written records for machines we do not have.

TOOLKIT_CPU_CAPABILITY=avx2|avx512|avx512_bf16|amx forces the CPU record's ISA level and native
bf16 flag, so the fp32 path can be measured on a bf16 machine and the bf16 path on an AVX2 one.
A forced record is taken at its word: a measured calibration does not overrule it.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, replace
from pathlib import Path

from toolkit.core.errors import UserError

PURPOSES = ("train", "eval", "infer")
ENV_FORCE = "TOOLKIT_CPU_CAPABILITY"
# The flags that decide CPU matmul speed per dtype (kept in the record so a run says why).
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "amx_fp16")
# Forced ISA level -> native bf16. avx512 without the _bf16 extension converts bf16 to fp32 in
# software (oneDNN), which is what makes bf16 slower than fp32 there.
_FORCED = {"avx2": False, "avx512": False, "avx512_bf16": True, "amx": True}


@dataclass(frozen=True)
class Capability:
    """One device: `kind` "cpu" or "cuda"; `isa` the CPU's vector level ("avx2", "avx512",
    "avx512_bf16", "amx", or "default"/arch name) or, on CUDA, "sm86"-style; `forced` the
    TOOLKIT_CPU_CAPABILITY value when the record was forced."""

    kind: str
    name: str
    isa: str
    flags: tuple[str, ...] = ()
    physical_cores: int = 1
    logical_cpus: int = 1
    native_bf16: bool = False
    native_fp16: bool = False
    compute_capability: tuple[int, int] | None = None
    torch_capability: str | None = None  # torch.backends.cpu.get_cpu_capability(), e.g. "AVX2"
    forced: str | None = None
    # The CPU's model numbers ("family 26 model 2 stepping 1" on x86): a VM often names Zen 4 and
    # Zen 5 alike ("AMD EPYC"), and their matmul rates differ ~2x.
    model_id: str = ""
    # A hybrid Intel CPU's efficiency cores (E-cores), left out of `physical_cores`.
    efficiency_cores: int = 0


def parse_cpulist(text: str) -> frozenset[int]:
    """CPU numbers from a kernel cpulist ("0-11,16", as in /sys/devices/cpu_atom/cpus); empty for ""."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(cpus)


def parse_cpuinfo(text: str, efficiency_cpus: frozenset[int] = frozenset()) -> dict:
    """Model name, model numbers, flag set and physical core count from /proc/cpuinfo text.

    Physical cores are the distinct (physical id, core id) pairs, so SMT siblings count once;
    without core ids (some VMs, ARM) every listed processor counts as a core. The processors in
    `efficiency_cpus` (a hybrid Intel CPU's E-cores) count apart, as `efficiency_cores`, unless they
    are all there is."""
    name, model_id, flags, cores, processors = "", "", set(), set(), 0
    e_cores: set = set()
    phys = None
    for block in text.split("\n\n"):
        fields = {}
        for line in block.splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                fields[k.strip()] = v.strip()
        if "processor" not in fields:
            continue
        processors += 1
        name = name or fields.get("model name") or fields.get("Model") or fields.get("cpu model", "")
        # x86: family / model / stepping; ARM: implementer / part / variant / revision.
        ids = [(k, fields[k]) for k in ("cpu family", "model", "stepping", "CPU implementer", "CPU part",
                                        "CPU variant", "CPU revision") if fields.get(k)]
        model_id = model_id or " ".join(f"{k.removeprefix('cpu ').removeprefix('CPU ')} {v}" for k, v in ids)
        # x86 says "flags", ARM says "Features".
        flags |= set((fields.get("flags") or fields.get("Features") or "").split())
        phys = fields.get("physical id", "0")
        if "core id" in fields or efficiency_cpus:
            efficient = fields["processor"].isdigit() and int(fields["processor"]) in efficiency_cpus
            (e_cores if efficient else cores).add((phys, fields.get("core id", fields["processor"])))
    if not cores and e_cores:  # only E-cores listed (or the list is wrong): count them
        cores, e_cores = e_cores, set()
    return {"name": name or "unknown CPU", "model_id": model_id, "flags": flags,
            "physical_cores": len(cores) if cores else processors, "efficiency_cores": len(e_cores)}


def isa_level(flags) -> str:
    """The highest x86 vector level the flags show: amx > avx512_bf16 > avx512 > avx2 > default.
    ARM: "sve"/"neon" ("bf16" in its Features means native bf16 dot products)."""
    f = set(flags)
    if {"amx_bf16", "amx_tile"} <= f:
        return "amx"
    if "avx512_bf16" in f:
        return "avx512_bf16"
    if "avx512f" in f:
        return "avx512"
    if "avx2" in f:
        return "avx2"
    if "sve" in f:
        return "sve"
    if "asimd" in f:
        return "neon"
    return "default"


def cpu_record(cpuinfo: str, logical_cpus: int | None = None, torch_capability: str | None = None,
               forced: str | None = None, efficiency_cpus: frozenset[int] = frozenset()) -> Capability:
    """The CPU record from /proc/cpuinfo text and a hybrid CPU's E-core CPU numbers (pure: tests feed
    captured samples)."""
    info = parse_cpuinfo(cpuinfo, efficiency_cpus)
    flags = info["flags"]
    isa = isa_level(flags)
    native_bf16 = isa in ("amx", "avx512_bf16") or (isa in ("neon", "sve") and "bf16" in flags)
    native_fp16 = bool({"avx512_fp16", "amx_fp16"} & flags)
    if forced is not None:
        if forced not in _FORCED:
            raise UserError(f"{ENV_FORCE} must be one of {', '.join(_FORCED)}; got {forced!r}")
        isa, native_bf16 = forced, _FORCED[forced]
    cores = max(1, info["physical_cores"])
    return Capability(
        kind="cpu", name=info["name"], isa=isa, flags=tuple(f for f in RELEVANT_FLAGS if f in flags),
        physical_cores=cores, logical_cpus=max(1, logical_cpus or cores), native_bf16=native_bf16,
        native_fp16=native_fp16, torch_capability=torch_capability, forced=forced, model_id=info["model_id"],
        efficiency_cores=info["efficiency_cores"],
    )


# Pascal's consumer chips (sm61: GTX 10xx) run fp16 arithmetic at 1/64 of their fp32 rate; sm60
# (P100) and sm62 (Jetson TX2) at 2x, as every GPU since Volta does (NVIDIA CUDA C++ Programming
# Guide, "Arithmetic Instructions" throughput table).
SLOW_FP16 = ((6, 1),)


def cuda_record(name: str, compute_capability: tuple[int, int], host: Capability | None = None) -> Capability:
    """A CUDA GPU's record: bf16 tensor cores from sm80 (Ampere) on, fast fp16 from sm60 on except
    Pascal's consumer chips (`SLOW_FP16`).

    Not torch.cuda.is_bf16_supported(): by default it also counts emulated bf16 (True on a T4),
    which runs but is far slower than fp16 there."""
    cc = tuple(compute_capability)
    return Capability(
        kind="cuda", name=name, isa=f"sm{cc[0]}{cc[1]}", physical_cores=host.physical_cores if host else 1,
        logical_cpus=host.logical_cpus if host else 1, native_bf16=cc >= (8, 0),
        native_fp16=cc >= (6, 0) and cc not in SLOW_FP16,
        compute_capability=cc,
    )


def _logical_cpus() -> int:
    """The CPUs this process may run on: its affinity set (a container's CPU set, not the host's), within its
    cgroup's CPU quota (`docker --cpus=2` leaves every CPU in the set but allows two of them)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cpu_quota(CGROUP)
    return min(n, quota) if quota else n


CGROUP = Path("/sys/fs/cgroup")


def _cpu_quota(root: Path) -> int | None:
    """`quota_cpus` of this process's cgroup: v2's cpu.max, else v1's quota and period (None: no limit)."""
    sources = [(root / "cpu.max",)] + [(root / d / "cpu.cfs_quota_us", root / d / "cpu.cfs_period_us")
                                       for d in ("cpu", "cpu,cpuacct")]
    for files in sources:
        try:
            return quota_cpus(" ".join(f.read_text() for f in files))
        except OSError:
            continue
    return None


def quota_cpus(text: str) -> int | None:
    """The CPUs a cgroup CPU quota allows, rounded up, from "QUOTA PERIOD" (cgroup v2's cpu.max, or v1's
    cpu.cfs_quota_us and cpu.cfs_period_us joined): "200000 100000" is 2, "150000 100000" 2; None for no
    limit ("max ..." in v2, "-1 ..." in v1) or text that is not a quota. Threads past it wait on the quota:
    the calibration's `cpu_share` would read every measurement as taken on a busy machine."""
    parts = text.split()
    if len(parts) != 2:
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    if quota <= 0 or period <= 0:
        return None
    return max(1, -(-quota // period))


def _read_cpuinfo() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


def detect(dev: str | None = None, use_torch: bool = True) -> Capability:
    """The record for `dev` ("cpu", "cuda", "cuda:N"; default: toolkit.core.hardware.device()).

    `use_torch=False` skips torch's own ISA probe on a CPU (importing torch takes seconds; nothing
    decides from that field), for callers that must stay instant. CUDA always asks torch."""
    if dev is None:
        from toolkit.core.hardware import device

        dev = device()
    return _detect(dev, os.environ.get(ENV_FORCE) or None, use_torch or dev.startswith("cuda"))


@functools.lru_cache(maxsize=8)
def _detect(dev: str, forced: str | None, use_torch: bool) -> Capability:
    text = _read_cpuinfo()
    torch, torch_cap = None, None
    if use_torch:
        try:
            import torch

            torch_cap = torch.backends.cpu.get_cpu_capability()
        except ImportError:
            pass
    host = cpu_record(text, _logical_cpus(), torch_cap, forced, _efficiency_cpus())
    if text == "":  # no /proc (macOS, Windows): cores from the OS, no ISA flags
        host = replace(host, physical_cores=os.cpu_count() or 1)
    if not dev.startswith("cuda"):
        return host
    index = int(dev.split(":", 1)[1]) if ":" in dev else 0
    return cuda_record(torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index), host)


def _efficiency_cpus() -> frozenset[int]:
    """A hybrid Intel CPU's E-core CPU numbers (Linux 5.13+ lists them for the cpu_atom PMU); empty
    elsewhere."""
    try:
        return parse_cpulist(Path("/sys/devices/cpu_atom/cpus").read_text())
    except (OSError, ValueError):
        return frozenset()


def threads(cap: Capability) -> int:
    """Intra-op threads: one per physical core (SMT siblings share the FMA units, so more only
    contend), never more than the CPUs this process may run on. A hybrid CPU's E-cores are left out,
    as llama.cpp's own default leaves them out: a matmul's threads split the work evenly, so a thread on
    a slower core holds the others at every barrier."""
    return max(1, min(cap.physical_cores, cap.logical_cpus))


def choose_dtype(cap: Capability, purpose: str, calibration=None) -> tuple[str, str]:
    """(dtype name, reason) for `purpose` in {"train", "eval", "infer"} on the device `cap` describes.

    CUDA: bf16 from sm80 on, else fp16 where it is fast (not Pascal's consumer sm61: fp32). CPU inference: fp32 (greedy output must match llama.cpp's
    f16/f32 path token for token). CPU training/evaluation: bf16 only on native bf16 (avx512_bf16,
    amx) and, given a `toolkit.core.calibration.Calibration`, only where its bf16 matmul rate beats
    fp32's; else fp32."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    if cap.kind == "cuda":
        cc = f"sm{cap.compute_capability[0]}{cap.compute_capability[1]}" if cap.compute_capability else "GPU"
        if cap.native_bf16:
            return "bfloat16", f"bf16: {cap.name} ({cc}) has bf16 tensor cores"
        if cap.native_fp16:
            return "float16", f"fp16: {cap.name} ({cc}) has no bf16 (needs sm80+)"
        return "float32", f"fp32: {cap.name} ({cc}) has no bf16 and runs fp16 at a small fraction of fp32's rate"
    if purpose == "infer":
        return "float32", "fp32: CPU inference stays fp32 so greedy output matches llama.cpp"
    forced = f", forced by {ENV_FORCE}={cap.forced}" if cap.forced else ""
    if not cap.native_bf16:
        return "float32", f"fp32: this CPU has no native bf16 ({cap.isa}{forced})"
    # Each dtype at its faster way of running a frozen layer (plain or pre-packed, see packed_matmuls).
    f32, b16 = (calibration.best_flops(d) if calibration else 0.0 for d in ("float32", "bfloat16"))
    if cap.forced or not (f32 and b16):
        return "bfloat16", f"bf16: native bf16 ({cap.isa}{forced})"
    if b16 > f32:
        return "bfloat16", f"bf16: native bf16 ({cap.isa}), matmul measured {b16 / f32:.1f}x fp32"
    return "float32", (f"fp32: bf16 matmul measured no faster than fp32 on this CPU ({cap.isa}: "
                       f"{b16 / 1e9:.0f} vs {f32 / 1e9:.0f} GFLOP/s)")


# Measured in training, the recipe's CPU profile: the AVX2 EPYC of issue 11 (4.5 against 103 tokens/s,
# 2026-11-22) and the Zen 5 EPYC with its libraries capped at AVX2 (80 against 2.75 s a step, steps 2-3,
# 2026-12-05 01:10 UTC; its calibration there read the two products 38x slower). A lone `a @ b` had read
# 94-129x: emulated bf16 runs `x @ W.T` ~15x faster than `g @ W` (probes.matmul_rate).
BF16_EMULATED_SLOWDOWN = "training 23-29x slower measured"


def forced_bf16_warning(cap: Capability, calibration, field: str) -> str:
    """The warning for bfloat16 set by `field` on a CPU without native bf16: the slowdown measured by
    `calibration` (each dtype at its faster way, as `choose_dtype` compares them). Where bf16 measured
    no slower, as on a native-bf16 CPU whose record is forced to avx2, it says so rather than
    printing a slowdown below 1x."""
    f32, b16 = (calibration.best_flops(d) if calibration else 0.0 for d in ("float32", "bfloat16"))
    if not (f32 and b16):
        measured = "bf16 matmuls were not measured on this CPU"
    elif f32 / b16 >= 1.05:
        slower = f32 / b16
        measured = (f"bf16 training matmuls measured {slower:.0f}x slower than fp32 on this CPU" if slower >= 10
                    else f"bf16 training matmuls measured {slower:.1f}x slower than fp32 on this CPU")
    else:
        forced = f", the record forced by {ENV_FORCE}={cap.forced}" if cap.forced else ""
        measured = (f"bf16 measured no slower than fp32 on this CPU ({b16 / 1e9:.0f} vs {f32 / 1e9:.0f} GFLOP/s"
                    f"{forced}), but a CPU without native bf16 emulates it ({BF16_EMULATED_SLOWDOWN})")
    return f"warning: {field}: bfloat16 on a CPU without native bf16 ({cap.isa}): {measured}; `auto` would pick float32"


# Pre-packing copies every frozen weight (twice when training; `packed_linear.for_device` checks the
# room) and reorders them once. The bar is above the measurement's spread (alternating, best of 3:
# +-0.01 on the Zen 5), not higher: a bf16 gain read 1.03-1.14 there where training gained 8%.
PACKED_MIN_GAIN = 1.02
# What each probe's gain was timed on (toolkit.core.probes.PACKED_GAIN_ROWS, the same keys), for the
# reason line.
PACKED_USES = {"train": "a layer's forward and input gradient", "infer": "a 32-row decode forward"}
# The probe each use is decided by. "score": the report's loss and perplexity passes, forwards of
# ~700-1000 rows, run with the matmuls of a training step's shape, not a decode step's: on the Zen 3
# (AVX2) the 32-row decode gained 1.28x packed while the loss pass's forward ran 11% slower packed.
PACKED_GAIN_OF = {"train": "train", "infer": "infer", "score": "train"}


def packed_matmuls(cap: Capability, dtype: str, calibration=None, use: str = "train") -> tuple[bool, str]:
    """(whether frozen linear layers run with oneDNN pre-packed weights, reason) for compute in
    `dtype` on the device `cap` describes (toolkit.core.packed_linear), for `use` ("train": a
    training step's forward and input-gradient matmuls; "infer": decoding; "score": the report's
    many-row forwards, decided by the "train" measurement). CPU only (CUDA's matmuls
    need no packing), and only where a `toolkit.core.calibration.Calibration` measured that use's
    matmuls at least PACKED_MIN_GAIN x faster packed than through torch's matmul in that dtype."""
    if use not in PACKED_GAIN_OF:
        raise ValueError(f"use must be one of {tuple(PACKED_GAIN_OF)}, got {use!r}")
    probe = PACKED_GAIN_OF[use]
    if cap.kind == "cuda":
        return False, "matmuls: cuBLAS"
    gain = (getattr(calibration, "packed_gain", None) or {}).get(f"{dtype} {probe}")
    if not gain:
        return False, f"matmuls: torch's (pre-packed {dtype} not measured on this CPU)"
    if gain >= PACKED_MIN_GAIN:
        return True, (f"matmuls: oneDNN, frozen weights pre-packed ({dtype} {PACKED_USES[probe]} measured "
                      f"{gain:.2f}x torch's matmul)")
    return False, (f"matmuls: torch's (pre-packed {dtype} {PACKED_USES[probe]} measured {gain:.2f}x, "
                   f"under {PACKED_MIN_GAIN}x)")


def matmul_rate(cap: Capability, dtype: str, calibration) -> float:
    """The calibrated FLOP/s the frozen layers' matmuls run at in `dtype`: the pre-packed rate
    where `packed_matmuls` takes that path for training, else torch's (0 when unmeasured). MFU divides by the
    faster of the two instead (`Calibration.best_flops`): the machine's limit, not the path taken."""
    use, _ = packed_matmuls(cap, dtype, calibration)
    return (calibration.packed_flops if use else calibration.matmul_flops).get(dtype, 0.0)
