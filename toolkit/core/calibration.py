"""A short measurement of this machine (<= ~3 s), run once and cached: matmul FLOP/s per dtype at
training-like shapes (on a CPU also with the weight pre-packed for oneDNN, `toolkit.core.packed_linear`,
and what packing gains in a training step's and a decode step's own matmuls), memory bandwidth (on a CPU,
how fast a decoding step reads weights), and on
a CPU the time of each packed-row attention kernel (`toolkit.core.segment_attention`). The dtype,
matmul and attention choices (toolkit.core.capability) and the planner's time model read it;
`toolkit estimate --calibrate` reruns it.

Cached in $TOOLKIT_CACHE/calibration.json (default ~/.cache/toolkit), one record per key
(device name + core count + torch version), so a torch upgrade or another machine sharing the
home folder measures again. An unreadable cache is rebuilt, never an error.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from toolkit.core.capability import Capability, detect, threads
from toolkit.core.progress import say

FORMAT = 7  # 2: packed_flops; 3: attention_s; 4: attention_s on a row of equal conversations; 5: packed_gain;
# 6: matmul_flops of a frozen layer's forward and input gradient together, not `a @ b`; 7: a CPU's
# bandwidth_bytes_per_s as a decoding step reads weights, not a copy
FILE_NAME = "calibration.json"
# (M, K, N) of one LoRA-era linear layer at a training step: a 2048-token batch through a
# 576 -> 1536 MLP projection (SmolLM2-135M). A GPU needs a bigger one to leave launch overhead behind.
CPU_SHAPE = (2048, 576, 1536)
CUDA_SHAPE = (8192, 2048, 8192)
# A dtype the CPU only emulates (bf16 without avx512_bf16: ~7 GFLOP/s for a layer's two products)
# would take seconds at the full shape: when its small probe projects one full pair of products past
# this, the probe's rate is the measurement. (A probe's rate understates a fast dtype several-fold, and
# a native fp32 pair takes ~30 ms here, so the bar is generous.)
FULL_SHAPE_LIMIT_S = 0.25
# The packed row the attention kernels are timed on: 8 conversations of 128 tokens, 9 query / 3 KV
# heads of 64 (a SmolLM2-135M layer), forward and backward. Equal lengths: the batched-matmul
# kernel's gain with no padding, which `capability.packed_attention` scales by each row's padding
# (a row of 60-130 tokens had hidden a 1.3-1.4x fp32 gain on the finance recipe's rows).
ATTENTION_SIZES = (128,) * 8
ATTENTION_HEADS = (9, 3, 64)
# What packing is decided on (`capability.packed_matmuls`): torch's matmuls against the packed ones in
# the forms a use runs, over PACKED_GAIN_WEIGHTS distinct weights of CPU_SHAPE's layer (a step reads
# each weight once, not one weight in a loop). "train": a frozen layer's forward `x @ W.T` and input
# gradient `g @ W` at a step's ~1000 rows; "infer": the forward of a 32-row decode step. The hot
# 2048-row product of `packed_flops` had hidden both: on the Zen 5 it read bf16 packing 1.00x, where
# the recipe trained 8% faster packed and its report ran 18% faster (docs/cpu-training.md).
PACKED_GAIN_ROWS = {"train": 1024, "infer": 32}
PACKED_GAIN_WEIGHTS = 4
# A CPU's memory rate is what a decoding step runs at: its weights read once by one-row products
# (`_read_rate`), over more bytes than a last-level cache holds. A copy is not that: on the Zen 5 a
# 128 MiB fp32 copy read 38-90 GB/s from one calibration to the next, while the toolkit's greedy
# decode held at 41-49 tok/s; at 78-88 GB/s copied, the embedded model's 538 MB of linear and
# LM-head weights took 15.9 ms pre-packed (34 GB/s) and 29.3 ms through torch's (18 GB/s).
READ_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Calibration:
    """One machine's measured rates. `matmul_flops` maps dtype name -> FLOP/s of torch's matmul
    ("float32", "bfloat16"; "float16" on CUDA only: fp16 is not a CPU compute dtype here);
    `packed_flops` the same product with the weight pre-packed for oneDNN (CPU only; empty where
    not measured). `best_flops` is the faster of the two: the rate a frozen layer can run at here.
    `attention_s` maps "dtype kernel" ("bfloat16 bmm", "bfloat16 sdpa_fp32", ...) -> seconds for one
    layer's attention over the ATTENTION_SIZES row, forward and backward (CPU only). `packed_gain`
    maps "dtype use" ("float32 train", "bfloat16 infer", ...; uses in PACKED_GAIN_ROWS) -> torch's
    time over the pre-packed time for that use's matmuls (CPU only). `bandwidth_bytes_per_s`: a
    GPU's copy rate; a CPU's rate of reading weights as a decoding step does (READ_BYTES)."""

    key: str
    device: str
    matmul_flops: dict[str, float]
    bandwidth_bytes_per_s: float
    seconds: float
    torch: str
    packed_flops: dict[str, float] = field(default_factory=dict)
    attention_s: dict[str, float] = field(default_factory=dict)
    packed_gain: dict[str, float] = field(default_factory=dict)

    def best_flops(self, dtype: str) -> float:
        """The faster of the plain and the pre-packed matmul rate of `dtype` (0 when unmeasured)."""
        return max(self.matmul_flops.get(dtype, 0.0), self.packed_flops.get(dtype, 0.0))

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        """Strictly typed: anything else (an older format, a hand edit) raises ValueError."""
        try:
            flops = {str(k): float(v) for k, v in d["matmul_flops"].items()}
            packed = {str(k): float(v) for k, v in d.get("packed_flops", {}).items()}
            attention = {str(k): float(v) for k, v in d.get("attention_s", {}).items()}
            gain = {str(k): float(v) for k, v in d.get("packed_gain", {}).items()}
            cal = cls(key=str(d["key"]), device=str(d["device"]), matmul_flops=flops,
                      bandwidth_bytes_per_s=float(d["bandwidth_bytes_per_s"]), seconds=float(d["seconds"]),
                      torch=str(d["torch"]), packed_flops=packed, attention_s=attention, packed_gain=gain)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"not a calibration record: {exc}") from exc
        if ("float32" not in flops or min(flops.values(), default=0) <= 0 or cal.bandwidth_bytes_per_s <= 0
                or min(packed.values(), default=1) <= 0 or min(attention.values(), default=1) <= 0
                or min(gain.values(), default=1) <= 0):
            raise ValueError("not a calibration record: missing or non-positive rates")
        return cal

    def summary(self) -> str:
        """One line for people: rates in GFLOP/s and GB/s."""
        rates = ", ".join(f"{k} {v / 1e9:.1f}" + (f" ({self.packed_flops[k] / 1e9:.1f} pre-packed)"
                                                   if k in self.packed_flops else "")
                          for k, v in self.matmul_flops.items())
        attention = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in self.attention_s.items())
        gain = ", ".join(f"{k} {v:.2f}x" for k, v in self.packed_gain.items())
        memory = "weights read as decoding reads them" if self.device.startswith("cpu") else "memory copy"
        return (f"{self.device}: matmul GFLOP/s {rates}; {memory} {self.bandwidth_bytes_per_s / 1e9:.1f} GB/s"
                + (f"; pre-packing gains {gain}" if gain else "")
                + (f"; packed-row attention ms a layer: {attention}" if attention else "")
                + f" (measured in {self.seconds:.1f} s, torch {self.torch})")


def torch_version() -> str:
    """The installed torch's version without importing torch (that takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        return "none"


