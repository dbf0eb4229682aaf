"""`make gpu-check`: the CUDA path measured on the machine at hand, to benchmarks/gpu-results.json.

1. Memory: Llama-3.2-1B (full config, random weights, Meta's tokenizer) trained by the toolkit's own
   path (`toolkit.finetune.trainer.finetune`, the finance recipe's GPU profile, batch 1) with QLoRA
   and with LoRA at sequence length 512 and 2048, a few steps each: the peak of
   `torch.cuda.max_memory_allocated` during training (the weights are resident, so they are in it)
   next to the estimator's `allocated_bytes` for the same settings (`toolkit.finetune.plan`, the
   one recipe-to-estimator mapping).
2. Speed: 20 optimizer steps of the finance recipe (GPU profile) on the same model, tokens/s, with
   the transformers+PEFT engine and, when Unsloth is installed, with Unsloth. Each engine runs in
   its own process: Unsloth must be imported before TRL/transformers.

Random weights stand in for the gated checkpoint: memory and speed depend on shapes, not values.

    python -m benchmarks.gpu_check             (on a CUDA machine; `make gpu-check`)
    python -m benchmarks.gpu_check --dry-run   (anywhere: plans the runs, builds each model on the
                                                meta device, prints what it would measure, writes nothing)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "finance"
OUT = ROOT / "benchmarks" / "gpu-results.json"
CATALOG_ID = "meta-llama/Llama-3.2-1B-Instruct"  # the estimator's entry for this shape
MEMORY_CASES = [(method, seq) for method in ("qlora", "lora") for seq in (512, 2048)]
MEMORY_STEPS = 3
SPEED_STEPS = 20
# Only the training loop: no held-out eval, no report, no checkpoint, every step logged.
_QUIET = ["eval.report=false", "data.eval=", "training.save_steps=0", "training.logging_steps=1"]


def memory_overrides(method: str, seq: int, model_dir: str) -> list[str]:
    return [f"model.base_model={model_dir}", "model.fallback_model=", f"method.name={method}",
            "method.unsloth=false", f"data.max_seq_len={seq}", "training.batch_size=1", "training.grad_accum=1",
            f"training.max_steps={MEMORY_STEPS}", *_QUIET]


def speed_overrides(engine: str, model_dir: str) -> list[str]:
    return [f"model.base_model={model_dir}", "model.fallback_model=", f"method.unsloth={engine == 'unsloth'}",
            f"training.max_steps={SPEED_STEPS}", *_QUIET]


def engines() -> list[str]:
    return ["transformers+peft"] + (["unsloth"] if importlib.util.find_spec("unsloth") else [])


def estimated(rec) -> dict:
    """The estimator's numbers for the run `rec` describes on a CUDA GPU in bf16."""
    from toolkit.estimate.planner import estimate
    from toolkit.finetune.plan import plan_inputs

    e = estimate(CATALOG_ID, **plan_inputs(rec, "cuda", "bfloat16").as_kwargs())
    allocated = getattr(e, "allocated_bytes", None)
    return {"estimated_allocated_bytes": allocated if allocated is not None else e.total_bytes,
            "estimated_total_bytes": e.total_bytes, "estimate_components": dict(e.components)}


def plan(model_dir: str) -> dict:
    """Every run this check makes, as (kind, settings, the estimate) rows, without running any."""
    from toolkit.finetune import recipe as recipe_mod

    rows = []
    for method, seq in MEMORY_CASES:
        rec = recipe_mod.load(RECIPE, memory_overrides(method, seq, model_dir), gpu=True)
        rows.append({"kind": "memory", "method": method, "seq_len": seq, "batch": 1, "steps": MEMORY_STEPS,
                     "lora_r": rec.lora.r, "gradient_checkpointing": rec.training.gradient_checkpointing,
                     **estimated(rec)})
    for engine in engines():
        rows.append({"kind": "speed", "engine": engine, "steps": SPEED_STEPS,
                     "overrides": speed_overrides(engine, model_dir)})
    return {"memory": [r for r in rows if r["kind"] == "memory"], "speed": [r for r in rows if r["kind"] == "speed"]}


def _peak_callback():
    import torch
    from transformers import TrainerCallback

    class Peak(TrainerCallback):
        """Peak allocated memory over the training steps (the model is already loaded at train begin)."""

        peak = 0

        def on_train_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())

    return Peak()


