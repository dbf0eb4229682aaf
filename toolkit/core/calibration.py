"""A short measurement of this machine (<= ~3 s), run once and cached: matmul FLOP/s per dtype at
training-like shapes (on a CPU also with the weight pre-packed for oneDNN, `toolkit.core.packed_linear`,
and what packing gains in a training step's and a decode step's own matmuls), memory bandwidth (on a CPU,
how fast a decoding step reads weights), and on a CPU the time of each packed-row attention kernel
(`toolkit.core.segment_attention`); the probes that time them are `toolkit.core.probes`. The dtype,
matmul and attention choices (toolkit.core.capability) and the planner's time model read it;
`toolkit estimate --calibrate` reruns it.

Cached in $TOOLKIT_CACHE/calibration.json (default ~/.cache/toolkit), one record per key
(device name + core count + torch version), so a torch upgrade or another machine sharing the
home folder measures again. An unreadable cache is rebuilt, never an error.

A CPU measurement taken while other processes use the cores is not this machine's, and a cached one
decides every later run: on the 2-core Zen 3 EPYC (2026-12-06), with one busy process beside it, fp32
read 16-90 GFLOP/s against 139-183 alone (16 made fp32 look emulated, so packing was not timed) and the
pre-packing gain of a training step's matmuls 0.79-1.63 (median 1.05) against 0.85-1.01 (median 0.93), while the
calibration's threads ran 59-60% of the matmul probes' wall time against 94-96% alone. So `measure`
records that share (`cpu_share`), and `load` measures again where it is under MIN_CPU_SHARE and caches no
measurement that stays under it. A slow moment of the host itself, which that share does not see, can tip
one reading of the pre-packing gain too (the Zen 3, 2026-12-07 03:46 UTC: 1.07 among 0.89-0.96), so the gain
the decisions read is the median of the machine's last GAIN_READINGS readings (`with_earlier_gains`).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from toolkit.core import probes as P
from toolkit.core.capability import Capability, detect, threads
from toolkit.core.progress import say

FORMAT = 10  # 2: packed_flops; 3: attention_s; 4: attention_s on a row of equal conversations; 5: packed_gain;
# 6: matmul_flops of a frozen layer's forward and input gradient together, not `a @ b`; 7: a CPU's
# bandwidth_bytes_per_s as a decoding step reads weights, not a copy; 8: attention_s of the bmm kernel
# in query blocks (segment_attention.CAUSAL_BLOCKS); 9: host_layer_s; 10: cpu_share (a record taken while
# other work had the cores, like the Zen 3's pre-packing gain of 1.06 that had made its training ~10% slower,
# is measured again)
FILE_NAME = "calibration.json"
# The least share of the matmul probes' wall time the calibration's threads must have run (CPU seconds
# over wall seconds x threads) for the measurement to be cached: 0.94-0.96 alone on the Zen 3, 0.59-0.60
# with one busy process beside it (see the module).
MIN_CPU_SHARE = 0.8
# How many of a machine's pre-packing gain readings decide (their median): one reading can be tipped
# by a slow moment of a shared host that `cpu_share` can't see. On the Zen 3 five benches' calibrations
# read 0.96, 0.95, 0.91, 1.07 and 0.89 for the training matmuls (2026-12-07 02:41-03:58 UTC); the 1.07,
# over PACKED_MIN_GAIN, had sent that bench's training through oneDNN's packs (~10% slower there).
GAIN_READINGS = 5


@dataclass(frozen=True)
class Calibration:
    """One machine's measured rates. `matmul_flops` maps dtype name -> FLOP/s of torch's matmul
    ("float32", "bfloat16"; "float16" on CUDA only: fp16 is not a CPU compute dtype here);
    `packed_flops` the same product with the weight pre-packed for oneDNN (CPU only; empty where
    not measured). `best_flops` is the faster of the two: the rate a frozen layer can run at here.
    `attention_s` maps "dtype kernel" ("bfloat16 bmm", "bfloat16 sdpa_fp32", ...) -> seconds for one
    layer's attention over `probes.ATTENTION_SIZES`'s row, forward and backward (CPU only). `packed_gain`
    maps "dtype use" ("float32 train", "bfloat16 infer", ...; uses in `probes.PACKED_GAIN_ROWS`) -> torch's
    time over the pre-packed time for that use's matmuls (CPU only). `bandwidth_bytes_per_s`: a
    GPU's copy rate; a CPU's rate of reading weights as a decoding step does (`probes.read_rate`).
    `host_layer_s`: a CPU's host work a decoder layer pays in a one-row decoding step
    (`probes.host_layer_seconds`; 0 on a GPU). `cpu_share`: the share of the matmul probes' wall time
    the calibration's threads ran (1.0 on a GPU, not measured); under MIN_CPU_SHARE other work had the
    cores (see the module). `packed_gain_seen`: the last GAIN_READINGS readings of each gain on this
    machine, newest last; `packed_gain` is their median (`with_earlier_gains`)."""

    key: str
    device: str
    matmul_flops: dict[str, float]
    bandwidth_bytes_per_s: float
    seconds: float
    torch: str
    packed_flops: dict[str, float] = field(default_factory=dict)
    attention_s: dict[str, float] = field(default_factory=dict)
    packed_gain: dict[str, float] = field(default_factory=dict)
    host_layer_s: float = 0.0
    cpu_share: float = 1.0
    packed_gain_seen: dict[str, list[float]] = field(default_factory=dict)

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
            seen = {str(k): [float(x) for x in v] for k, v in d.get("packed_gain_seen", {}).items()}
            cal = cls(key=str(d["key"]), device=str(d["device"]), matmul_flops=flops,
                      bandwidth_bytes_per_s=float(d["bandwidth_bytes_per_s"]), seconds=float(d["seconds"]),
                      torch=str(d["torch"]), packed_flops=packed, attention_s=attention, packed_gain=gain,
                      host_layer_s=float(d.get("host_layer_s", 0.0)), cpu_share=float(d.get("cpu_share", 1.0)),
                      packed_gain_seen=seen)
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(f"not a calibration record: {exc}") from exc
        if ("float32" not in flops or min(flops.values(), default=0) <= 0 or cal.bandwidth_bytes_per_s <= 0
                or min(packed.values(), default=1) <= 0 or min(attention.values(), default=1) <= 0
                or min(gain.values(), default=1) <= 0 or cal.host_layer_s < 0 or not 0 < cal.cpu_share <= 2
                or min((x for v in seen.values() for x in v), default=1) <= 0):
            raise ValueError("not a calibration record: missing or non-positive rates")
        return cal

    def summary(self) -> str:
        """One line for people: rates in GFLOP/s and GB/s."""
        rates = ", ".join(f"{k} {v / 1e9:.1f}" + (f" ({self.packed_flops[k] / 1e9:.1f} pre-packed)"
                                                   if k in self.packed_flops else "")
                          for k, v in self.matmul_flops.items())
        attention = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in self.attention_s.items())
        gain = ", ".join(f"{k} {v:.2f}x" + (f" (median of {len(self.packed_gain_seen[k])} readings)"
                                             if len(self.packed_gain_seen.get(k, ())) > 1 else "")
                         for k, v in self.packed_gain.items())
        memory = "weights read as decoding reads them" if self.device.startswith("cpu") else "memory copy"
        return (f"{self.device}: matmul GFLOP/s {rates}; {memory} {self.bandwidth_bytes_per_s / 1e9:.1f} GB/s"
                + (f"; pre-packing gains {gain}" if gain else "")
                + (f"; packed-row attention ms a layer: {attention}" if attention else "")
                + (f"; decoding's host work {self.host_layer_s * 1e3:.2f} ms a layer" if self.host_layer_s else "")
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


def _valid(records: dict, k: str) -> Calibration | None:
    """The cached record for key `k` where it is one (None: missing, or an older format or hand edit)."""
    try:
        cal = Calibration.from_dict(records[k]) if k in records else None
    except ValueError:
        return None
    return cal if cal is not None and cal.key == k else None


def cached(cap: Capability | None = None) -> bool:
    """Whether `load` would answer from the cache (a valid record for this machine), without measuring."""
    return _valid(_read_records(cache_path()), current_key(cap or detect())) is not None


def load(cap: Capability | None = None, refresh: bool = False) -> Calibration:
    """This machine's calibration: from the cache, or measured (and cached) when missing, stale,
    corrupt, or `refresh`."""
    cap = cap or detect()
    k = current_key(cap)
    path = cache_path()
    records = _read_records(path)
    earlier = _valid(records, k)
    if not refresh and earlier is not None:
        return earlier
    if not refresh and k in records:
        say(f"calibration cache entry for {k} is invalid; measuring again")
    say(f"calibrating {cap.name} (matmul and memory speed, a few seconds; cached) ...")
    cal = with_earlier_gains(measure(cap), earlier)
    if cal.cpu_share < MIN_CPU_SHARE:
        say(f"calibration: other work had the CPU while it measured (its threads ran {cal.cpu_share:.0%} of the "
            "time); measuring again")
        cal = max(cal, with_earlier_gains(measure(cap), earlier), key=lambda c: c.cpu_share)
        if cal.cpu_share < MIN_CPU_SHARE:
            say(f"calibration not cached: the CPU was busy with other work again ({cal.cpu_share:.0%}); this run "
                "uses it, the next one measures again")
            return cal
    records[k] = asdict(cal)
    _write_records(path, records)
    return cal


def with_earlier_gains(cal: Calibration, earlier: Calibration | None) -> Calibration:
    """`cal` (a new measurement) with each pre-packing gain the median of its last GAIN_READINGS readings
    on this machine: `earlier`'s (the cached record of the same key, or None) then `cal`'s own."""
    seen = {}
    for name, gain in cal.packed_gain.items():
        before = ((earlier.packed_gain_seen.get(name) or [earlier.packed_gain[name]])
                  if earlier is not None and name in earlier.packed_gain else [])
        seen[name] = [*before, gain][-GAIN_READINGS:]
    return replace(cal, packed_gain={name: statistics.median(v) for name, v in seen.items()}, packed_gain_seen=seen)


def measure(cap: Capability) -> Calibration:
    """Measure now (no cache): matmul FLOP/s per candidate dtype, best of a few reps, and memory
    bandwidth (`probes.bandwidth`: a GPU's copy, a CPU's weight reads as a decoding step does them); on a
    CPU also a decoding step's host work a layer (`probes.host_layer_seconds`) and the share of the matmul
    probes' time its threads ran (`cpu_share`). CPU runs at threads(cap)."""
    import torch

    t0 = time.perf_counter()
    cuda = cap.kind == "cuda"
    dev = "cuda" if cuda else "cpu"
    dtypes = ("float32", "bfloat16", "float16") if cuda else ("float32", "bfloat16")
    prev, n_threads = torch.get_num_threads(), threads(cap)
    if not cuda:
        torch.set_num_threads(n_threads)
    try:
        # The host-work probe takes ~0.06 s, shorter than a shared host's slow moments: 24 calls in a loop
        # on the Zen 3 read 0.38-0.40 ms a layer but one, 0.68. The faster of one at the start and one at
        # the end.
        host = 0.0 if cuda else P.host_layer_seconds(torch)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        with torch.inference_mode():
            flops = {dt: P.matmul_rate(torch, dev, getattr(torch, dt), P.CUDA_SHAPE if cuda else P.CPU_SHAPE)
                     for dt in dtypes}
            packed = {} if cuda else P.packed_rates(torch, flops)
            gain = {} if cuda else P.packed_gains(torch, flops)
            bw = P.bandwidth(torch, dev)
        share = 1.0 if cuda else (time.process_time() - cpu0) / ((time.perf_counter() - wall0) * n_threads)
        attention = {} if cuda else P.attention_times(torch, flops)
        host = 0.0 if cuda else min(host, P.host_layer_seconds(torch))
    finally:
        torch.set_num_threads(prev)
    return Calibration(key=current_key(cap),
                       device=f"{cap.kind} {cap.name} ({cap.isa})", matmul_flops=flops, bandwidth_bytes_per_s=bw,
                       seconds=round(time.perf_counter() - t0, 3), torch=torch_version(), packed_flops=packed,
                       attention_s=attention, packed_gain=gain, host_layer_s=host, cpu_share=round(share, 3))
