"""The C allocator a CPU training process runs under: tcmalloc where installed, else glibc's malloc
in huge pages.

A CPU training step allocates and frees gigabytes of activations, gradients and logits. Under
glibc's default settings, blocks over its mmap threshold come from fresh `mmap()`s and go back
at `free()`, and the heap's top is trimmed, so each step page-faults the same memory in again:
8,000-11,000 minor faults a step on the finance recipe's CPU profile.

- **tcmalloc** (gperftools; `apt install libtcmalloc-minimal4` on Debian and Ubuntu), preloaded with
  `TCMALLOC_RELEASE_RATE=0`, keeps what a step frees for the next one. It is what PyTorch's own CPU
  launcher (`torch.backends.xeon.run_cpu`) preloads by default. Measured on the Zen 5 EPYC
  (docs/cpu-training.md, 2026-12-05), 40-step runs of the recipe, alternating with glibc's huge
  pages: 1058.5 / 1056.4 / 1039.2 / 1035.7 / 988.6 training tokens/s against 930.8 / 927.6 / 952.6 /
  930.6 / 945.4 in bf16 (+10% on the means), the same loss. jemalloc (5.3; its defaults, PyTorch's
  launcher's settings, never purging) read 1-19% slower than glibc's huge pages; mimalloc (3.4) never
  purging +5-7%, half tcmalloc's gain, and slower in its defaults.
- **glibc's `glibc.malloc.hugetlb=1`** (glibc 2.35 and later), where tcmalloc is not installed, has
  malloc align its memory to transparent huge pages and `madvise()` them: 230-240 faults a step
  instead of 8,000-11,000, ~6% less time a step (six alternating pairs). The kernel must allow huge
  pages (`/sys/kernel/mm/transparent_hugepage/enabled`: `always` or `madvise`, the usual defaults).

Both take effect only when a process starts, so `toolkit finetune` re-executes itself with the
environment `decide` gives (`relaunch`), as PyTorch's launcher starts its script under another
allocator; so do `toolkit generate` and `toolkit chat` where the model decodes through transformers
(`commands.model_argument.restart_for_decoding`: ~10% more tokens/s on the Zen 3). The restarted
process puts `LD_PRELOAD` back as it found it, so the programs it starts do not inherit tcmalloc. `decide` is the one place that says which, a pure function of the facts
`detect` reads. `TOOLKIT_MALLOC=system` leaves the allocator as the system has it;
`TOOLKIT_MALLOC=glibc` takes glibc's huge pages even where tcmalloc is installed.
"""

from __future__ import annotations

import dataclasses
import os
import sys

ENV = "GLIBC_TUNABLES"
PRELOAD = "LD_PRELOAD"
OPT_OUT = "TOOLKIT_MALLOC"  # "system" or "glibc"
HUGETLB = "glibc.malloc.hugetlb=1"
THP_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
# tcmalloc hands freed memory back to the kernel at this rate (gperftools' default 1.0); 0 keeps it,
# which is the point here. Its report of single allocations over 1 GiB (a Llama's fp32 embedding)
# would print to the user's terminal: raised out of reach.
TCMALLOC_ENV = {"TCMALLOC_RELEASE_RATE": "0", "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD": str(1 << 60)}
TCMALLOC_NAMES = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4", "libtcmalloc_minimal.so", "libtcmalloc.so")
# What LD_PRELOAD was before the restart ("" for unset), for the restarted process to put back.
PRELOAD_WAS = "TOOLKIT_LD_PRELOAD_WAS"


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
    tcmalloc: str = ""             # the path of an installed tcmalloc, "" none
    preload: str = ""              # LD_PRELOAD as the process got it
    glibc_only: bool = False       # TOOLKIT_MALLOC=glibc
    loaded: str = ""               # the tcmalloc this process already runs under, "" none


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


def library_dirs(environ=os.environ) -> list[str]:
    """Where a tcmalloc is looked for: the environment's own lib (venv, conda), the user's, then
    the system's, multiarch included (Debian's /usr/lib/x86_64-linux-gnu, which PyTorch's launcher
    does not search)."""
    import sysconfig

    arch = sysconfig.get_config_var("MULTIARCH") or ""
    dirs = [os.path.join(sys.prefix, "lib")]
    dirs += [os.path.join(environ[v], "lib") for v in ("CONDA_PREFIX", "VIRTUAL_ENV") if environ.get(v)]
    dirs += [os.path.expanduser("~/.local/lib"), "/usr/local/lib"]
    dirs += [f"/usr/lib/{arch}", f"/lib/{arch}"] if arch else []
    dirs += ["/usr/lib64", "/usr/lib", "/lib64", "/lib"]
    return list(dict.fromkeys(dirs))


def find_tcmalloc(dirs) -> str:
    """The first tcmalloc library in `dirs` (the minimal one first: no profiler), or ""."""
    for name in TCMALLOC_NAMES:
        for d in dirs:
            path = os.path.join(d, name)
            if os.path.isfile(path):
                return path
    return ""


def detect() -> Facts:
    """The facts for this process: platform, libc, the kernel's THP mode, an installed tcmalloc,
    the environment, and whether nvidia-smi sees a GPU (no torch import: this runs before the
    process restarts)."""
    import platform

    from toolkit.core import hardware

    libc, version = platform.libc_ver()
    try:
        with open(THP_FILE) as f:
            thp = thp_mode(f.read())
    except OSError:
        thp = ""
    setting = os.environ.get(OPT_OUT, "").lower()
    return Facts(system=platform.system(), libc=libc, libc_version=_version(version), thp=thp,
                 tunables=os.environ.get(ENV, ""), opt_out=setting == "system",
                 cuda=hardware.detect().kind == "cuda",
                 tcmalloc=find_tcmalloc(library_dirs()) if platform.system() == "Linux" else "",
                 preload=os.environ.get(PRELOAD, ""), glibc_only=setting == "glibc", loaded=loaded_tcmalloc())


