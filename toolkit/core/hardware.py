"""The one place that decides device, dtype and how much memory there is.

Detection never imports torch unless asked to: `toolkit estimate` must stay instant, so GPU
memory comes from `nvidia-smi` and CPU memory from /proc/meminfo (psutil where there is none).
Training and decoding call `device()` / `dtype_for()` / `dtype_choice()` / `apply_threads()`, which
do use torch; what the device can do is toolkit.core.capability, how fast it is toolkit.core.calibration.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
from dataclasses import dataclass

from toolkit.core.errors import UserError

@dataclass(frozen=True)
class Hardware:
    """What we run on: `kind` is "cuda" or "cpu"; memory in bytes."""

    kind: str
    name: str
    total_bytes: int
    available_bytes: int
    source: str  # where the numbers came from, shown to the user


def _nvidia_smi() -> Hardware | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=name,memory.total,memory.free", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None
    if not out:
        return None
    # One consumer GPU is the target; with several, the first is the one training uses.
    name, total_mib, free_mib = (x.strip() for x in out[0].split(","))
    return Hardware("cuda", name, int(float(total_mib)) * 1024**2, int(float(free_mib)) * 1024**2, "nvidia-smi")


@functools.lru_cache(maxsize=1)
def nvidia_smi_compute_capability() -> tuple[int, int] | None:
    """The first GPU's compute capability from nvidia-smi (drivers from 510 on), without torch:
    `toolkit estimate` decides the dtype from it and must stay instant. None where it can't say.
    Asked once a process: it does not change, and each call starts nvidia-smi."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10, check=True).stdout.split()
        major, minor = out[0].split(".")
        return int(major), int(minor)
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None


def cpu_memory() -> Hardware:
    """This machine's RAM: total and available (MemAvailable: what can be had without swapping)."""
    total = avail = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                if key == "MemTotal":
                    total = int(value.split()[0]) * 1024
                elif key == "MemAvailable":
                    avail = int(value.split()[0]) * 1024
    except OSError:
        pass
    if total is None:  # no /proc (macOS, Windows): Windows has no os.sysconf, which knows no free RAM anyway
        import psutil  # installed with accelerate

        mem = psutil.virtual_memory()
        return Hardware("cpu", _cpu_name(), mem.total, mem.available, "psutil")
    return Hardware("cpu", _cpu_name(), total, avail or total, "/proc/meminfo")


def _cpu_name() -> str:
    """"CPU (6 cores, 12 threads)": physical cores (what training runs a thread on) and the logical
    CPUs this process may use, not os.cpu_count()'s whole machine; on a hybrid CPU "6 P-cores" and
    the E-cores left out."""
    from toolkit.core import capability

    cap = capability.detect("cpu", use_torch=False)
    cores = capability.threads(cap)  # a container's CPU set may hold fewer than the machine's cores
    kind = f"P-cores, {cap.efficiency_cores} E-cores unused" if cap.efficiency_cores else "cores"
    return f"CPU ({cores} {kind}{f', {cap.logical_cpus} threads' if cap.logical_cpus > cores else ''})"


def detect(use_torch: bool = False) -> Hardware:
    """Detect the accelerator (first CUDA GPU) or fall back to CPU RAM.

    `use_torch=True` also asks torch.cuda, for machines where nvidia-smi is not on PATH.
    """
    hw = _nvidia_smi()
    if hw is None and use_torch:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info(0)
            hw = Hardware("cuda", torch.cuda.get_device_name(0), total, free, "torch.cuda")
    return hw or cpu_memory()


def device() -> str:
    """The torch device everything runs on: "cuda" when a CUDA GPU is usable, else "cpu".

    TOOLKIT_DEVICE=cpu forces the CPU (for tests on a GPU machine).
    """
    forced = os.environ.get("TOOLKIT_DEVICE")
    if forced:
        return forced
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def dtype_for(dev: str, purpose: str) -> str:
    """Compute dtype name for `purpose` in {"train", "eval", "infer"} on device `dev`.

    CUDA: bf16 where the GPU supports it (Ampere+), else fp16.
    CPU training/evaluation: bf16 only with native bf16 (avx512_bf16, AMX) and measured faster
    than fp32 by the calibration: bf16 compute ran ~1.75x faster than fp32 for QLoRA (240 vs 137
    tokens/s) on an AVX512-BF16 CPU, but ~25x slower on an AVX2-only one (it emulates bf16).
    CPU inference: fp32, because greedy output must match llama.cpp's f16/f32 path token for
    token and bf16 matmuls on CPU are not faster for a 135M model.
    """
    return dtype_choice(dev, purpose)[0]


_warned: set[str] = set()


