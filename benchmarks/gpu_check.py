"""`make gpu-check`: the CUDA path measured on the machine at hand, to benchmarks/gpu-results.json.

1. Memory and step time: Llama-3.2-1B (full config, random weights, Meta's tokenizer) trained by
   the toolkit's own path (`toolkit.finetune.trainer.finetune`, the finance recipe's GPU profile)
   with QLoRA and with LoRA at 512 x 1, 2048 x 1 and 512 x 8 tokens (the recipe's own), a few steps
   each: the peak of `torch.cuda.max_memory_allocated` during training (the weights are resident,
   so they are in it) next to the estimator's `allocated_bytes` for the same settings
   (`toolkit.finetune.plan`, the one recipe-to-estimator mapping), and the median step time after
   the first step (which pays CUDA's and the kernels' start-up).
2. Speed: 20 optimizer steps of the finance recipe (GPU profile) on the same model, tokens/s, with
   the transformers+PEFT engine and, when Unsloth is installed, with Unsloth. Each engine runs in
   its own process: Unsloth must be imported before TRL/transformers.
3. End to end: `toolkit finetune recipes/finance` as a user runs it on a GPU (the GPU profile whole:
   3 epochs, in-training evals, the base-vs-fine-tuned report, saving), wall time and its phases.
   With random weights the report's numbers mean nothing; its time is an upper bound (every
   generation runs to max_new_tokens).
4. compute: the share of the calibrated matmul rate a compute-bound step reaches (micro-batches of
   8k and 32k tokens); decode: seconds per decoding step, the toolkit's loop and transformers'
   `generate` as the report runs it (benchmarks/gpu_time.py, the time model's CUDA inputs).
5. fp16: the speed run with `method.compute_dtype=float16` (what a pre-Ampere GPU gets), QLoRA and
   LoRA: it runs, its loss falls, and its tokens/s beside bf16's.

Random weights stand in for the gated checkpoint: memory and speed depend on shapes, not values.

    python -m benchmarks.gpu_check             (on a CUDA machine; `make gpu-check`)
    python -m benchmarks.gpu_check --dry-run   (anywhere: plans the runs, builds each model on the
                                                meta device, prints what it would measure, writes nothing)
    python -m benchmarks.gpu_check --parts speed,e2e   (some of the parts)

The results file is rewritten after every part, so a check cut short keeps what it measured.
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
MEMORY_CASES = [(method, seq, batch) for method in ("qlora", "lora") for seq, batch in ((512, 1), (2048, 1), (512, 8))]
MEMORY_STEPS = 6
SPEED_STEPS = 20
PARTS = ("memory", "speed", "e2e", "compute", "decode", "fp16")
DEFAULT_PARTS = ("memory", "speed", "e2e")  # what `make gpu-check` runs; the rest on request
RUN_TIMEOUT_S = 900  # one subprocess run; a hang must not eat a borrowed GPU's whole lease
# Only the training loop: no held-out eval, no report, no checkpoint, every step logged.
_QUIET = ["eval.report=false", "data.eval=", "training.save_steps=0", "training.logging_steps=1"]


def memory_overrides(method: str, seq: int, model_dir: str, batch: int = 1) -> list[str]:
    return [f"model.base_model={model_dir}", "model.fallback_model=", f"method.name={method}",
            "method.unsloth=false", f"data.max_seq_len={seq}", f"training.batch_size={batch}", "training.grad_accum=1",
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

    kw = plan_inputs(rec, "cuda", "bfloat16").as_kwargs()
    e = estimate(CATALOG_ID, **kw)
    # What the estimate would be with transformers' own loss (fp32 logits for every token) in place
    # of SFTTrainer's fused LM head: the term the measurement tells apart.
    full_logits = estimate(CATALOG_ID, **kw, loss="transformers")
    return {"estimated_allocated_bytes": e.allocated_bytes, "estimated_total_bytes": e.total_bytes,
            "estimated_allocated_bytes_transformers_loss": full_logits.allocated_bytes,
            "estimate_components": dict(e.components)}


def plan(model_dir: str) -> dict:
    """Every run this check makes, as (kind, settings, the estimate) rows, without running any."""
    from toolkit.finetune import recipe as recipe_mod

    rows = []
    for method, seq, batch in MEMORY_CASES:
        rec = recipe_mod.load(RECIPE, memory_overrides(method, seq, model_dir, batch), gpu=True)
        rows.append({"kind": "memory", "method": method, "seq_len": seq, "batch": batch, "steps": MEMORY_STEPS,
                     "lora_r": rec.lora.r, "gradient_checkpointing": rec.training.gradient_checkpointing,
                     **estimated(rec)})
    for engine in engines():
        rows.append({"kind": "speed", "engine": engine, "steps": SPEED_STEPS,
                     "overrides": speed_overrides(engine, model_dir)})
    rows.append({"kind": "e2e", "overrides": e2e_overrides(model_dir)})
    from benchmarks.gpu_time import COMPUTE_CASES

    for method, seq, batch in COMPUTE_CASES:
        rec = recipe_mod.load(RECIPE, memory_overrides(method, seq, model_dir, batch), gpu=True)
        rows.append({"kind": "compute", "method": method, "seq_len": seq, "batch": batch, "steps": MEMORY_STEPS,
                     "lora_r": rec.lora.r, "gradient_checkpointing": rec.training.gradient_checkpointing,
                     **estimated(rec)})
    rows += [{"kind": "decode", "model": m} for m in ("bf16", "nf4+lora")]
    for method in ("qlora", "lora"):
        rows.append({"kind": "fp16", "method": method, "steps": SPEED_STEPS,
                     "overrides": [*speed_overrides("transformers+peft", model_dir), "method.compute_dtype=float16",
                                   f"method.name={method}"]})
    return {part: [r for r in rows if r["kind"] == part] for part in PARTS}


def e2e_overrides(model_dir: str) -> list[str]:
    return [f"model.base_model={model_dir}", "model.fallback_model="]


def _peak_callback():
    import torch
    from transformers import TrainerCallback

    class Peak(TrainerCallback):
        """Peak allocated memory over the training steps (the model is already loaded at train begin),
        each step's seconds and tokens seen, and the logged losses."""

        peak = reserved = 0

        def __init__(self):
            self.step_s, self.tokens, self.losses, self._t = [], [], [], None

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

        def on_train_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            now = time.perf_counter()
            self.step_s.append(now - self._t)
            self.tokens.append(state.num_input_tokens_seen)
            self._t = now
            self.peak = max(self.peak, torch.cuda.max_memory_allocated())
            self.reserved = max(self.reserved, torch.cuda.max_memory_reserved())

    return Peak()


