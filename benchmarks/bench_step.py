"""Where a CPU training step's time goes: the finance recipe's CPU profile under torch's profiler.

The recipe trains STEPS optimizer steps through `toolkit.finetune.trainer.finetune` (as `make finetune`
does, no report). After WARMUP steps, PLAIN steps are timed without the profiler, then the rest are
profiled, from the end of one step to the end of the last, data loading and the optimizer included.
Each operator's own time goes to one part:

- base GEMMs: the frozen layers' matrix products (forward and input gradient; BLAS or oneDNN with the
  weight pre-packed, toolkit.core.packed_linear), LoRA's add inside them
  excluded; their GFLOP/s is 2MKN from the recorded shapes over their time;
- LoRA rank-r products: every matrix product with the adapter's rank as a dimension;
- LM head: every operator on a vocabulary-wide tensor (logits, softmax, their gradients);
- attention: the scaled-dot-product kernels, or the batched matmuls and softmax of the bmm kernel
  (toolkit.core.segment_attention; its padding copies and the adds of its query blocks' dK and dV shares
  count as other operators), forward and backward;
- other operators: norms, rotary, SiLU, casts, adds, the optimizer;
- outside operators: the window's wall time no operator accounts for (Python, the autograd engine,
  collation, and the profiler's own bookkeeping: compare s_per_step with s_per_step_unprofiled).

The base GEMMs' in-step rate over the calibrated matmul rate (the faster of a calibration before and
after the run) is about what MFU would be if nothing but the base GEMMs took time: the ceiling for
this way of running the step. MFU itself is bench_train's. On a CPU with native bf16 it runs twice,
as detected and forced to AVX2 (fp32), like bench_train.

    python -m benchmarks.run step
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

# Steps 1-2 warm up (fresh pages, first calls), 3-5 are timed without the profiler, 6-9 profiled.
STEPS, WARMUP, PLAIN = 9, 2, 3
# The kernels; aten::matmul and aten::linear only dispatch to them (counting them too would count twice).
GEMMS = {"aten::mm", "aten::addmm", "aten::addmm_"}
# In the recipe's step only the bmm attention kernel runs batched matmuls and a softmax (the LM head's
# softmax is written out over vocabulary-wide rows): attention, not base GEMMs.
ATTENTION_OPS = {"aten::bmm", "aten::baddbmm", "aten::_softmax"}
# oneDNN's product with a pre-packed weight (toolkit.core.packed_linear): x (..., K) by W (N, K).
LINEARS = {"mkldnn::_linear_pointwise"}
PARTS = ("base GEMMs", "LoRA rank-r products", "LM head", "attention", "other operators", "outside operators")


def part_of(name: str, shapes: list, rank: int, vocab: int) -> str:
    """The part an operator's own time goes to, from its name and input shapes."""
    dims = {d for s in shapes if isinstance(s, (list, tuple)) for d in s}
    if vocab in dims:
        return "LM head"
    if "scaled_dot_product" in name or name in ATTENTION_OPS:
        return "attention"
    if name in GEMMS or name in LINEARS:
        return "LoRA rank-r products" if rank in dims else "base GEMMs"
    return "other operators"


def gemm_flops(name: str, shapes: list) -> float:
    """FLOPs of one matrix product from its name and input shapes: (M, K) @ (K, N), with addmm's
    accumulator first when there are three; batched (B, M, K) @ (B, K, N) for bmm; a packed linear's
    (..., K) by its weight (N, K)."""
    if name in LINEARS:
        (*rows, k), n = shapes[0], shapes[1][0]
        return 2.0 * math.prod(rows) * k * n
    mats = [s for s in shapes if isinstance(s, (list, tuple)) and len(s) >= 2][-2:]
    if len(mats) < 2:
        return 0.0
    (*batch, m, k), n = mats[0], mats[1][-1]
    return 2.0 * m * k * n * (batch[0] if batch else 1)