# Settings that cap the vector instructions the math libraries use. With ONEDNN_MAX_CPU_ISA=AVX2 an
# AVX512-BF16 CPU runs fp32 matmuls at about half its rate and bf16 ones emulated, ~40x slower: a
# calibration measured without the cap would pick bf16 there.
ISA_CAPS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def isa_caps(environ) -> str:
    """The library ISA caps set in `environ`, as "NAME=value ..." ("" when none is)."""
    return " ".join(f"{name}={environ[name]}" for name in ISA_CAPS if environ.get(name))


def key(cap: Capability, torch_ver: str, caps: str = "") -> str:
    """Cache key: what the numbers depend on, including the library ISA caps in effect (`isa_caps`).
    A forced capability (TOOLKIT_CPU_CAPABILITY) does not change it: the measurement is of the real
    hardware."""
    if cap.kind == "cuda":
        return f"cuda|{cap.name}|{cap.isa}|torch {torch_ver}"
    # The real flags, not the (forceable) ISA level: the measurement is of the hardware.
    return (f"cpu|{cap.name}|{cap.model_id}|{' '.join(cap.flags)}|{threads(cap)} threads|torch {torch_ver}"
            + (f"|{caps}" if caps else ""))


def current_key(cap: Capability) -> str:
    """`key` for this process: its torch version and the ISA caps in its environment."""
    return key(cap, torch_version(), isa_caps(os.environ))


