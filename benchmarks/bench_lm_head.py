"""CPU LM head: TRL's chunked log-prob kernel vs toolkit.finetune.cpu_lm_head, forward + backward.

The finance recipe's CPU step shape: ~460 labelled positions, SmolLM2's hidden size 576 and vocabulary
49,152, fp32, the outputs SFTTrainer asks for (log-probabilities, entropy, top-1). The floor is the two
matmuls any implementation needs (logits, and the gradient of the hidden states). Best of 5 after a warm-up.

    python -m benchmarks.run lm_head
"""

from __future__ import annotations

import time

N, H, V = 460, 576, 49152
OUTPUTS = ("log_probs", "entropy", "is_top1")


def _best(fn, repeats: int = 5) -> float:
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

    from toolkit.core import hardware
    from toolkit.finetune.cpu_lm_head import log_probs_function

    hardware.apply_threads("cpu")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).requires_grad_(True)
    weight = torch.randn(V, H, generator=g) * 0.02
    targets = torch.randint(0, V, (N,), generator=g)

    def step(fn):
        def go():
            hidden.grad = None
            lp = fn.apply(hidden, weight, None, targets, 1.0, 32768, None, 1.0, OUTPUTS)[0]
            (-lp.sum()).backward()
        return go

    def floor():
        with torch.no_grad():
            (hidden @ weight.t()) @ weight

    trl_s, ours_s, mm_s = _best(step(ChunkedLogProbFunction)), _best(step(log_probs_function())), _best(floor)
    rows = [{"measure": "lm head fwd+bwd", "path": name, "seconds": round(sec, 3), "vs two matmuls": f"{sec / mm_s:.2f}x"}
            for name, sec in (("TRL ChunkedLogProbFunction (CPU fallback)", trl_s), ("toolkit cpu_lm_head.LogProbs", ours_s),
                              ("two matmuls (floor)", mm_s))]
    rows[1]["speedup vs TRL"] = f"{trl_s / ours_s:.2f}x"
    return {"title": "CPU LM head: labelled positions of one finance CPU step (460 x 576 -> 49,152, fp32)", "rows": rows,
            "notes": "Forward and backward with the log-probabilities, entropy and top-1 SFTTrainer logs; best of 5."}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
