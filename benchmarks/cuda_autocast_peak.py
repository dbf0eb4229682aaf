"""Why QLoRA peaks lower than LoRA on CUDA, shown on a CPU (2026-12-04; docs/estimate.md).

PEFT's 4-bit LoRA layer (peft/tuners/lora/bnb.py, Linear4bit.forward) casts its input to the fp32
adapter's dtype only when `torch.is_autocast_enabled()` is False; called without a device, that is
CUDA's autocast state. Under the trainer's bf16 autocast on CUDA the 4-bit layers therefore keep
their 16-bit inputs, shared between q/k/v and between gate/up, while plain LoRA's layer
(peft/tuners/lora/layer.py) always casts. A CPU run under CPU autocast casts in both; `--cuda-like`
makes `torch.is_autocast_enabled()` report CPU autocast so the CPU takes CUDA's branch.

Builds a Llama of Llama-3.2-1B's width (hidden 2048, MLP 8192, 32 x 64 query and 8 KV heads) with
LAYERS layers and a 2,000-token vocabulary (the LM head out of the way), gradient checkpointing as
the trainer sets it, LoRA r16 on all linears (QLoRA: nf4 with double quantization by bitsandbytes on
the CPU), and times one forward + backward under bf16 autocast at 512, 1024 and 2048 tokens. The peak
is the running sum of the allocations and frees the torch profiler records; prints it per method and
its slope in bytes per token.

    python -m benchmarks.cuda_autocast_peak [--cuda-like] [LAYERS]   (default 4; ~1 minute)
"""

from __future__ import annotations

import sys
import tempfile

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = (512, 1024, 2048)


def build(layers: int, method: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    from toolkit.finetune.base_model import keep_4bit_weights_trainable

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=2000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                      attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    if method == "qlora":
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            model = LlamaForCausalLM.from_pretrained(d, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16))
        keep_4bit_weights_trainable(model)  # the training path, not bitsandbytes' CPU inference kernel
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, target_modules=ALL_LINEAR, lora_dropout=0.0))
    model.train()
    return model


def peak_bytes(model, tokens: int) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, 2000, (1, tokens))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def main(argv=None) -> int:
    import torch

    args = sys.argv[1:] if argv is None else argv
    cuda_like = "--cuda-like" in args
    layers = int(next((a for a in args if a.isdigit()), "4"))
    if cuda_like:
        cpu_state = torch.is_autocast_enabled
        torch.is_autocast_enabled = lambda *a: cpu_state(*a) if a else cpu_state("cpu")
    for method in ("lora", "qlora"):
        model = build(layers, method)
        peaks = {t: peak_bytes(model, t) for t in TOKENS}
        slope = (peaks[TOKENS[-1]] - peaks[TOKENS[0]]) / (TOKENS[-1] - TOKENS[0])
        print(f"{method}{' (CUDA autocast branch)' if cuda_like else ''}: peak MiB "
              f"{', '.join(f'{t}: {p / 2**20:.1f}' for t, p in peaks.items())}; {slope:,.0f} bytes a token", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
