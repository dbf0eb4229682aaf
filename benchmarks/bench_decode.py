"""Decoding speed: our loop vs the libraries' own generation, on the embedded model.

1. transformers backend + our search loop vs `model.generate` at the same settings (goal >= 1.0x);
2. llama.cpp backend + our loop vs llama-cpp-python's `create_completion`, same f16 GGUF (>= 0.9x);
3. llama.cpp backend vs transformers backend (ratio);
4. a chat's next turn: the prompt's prefix kept in the KV cache from the last turn vs prefilled whole;
5. a run folder (LoRA adapter): merged into the base as the backend loads it vs a PeftModel.

tokens/s = new tokens / wall time of the whole call (prefill included), best of several runs
after one warm-up, ours and the reference alternating. Greedy outputs are identical on both sides, so token counts match.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

PROMPT = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
NEW_TOKENS = 48
REPEATS = 3  # transformers runs; llama.cpp runs are cheap and get LLAMA_REPEATS
LLAMA_REPEATS = 7


def _rates(ours, theirs, repeats: int = REPEATS) -> tuple[float, int, float, int]:
    """Best tokens/s of two callables (each returns its new-token count) over `repeats` runs,
    run alternately. Best-of (as timeit does), because on a shared machine other processes
    only ever slow a run down: the fastest run is the closest to the code's own speed."""
    ours(), theirs()  # warm-up
    a, b = [], []
    for _ in range(repeats):
        for fn, runs in ((ours, a), (theirs, b)):
            t0 = time.perf_counter()
            n = fn()
            runs.append((n / (time.perf_counter() - t0), n))
    ra, rb = max(r for r, _ in a), max(r for r, _ in b)
    print(f"  {ra:.1f} vs {rb:.1f} tok/s ({a[-1][1]} / {b[-1][1]} tokens)", file=sys.stderr, flush=True)
    return ra, a[-1][1], rb, b[-1][1]


HISTORY = [  # a chat some turns in: the next turn's prompt repeats all of it
    {"role": "user", "content": "I have $5,000 in savings. Should I pay off my credit card first or invest?"},
    {"role": "assistant", "content": "Pay off the card first in most cases. A card charging 22% a year costs you "
     "more than a broad index fund is likely to earn, and paying it down is a guaranteed return. Keep a small "
     "emergency fund, say one month of expenses, so a surprise bill does not go back on the card. Once the "
     "balance is gone, invest what you were paying each month."},
    {"role": "user", "content": "The card is at 19.9% and the balance is $3,200. How long at $400 a month?"},
    {"role": "assistant", "content": "At 19.9% the monthly rate is about 1.66%. The first month's interest is "
     "about $53, so $347 goes to the balance. Repeating that, the balance is paid off in 9 months, with about "
     "$250 of interest in all. Paying $500 a month instead cuts it to 7 months and about $200 of interest."},
    {"role": "user", "content": "And if I invest the remaining $1,800 at 7% a year for ten years?"},
]


def _next_turn(backend, name: str) -> dict:
    """The next turn of a chat: after the last turn's answer, the new prompt's prefill with the
    conversation's KV kept (`toolkit.decoding.backends.reusable_prefix`) vs prefilled whole, best
    of REPEATS alternating; rates are the new prompt's tokens over the prefill's time."""
    from toolkit.decoding import DecodingConfig, generate

    turn1 = backend.chat_ids(HISTORY)
    reply = backend.decode(generate(backend, turn1, DecodingConfig(max_new_tokens=NEW_TOKENS)).tokens)
    turn2 = backend.chat_ids(HISTORY + [{"role": "assistant", "content": reply},
                                        {"role": "user", "content": "Is that before or after taxes?"}])
    kept, whole = [], []
    for i in range(REPEATS + 1):  # the first round warms up
        backend.reset()
        backend.prefill(turn1 + backend.encode(reply))  # the cache as the last turn's answer left it
        t0 = time.perf_counter()
        backend.prefill(turn2)
        t1 = time.perf_counter()
        backend.reset()
        backend.prefill(turn2)
        t2 = time.perf_counter()
        if i:
            kept.append(t1 - t0)
            whole.append(t2 - t1)
    a, b = len(turn2) / min(kept), len(turn2) / min(whole)
    print(f"  next turn ({name}): {min(kept) * 1e3:.1f} vs {min(whole) * 1e3:.1f} ms", file=sys.stderr, flush=True)
    return {"comparison": f"ours ({name}): chat's next turn, prompt prefix kept vs prefilled whole",
            "settings": f"prompt {len(turn2)} tokens, {len(turn1)} from before the reply",
            "new_tokens": "prefill", "ours_tok_s": round(a, 1), "reference_tok_s": round(b, 1), "ratio": round(a / b, 2)}


