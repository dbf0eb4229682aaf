"""The C allocator setting a CPU training process runs under: glibc's malloc in huge pages.

A CPU training step allocates and frees gigabytes of activations, gradients and logits. Under
glibc's default settings, blocks over its mmap threshold come from fresh `mmap()`s and go back
at `free()`, and the heap's top is trimmed, so each step page-faults the same memory in again:
8,000-11,000 minor faults a step on the finance recipe's CPU profile. The tunable
`glibc.malloc.hugetlb=1` (glibc 2.35 and later) has malloc align its memory to transparent huge
pages and `madvise()` them: 230-240 faults a step. Measured on the Zen 5 EPYC (docs/cpu-training.md),
12-step runs of the recipe, the settings alternating, six pairs: 0.947-1.050 s a step against
1.054-1.147 without it (~6%), the same loss to all digits. The kernel must allow huge pages
(`/sys/kernel/mm/transparent_hugepage/enabled`: `always` or `madvise`, the usual defaults).

glibc reads its tunables once, when the process starts, so `toolkit finetune` re-executes itself
with `GLIBC_TUNABLES` set (`relaunch`), as PyTorch's `torch.backends.xeon.run_cpu` launcher starts
its script under another allocator. `decide` is the one place that says whether, a pure function of
the facts `detect` reads. `TOOLKIT_MALLOC=system` leaves the allocator as the system has it.
"""

from __future__ import annotations

import dataclasses
import os
import sys

ENV = "GLIBC_TUNABLES"
OPT_OUT = "TOOLKIT_MALLOC"
HUGETLB = "glibc.malloc.hugetlb=1"
THP_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"


@dataclasses.dataclass(frozen=True)
class Facts:
    """What the decision depends on."""

    system: str                    # platform.system()
    libc: str                      # platform.libc_ver()[0]: "glibc", or "" (musl, macOS, Windows)
    libc_version: tuple[int, ...]  # (2, 36)
    thp: str                       # the kernel's transparent huge page mode: always / madvise / never, "" unknown
    tunables: str                  # GLIBC_TUNABLES as the process got it, "" when unset
    opt_out: bool                  # TOOLKIT_MALLOC=system
    cuda: bool                     # an NVIDIA GPU is visible: training goes there


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for p in text.split("."):
        if not p.isdigit():
            break
        parts.append(int(p))
    return tuple(parts)


def thp_mode(text: str) -> str:
    """The bracketed choice of the kernel's `enabled` file ("always [madvise] never" -> "madvise")."""
    start, end = text.find("["), text.find("]")
    return text[start + 1:end] if 0 <= start < end else ""


def detect() -> Facts:
    """The facts for this process: platform, libc, the kernel's THP mode, the environment, and
    whether nvidia-smi sees a GPU (no torch import: this runs before the process restarts)."""
    import platform

    from toolkit.core import hardware

    libc, version = platform.libc_ver()
    try:
        with open(THP_FILE) as f:
            thp = thp_mode(f.read())
    except OSError:
        thp = ""
    return Facts(system=platform.system(), libc=libc, libc_version=_version(version), thp=thp,
                 tunables=os.environ.get(ENV, ""), opt_out=os.environ.get(OPT_OUT, "").lower() == "system",
                 cuda=hardware.detect().kind == "cuda")


def decide(f: Facts) -> tuple[str | None, str]:
    """(the GLIBC_TUNABLES value to restart under, or None to run as is; why)."""
    if f.opt_out:
        return None, f"{OPT_OUT}=system"
    if f.system != "Linux" or f.libc != "glibc":
        return None, "not glibc's malloc"
    if f.libc_version < (2, 35):
        return None, f"glibc {'.'.join(map(str, f.libc_version))} has no malloc.hugetlb (2.35+)"
    if f.thp not in ("always", "madvise"):
        return None, f"the kernel's transparent huge pages are {f.thp or 'not available'}"
    if f.cuda:
        return None, "training goes to the GPU (the setting was measured for CPU training)"
    if "glibc.malloc.hugetlb" in f.tunables:
        return None, f"{ENV} already sets malloc.hugetlb"
    return (f"{f.tunables}:{HUGETLB}" if f.tunables else HUGETLB), \
        f"malloc in transparent huge pages (THP {f.thp}): far fewer page faults a step"


def state() -> str:
    """For run.json: the setting this process runs under, and why."""
    f = detect()
    if HUGETLB in f.tunables.split(":"):
        return HUGETLB
    value, why = decide(f)
    if value is not None:  # a library call: only the command line's entry restarts
        why = f"not started by `toolkit finetune`, which restarts under {HUGETLB}"
    return f"system default ({why})"


def relaunch() -> None:
    """Restart this process (same interpreter, same arguments) under the tunable where `decide`
    says so; returns where it does not. Only for the command line's entry: it replaces the process."""
    value, _ = decide(detect())
    if value is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, ENV: value})
