"""The CUDA time model's inputs, measured (parts "compute" and "decode" of `benchmarks.gpu_check`).

compute: the toolkit's trainer on the random-weight Llama-3.2-1B at micro-batches of 2048 x 4 and
    2048 x 16 tokens (LoRA) and 2048 x 16 (QLoRA), large enough that the GPU's work outlasts the
    host's (`timing.CUDA_STEP_SECONDS_PER_LAYER`). The model FLOPs of a step (the planner's formulas,
    over the run's own mean conversation length and labelled share) over its median time, as a
    share of the matmul rate calibrated in the same process: what `timing.TRAIN_EFFICIENCY["cuda"]`
    stands for. The slope between the two LoRA sizes gives the same share with the host's fixed
    time taken out.
decode: seconds per decoding step of the same model, where every step waits on the host (kernel
    launches, Python): the toolkit's own loop (`toolkit generate`, `toolkit chat`) in bf16, and
    transformers' `generate` as the report runs it (batches of 16 prompts) on the bf16 base and on
    the QLoRA model it reports on (4-bit base + unmerged LoRA). Random weights can end a reply at
    any token, so each run decodes a fixed number of steps with EOS switched off.
"""

from __future__ import annotations

import time

COMPUTE_CASES = [("lora", 2048, 4), ("lora", 2048, 16), ("qlora", 2048, 16)]
DECODE_STEPS = 128
DECODE_REPEATS = 3
PROMPT = [{"role": "user", "content": "Explain what a bond's yield to maturity is, and how it moves when rates rise."}]


def calibrated_flops(dtype: str = "bfloat16") -> float:
    """This GPU's matmul FLOP/s in `dtype`, measured now (toolkit.core.calibration, not its cache)."""
    from toolkit.core import calibration, capability

    return calibration.measure(capability.detect("cuda")).matmul_flops[dtype]


def model_flops_per_token(catalog_id: str, rec, info: dict) -> float:
    """The planner's training FLOPs per token for run `info` (run.json) of recipe `rec`: attention
    over the mean conversation (padding-free packing keeps conversations apart), the LM head over
    the labelled share (TRL scores only labelled positions on CUDA)."""
    from toolkit.estimate import catalog, timing
    from toolkit.finetune.plan import plan_inputs

    plan = plan_inputs(rec, "cuda", "bfloat16")  # the one recipe-to-estimator mapping
    context = info["train_tokens_per_epoch"] / max(1, info["train_examples"])
    return timing.train_flops_per_token(
        catalog.lookup(catalog_id), method=info["method"], seq_len=round(context), lora_r=plan.lora_r,
        targets=plan.targets, grad_ckpt=plan.grad_ckpt,
        labelled_fraction=info["trained_tokens_per_epoch"] / info["train_tokens_per_epoch"]).total


def matmul_share(row: dict, flops_per_token: float, rate: float) -> dict:
    """The row with its model FLOPs and the share of `rate` its steps after the first reached (a
    packed epoch can end in a shorter micro-batch, so tokens and seconds are summed, not medians)."""
    return {**row, "gflop_per_token": round(flops_per_token / 1e9, 3), "matmul_tflops": round(rate / 1e12, 1),
            "matmul_share": round(row["tokens_per_s_after_first"] * flops_per_token / rate, 3)}


def slope_share(rows: list[dict], rate: float) -> dict | None:
    """A least-squares line through the (tokens, seconds) of every step after the first of `rows`
    (one method, several sizes): its slope is the GPU's time per token, so the host's fixed time
    per step (its intercept) drops out. None when the line does not rise (host-bound throughout)."""
    pts = [(n, t) for r in rows for n, t in zip(r["tokens_all"][1:], r["step_s_all"][1:])]
    if len({n for n, _ in pts}) < 2:
        return None
    mn, mt = sum(n for n, _ in pts) / len(pts), sum(t for _, t in pts) / len(pts)
    slope = sum((n - mn) * (t - mt) for n, t in pts) / sum((n - mn) ** 2 for n, _ in pts)
    if slope <= 0:
        return None
    return {"seconds_per_1k_tokens": round(1e3 * slope, 5), "intercept_s": round(mt - slope * mn, 4),
            "share": round(rows[0]["gflop_per_token"] * 1e9 / slope / rate, 3), "steps": len(pts)}