def _packed_vs_plain(hf, ids, cfg) -> dict:
    """Our greedy loop on the transformers backend with its linear layers pre-packed for oneDNN
    (toolkit.core.packed_linear) vs torch's matmul: best of REPEATS each, alternating."""
    import torch

    from toolkit.core import packed_linear
    from toolkit.decoding import generate

    hf.close()  # unpacked, whatever from_spec chose; packed again per run below
    packed, plain, tokens = [], [], set()
    for i in range(REPEATS + 1):  # the first round warms up
        for runs, block in ((plain, None), (packed, packed_linear.packed_linears(hf.model, torch.float32))):
            with block or contextlib.nullcontext():
                hf.reset()  # the other side's KV must not be kept
                t0 = time.perf_counter()
                out = generate(hf, ids, cfg)
                if i:
                    runs.append(out.new_tokens / (time.perf_counter() - t0))
                tokens.add(tuple(out.tokens))
    assert len(tokens) == 1, "pre-packed greedy tokens differ from torch's"
    a, b = max(packed), max(plain)
    print(f"  pre-packed {a:.1f} vs {b:.1f} tok/s", file=sys.stderr, flush=True)
    return {"comparison": "transformers backend: linear layers pre-packed vs torch's matmul", "settings": "greedy",
            "new_tokens": f"{len(next(iter(tokens)))} / {len(next(iter(tokens)))}", "ours_tok_s": round(a, 1),
            "reference_tok_s": round(b, 1), "ratio": round(a / b, 2)}


def _run_folder(tmp, hf_dir) -> str:
    """A run folder as the finance CPU recipe leaves it: an r-16 all-linear LoRA adapter on the embedded
    model (random B, so the adapter changes the answers) with run.json naming its base."""
    import json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    peft = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    for name, p in peft.named_parameters():
        if "lora_B" in name:
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    run = tmp / "run"
    peft.save_pretrained(run / "adapter")
    AutoTokenizer.from_pretrained(hf_dir).save_pretrained(run / "adapter")
    (run / "run.json").write_text(json.dumps({"recipe": "bench", "base_model": "embedded", "base_source": str(hf_dir),
                                              "method": "lora"}))
    return str(run)


def _merged_vs_unmerged(run: str, cfg) -> dict:
    """A run folder through the transformers backend as the toolkit opens it (the adapter merged into
    the base) vs the same run as a PeftModel (the adapter's products at every layer), both packed as
    this CPU's calibration says: best of REPEATS each, alternating."""
    from toolkit.core.loading import load_model
    from toolkit.decoding import generate
    from toolkit.decoding.backends.hf import HFBackend

    merged = HFBackend.from_spec(run, device="cpu")
    model, tok = load_model(run, "cpu", "float32")
    unmerged = HFBackend(model, tok)
    unmerged.pack("float32")
    ids = merged.chat_ids(PROMPT)
    tokens = set()

    def run_on(b):
        b.reset()
        out = generate(b, ids, cfg)
        tokens.add(tuple(out.tokens))
        return out.new_tokens

    try:
        a, n_a, b, n_b = _rates(lambda: run_on(merged), lambda: run_on(unmerged))
    finally:
        merged.close()
        unmerged.close()
    assert len(tokens) == 1, "the merged adapter's greedy tokens differ from the PeftModel's"
    print(f"  run folder merged {a:.1f} vs unmerged {b:.1f} tok/s", file=sys.stderr, flush=True)
    return {"comparison": "run folder (r16 all-linear LoRA): adapter merged (as loaded) vs a PeftModel",
            "settings": "greedy", "new_tokens": f"{n_a} / {n_b}", "ours_tok_s": round(a, 1),
            "reference_tok_s": round(b, 1), "ratio": round(a / b, 2)}


