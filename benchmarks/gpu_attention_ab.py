"""On a CUDA machine: which SDPA kernel packed QLoRA training should use (the measurement behind
`toolkit.finetune.packed_attention.CUDA_PACKED_SDPA_BACKENDS`).

QLoRA on random-weight Llama-3.2-1B, the finance recipe's GPU profile at 8 x 512 packed tokens a
step, 10 steps per variant, each variant in a fresh process, the same seed and data:
- `torch`: torch's own SDPA choice (cuDNN's kernel on Hopper for the packed rows' block-diagonal mask);
- `toolkit`: the trainer's choice (every SDPA backend but cuDNN's);
- `segments`: each packed conversation attended alone with SDPA's causal kernel (the CPU path's kernel).

    python -m benchmarks.gpu_attention_ab MODEL_DIR OUT.jsonl [qlora|lora]   (MODEL_DIR: made if missing)

Prints and appends one JSON line a variant: median step time after the first, every step's time,
the logged losses (equal across variants up to kernel rounding) and the peak allocated memory.
The 2026-12-04 H200 run is in benchmarks/gpu-results.json ("attention"); it ran before the trainer
made the choice, so its `toolkit` variant turned cuDNN's SDPA off process-wide instead (the same kernels).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

VARIANTS = ("torch", "toolkit", "segments")
STEPS = 10


def one(model_dir: Path, variant: str, out: Path, method: str) -> dict:
    import torch

    from benchmarks.gpu_check import RECIPE, _peak_callback, _step_times, memory_overrides
    from toolkit.finetune import packed_attention as pa

    if variant == "torch":
        pa.cuda_sdpa_backends = lambda *a: None
    elif variant == "segments":
        from types import SimpleNamespace

        import toolkit.core.hardware as hw

        pa.wanted = lambda *a: True
        pa.cuda_sdpa_backends = lambda *a: None
        hw.attention_choice = lambda dev, dtype: SimpleNamespace(kernel="sdpa", fallback="sdpa", max_padding=float("inf"),
                                                                 reason="attention: each conversation alone (A/B)")
    from toolkit.finetune.trainer import finetune

    cb = _peak_callback()
    ov = [o for o in memory_overrides(method, 512, str(model_dir), 8) if not o.startswith("training.max_steps")]
    finetune(RECIPE, [*ov, f"training.max_steps={STEPS}"], runs_dir=Path(f"/tmp/ab-{variant}-{method}"),
             callbacks=[cb], gpu=True)
    times = _step_times(cb.step_s, cb.tokens)
    r = {"variant": variant, "method": method, "step_s_median": times["step_s_median"], "step_s": times["step_s_all"],
         "losses": cb.losses, "peak_alloc": torch.cuda.max_memory_allocated()}
    with out.open("a") as f:
        f.write(json.dumps(r) + "\n")
    return r


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 4 and args[3] in VARIANTS:  # the child process of one variant
        print(json.dumps(one(Path(args[0]), args[3], Path(args[1]), args[2])))
        return 0
    if len(args) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    model_dir, out, method = Path(args[0]), Path(args[1]), args[2] if len(args) == 3 else "qlora"
    if not (model_dir / "config.json").is_file():
        from benchmarks.gpu_check import build_model_dir

        build_model_dir(model_dir)
    for v in VARIANTS:
        subprocess.run([sys.executable, "-m", "benchmarks.gpu_attention_ab", str(model_dir), str(out), method, v],
                       timeout=600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
