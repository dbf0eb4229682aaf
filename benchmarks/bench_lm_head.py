"""CPU LM head: TRL's chunked log-prob kernel vs toolkit.finetune.cpu_lm_head's heads, forward + backward.

The finance recipe's CPU step shape: ~460 labelled positions, SmolLM2's hidden size 576 and vocabulary
49,152, fp32, the outputs SFTTrainer asks for (log-probabilities, entropy, top-1). The floor is the two
matmuls any implementation needs (logits, and the gradient of the hidden states). Best of 5 after a warm-up.
Then Llama-3.2-1B's head (2048 -> 128,256) at 1,500 positions, past what the materialized head takes
(MAX_LOGITS_BYTES of logits: TRL's kernel ran there before the streamed head), best of 2.

    python -m benchmarks.run lm_head
"""

from __future__ import annotations

import time

N, H, V = 460, 576, 49152
LLAMA = (1500, 2048, 128256)  # Llama-3.2-1B's head at 1,500 labelled positions
OUTPUTS = ("log_probs", "entropy", "is_top1")


def _best(fn, repeats: int = 5) -> float:
    """The shortest of `repeats` calls after an untimed one."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run() -> dict:
    import torch
    from trl.kernels import ChunkedLogProbFunction

    from toolkit.core import capability, hardware, packed_linear
    from toolkit.finetune import cpu_lm_head

    hardware.apply_threads("cpu")
    g = torch.Generator().manual_seed(0)

    def shape(n, h, v):
        return (torch.randn(n, h, generator=g).requires_grad_(True), torch.randn(v, h, generator=g) * 0.02,
                torch.randint(0, v, (n,), generator=g))

    def step(fn, hidden, weight, targets):
        def go():
            hidden.grad = None
            # Under bf16 autocast where the inputs are bf16, as a bf16 training run calls the head
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=weight.dtype == torch.bfloat16):
                lp = fn.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, OUTPUTS)[0]
            (-lp.sum()).backward()
        return go

    def bf16(hidden, weight, targets):
        return hidden.detach().bfloat16().requires_grad_(True), weight.bfloat16(), targets

    def floor(hidden, weight):
        def go():
            with torch.no_grad():
                (hidden @ weight.t()) @ weight
        return go

    def rows(label, timed):
        trl_s = next(sec for name, sec, _ in timed if name.startswith("TRL"))
        return [{"measure": "lm head fwd+bwd", "shape": label, "path": name, "seconds": round(sec, 3),
                 "vs two matmuls": f"{sec / floor_s:.2f}x",
                 "speedup vs TRL": f"{trl_s / sec:.2f}x" if name.startswith("toolkit") else ""}
                for name, sec, floor_s in timed]

    hidden, weight, targets = shape(N, H, V)
    args = (hidden, weight, targets)
    mm_s = _best(floor(hidden, weight))
    timed = [("TRL ChunkedLogProbFunction (CPU fallback)", _best(step(ChunkedLogProbFunction, *args)), mm_s),
             ("toolkit cpu_lm_head, materialized (LogProbs)", _best(step(cpu_lm_head.materialized_function(), *args)),
              mm_s),
             ("toolkit cpu_lm_head, streamed (StreamedLogProbs)", _best(step(cpu_lm_head.streamed_function(), *args)),
              mm_s),
             ("two matmuls (floor)", mm_s, mm_s)]
    if packed_linear.available():
        # As in training where the frozen linears run pre-packed: the LM head finds the weight's packs
        # (`cpu_lm_head.head_for` then takes the materialized head).
        head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
        head.weight.copy_(weight)
        with packed_linear.packed_linears(head, torch.float32):
            packs = packed_linear.packs_of(head.weight)
            back = packed_linear.input_grad_pack(packs, head.weight, N)

            def packed_floor():
                with torch.no_grad():
                    packed_linear.matmul(packed_linear.matmul(hidden.detach(), packs[0]), back)

            pfloor_s = _best(packed_floor)
            timed += [("toolkit cpu_lm_head, materialized, weight pre-packed",
                       _best(step(cpu_lm_head.materialized_function(), hidden, head.weight, targets)), pfloor_s),
                      ("two matmuls, weight pre-packed (floor)", pfloor_s, pfloor_s)]
    out = rows(f"{N} x {H} -> {V:,}", timed)

    n, h, v = LLAMA
    hidden, weight, targets = shape(n, h, v)
    args = (hidden, weight, targets)
    assert not cpu_lm_head.fits(n, v, None, None, OUTPUTS) and cpu_lm_head.fits(n, v, None, None, OUTPUTS, True)
    mm_s = _best(floor(hidden, weight), 2)
    out += rows(f"{n:,} x {h} -> {v:,}", [
        ("TRL ChunkedLogProbFunction (CPU fallback)", _best(step(ChunkedLogProbFunction, *args), 2), mm_s),
        ("toolkit cpu_lm_head, streamed (StreamedLogProbs)", _best(step(cpu_lm_head.streamed_function(), *args), 2),
         mm_s),
        ("two matmuls (floor)", mm_s, mm_s)])
    if capability.detect("cpu").native_bf16:
        # bf16, as the toolkit trains on such a CPU: the materialized head where its logits fit (the
        # recipe's shape), the streamed one past that (cpu_lm_head.streams)
        for (n, h, v), repeats in (((N, H, V), 5), (LLAMA, 2)):
            args = bf16(*shape(n, h, v))
            mm_s = _best(floor(*args[:2]), repeats)
            heads = [("TRL ChunkedLogProbFunction (CPU fallback)", ChunkedLogProbFunction)]
            if cpu_lm_head.fits(n, v, None, None, OUTPUTS):
                heads.append(("toolkit cpu_lm_head, materialized (LogProbs)", cpu_lm_head.materialized_function()))
            heads.append(("toolkit cpu_lm_head, streamed (StreamedLogProbs)", cpu_lm_head.streamed_function()))
            out += rows(f"{n:,} x {h} -> {v:,}, bf16", [(name, _best(step(fn, *args), repeats), mm_s)
                                                         for name, fn in heads] + [("two matmuls (floor)", mm_s, mm_s)])
    return {"title": f"CPU LM head: labelled positions of one finance CPU step ({N} x {H} -> {V:,}, fp32), and "
                     f"Llama-3.2-1B's head past the materialized head's limit; both in bf16 on a CPU with native bf16",
            "rows": out,
            "notes": ("Forward and backward with the log-probabilities, entropy and top-1 SFTTrainer logs; best of 5 "
                      "(Llama-3.2-1B's shape: best of 2). 'materialized' writes the logits once and turns them "
                      "into their gradient in place; 'streamed' takes the vocabulary in cache-sized blocks and "
                      "keeps nothing vocabulary-sized (what training uses in fp32 with the weight not pre-packed: "
                      "cpu_lm_head.head_for). 'weight pre-packed': inside toolkit.core.packed_linear's block, as a "
                      "training run whose calibration chose oneDNN's packed matmuls uses it; its 'vs two matmuls' "
                      "is against the pre-packed floor. Llama-3.2-1B's head at 1,500 positions is 770 MB of fp32 "
                      "logits, past the materialized head's 512 MB: there TRL's kernel ran before. The bf16 rows "
                      "(a CPU with native bf16 only) run the head under bf16 autocast on a bf16 weight and hidden "
                      "states, as bf16 training does; training takes the materialized head where its logits fit "
                      "and the streamed one past that.")}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