def host_probe_ratio(rounds: int = 3) -> list[float]:
    """The transformers backend's host work a layer over the calibration's probe
    (`probes.host_layer_seconds`), `rounds` times, alternating: the backend's own one-row step on a
    random-weight Llama of the probe's shapes (its products and reads next to nothing), pre-packed as
    the backend packs a model, 8 layers against 2 so that the step's own cost drops out. The time
    model takes timing.CPU_DECODE_HOST_OVER_PROBE x the probe: this checks that ratio here."""
    import statistics

    import torch

    from toolkit.core import probes
    from toolkit.core.reference_models import llama32_config, random_llama32
    from toolkit.decoding.backends.hf import HFBackend

    hidden, heads, kv_heads, d = probes.HOST_LAYER

    class Tokenizer:  # the steps take ids; nothing is encoded or decoded
        eos_token_id = 1

    def backend(layers):
        torch.manual_seed(0)
        model = random_llama32(llama32_config(
            vocab_size=256, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=d,
            bos_token_id=0, eos_token_id=1, pad_token_id=0)).eval()
        b = HFBackend(model, Tokenizer())
        b.pack("float32")
        return b

    def step_seconds(b):
        b.reset()
        b.prefill(list(range(2, 50)))
        times = []
        for _ in range(16):
            t = time.perf_counter()
            b.step([5])
            times.append(time.perf_counter() - t)
        return statistics.median(times[2:])

    eight, two = backend(8), backend(2)
    try:
        return [(step_seconds(eight) - step_seconds(two)) / 6 / probes.host_layer_seconds(torch) for _ in range(rounds)]
    finally:
        eight.close(), two.close()


def _time_model(measured: float, new_tokens: int, prompt_tokens: int) -> list[dict]:
    """The time model's rate for the transformers backend's greedy call (`toolkit estimate --model
    embedded --task inference`, its prefill and decoding, at a calibration measured right now: a shared
    host's speed moves) against the measured `measured`; and the host-work ratio the model assumes
    against this machine's (`host_probe_ratio`)."""
    from toolkit.core import calibration
    from toolkit.estimate.catalog import lookup
    from toolkit.estimate.planner import estimate
    from toolkit.estimate.timeplan import rates_here, time_fields
    from toolkit.estimate.timing import CPU_DECODE_HOST_OVER_PROBE

    cal = calibration.load(refresh=True)
    m = lookup("embedded")
    est = estimate(m, "inference", "fp32", seq_len=prompt_tokens + new_tokens, device="cpu")
    t = time_fields(m, est, rates_here("float32", "infer"), targets=(), prompt_tokens=prompt_tokens)
    predicted = new_tokens / (t["prefill_s"] + new_tokens / t["decode_tokens_per_s"])
    ratios = host_probe_ratio()
    print(f"  time model {predicted:.1f} tok/s (host {cal.host_layer_s * 1e3:.2f} ms a layer probed); "
          f"host over probe {' / '.join(f'{r:.2f}' for r in ratios)}", file=sys.stderr, flush=True)
    return [{"comparison": "ours (transformers) vs the time model (toolkit estimate, calibrated now)",
             "settings": "greedy", "new_tokens": new_tokens, "ours_tok_s": round(measured, 1),
             "reference_tok_s": round(predicted, 1), "ratio": round(measured / predicted, 2)},
            {"comparison": (f"transformers backend's host work a layer over the calibration's probe "
                            f"({cal.host_layer_s * 1e3:.2f} ms); the time model takes {CPU_DECODE_HOST_OVER_PROBE:.2f}"),
             "settings": "random-weight Llama of the probe's shapes, 8 layers against 2, three rounds",
             "new_tokens": "", "ours_tok_s": "", "reference_tok_s": "",
             "ratio": " / ".join(f"{r:.2f}" for r in ratios)}]


def _f16_gguf(hf_dir) -> str:
    from toolkit.export.convert import hf_to_gguf
    from toolkit.core.models import cache_dir

    target = cache_dir() / "smollm2-135m-instruct-f16-v1.gguf"
    if not target.is_file():
        hf_to_gguf(hf_dir, target, outtype="f16")
    return str(target)