def dtype_choice(dev: str, purpose: str, requested: str = "auto", field: str = "compute dtype") -> tuple[str, str]:
    """(dtype name, reason) for `purpose` on `dev`: `requested` "auto" follows dtype_for's rules
    (toolkit.core.capability.choose_dtype); an explicit dtype is kept, except float16 on a CPU
    (an error naming `field`); bfloat16 on a CPU without native bf16 warns once with the measured
    slowdown."""
    from toolkit.core import capability as C

    cap = C.detect(dev)
    if requested == "auto":
        return auto_dtype(cap, purpose)
    if cap.kind == "cpu" and requested == "float16":
        raise UserError(f"{field}: float16 is not supported on CPU (no fp16 matmul kernels there); "
                        "use auto, float32 or bfloat16")
    if cap.kind == "cpu" and requested == "bfloat16" and not cap.native_bf16 and field not in _warned:
        from toolkit.core import calibration
        from toolkit.core.progress import say

        _warned.add(field)
        say(C.forced_bf16_warning(cap, calibration.load(cap), field))
    return requested, f"set by {field}"


def auto_dtype(cap, purpose: str) -> tuple[str, str]:
    """(dtype name, reason) that `auto` means for the device `cap` describes: capability.choose_dtype,
    with the calibration loaded only where it decides (a native-bf16 CPU whose record is not forced)."""
    from toolkit.core import capability as C

    cal = None
    if cap.kind == "cpu" and cap.native_bf16 and purpose != "infer" and not cap.forced:
        from toolkit.core import calibration

        cal = calibration.load(cap)
    return C.choose_dtype(cap, purpose, cal)


def packed_choice(dev: str, dtype: str, use: str = "train", use_torch: bool = True) -> tuple[bool, str]:
    """(whether frozen linear layers run pre-packed for oneDNN, reason) for compute in `dtype` on
    `dev` for `use` ("train", "infer" or "score"): capability.packed_matmuls over this machine's calibration
    (cached; measured once). `use_torch=False` answers without importing torch, for a plan that must stay
    instant: a calibration measures the packs only where this torch has them."""
    from toolkit.core import capability as C

    cap = C.detect(dev, use_torch=use_torch)  # torch's ISA probe keys no calibration (timeplan.host_capability)
    if cap.kind == "cuda":
        return C.packed_matmuls(cap, dtype, use=use)
    from toolkit.core import calibration, packed_linear

    if use_torch and not packed_linear.available():
        return False, "matmuls: torch's (this torch has no oneDNN packed linear)"
    return C.packed_matmuls(cap, dtype, calibration.load(cap), use)


def attention_choice(dev: str, dtype: str):
    """The `attention_kernels.AttentionChoice` for packed training's attention computing in `dtype` on
    `dev`: attention_kernels.packed_attention over this machine's calibration (cached; measured once)."""
    from toolkit.core import attention_kernels
    from toolkit.core import capability as C

    cap = C.detect(dev)
    if cap.kind == "cuda":
        return attention_kernels.packed_attention(cap, dtype)
    from toolkit.core import calibration

    return attention_kernels.packed_attention(cap, dtype, calibration.load(cap))


def _explicit_threads() -> int | None:
    """TOOLKIT_THREADS=N as N (a UserError when not a positive integer), else None."""
    explicit = os.environ.get("TOOLKIT_THREADS")
    if explicit is None:
        return None
    if not explicit.isdigit() or int(explicit) < 1:
        raise UserError(f"TOOLKIT_THREADS must be a positive integer; got {explicit!r}")
    return int(explicit)


def llama_threads() -> int:
    """llama.cpp's threads, for decoding and prompt batches alike: TOOLKIT_THREADS=N, else one per
    physical core within the CPUs this process may use (a hybrid CPU's P-cores), the decision torch's
    threads follow (`capability.threads`) and llama.cpp's and Ollama's own default. It was half the logical CPUs
    (and the decoding backend llama-cpp-python's default, the same), after two threads ran a 253-token
    eval 5-10x slower than one on a 2-core guest while other jobs ran there: llama.cpp's threads spin
    at barriers. On that guest idle (the Zen 4 EPYC, 2026-12-06; docs/export.md) two threads against one
    served the first token 1.6-2.2x sooner and decoded 1.3-1.8x faster, and the toolkit's own decoding
    steps ran 1.3-1.5x faster. On an SMT CPU half the logical CPUs were the physical cores already;
    without SMT (most VMs) this doubles them."""
    explicit = _explicit_threads()
    if explicit is not None:
        return explicit
    from toolkit.core import capability as C

    return C.threads(C.detect("cpu", use_torch=False))


def apply_threads(dev: str) -> int:
    """Set torch's intra-op threads to one per physical core on CPU (SMT siblings only contend);
    returns the thread count in effect. TOOLKIT_THREADS=N sets N; an explicit OMP_NUM_THREADS is
    left to torch, which already follows it. Several local processes (accelerate) share the cores."""
    import torch

    explicit = _explicit_threads()
    if explicit is not None:
        want = explicit
    elif dev.startswith("cuda") or os.environ.get("OMP_NUM_THREADS"):
        return torch.get_num_threads()
    else:
        from toolkit.core import capability as C

        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        want = max(1, C.threads(C.detect(dev)) // max(1, local))
    if torch.get_num_threads() != want:
        torch.set_num_threads(want)
    return want


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