def _timed(fn, repeats: int = DECODE_REPEATS) -> list[float]:
    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    fn()  # warm-up: kernels, caches, the allocator
    out = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def _hf_generate(model, tok, batch: int):
    """transformers' greedy `generate` as the report calls it, `batch` copies of PROMPT, DECODE_STEPS
    new tokens each (EOS off); returns a callable."""
    import torch

    text = tok.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    tok.padding_side = "left"
    enc = tok([text] * batch, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)

    def run():
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=DECODE_STEPS, min_new_tokens=DECODE_STEPS, do_sample=False,
                           temperature=None, top_p=None, top_k=None, pad_token_id=tok.pad_token_id or 0)
    return run


def _ours(model, tok):
    """The toolkit's own greedy loop (toolkit.decoding) on the transformers backend, DECODE_STEPS
    tokens (EOS off)."""
    from toolkit.decoding import generate
    from toolkit.decoding.backends.hf import HFBackend
    from toolkit.decoding.config import DecodingConfig

    backend = HFBackend(model, tok)
    backend.eos_ids = frozenset()  # random weights: a fixed number of steps
    ids = backend.chat_ids(PROMPT)
    cfg = DecodingConfig(max_new_tokens=DECODE_STEPS)
    return lambda: generate(backend, ids, cfg)


def _step_row(name: str, seconds: list[float], rows: int) -> dict:
    best = min(seconds)
    return {"decoder": name, "rows": rows, "new_tokens_per_row": DECODE_STEPS, "runs_s": [round(s, 3) for s in seconds],
            "step_ms": round(1e3 * best / DECODE_STEPS, 3), "tokens_per_s": round(rows * DECODE_STEPS / best, 1)}


def measure_decode(row: dict, model_dir: str, device: str = "cuda") -> dict:
    """Decode step times for `row["model"]`: "bf16" (the base as `toolkit generate` loads it) or
    "nf4+lora" (the QLoRA model the report scores: 4-bit base, LoRA r16 on all linears, unmerged)."""
    import torch

    from toolkit.core.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(model_dir)
    if row["model"] == "bf16":
        model = load_causal_lm(model_dir, "bfloat16", device)
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        model = get_peft_model(load_causal_lm(model_dir, "bfloat16", device, quantization=quant),
                               LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.eval()
    layers = model.config.num_hidden_layers
    runs = []
    if row["model"] == "bf16":
        runs.append(_step_row("toolkit loop (toolkit generate)", _timed(_ours(model, tok)), 1))
    from toolkit.finetune.scoring import ANSWER_BATCH

    for batch in (1, ANSWER_BATCH):  # one stream, and the report's batches
        runs.append(_step_row(f"transformers generate, batch {batch}", _timed(_hf_generate(model, tok, batch)), batch))
    for r in runs:
        r["step_ms_per_layer"] = round(r["step_ms"] / layers, 4)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {**row, "layers": layers, "runs": runs}


def summarize_compute(rows: list[dict], rate: float) -> dict:
    """The shares of the compute part's rows, and each method's least-squares line."""
    ok = [r for r in rows if "matmul_share" in r]
    out = {"matmul_tflops": round(rate / 1e12, 1),
           "shares": {f"{r['method']} {r['seq_len']}x{r['batch']}": r["matmul_share"] for r in ok}}
    for method in sorted({r["method"] for r in ok}):
        out[f"{method}_line"] = slope_share([r for r in ok if r["method"] == method], rate)
    return out