def cache_path() -> Path:
    from toolkit.core.models import cache_dir

    return cache_dir() / FILE_NAME


def _read_records(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        say(f"calibration cache {path} unreadable ({type(exc).__name__}); measuring again")
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("records"), dict):
        say(f"calibration cache {path} has an unknown layout; measuring again")
        return {}
    return data["records"]


def _write_records(path: Path, records: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"format": FORMAT, "records": records}, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home costs a re-measure next time, nothing more
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        say(f"calibration not cached ({path}: {exc.strerror or exc})")


def load(cap: Capability | None = None, refresh: bool = False) -> Calibration:
    """This machine's calibration: from the cache, or measured (and cached) when missing, stale,
    corrupt, or `refresh`."""
    cap = cap or detect()
    k = current_key(cap)
    path = cache_path()
    records = _read_records(path)
    if not refresh and k in records:
        try:
            cal = Calibration.from_dict(records[k])
            if cal.key == k:
                return cal
        except ValueError:
            pass
        say(f"calibration cache entry for {k} is invalid; measuring again")
    say(f"calibrating {cap.name} (matmul and memory speed, a few seconds; cached) ...")
    cal = measure(cap)
    records[k] = asdict(cal)
    _write_records(path, records)
    return cal


def measure(cap: Capability) -> Calibration:
    """Measure now (no cache): matmul FLOP/s per candidate dtype, best of a few reps, and memory
    bandwidth (`_bandwidth`: a GPU's copy, a CPU's weight reads as a decoding step does them). CPU
    runs at threads(cap)."""
    import torch

    t0 = time.perf_counter()
    cuda = cap.kind == "cuda"
    dev = "cuda" if cuda else "cpu"
    dtypes = ("float32", "bfloat16", "float16") if cuda else ("float32", "bfloat16")
    prev = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(threads(cap))
    try:
        with torch.inference_mode():
            flops = {dt: _matmul_rate(torch, dev, getattr(torch, dt), CUDA_SHAPE if cuda else CPU_SHAPE)
                     for dt in dtypes}
            packed = {} if cuda else _packed_rates(torch, flops)
            gain = {} if cuda else _packed_gains(torch, flops)
            bw = _bandwidth(torch, dev)
        attention = {} if cuda else _attention_times(torch, flops)
    finally:
        torch.set_num_threads(prev)
    return Calibration(key=current_key(cap),
                       device=f"{cap.kind} {cap.name} ({cap.isa})", matmul_flops=flops, bandwidth_bytes_per_s=bw,
                       seconds=round(time.perf_counter() - t0, 3), torch=torch_version(), packed_flops=packed,
                       attention_s=attention, packed_gain=gain)


def _native(flops: dict[str, float]) -> list[str]:
    """The dtypes whose measured matmul rate is not an emulation's (one full CPU_SHAPE product within
    FULL_SHAPE_LIMIT_S: >= 14.5 GFLOP/s, twice an emulated bf16's pair): the only ones worth timing
    further."""
    m, k, n = CPU_SHAPE
    return [dt for dt, rate in flops.items() if 2 * m * k * n / rate <= FULL_SHAPE_LIMIT_S]


