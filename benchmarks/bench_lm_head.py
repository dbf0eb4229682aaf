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

    from toolkit.core import hardware, packed_linear
    from toolkit.finetune.cpu_lm_head import log_probs_function

    hardware.apply_threads("cpu")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).requires_grad_(True)
    weight = torch.randn(V, H, generator=g) * 0.02
    targets = torch.randint(0, V, (N,), generator=g)

    def step(fn, w=weight):
        def go():
            hidden.grad = None
            lp = fn.apply(hidden, w, None, targets, 1.0, 32768, None, 1.0, OUTPUTS)[0]
            (-lp.sum()).backward()
        return go

    def floor():
        with torch.no_grad():
            (hidden @ weight.t()) @ weight

    trl_s, ours_s, mm_s = _best(step(ChunkedLogProbFunction)), _best(step(log_probs_function())), _best(floor)
    timed = [("TRL ChunkedLogProbFunction (CPU fallback)", trl_s, mm_s), ("toolkit cpu_lm_head.LogProbs", ours_s, mm_s),
             ("two matmuls (floor)", mm_s, mm_s)]
    if packed_linear.available():
        # As in training where the frozen linears run pre-packed: the LM head finds the weight's packs.
        head = torch.nn.Linear(H, V, bias=False).requires_grad_(False)
        head.weight.copy_(weight)
        with packed_linear.packed_linears(head, torch.float32):
            packs = packed_linear.packs_of(head.weight)
            back = packed_linear.input_grad_pack(packs, head.weight, N)

            def packed_floor():
                with torch.no_grad():
                    packed_linear.matmul(packed_linear.matmul(hidden.detach(), packs[0]), back)

            pfloor_s = _best(packed_floor)
            timed += [("toolkit cpu_lm_head.LogProbs, weight pre-packed", _best(step(log_probs_function(), head.weight)),
                       pfloor_s), ("two matmuls, weight pre-packed (floor)", pfloor_s, pfloor_s)]
    rows = [{"measure": "lm head fwd+bwd", "path": name, "seconds": round(sec, 3), "vs two matmuls": f"{sec / floor_s:.2f}x",
             "speedup vs TRL": f"{trl_s / sec:.2f}x" if name.startswith("toolkit") else ""}
            for name, sec, floor_s in timed]
    return {"title": "CPU LM head: labelled positions of one finance CPU step (460 x 576 -> 49,152, fp32)", "rows": rows,
            "notes": ("Forward and backward with the log-probabilities, entropy and top-1 SFTTrainer logs; best of 5. "
                      "'weight pre-packed': inside toolkit.core.packed_linear's block, as a training run whose "
                      "calibration chose oneDNN's packed matmuls uses it; its 'vs two matmuls' is against the "
                      "pre-packed floor.")}


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
