"""A run's peak memory, measured, to set beside the planner's estimate of it.

On a CPU the measure is the process's resident set at its highest (Linux's VmHWM, which
`/proc/self/clear_refs` resets): everything the estimate counts (weights, adapters, optimizer,
activations, logits, the libraries' own memory) and what it does not (the C allocator's cache of
freed blocks, oneDNN's primitive caches, pre-packed weights), as a user's system monitor shows it.
Where VmHWM can't be read (not Linux) it is `getrusage`'s maximum since the process started. VmHWM is
the larger of a high-water mark the kernel raises only on some paths (where it unmaps pages) and the
resident set now, so two reads can fall slightly: a caller keeping a peak keeps the larger.

On CUDA it is torch's `max_memory_allocated` (what the estimate's GPU table was measured against,
docs/estimate.md) and `max_memory_reserved` (the caching allocator's share of the GPU, what
`nvidia-smi` sees less the CUDA context).
"""

from __future__ import annotations

STATUS = "/proc/self/status"
CLEAR_REFS = "/proc/self/clear_refs"


def reset(dev: str) -> None:
    """Start a new peak from now (where the platform lets it be reset)."""
    if dev.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
        return
    try:
        with open(CLEAR_REFS, "w") as f:
            f.write("5")  # resets the peak resident set to the current one (proc(5))
    except OSError:
        pass


def status_bytes(text: str, key: str) -> int | None:
    """`key`'s value in bytes from /proc/<pid>/status `text` ("VmHWM:  2416284 kB"), None if absent."""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == key:
            number, _, unit = value.strip().partition(" ")
            return int(number) * (1024 if unit.strip() == "kB" else 1)
    return None


def peak(dev: str) -> dict:
    """{"peak_bytes", "measure"} for a CPU process; on CUDA also "reserved_bytes"."""
    if dev.startswith("cuda"):
        import torch

        return {"peak_bytes": int(torch.cuda.max_memory_allocated()), "reserved_bytes": int(torch.cuda.max_memory_reserved()),
                "measure": "torch.cuda.max_memory_allocated"}
    try:
        with open(STATUS) as f:
            hwm = status_bytes(f.read(), "VmHWM")
    except OSError:
        hwm = None
    if hwm is not None:
        return {"peak_bytes": hwm, "measure": "peak resident set of the process (VmHWM)"}
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux, bytes on macOS
    return {"peak_bytes": int(rss if sys.platform == "darwin" else rss * 1024),
            "measure": "peak resident set of the process since it started (getrusage)"}
