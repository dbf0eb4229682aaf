"""Fine-tune benchmark.

1. The finance recipe end to end on this machine (CPU profile on a machine without a GPU; the
   embedded model when Llama-3.2-1B can't be had): wall time including model preparation and
   the report, and the held-out answer-token loss of base vs fine-tuned.
   Targets: <= 600 s wall on the 2-core CPU; loss >= 25% lower than the base model's.
2. Training throughput, in one run: our path (TRL SFTTrainer, QLoRA nf4 with bf16 compute,
   padding-free packing) vs a naive HF Trainer + PEFT LoRA baseline (fp32, batches padded to the
   longest example), same model, same data, same number of optimizer steps and per-step batch
   of 8 conversations' worth of tokens. Tokens/s counts real (non-pad) tokens. Target: >= 1.5x.

    python -m benchmarks.run train          (or BENCH_TRAIN_SKIP_E2E=1 for part 2 only)
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "finance"
STEPS = int(os.environ.get("BENCH_TRAIN_STEPS", "8"))


def end_to_end(tmp: Path) -> dict:
    from toolkit.finetune.trainer import finetune

    t0 = time.time()
    run = finetune(RECIPE, runs_dir=tmp / "e2e")
    wall = time.time() - t0
    info = json.loads((run / "run.json").read_text())
    rep = json.loads((run / "report.json").read_text())
    b, f = rep["base"], rep["finetuned"]
    return {
        "measure": "finance recipe end to end", "base_model": info["base_model"], "profile": info["profile"] or "-",
        "steps": info["steps"], "wall_s": round(wall, 1), "train_s": info["train_runtime_s"],
        "tokens_per_s": info["tokens_per_s"], "base_answer_loss": b["answer_loss"],
        "finetuned_answer_loss": f["answer_loss"],
        "loss_reduction_pct": round(100 * rep["improvement"]["answer_loss_reduction"], 1),
        "gen_score_base": b["generation_score"], "gen_score_finetuned": f["generation_score"],
        "general_ppl_base": b["general_ppl"], "general_ppl_finetuned": f["general_ppl"],
        "targets": "wall <= 600 s; reduction >= 25%",
        "met": wall <= 600 and rep["improvement"]["answer_loss_reduction"] >= 0.25,
    }


def ours(tmp: Path) -> dict:
    from toolkit.finetune.trainer import finetune

    run = finetune(RECIPE, [f"training.max_steps={STEPS}", "eval.report=false", "data.eval=", "training.save_steps=0",
                            "training.logging_steps=1"], runs_dir=tmp / "ours", gpu=False)
    info = json.loads((run / "run.json").read_text())
    return {"path": "ours: SFTTrainer + QLoRA nf4 bf16 + padding-free packing", "steps": info["steps"],
            "real_tokens": info["tokens_seen"], "train_s": info["train_runtime_s"],
            "tokens_per_s": info["tokens_per_s"]}


def naive(tmp: Path) -> dict:
    """The baseline people write first: Trainer + PEFT, fp32, pad to the longest in each batch."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainingArguments, set_seed)

    from toolkit.finetune import data, recipe
    from toolkit.core.models import embedded_hf_dir

    rec = recipe.load(RECIPE, gpu=False)
    src = str(embedded_hf_dir())
    tok = AutoTokenizer.from_pretrained(src)
    split = data.tokenize_split(tok, data.read_examples(rec.data_path(rec.data.train)), rec.data.max_seq_len)
    ds = data.to_dataset(split).map(lambda ex: {"attention_mask": [1] * len(ex["input_ids"])})
    set_seed(rec.training.seed)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=rec.lora.r, lora_alpha=rec.lora.alpha, lora_dropout=rec.lora.dropout,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=str(tmp / "naive"), per_device_train_batch_size=8, max_steps=STEPS,
                             learning_rate=rec.training.learning_rate, logging_steps=1, save_strategy="no",
                             report_to="none", use_cpu=True, include_num_input_tokens_seen="non_padding",
                             disable_tqdm=True, seed=rec.training.seed)
    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      data_collator=DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=-100))
    res = trainer.train()
    secs = res.metrics["train_runtime"]
    toks = trainer.state.num_input_tokens_seen
    return {"path": "naive: Trainer + PEFT LoRA fp32, padded batches of 8", "steps": trainer.state.global_step,
            "real_tokens": toks, "train_s": round(secs, 1), "tokens_per_s": round(toks / secs, 1)}


def run() -> dict:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-train-") as d:
        tmp = Path(d)
        if not os.environ.get("BENCH_TRAIN_SKIP_E2E"):
            rows.append(end_to_end(tmp))
        a, b = ours(tmp), naive(tmp)
        speedup = round(a["tokens_per_s"] / b["tokens_per_s"], 2)
        rows += [dict(a, measure="training throughput"), dict(b, measure="training throughput",
                                                              speedup=f"{speedup}x (target >= 1.5x)")]
    return {"title": "Fine-tuning: finance recipe end to end, and training tokens/s vs a naive baseline",
            "rows": rows,
            "notes": "CPU timings on a shared 2-core machine are noisy; the throughput ratio is measured within one run."}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
