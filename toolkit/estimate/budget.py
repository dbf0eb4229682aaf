"""Where a memory budget comes from: a size (`--vram 8GB`), a GPU name (`--gpu "RTX 3060 12GB"`),
or the detected hardware (first CUDA GPU via nvidia-smi, else available CPU RAM)."""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from toolkit.core.errors import UserError
from toolkit.core.units import GIB, MIB, gib

# GB = GiB, for --vram too (toolkit.core.units).
_UNITS = {
    "": GIB, "b": 1, "k": 1024, "kb": 1024, "kib": 1024, "m": MIB, "mb": MIB, "mib": MIB,
    "g": GIB, "gb": GIB, "gib": GIB, "t": 1024**4, "tb": 1024**4, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str, what: str = "--vram") -> int:
    """Bytes in a size like "8GB", "8 GiB", "7680MiB", "24" (GiB when no unit). GB = GiB."""
    m = _SIZE.match(str(text))
    if not m or m.group(2).lower() not in _UNITS:
        if re.match(r"^\s*-", str(text)):
            raise UserError(f"{what}: size must be positive, got {text!r}")
        raise UserError(f"{what}: cannot read {text!r} as a size (examples: 8GB, 7.5GiB, 7680MiB)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1:
        raise UserError(f"{what}: size must be positive, got {text!r}")
    return int(value)


# Memory of common consumer / cloud GPUs in GiB (vendor spec sheets).
GPUS: dict[str, int] = {
    "GTX 1060 6GB": 6, "GTX 1070 8GB": 8, "GTX 1080 8GB": 8, "GTX 1080 Ti 11GB": 11, "GTX 1660 6GB": 6, "RTX 2060 6GB": 6, "RTX 2060 12GB": 12, "RTX 2070 8GB": 8, "RTX 2080 8GB": 8,
    "RTX 2080 Ti 11GB": 11, "RTX 3050 8GB": 8, "RTX 3060 8GB": 8, "RTX 3060 12GB": 12,
    "RTX 3060 Ti 8GB": 8, "RTX 3070 8GB": 8, "RTX 3070 Ti 8GB": 8, "RTX 3080 10GB": 10,
    "RTX 3080 12GB": 12, "RTX 3080 Ti 12GB": 12, "RTX 3090 24GB": 24, "RTX 3090 Ti 24GB": 24,
    "RTX 4060 8GB": 8, "RTX 4060 Ti 8GB": 8, "RTX 4060 Ti 16GB": 16, "RTX 4070 12GB": 12,
    "RTX 4070 Super 12GB": 12, "RTX 4070 Ti 12GB": 12, "RTX 4070 Ti Super 16GB": 16,
    "RTX 4080 16GB": 16, "RTX 4080 Super 16GB": 16, "RTX 4090 24GB": 24, "RTX 5060 Ti 16GB": 16,
    "RTX 5070 12GB": 12, "RTX 5070 Ti 16GB": 16, "RTX 5080 16GB": 16, "RTX 5090 32GB": 32,
    "RTX A4000 16GB": 16, "RTX A6000 48GB": 48, "P100 16GB": 16, "V100 16GB": 16, "V100 32GB": 32,
    "T4 16GB": 16, "A10G 24GB": 24, "L4 24GB": 24, "A100 40GB": 40, "A100 80GB": 80, "H100 80GB": 80,
}


def _norm(name: str) -> str:
    s = name.lower().replace("nvidia", "").replace("geforce", "").replace("gib", "gb")
    return re.sub(r"[^a-z0-9]", "", s)


_BY_NORM = {_norm(k): k for k in GPUS}


def _model(key: str) -> str:
    """A table name without its memory size: "RTX 3090 24GB" -> "rtx3090"."""
    return _norm(re.sub(r"\s*\d+GB$", "", key))


def gpu_bytes(name: str) -> tuple[str, int]:
    """(canonical name, bytes) for a GPU in the table, with or without its size when the model
    comes in one size ("RTX 3090", not "RTX 3060": 8 or 12 GB); close names are suggested otherwise."""
    key = _BY_NORM.get(_norm(name))
    if key:
        return key, GPUS[key] * GIB
    n = _norm(name)
    sized = [k for k in GPUS if _model(k) == n] if n else []
    if len(sized) > 1:
        raise UserError(f"--gpu {name!r} comes in several sizes: {', '.join(sized)} (add the size)")
    if len(sized) == 1:
        return sized[0], GPUS[sized[0]] * GIB
    if not n:
        raise UserError("--gpu is empty (a name such as \"RTX 3060 12GB\", see `toolkit estimate --list-gpus`)")
    close = difflib.get_close_matches(n, list(_BY_NORM), n=3, cutoff=0.5)
    hint = f"did you mean: {', '.join(_BY_NORM[c] for c in close)}" if close else "see `toolkit estimate --list-gpus`"
    raise UserError(f"--gpu: unknown GPU {name!r}; {hint} (or pass --vram SIZE)")


@dataclass(frozen=True)
class Budget:
    """The memory to fit in: bytes, the device kind it belongs to, and where it came from."""

    bytes: int
    device: str  # "cuda" or "cpu"
    source: str


def resolve_budget(vram: str | None, gpu: str | None) -> Budget:
    """--vram beats --gpu beats detection. Detected memory follows the one rule the fine-tune's
    `base_model: auto` and fit check use (toolkit.finetune.plan): what is free now — nvidia-smi's
    free memory, or MemAvailable from /proc/meminfo. A named size (--vram, --gpu) is a whole,
    empty device."""
    if vram is not None and gpu is not None:
        raise UserError("give either --vram or --gpu, not both")
    if vram is not None:
        return Budget(parse_size(vram), "cuda", f"--vram {vram}")
    if gpu is not None:
        name, size = gpu_bytes(gpu)
        return Budget(size, "cuda", f"--gpu {name}")
    from toolkit.core.hardware import detect

    hw = detect()
    if hw.kind == "cuda":
        return Budget(hw.available_bytes, "cuda",
                      f"{hw.name}, {gib(hw.available_bytes, 1)} free of {gib(hw.total_bytes, 1)} ({hw.source})")
    return Budget(hw.available_bytes, "cpu", f"{hw.name}: {gib(hw.available_bytes, 1)} RAM available ({hw.source})")