def _attention_times(torch, flops: dict[str, float], reps: int = 5) -> dict[str, float]:
    """Seconds of each packed-row attention kernel on the ATTENTION_SIZES row, forward and backward,
    best of `reps` (the kernels alternating) after one untimed call, per dtype whose matmul is not an
    emulation's."""
    from toolkit.core import segment_attention

    heads, kv, d = ATTENTION_HEADS
    rows = sum(ATTENTION_SIZES)
    gen = torch.Generator().manual_seed(0)
    out = {}
    for dt in _native(flops):
        dtype = getattr(torch, dt)
        q, key_, value = (torch.randn(1, h, rows, d, generator=gen).to(dtype).requires_grad_()
                          for h in (heads, kv, kv))
        grad = torch.randn(1, rows, heads, d, generator=gen).to(dtype)
        steps = {kernel: (lambda kernel=kernel: segment_attention.attend(q, key_, value, ATTENTION_SIZES,
                                                                            kernel).backward(grad))
                 for kernel in segment_attention.CPU_KERNELS if not (kernel == "sdpa_fp32" and dt == "float32")}
        for step in steps.values():
            step()
        # The kernels alternate, as `_packed_gains`' two ways do: the choice reads their ratio, and a
        # shared host's slow moment (its rates moved 18-34% between calibrations) then slows each.
        best = dict.fromkeys(steps, float("inf"))
        for _ in range(reps):
            for kernel, step in steps.items():
                best[kernel] = min(best[kernel], _timed(torch, "cpu", step))
        out.update({f"{dt} {kernel}": t for kernel, t in best.items()})
    return out


def _packed_rates(torch, flops: dict[str, float]) -> dict[str, float]:
    """The CPU shape's rate with the weight pre-packed for oneDNN, per dtype whose plain rate is not
    an emulation's (`_native`; packing does not make an emulated dtype a compute dtype)."""
    from toolkit.core import packed_linear

    if not packed_linear.available():
        return {}
    m, k, n = CPU_SHAPE
    gen = torch.Generator().manual_seed(0)
    out = {}
    for dt in _native(flops):
        dtype = getattr(torch, dt)
        a = torch.randn(m, k, generator=gen).to(dtype)
        w = packed_linear.pack(torch.randn(n, k, generator=gen).to(dtype), m)
        packed_linear.matmul(a, w)  # kernel selection, not timed
        out[dt] = max(2 * m * k * n / _timed(torch, "cpu", lambda: packed_linear.matmul(a, w)) for _ in range(10))
    return out


def _packed_gains(torch, flops: dict[str, float], reps: int = 3) -> dict[str, float]:
    """"dtype use" -> torch's time over the pre-packed time for each PACKED_GAIN_ROWS use, per dtype
    whose plain rate is not an emulation's. The two alternate (a shared host's slow moment then slows
    both); best of `reps` each."""
    from toolkit.core import packed_linear

    if not packed_linear.available():
        return {}
    _, k, n = CPU_SHAPE
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.functional.linear
    out = {}
    for dt in _native(flops):
        dtype = getattr(torch, dt)
        weights = [torch.randn(n, k, generator=gen).to(dtype) for _ in range(PACKED_GAIN_WEIGHTS)]
        for use, rows in PACKED_GAIN_ROWS.items():
            train = use == "train"
            x = torch.randn(rows, k, generator=gen).to(dtype)
            g = torch.randn(rows, n, generator=gen).to(dtype) if train else None
            packs = [(packed_linear.pack(w, rows), packed_linear.pack(w.t(), rows) if train else None)
                     for w in weights]

            def plain():
                for w in weights:
                    linear(x, w)
                    if train:
                        g @ w

            def packed():
                for p, pt in packs:
                    packed_linear.matmul(x, p)
                    if train:
                        packed_linear.matmul(g, pt)

            plain()  # kernel selection, not timed
            packed()
            t_plain = t_packed = float("inf")
            for _ in range(reps):
                t_plain = min(t_plain, _timed(torch, "cpu", plain))
                t_packed = min(t_packed, _timed(torch, "cpu", packed))
            out[f"{dt} {use}"] = t_plain / t_packed
    return out