def decide(f: Facts) -> tuple[dict[str, str] | None, str]:
    """(the environment variables to restart under, or None to run as is; why)."""
    if f.opt_out:
        return None, f"{OPT_OUT}=system"
    if f.system != "Linux" or f.libc != "glibc":
        return None, "not glibc's malloc"
    if f.cuda:
        return None, "training goes to the GPU (the setting was measured for CPU training)"
    if _under_tcmalloc(f):
        return None, "already runs under tcmalloc"
    if f.tcmalloc and not f.glibc_only:
        env = {PRELOAD: ":".join(p for p in (f.tcmalloc, f.preload) if p), PRELOAD_WAS: f.preload, **TCMALLOC_ENV}
        return env, "tcmalloc, keeping freed memory for the next step: fewer page faults than glibc's huge pages"
    if f.libc_version < (2, 35):
        return None, f"glibc {'.'.join(map(str, f.libc_version))} has no malloc.hugetlb (2.35+) and no tcmalloc is installed"
    if f.thp not in ("always", "madvise"):
        return None, f"the kernel's transparent huge pages are {f.thp or 'not available'}"
    if "glibc.malloc.hugetlb" in f.tunables:
        return None, f"{ENV} already sets malloc.hugetlb"
    return ({ENV: f"{f.tunables}:{HUGETLB}" if f.tunables else HUGETLB},
            f"malloc in transparent huge pages (THP {f.thp}): far fewer page faults a step")


def _under_tcmalloc(f: Facts) -> bool:
    """This process runs under a tcmalloc already: ours after the restart, or the user's preload."""
    return bool(f.loaded) or "tcmalloc" in f.preload


def training_allocator(f: Facts) -> str:
    """The C allocator `toolkit finetune` trains under on a CPU with these facts: "tcmalloc" where it
    already runs under one or would restart under one, else "glibc" (huge pages or glibc's default:
    the time model prices both alike)."""
    env, _ = decide(f)
    return "tcmalloc" if _under_tcmalloc(f) or (env and PRELOAD in env) else "glibc"


def training_allocator_on(device: str) -> str:
    """`training_allocator` of this machine for a training run on `device` ("cuda..." or "cpu"), as the
    planner and the time model name it: on CUDA the process's host heap is neither planned nor priced,
    and "glibc" stands."""
    return "glibc" if device.startswith("cuda") else training_allocator(detect())


def install_hint(f: Facts) -> str:
    """One line for a CPU training run's output where `decide` would take tcmalloc were one installed
    but none is, else ""."""
    env, _ = decide(dataclasses.replace(f, tcmalloc="tcmalloc"))
    if f.tcmalloc or not env or PRELOAD not in env:
        return ""
    return ("malloc: tcmalloc is not installed; with it CPU training ran 3-15% faster here "
            "(`apt install libtcmalloc-minimal4` on Debian/Ubuntu; docs/cpu-training.md)")


def loaded_tcmalloc(maps: str = "/proc/self/maps") -> str:
    """The tcmalloc library mapped into this process, or ""."""
    try:
        with open(maps) as f:
            for line in f:
                path = line.split(maxsplit=5)[-1].strip()
                if "libtcmalloc" in os.path.basename(path):
                    return path
    except OSError:
        pass
    return ""


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS: tcmalloc's `MallocExtension_ReleaseFreeMemory` where
    it is loaded, else glibc's `malloc_trim(0)`; nothing where neither can be called. For a phase change
    whose allocations differ in shape from the last phase's (training, then the report's forwards and
    decoding): the pages the first freed would otherwise stay resident beside what the second allocates."""
    import ctypes

    lib = loaded_tcmalloc()
    try:
        if lib:
            ctypes.CDLL(lib).MallocExtension_ReleaseFreeMemory()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def current() -> str:
    """What this process allocates with: "tcmalloc", "glibc huge pages" or "glibc"."""
    if loaded_tcmalloc():
        return "tcmalloc"
    return "glibc huge pages" if HUGETLB in os.environ.get(ENV, "").split(":") else "glibc"


def state() -> str:
    """For run.json: the allocator this process runs under, and why."""
    lib = loaded_tcmalloc()
    if lib:
        return f"tcmalloc ({lib}, TCMALLOC_RELEASE_RATE={os.environ.get('TCMALLOC_RELEASE_RATE', 'its default')})"
    f = detect()
    if HUGETLB in f.tunables.split(":"):
        return HUGETLB
    env, why = decide(f)
    if env is not None:  # a library call: only the command line's entry restarts
        why = f"not started by `toolkit finetune`, which restarts under {' '.join(f'{k}={v}' for k, v in env.items() if k != PRELOAD_WAS)}"
    return f"system default ({why})"


def relaunch() -> None:
    """Restart this process (same interpreter, same arguments) under the environment `decide` gives;
    returns where it says none. In the restarted process, puts LD_PRELOAD back as it was before the
    restart. Only for the command line's entry: it replaces the process."""
    if PRELOAD_WAS in os.environ:  # the restarted process: tcmalloc is in; its children need not be
        was = os.environ.pop(PRELOAD_WAS)
        if was:
            os.environ[PRELOAD] = was
        else:
            os.environ.pop(PRELOAD, None)
        return
    env, _ = decide(detect())
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **env})
