"""Measure one LoRA/QLoRA training step of the embedded model on CPU, the stack the toolkit runs
(transformers + PEFT + bitsandbytes), for comparison with `toolkit.estimate.planner` (device "cpu").

Run as a script, one configuration per process:
  MALLOC_MMAP_THRESHOLD_=65536 python -m benchmarks.estimate_cpu_peak qlora ckpt 512 2 [transformers|trl] [bf16|fp32]
The last argument is the compute dtype (bf16 by default; fp32 is what a CPU without native bf16, or a
GTX 10xx, trains in). The one before it is the loss: transformers' own (`model(ids, labels=ids).loss`, fp32 logits for
every token; the default; PEFT's own layers) or the toolkit trainer's (TRL's fused LM head, as SFTTrainer
installs it, with `toolkit.finetune.trl_compat.lean_lm_head_on_cpu`, and the trainer's fused LoRA layers,
norms and rotary under its autocast, as the trainer runs them on a CPU; every token labelled, rows not packed).
With glibc's mmap threshold fixed at 64 KiB every tensor buffer above it is its own mapping,
returned to the OS when freed, so the process RSS follows the live tensors and its high-water
mark (VmHWM, reset through /proc/self/clear_refs before the step) is the step's peak. Checked on
the loss alone: transformers' causal-LM loss peaks at 14.2 bytes x vocab per token, the 14 that
toolkit.estimate.formulas.logits_bytes counts. Prints one JSON line:
- base_bytes: parameters, buffers and bnb quant states before the first step;
- live_peak_bytes: base_bytes + (VmHWM - VmRSS before the step): the first step's peak,
  gradients and AdamW states included;
- rss_before / rss_peak: the whole process (python, libraries, tokenizer files...).
"""

from __future__ import annotations

import gc
import json
import sys
import warnings


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def measure(method: str, ckpt: bool, seq: int, batch: int, rank: int = 16, loss: str = "transformers",
            compute: str = "bf16") -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from toolkit.core.models import embedded_hf_dir

    src = str(embedded_hf_dir())
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[compute]
    if method == "qlora":
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=q, device_map={"": "cpu"},
                                                     dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if loss == "trl":  # before PEFT wraps it, as SFTTrainer does
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def resident() -> int:
        """Bytes of parameters, buffers and bnb quant states, each read once: a weight loaded in the
        file's own dtype (fp32 here) stays a view of the memory-mapped safetensors file, whose pages
        join the RSS only when first read, and the step would count them again as its own."""
        tensors = list(model.parameters()) + list(model.buffers())
        for mod in model.modules():
            qs = getattr(getattr(mod, "weight", None), "quant_state", None)
            if qs is not None:
                tensors += [qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code] if qs.nested else [])
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage() for t in tensors}
        for st in storages.values():
            torch.tensor([], dtype=torch.uint8).set_(st).sum()  # every page read
        return sum(st.nbytes() for st in storages.values())

    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    base = resident()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    rss_before = _status("VmRSS")
    if loss == "trl":
        # the trainer's CPU path: its head, its fused LoRA layers, norms and rotary, under autocast in bf16
        from toolkit.core import packed_linear
        from toolkit.finetune import cpu_lm_head
        from toolkit.finetune.fused_lora import fused_on_cpu
        from toolkit.finetune.fused_norm import fused_norms_on_cpu
        from toolkit.finetune.fused_rope import fused_rope_on_cpu
        from toolkit.finetune.plan import DTYPE_QUANT
        from toolkit.finetune.trl_compat import lean_lm_head_on_cpu

        # and its pre-packed frozen linears where this machine's calibration takes them (the LM head in fp32)
        name = {q: d for d, q in DTYPE_QUANT.items()}[compute]
        packed = packed_linear.for_device(model, "cpu", name, "train", skip=cpu_lm_head.unpacked_head(model, name))[0]
        with (packed, lean_lm_head_on_cpu("cpu"), fused_on_cpu(model, "cpu"), fused_norms_on_cpu(model, "cpu"),
              fused_rope_on_cpu(model, "cpu"), torch.autocast("cpu", dtype=dtype, enabled=compute == "bf16")):
            out = model(input_ids=ids, labels=ids, fused_lm_head=True)
            out.loss.backward()
    else:
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
    rss_peak = _status("VmHWM")
    peak = base + rss_peak - rss_before
    return {"method": method, "grad_ckpt": ckpt, "seq_len": seq, "batch": batch, "lora_r": rank, "loss": loss, "compute": compute,
            "base_bytes": base,
            "live_peak_bytes": peak, "rss_before": rss_before, "rss_peak": rss_peak}


if __name__ == "__main__":
    warnings.filterwarnings("ignore")
    m, c, s, b = sys.argv[1], sys.argv[2] == "ckpt", int(sys.argv[3]), int(sys.argv[4])
    print(json.dumps(measure(m, c, s, b, loss=sys.argv[5] if len(sys.argv) > 5 else "transformers",
                             compute=sys.argv[6] if len(sys.argv) > 6 else "bf16")))