def _timed(torch, dev: str, fn) -> float:
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if dev == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _matmul_rate(torch, dev: str, dtype, shape: tuple[int, int, int], reps: int = 10) -> float:
    """FLOP/s of a frozen layer's two products at a training step, `x @ W.T` (forward) and `g @ W`
    (input gradient), W stored (N, K) as a model keeps it, timed together. Where a dtype is native,
    any form runs at one rate; where it is emulated they do not: on an AVX2 CPU's bf16 (the Zen 5 with
    its libraries capped, 2026-12-05) ATen's dot-product kernel ran `x @ W.T` at ~50 GFLOP/s and
    `g @ W` and `a @ b` at ~3-4, so timing `a @ b` alone had put bf16 training ~90x behind fp32
    where its two products are ~30x behind."""
    m, k, n = shape
    gen = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(n, k, device=dev, generator=gen).to(dtype)

    def pair(x, g, out_f=None, out_g=None):
        torch.mm(x, w.t(), out=out_f) if out_f is not None else x @ w.t()
        torch.mm(g, w, out=out_g) if out_g is not None else g @ w

    def inputs(rows):
        return (torch.randn(rows, k, device=dev, generator=gen).to(dtype),
                torch.randn(rows, n, device=dev, generator=gen).to(dtype))

    # Probe at 1/16 of the rows first: an emulated dtype is measured there, within budget.
    pm = max(16, m // 16)
    px, pg = inputs(pm)
    wx, wg = inputs(16)
    _timed(torch, dev, lambda: pair(wx, wg))  # one-off library init and kernel selection, not timed
    first = _timed(torch, dev, lambda: pair(px, pg))
    probe = first if first > 0.05 else min(first, *(_timed(torch, dev, lambda: pair(px, pg)) for _ in range(2)))
    pair_flops = 2 * 2 * m * k * n
    probe_rate = 2 * 2 * pm * k * n / probe
    if pair_flops / probe_rate > FULL_SHAPE_LIMIT_S:
        return probe_rate
    x, g = inputs(m)
    out_f, out_g = x @ w.t(), g @ w
    # A slow machine (or busy cores) times fewer: ~0.6 s a dtype at most, the whole within ~3 s.
    reps = max(1, min(reps, int(0.6 / max(_timed(torch, dev, lambda: pair(x, g, out_f, out_g)), 1e-9))))
    inner = 10 if dev == "cuda" else 1  # a GPU matmul is shorter than the timer's resolution

    # Best of 10 (a CPU pair of this shape is ~15 ms, so one busy moment on a shared host can slow
    # three in a row), into output buffers: the rate of the arithmetic, not of page faults.
    def run():
        for _ in range(inner):
            pair(x, g, out_f, out_g)

    return max(pair_flops * inner / _timed(torch, dev, run) for _ in range(reps))


def _bandwidth(torch, dev: str, reps: int = 3) -> float:
    """Bytes a second. A GPU: a 1 GiB copy (bytes read + written). A CPU: `_read_rate`."""
    if dev != "cuda":
        return _read_rate(torch, reps)
    n = 256 * 2**20  # larger than a GPU's last-level cache, pages touched before timing
    src = torch.ones(n, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    nbytes = 2 * src.numel() * src.element_size()
    return max(nbytes / _timed(torch, dev, lambda: dst.copy_(src)) for _ in range(reps))


def _read_rate(torch, reps: int = 3) -> float:
    """Bytes a second a CPU decoding step reads its weights at: one-row products over READ_BYTES of
    fp32 weights of CPU_SHAPE's layer, each read once, the faster of torch's and the pre-packed
    product (a CPU model decodes through whichever `capability.packed_matmuls` measured faster).
    Best of `reps`."""
    from toolkit.core import packed_linear

    _, k, n = CPU_SHAPE
    count = max(1, READ_BYTES // (4 * k * n))
    weights = [torch.full((n, k), 0.01) for _ in range(count)]
    x = torch.full((1, k), 0.5)
    linear = torch.nn.functional.linear

    def plain():
        for w in weights:
            linear(x, w)

    plain()  # kernel selection, not timed
    best = min(_timed(torch, "cpu", plain) for _ in range(reps))
    if packed_linear.available():
        for i, w in enumerate(weights):  # one weight at a time: READ_BYTES, not twice that, at the peak
            weights[i] = packed_linear.pack(w, 1)

        def packed():
            for w in weights:
                packed_linear.matmul(x, w)

        packed()
        best = min(best, *(_timed(torch, "cpu", packed) for _ in range(reps)))
    return count * 4 * k * n / best