def run() -> dict:
    import llama_cpp
    import torch

    from toolkit.decoding.backends.hf import HFBackend
    from toolkit.decoding.backends.llamacpp import LlamaCppBackend
    from toolkit.decoding import DecodingConfig, generate
    from toolkit.core.models import embedded_hf_dir

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    rows = []
    hf = HFBackend.from_spec("embedded", device="cpu")
    ids = hf.chat_ids(PROMPT)
    settings = {
        "greedy": (DecodingConfig(max_new_tokens=NEW_TOKENS), dict(do_sample=False)),
        "sample t=0.7 top-k 50 top-p 0.9": (
            DecodingConfig(strategy="sample", temperature=0.7, top_k=50, top_p=0.9, seed=0, max_new_tokens=NEW_TOKENS),
            dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9)),
        "beam 4": (DecodingConfig(strategy="beam", num_beams=4, max_new_tokens=NEW_TOKENS // 3),
                   dict(do_sample=False, num_beams=4)),
    }
    hf_rates = {}
    x = torch.tensor([ids])
    matmuls = hf.matmuls
    for name, (cfg, kw) in settings.items():
        def ref():
            torch.manual_seed(0)
            out = hf.model.generate(x, max_new_tokens=cfg.max_new_tokens, **kw)
            return out.shape[1] - len(ids)

        # reset(): no prompt-prefix reuse between runs, as model.generate has none
        ours, n_ours, theirs, n_theirs = _rates(lambda: (hf.reset(), generate(hf, ids, cfg))[1].new_tokens, ref)
        hf_rates[name] = ours
        rows.append({"comparison": "ours (transformers) vs model.generate", "settings": name,
                     "new_tokens": f"{n_ours} / {n_theirs}", "ours_tok_s": round(ours, 1),
                     "reference_tok_s": round(theirs, 1), "ratio": round(ours / theirs, 2)})
    rows.append(_next_turn(hf, "transformers"))
    rows.append(_packed_vs_plain(hf, ids, settings["greedy"][0]))
    rows += _time_model(hf_rates["greedy"], NEW_TOKENS, len(ids))
    hf.close()
    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        rows.append(_merged_vs_unmerged(_run_folder(Path(tmp), embedded_hf_dir()), settings["greedy"][0]))

    gguf = _f16_gguf(embedded_hf_dir())
    backend = LlamaCppBackend(gguf, n_ctx=1024, n_threads=threads)
    llm = llama_cpp.Llama(gguf, n_ctx=1024, n_threads=threads, verbose=False)
    try:
        for name, (cfg, _) in settings.items():
            def mine():
                backend.reset()
                return generate(backend, ids, cfg).new_tokens

            if name == "greedy":
                def ref():
                    out = llm.create_completion(ids, max_tokens=NEW_TOKENS, temperature=0.0, top_k=1, repeat_penalty=1.0)
                    return out["usage"]["completion_tokens"]
            elif name.startswith("sample"):
                def ref():
                    out = llm.create_completion(ids, max_tokens=NEW_TOKENS, temperature=0.7, top_k=50, top_p=0.9,
                                                min_p=0.0, repeat_penalty=1.0, seed=0)
                    return out["usage"]["completion_tokens"]
            else:
                ref = None  # llama.cpp has no beam search of its own
            if ref is None:
                ours, n_ours, _, _ = _rates(mine, lambda: 0, LLAMA_REPEATS)
            else:
                # llm.reset(): no prompt-prefix reuse between runs, both sides prefill every time
                ours, n_ours, theirs, n_theirs = _rates(mine, lambda: (llm.reset(), ref())[1], LLAMA_REPEATS)
                rows.append({"comparison": "ours (llama.cpp) vs create_completion", "settings": name,
                             "new_tokens": f"{n_ours} / {n_theirs}", "ours_tok_s": round(ours, 1),
                             "reference_tok_s": round(theirs, 1), "ratio": round(ours / theirs, 2)})
            rows.append({"comparison": "ours: llama.cpp vs transformers backend", "settings": name,
                         "new_tokens": n_ours, "ours_tok_s": round(ours, 1),
                         "reference_tok_s": round(hf_rates[name], 1), "ratio": round(ours / hf_rates[name], 2)})
        rows.append(_next_turn(backend, "llama.cpp"))
    finally:
        backend.close()
        llm.close()
    return {
        "title": "Decoding speed (embedded SmolLM2-135M, CPU)",
        "rows": rows,
        "notes": (f"Best of {REPEATS} (transformers) / {LLAMA_REPEATS} (llama.cpp) runs after a warm-up, ours and the "
                  f"reference alternating; prompt of {len(ids)} tokens, up to {NEW_TOKENS} new "
                  f"({NEW_TOKENS // 3} for beam), {threads} threads for torch and llama.cpp, fp32 transformers, f16 "
                  "GGUF. Greedy outputs are token-identical on all four paths; sampled lengths can differ "
                  "(different random streams). llama.cpp has no beam search: only our loop runs it there. "
                  f"The transformers backend as the toolkit opens it on this CPU ({matmuls}), model.generate "
                  "on the same model; the pre-packed row: our greedy loop with the linear layers packed for "
                  "oneDNN against torch's matmul, alternating, packing outside the timing; the run-folder row: a LoRA "
                  "run of the embedded model as the backend loads it (merged) against the same adapter as a PeftModel. "
                  "Every run above prefills "
                  "its whole prompt (no prefix kept between runs); the next-turn rows time the prefill alone, in "
                  "prompt tokens per second: the cache holds the last turn's prompt and answer, and the new "
                  "prompt repeats them (the answer re-tokenized from its text, as the chat sends it)."),
    }


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
