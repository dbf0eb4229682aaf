"""On a CUDA machine: how padding-free packed training attends (the measurements behind
`toolkit.core.attention_kernels.cuda_packed_attention` and `toolkit.finetune.packed_attention`).

1. The kernel: `segment_attention.varlen` (PyTorch's varlen flash kernel) and SDPA over the
   block-diagonal mask, each against each conversation attended alone in fp64, outputs and
   gradients, on a bf16 row of Llama-3.2-1B's attention shape (32 query, 8 KV heads of 64).
2. Training: QLoRA on random-weight Llama-3.2-1B, the finance recipe's GPU profile at 8 x 512
   packed tokens a step, 16 steps per variant, each in a fresh process, same seed and data:
   - `masked`: SDPA over the row's block-diagonal mask without cuDNN's kernel (the trainer's choice
     where PyTorch has no varlen kernel: forced here by hiding it);
   - `varlen`: the trainer's choice on sm80+ with PyTorch >= 2.10; every layer reads the row's
     bounds back to the host and sends them to the GPU again (two waits for the GPU a layer);
   - `varlen_once`, a trial: as `varlen`, the bounds read and sent once a forward (a one-entry cache
     keyed by the collator's tensor and its version). QLoRA, 2026-12-04 16:44 UTC: median steps 0.314 /
     0.323 s against varlen's 0.346 / 0.296, no difference beyond the spread (gpu-results.json,
     "attention_trials_evening"). The trial before it, the collator's GPU tensor passed straight to
     the kernel, read slower than `varlen` ("attention_varlen_device_bounds_trial").
   - `varlen_fused_lora`, a trial: as `varlen`, with the LoRA layers (QLoRA's 4-bit ones included)
     through `toolkit.finetune.fused_lora` as on a CPU: one autograd node a layer, the adapter added
     inside the base product. 16:44-16:56 UTC, alternating with varlen: QLoRA 0.281 / 0.286 / 0.327 /
     0.332 s against 0.346 / 0.296 / 0.368 / 0.313 (-7.5% on the means); LoRA 0.300 / 0.334 against
     0.343 / 0.261 (no gain), its peak 5.3% lower.

    python -m benchmarks.gpu_attention_ab MODEL_DIR OUT.jsonl [qlora|lora] [VARIANT,VARIANT,...]
    (MODEL_DIR: made if missing; variants in the order given, repeats allowed; default masked,varlen)

Appends one JSON line for the kernel check and one a variant: median step time after the first, every
step's time, the logged losses (equal across variants up to kernel rounding) and the peak allocated memory.
An earlier form (2026-12-04 ~11:30 UTC, benchmarks/gpu-results.json "attention") compared torch's own
SDPA choice (cuDNN's kernel), SDPA without cuDNN, and per-conversation SDPA calls.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

VARIANTS = ("masked", "varlen", "varlen_once", "varlen_fused_lora")
DEFAULT_VARIANTS = ("masked", "varlen")
KERNEL_SIZES = [143, 87, 301, 64, 512, 120, 95, 230, 161, 78, 257]  # ~2,048 tokens, finance-like lengths
STEPS = 16


def one(model_dir: Path, variant: str, out: Path, method: str) -> dict:
    import torch

    from benchmarks.gpu_check import RECIPE, _peak_callback, _step_times, memory_overrides

    if variant == "masked":
        from toolkit.core import segment_attention

        segment_attention.varlen_call = lambda: None  # as on a PyTorch without the kernel
    if variant == "varlen_once":
        _read_bounds_once()
    if variant == "varlen_fused_lora":
        from toolkit.finetune import fused_lora

        fused_lora.wanted = lambda device: True
    from toolkit.finetune.trainer import finetune

    cb = _peak_callback()
    ov = [o for o in memory_overrides(method, 512, str(model_dir), 8) if not o.startswith("training.max_steps")]
    run = finetune(RECIPE, [*ov, f"training.max_steps={STEPS}"], runs_dir=Path(f"/tmp/ab-{variant}-{method}"),
                   callbacks=[cb], gpu=True)
    times = _step_times(cb.step_s, cb.tokens)
    r = {"variant": variant, "method": method, "step_s_median": times["step_s_median"], "step_s": times["step_s_all"],
         "losses": cb.losses, "peak_alloc": torch.cuda.max_memory_allocated(),
         "attention": json.loads((run / "run.json").read_text())["packed_attention_reason"]}
    with out.open("a") as f:
        f.write(json.dumps(r) + "\n")
    return r


def _read_bounds_once() -> None:
    """The `varlen_once` trial: the row's bounds read from the collator's tensor once a forward and
    its device copy made once (transformers hands every layer the same tensor)."""
    import functools

    from toolkit.core import segment_attention
    from toolkit.finetune import packed_attention

    read, last = packed_attention.segment_bounds, [None, -1, None]

    def once(cu_seq_lens=None, position_ids=None):
        key = cu_seq_lens if cu_seq_lens is not None else position_ids
        if key is None or last[0] is not key or last[1] != key._version:
            last[:] = [key, getattr(key, "_version", -1), read(cu_seq_lens, position_ids)]
        return last[2]

    packed_attention.segment_bounds = once
    segment_attention._cumulative = functools.lru_cache(maxsize=4)(segment_attention._cumulative)


def kernel_check() -> dict:
    """Max |difference| from each conversation attended alone (fp64) of varlen's and masked SDPA's
    output and q/k/v gradients, bf16 inputs; and their forward+backward milliseconds."""
    import time

    import torch

    from toolkit.core import segment_attention as S

    g = torch.Generator(device="cuda").manual_seed(0)
    rows, sizes = sum(KERNEL_SIZES), KERNEL_SIZES
    q, k, v = (torch.randn(1, h, rows, 64, generator=g, device="cuda", dtype=torch.bfloat16).requires_grad_()
               for h in (32, 8, 8))
    grad = torch.randn(1, rows, 32, 64, generator=g, device="cuda", dtype=torch.bfloat16)
    seg = torch.repeat_interleave(torch.arange(len(sizes), device="cuda"), torch.tensor(sizes, device="cuda"))
    mask = (seg[:, None] == seg[None, :]) & torch.ones(rows, rows, dtype=torch.bool, device="cuda").tril()

    def masked(a, b, c):
        return torch.nn.functional.scaled_dot_product_attention(a, b, c, attn_mask=mask, enable_gqa=True).transpose(1, 2)

    def reference(a, b, c):
        return S.sdpa(a.double(), b.double(), c.double(), sizes)

    def run(fn, inputs):
        for t in inputs:
            t.grad = None
        out = fn(*inputs)
        out.backward(grad.to(out.dtype))
        return out.detach().double(), [t.grad.double() for t in inputs]

    ref = run(reference, [t.detach().double().requires_grad_() for t in (q, k, v)])
    out = {"sizes": sizes, "heads": [32, 8, 64]}
    for name, fn in (("varlen", lambda a, b, c: S.varlen(a, b, c, sizes)), ("masked", masked)):
        got = run(fn, [q, k, v])
        out[f"{name}_max_abs_diff"] = {"out": float((got[0] - ref[0]).abs().max()),
                                       **{f"d{n}": float((a - b).abs().max()) for n, a, b in zip("qkv", got[1], ref[1])}}
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(20):
            run(fn, [q, k, v])
        torch.cuda.synchronize()
        out[f"{name}_fwd_bwd_ms"] = round((time.perf_counter() - t0) / 20 * 1e3, 3)
    return out


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 5 and args[4] == "--child" and args[3] in VARIANTS:  # the process of one variant
        print(json.dumps(one(Path(args[0]), args[3], Path(args[1]), args[2])))
        return 0
    variants = args[3].split(",") if len(args) == 4 else DEFAULT_VARIANTS
    if len(args) not in (2, 3, 4) or not set(variants) <= set(VARIANTS):
        print(__doc__, file=sys.stderr)
        return 2
    model_dir, out, method = Path(args[0]), Path(args[1]), args[2] if len(args) >= 3 else "qlora"
    if not (model_dir / "config.json").is_file():
        from benchmarks.gpu_check import build_model_dir

        build_model_dir(model_dir)
    check = {"variant": "kernel check", **kernel_check()}
    print(json.dumps(check), flush=True)
    with Path(out).open("a") as f:
        f.write(json.dumps(check) + "\n")
    for v in variants:
        subprocess.run([sys.executable, "-m", "benchmarks.gpu_attention_ab", str(model_dir), str(out), method, v,
                        "--child"], timeout=600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