def measure_memory(row: dict, model_dir: str, runs: Path) -> dict:
    import torch

    from toolkit.finetune.trainer import finetune

    import gc

    gc.collect()  # the previous case's model and optimizer must not count here
    torch.cuda.empty_cache()
    peak = _peak_callback()
    run = finetune(RECIPE, memory_overrides(row["method"], row["seq_len"], model_dir, row["batch"]), runs_dir=runs,
                   callbacks=[peak], gpu=True)
    info = json.loads((run / "run.json").read_text())
    ratio = peak.peak / row["estimated_allocated_bytes"]
    # Reserved is what the caching allocator holds (what nvidia-smi shows, less the CUDA context).
    return {**row, "measured_max_allocated_bytes": peak.peak, "measured_over_estimate": round(ratio, 3),
            "measured_max_reserved_bytes": peak.reserved, "engine": info["engine"], "steps_done": info["steps"],
            "attention": info.get("packed_attention_reason"),
            **_step_times(peak.step_s, peak.tokens), "losses": [round(x, 4) for x in peak.losses],
            "_info": {k: info[k] for k in ("method", "train_examples", "train_tokens_per_epoch",
                                           "trained_tokens_per_epoch")}}


def measure_compute(row: dict, model_dir: str, runs: Path, rate: float) -> dict:
    """A memory-style run at a compute-bound size, with its share of the calibrated matmul rate."""
    from benchmarks.gpu_time import matmul_share, model_flops_per_token
    from toolkit.finetune import recipe as recipe_mod

    out = measure_memory(row, model_dir, runs)
    info = out.pop("_info")
    rec = recipe_mod.load(RECIPE, memory_overrides(row["method"], row["seq_len"], model_dir, row["batch"]), gpu=True)
    return matmul_share(out, model_flops_per_token(CATALOG_ID, rec, info), rate)


def _step_times(step_s: list[float], tokens_seen: list[int]) -> dict:
    """Median seconds and tokens of the steps after the first (which pays start-up)."""
    import statistics

    tokens = [b - a for a, b in zip([0, *tokens_seen], tokens_seen)]
    if len(step_s) < 2:
        return {}
    return {"step_s_median": round(statistics.median(step_s[1:]), 4), "step_s_first": round(step_s[0], 3),
            "tokens_per_step_median": statistics.median(tokens[1:]), "step_s_all": [round(x, 4) for x in step_s],
            "tokens_all": tokens, "tokens_per_s_after_first": round(sum(tokens[1:]) / sum(step_s[1:]), 1)}