def profile_steps(tmp: Path) -> dict:
    """Seconds per step by part over steps WARMUP+PLAIN+1..STEPS of the recipe's CPU profile, and per
    step unprofiled over the PLAIN steps before them."""
    import torch
    from transformers import TrainerCallback

    from benchmarks import bench_train
    from toolkit.core import attention_kernels, calibration, capability
    from toolkit.estimate import catalog
    from toolkit.finetune import recipe
    from toolkit.finetune.trainer import finetune

    # Shapes, not the profiler's FLOP counting: with_flops=True made the elementwise operators read 5-6x
    # slower (aten::mul 0.76 vs 0.12 ms a call, forced fp32 on the EPYC); record_shapes alone, ~1.5x on them.
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
    window = {}

    class Window(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == WARMUP:
                window.update(plain0=time.perf_counter())
            elif state.global_step == WARMUP + PLAIN:
                window.update(t0=time.perf_counter())
                prof.start()
            elif state.global_step == STEPS:
                prof.stop()
                window.update(t1=time.perf_counter())

    cap = capability.detect("cpu")
    rates = [calibration.measure(cap)]
    run = finetune(bench_train.RECIPE, [f"training.max_steps={STEPS}", "eval.report=false", "data.eval=",
                                        "training.save_steps=0"], runs_dir=tmp, gpu=False, callbacks=[Window()])
    rates.append(calibration.measure(cap))
    info = json.loads((run / "run.json").read_text())
    rec = recipe.load(bench_train.RECIPE, gpu=False)
    vocab = catalog.lookup("embedded").vocab  # the CPU profile's model (bench_train counts its FLOPs too)
    steps, wall = STEPS - WARMUP - PLAIN, window["t1"] - window["t0"]
    secs, flops = dict.fromkeys(PARTS, 0.0), 0.0
    for ev in prof.key_averages(group_by_input_shape=True):
        part = part_of(ev.key, ev.input_shapes, rec.lora.r, vocab)
        secs[part] += ev.self_cpu_time_total / 1e6
        if part == "base GEMMs":
            flops += ev.count * gemm_flops(ev.key, ev.input_shapes)
    secs["outside operators"] = max(0.0, wall - sum(secs.values()))
    # The faster of a calibration before and after: one alone can land on a slow moment of a shared host.
    calib = max(r.best_flops(info["compute_dtype"]) for r in rates)
    gemm_rate = flops / secs["base GEMMs"] if secs["base GEMMs"] else 0.0
    # The packed-row attention kernels as the calibration before the run timed them, in the run's dtype.
    attention = " / ".join(f"{k} {v * 1e3:.1f}"
                           for k, v in attention_kernels.attention_times(rates[0], info["compute_dtype"]).items())
    return {"dtype": info["compute_dtype"], "reason": info.get("compute_dtype_reason", ""), "steps": steps,
            "wall": wall, "plain": (window["t0"] - window["plain0"]) / PLAIN, "secs": secs,
            "gemm_rate": gemm_rate, "calib": calib, "attention": info.get("packed_attention"),
            "attention_ms": attention}


def rows_for(p: dict, cpu: str) -> list[dict]:
    total = p["wall"]
    rows = [{"measure": "step time by part", "dtype": p["dtype"], "part": part,
             "s_per_step": round(sec / p["steps"], 3), "share_pct": round(100 * sec / total, 1),
             "gflops": round(p["gemm_rate"] / 1e9, 1) if part == "base GEMMs" else ""}
            for part, sec in p["secs"].items()]
    rows.append({"measure": "profiled window", "dtype": p["dtype"], "why": p["reason"], "cpu": cpu,
                 "steps": p["steps"], "s_per_step": round(total / p["steps"], 2),
                 "s_per_step_unprofiled": round(p["plain"], 2),
                 "base_gemms_pct_of_unprofiled_step": round(100 * p["secs"]["base GEMMs"] / p["steps"] / p["plain"], 1),
                 "calibrated_gflops": round(p["calib"] / 1e9, 1),
                 "base_gemms_in_step_pct_of_calibrated": round(100 * p["gemm_rate"] / p["calib"], 1),
                 "attention": p["attention"], "calibrated_attention_ms_a_layer": p["attention_ms"]})
    return rows


def run() -> dict:
    from benchmarks.bench_train import capability_passes, cpu_label

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-step-") as d:
        for name, cap in capability_passes():
            rows += rows_for(profile_steps(Path(d) / name), cpu_label(cap))
    return {"title": "Where a CPU training step's time goes (finance recipe, CPU profile, torch profiler)",
            "rows": rows,
            "notes": (f"Steps {WARMUP + PLAIN + 1}-{STEPS} of the recipe's CPU profile profiled (data, forward, backward, "
                      f"optimizer), steps {WARMUP + 1}-{WARMUP + PLAIN} timed without the profiler; each operator's own time "
                      "in one part (benchmarks/bench_step.py says which). base GEMMs' GFLOP/s: 2MKN from the recorded "
                      "shapes over their time; base_gemms_in_step_pct_of_calibrated: that rate over the faster of two "
                      "calibrations (before and after), about the MFU if nothing but the base GEMMs took time. Recording "
                      "shapes costs time of its own (s_per_step against s_per_step_unprofiled; it lands mostly in the outside "
                      "and other parts, so their shares are upper bounds). The profiler's FLOP counting "
                      "(with_flops) is not used: it made aten::mul read 6x slower.")}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
