"""Where the finance report's greedy answers spend their time on a GPU (a device-session probe).

The report's answers took 20.2 s on the base side and 6.0 s on the fine-tuned side in the H200's
end-to-end run (2026-12-04 18:10 UTC), where the time model priced 384 decoding steps at 39.5 ms
(15.2 s, both sides). This loads the QLoRA model as the trainer does (`load_for_training`, LoRA
as initialised), asks the report's 24 held-out questions through `scoring.greedy_answers` (the
report's own call), adapter off then on, each twice (cold, warm), then the held-out loss pass
twice, and prints seconds, decoding steps (the longest answer of each batch) and seconds a step.

VARIANT `toolkit` (default) runs the calls as shipped; `torch` lets torch pick SDPA's kernel
(cuDNN's included), as the report did before `toolkit.core.sdpa_backends` applied to it.
Run at 18:14 UTC with torch's choice (the report as it then was): base 27.2 s cold (141.5 ms a
step), 7.2 s warm (37.7 ms); adapter on 11.4 / 12.3 s (59.6 / 64.1 ms); the loss pass 2.8 s cold,
1.0 s warm (benchmarks/gpu-results.json "report_answers").

    python -m benchmarks.gpu_report_answers MODEL_DIR OUT.json [DEVICE [VARIANT]]
        (DEVICE cuda; cpu to try it here)
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    import torch

    from benchmarks.gpu_check import RECIPE, e2e_overrides
    from toolkit.core import sdpa_backends
    from toolkit.finetune import data as data_mod
    from toolkit.finetune import recipe as recipe_mod
    from toolkit.finetune import report, scoring
    from toolkit.finetune.base_model import load_for_training

    args = list(argv or sys.argv[1:])
    model_dir, out, dev, variant = (args + ["cuda", "toolkit"][len(args) - 2:])[:4]
    if variant == "torch":
        sdpa_backends.for_device = lambda device, engine="": None  # this process only: torch's own choice
    elif variant != "toolkit":
        raise SystemExit(f"error: VARIANT is toolkit or torch, not {variant!r}")
    rec = recipe_mod.load(RECIPE, [*e2e_overrides(model_dir), "method.name=qlora"], gpu=dev == "cuda")
    model, tok, _ = load_for_training(model_dir, rec, dev, "bfloat16")
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    _, held = data_mod.read_splits(rec)
    split = data_mod.tokenize_split(tok, held, rec.data.max_seq_len, rec.data.overlong, True, "eval")
    questions = report._questions(split, rec.eval.generation_samples)
    prompts = [q["prompt"] for q in questions]
    n = rec.eval.max_new_tokens
    rows = [{"variant": variant, "use_cache": getattr(model.config, "use_cache", None),
             "generation_use_cache": getattr(getattr(model, "generation_config", None), "use_cache", None),
             "questions": len(prompts), "max_new_tokens": n}]
    print(json.dumps(rows[0]), flush=True)
    for side in ("base", "base", "adapter", "adapter"):
        lengths = []
        orig = model.generate

        def counted(*a, **kw):
            g = orig(*a, **kw)
            lengths.append(g.shape[1] - kw["input_ids"].shape[1])
            return g
        model.generate = counted
        sync()
        t0 = time.perf_counter()
        if side == "base":
            with model.disable_adapter():
                scoring.greedy_answers(model, tok, prompts, n, "bfloat16")
        else:
            scoring.greedy_answers(model, tok, prompts, n, "bfloat16")
        sync()
        s = time.perf_counter() - t0
        del model.generate
        row = {"side": side, "seconds": round(s, 2), "steps_per_batch": lengths,
               "ms_per_step": round(1e3 * s / max(1, sum(lengths)), 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    for _ in range(2):
        t1 = time.perf_counter()
        scoring.answer_loss(model, split.input_ids, split.labels, "bfloat16")
        rows.append({"answer_loss_s": round(time.perf_counter() - t1, 2)})
        print(json.dumps(rows[-1]), flush=True)
    Path(out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