def measure_run(row: dict, runs: Path) -> dict:
    """One `toolkit finetune` in a fresh process (Unsloth has to be imported before TRL/transformers)."""
    from benchmarks import finetune_process

    t0 = time.time()
    try:
        run = finetune_process.run(RECIPE, runs, row["overrides"], timeout_s=RUN_TIMEOUT_S)
    except RuntimeError as exc:
        return {**row, "error": [str(exc)]}
    info = json.loads((run / "run.json").read_text())
    keys = ("engine", "packing", "compute_dtype", "steps", "tokens_seen", "train_runtime_s", "tokens_per_s",
            "prep_s", "report_s", "wall_s", "report_error", "packed_attention_reason")
    logs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [round(r["loss"], 4) for r in logs if "loss" in r]
    rep = info.get("report") or {}
    # The run's phases: in-training evals (inside train_runtime_s) and the report's parts.
    phases = {"in_training_evals_s": [r["eval_runtime"] for r in logs if "eval_runtime" in r],
              "report_base_s": (rep.get("base") or {}).get("seconds"),
              "report_finetuned_s": (rep.get("finetuned") or {}).get("seconds"), "report_whole_s": rep.get("seconds")}
    return {**row, **{k: info.get(k) for k in keys}, "process_wall_s": round(time.time() - t0, 1),
            "losses_first_last": losses[:1] + losses[-1:], "phases": phases}


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
        print(f"would measure: {r['method']} seq {r['seq_len']} batch {r['batch']}, {r['steps']} steps: "
              f"torch.cuda.max_memory_allocated vs estimated allocated {r['estimated_allocated_bytes'] / 2**30:.2f} GiB")
    for r in planned["speed"]:
        print(f"would measure: {r['steps']} steps of the finance recipe with {r['engine']}: tokens/s")
    print("would measure: `toolkit finetune recipes/finance` end to end (GPU profile): wall time and phases")
    for r in planned["compute"]:
        print(f"would measure (compute): {r['method']} seq {r['seq_len']} batch {r['batch']}, {r['steps']} steps: "
              "median step time as a share of the calibrated bf16 matmul rate")
    for r in planned["decode"]:
        print(f"would measure (decode): {r['model']}: seconds per decoding step")
    for r in planned["fp16"]:
        print(f"would measure (fp16): {r['steps']} steps of the finance recipe, {r['method']} in float16: tokens/s, loss")
    print(f"would write: {OUT.relative_to(ROOT)} (dry run: nothing written)")
    return {"parameters": n_params, **planned}


def _recorded(measure, row: dict, *args) -> dict:
    """`measure(row, *args)`, or the row with the error that stopped it: one case failing must not
    cost the others' measurements (a borrowed GPU's time is short)."""
    import traceback

    try:
        return measure(row, *args)
    except Exception as exc:  # noqa: BLE001 - recorded in the results, with where it happened
        return {**row, "error": [f"{type(exc).__name__}: {exc}", *traceback.format_exc().strip().splitlines()[-6:]]}


def parse_parts(text: str) -> tuple[str, ...]:
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"--parts takes a comma-separated subset of {','.join(PARTS)}; got {text!r}")
    return parts


def _write(out: Path, results: dict) -> None:
    tmp_out = out.with_name(out.name + ".tmp")
    tmp_out.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp_out, out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="plan and print the runs; needs no GPU, writes nothing")
    ap.add_argument("--out", type=Path, default=OUT, help=f"results file (default {OUT.relative_to(ROOT)})")
    ap.add_argument("--parts", type=parse_parts, default=DEFAULT_PARTS,
                    help=f"which parts, in order, of {','.join(PARTS)} (default {','.join(DEFAULT_PARTS)})")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the model, runs and logs in this folder (default: a temporary one, deleted)")
    args = ap.parse_args(argv)
    if args.dry_run:
        dry_run()
        return 0
    import torch

    from benchmarks import gpu_time

    if not torch.cuda.is_available():
        print("error: gpu-check needs a CUDA GPU (use --dry-run to see the plan)", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is local
    results = {"taken": environment(), **{part: [] for part in args.parts}}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        if args.work is not None:
            tmp = args.work
            Path(tmp).mkdir(parents=True, exist_ok=True)
        model_dir = build_model_dir(Path(tmp) / "llama32-1b-random")
        planned = plan(str(model_dir))
        rate = gpu_time.calibrated_flops() if "compute" in args.parts else None
        for part in args.parts:
            for row in planned[part]:
                if part == "memory":
                    results[part].append(_recorded(measure_memory, row, str(model_dir), Path(tmp) / "runs"))
                    results[part][-1].pop("_info", None)
                elif part == "compute":
                    results[part].append(_recorded(measure_compute, row, str(model_dir), Path(tmp) / "runs", rate))
                elif part == "decode":
                    results[part].append(_recorded(gpu_time.measure_decode, row, str(model_dir)))
                else:
                    results[part].append(measure_run(row, Path(tmp) / f"runs-{part}"))
                print(json.dumps({k: v for k, v in results[part][-1].items() if k != "estimate_components"}),
                      flush=True)
                _write(args.out, results)
            if part == "compute":
                results["compute_summary"] = gpu_time.summarize_compute(results[part], rate)
                print(json.dumps(results["compute_summary"]), flush=True)
                _write(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