def measure_memory(row: dict, model_dir: str, runs: Path) -> dict:
    import torch

    from toolkit.finetune.trainer import finetune

    import gc

    gc.collect()  # the previous case's model and optimizer must not count here
    torch.cuda.empty_cache()
    peak = _peak_callback()
    run = finetune(RECIPE, memory_overrides(row["method"], row["seq_len"], model_dir), runs_dir=runs,
                   callbacks=[peak], gpu=True)
    info = json.loads((run / "run.json").read_text())
    ratio = peak.peak / row["estimated_allocated_bytes"]
    return {**row, "measured_max_allocated_bytes": peak.peak, "measured_over_estimate": round(ratio, 3),
            "engine": info["engine"], "steps_done": info["steps"]}


def measure_speed(row: dict, runs: Path) -> dict:
    """One engine in a fresh process (Unsloth has to be imported before TRL/transformers)."""
    from benchmarks import finetune_process

    t0 = time.time()
    try:
        run = finetune_process.run(RECIPE, runs, row["overrides"])
    except RuntimeError as exc:
        return {**row, "error": [str(exc)]}
    info = json.loads((run / "run.json").read_text())
    return {**row, "engine_used": info["engine"], "packing": info.get("packing"), "steps_done": info["steps"],
            "tokens_seen": info["tokens_seen"], "train_runtime_s": info["train_runtime_s"],
            "tokens_per_s": info["tokens_per_s"], "wall_s": round(time.time() - t0, 1)}


def environment() -> dict:
    import torch

    def version(dist):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"gpu": torch.cuda.get_device_name(0), "gpu_memory_bytes": torch.cuda.get_device_properties(0).total_memory,
            "torch": torch.__version__, "cuda": torch.version.cuda,
            **{d: version(d) for d in ("transformers", "trl", "peft", "accelerate", "bitsandbytes", "unsloth")},
            "model": "Llama-3.2-1B config, random weights (toolkit.core.reference_models), Meta's tokenizer",
            "recipe": "recipes/finance, GPU profile", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": "python -m benchmarks.gpu_check"}


def build_model_dir(target: Path) -> Path:
    """Random-weight Llama-3.2-1B with Meta's tokenizer and chat template, saved as an HF folder."""
    from toolkit.core.reference_models import load_llama32_tokenizer, random_llama32

    model = random_llama32(dtype="bfloat16", device="cuda")
    model.save_pretrained(target)
    load_llama32_tokenizer().save_pretrained(target)
    del model
    return target


def dry_run() -> dict:
    """Plan every run and build the model on the meta device: shapes, parameters, estimates."""
    from toolkit.core.reference_models import random_llama32

    model = random_llama32(device="meta")
    n_params = sum(p.numel() for p in model.parameters())
    planned = plan("<random Llama-3.2-1B folder>")
    print(f"model: Llama-3.2-1B config, random weights: {n_params:,} parameters (built on the meta device)")
    for r in planned["memory"]:
        print(f"would measure: {r['method']} seq {r['seq_len']} batch 1, {r['steps']} steps: "
              f"torch.cuda.max_memory_allocated vs estimated allocated {r['estimated_allocated_bytes'] / 2**30:.2f} GiB")
    for r in planned["speed"]:
        print(f"would measure: {r['steps']} steps of the finance recipe with {r['engine']}: tokens/s")
    print(f"would write: {OUT.relative_to(ROOT)} (dry run: nothing written)")
    return {"parameters": n_params, **planned}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="plan and print the runs; needs no GPU, writes nothing")
    ap.add_argument("--out", type=Path, default=OUT, help=f"results file (default {OUT.relative_to(ROOT)})")
    args = ap.parse_args(argv)
    if args.dry_run:
        dry_run()
        return 0
    import torch

    if not torch.cuda.is_available():
        print("error: gpu-check needs a CUDA GPU (use --dry-run to see the plan)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is local
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        model_dir = build_model_dir(Path(tmp) / "llama32-1b-random")
        planned = plan(str(model_dir))
        memory = []
        for row in planned["memory"]:
            memory.append(measure_memory(row, str(model_dir), Path(tmp) / "runs"))
            print(json.dumps({k: v for k, v in memory[-1].items() if k != "estimate_components"}), flush=True)
        speed = []
        for row in planned["speed"]:
            speed.append(measure_speed(row, Path(tmp) / "runs"))
            print(json.dumps(speed[-1]), flush=True)
    results = {"taken": environment(), "memory": memory, "speed": speed}
    tmp_out = args.out.with_name(args.out.name + ".tmp")
    tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp_out, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
