"""Estimate memory: pick a model for your GPU/RAM, or break down one model's needs.

Without --model: detects the GPU (nvidia-smi) or, on CPU, the available RAM — or takes
--vram SIZE / --gpu NAME — and prints every catalog model x quant for the task with its
estimate and headroom, then the pick: the largest model that fits with a 10% safety margin.

With --model (catalog id, `embedded`, an HF folder, a .gguf file or a run folder): prints the breakdown
(weights, KV cache, activations, logits, gradients, optimizer, LoRA adapter, overhead).

Examples:
  toolkit estimate --gpu "RTX 3060 12GB"
  toolkit estimate --vram 8GB --task inference
  toolkit estimate --model meta-llama/Llama-3.2-1B-Instruct --task qlora --seq-len 1024 --json
  toolkit estimate --model path/to/model.gguf --task inference --seq-len 4096
"""

from __future__ import annotations

import json

from toolkit.core.errors import UserError
from toolkit.core.units import gib

_TASKS = ("inference", "lora", "qlora", "full")


def add_arguments(p) -> None:
    # Values are validated in run() so that every mistake is one `error:` line with exit 2.
    p.add_argument("--model", help="catalog id (org optional), `embedded`, HF folder or .gguf file")
    p.add_argument("--task", default="qlora", help=f"one of {', '.join(_TASKS)} (default qlora)")
    p.add_argument("--quant", help="fp32/bf16/fp16, int8/nf4/nf4-dq (bitsandbytes), or a GGUF type "
                   "(f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, ...: llama.cpp inference)")
    p.add_argument("--seq-len", default="512", help="tokens per sequence / context length (default 512)")
    p.add_argument("--batch", default="1", help="sequences per step (default 1)")
    p.add_argument("--lora-r", default="16", help="LoRA rank (default 16; all linear layers are targeted)")
    ck = p.add_mutually_exclusive_group()
    ck.add_argument("--grad-ckpt", dest="grad_ckpt", action="store_true", default=True,
                    help="gradient checkpointing on (default)")
    ck.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false", help="gradient checkpointing off")
    p.add_argument("--optimizer", default="adamw", help="adamw (default), adamw-8bit, paged-adamw, paged-adamw-8bit")
    p.add_argument("--vram", help="memory budget, e.g. 8GB, 7.5GiB, 7680MiB (GB = GiB)")
    p.add_argument("--gpu", help='budget from a GPU name, e.g. "RTX 3060 12GB" (see --list-gpus)')
    p.add_argument("--list-gpus", action="store_true", help="print the known GPUs and exit")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args) -> int:
    from toolkit.estimate import budget as B
    if args.list_gpus:
        for name, gib in B.GPUS.items():
            print(f"{name:<26} {gib:>3} GiB")
        return 0
    if args.task not in _TASKS:
        raise UserError(f"--task must be one of {', '.join(_TASKS)}, got {args.task!r}")
    if args.model:
        return _one_model(args)
    return _pick(args)


def _budget_if_any(args):
    from toolkit.estimate import budget as B
    if args.vram is None and args.gpu is None:
        return None
    return B.resolve_budget(args.vram, args.gpu)


def _one_model(args) -> int:
    from toolkit.estimate import planner as E
    bud = _budget_if_any(args)
    if bud is None:
        from toolkit.core.hardware import detect

        device = detect().kind
    else:
        device = bud.device
    est = E.estimate(args.model, args.task, args.quant, args.seq_len, args.batch, args.lora_r,
                     args.grad_ckpt, optimizer=args.optimizer, device=device,
                     budget_bytes=bud.bytes if bud else None)
    if args.json:
        d = est.to_dict()
        if bud:
            d["budget_source"] = bud.source
        print(json.dumps(d))
        return 0
    head = [est.task, est.quant, f"{est.backend} on {est.device}", f"seq {est.seq_len} x batch {est.batch}"]
    if est.lora_r:
        head.append(f"LoRA r{est.lora_r}")
    if est.grad_ckpt is not None:
        head.append("grad ckpt " + ("on" if est.grad_ckpt else "off"))
    print(f"{est.model}  ({est.params / 1e9:.3f} B params)")
    print("  " + " · ".join(head))
    for name, b in sorted(est.components.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<15} {gib(b):>11}")
    print(f"  {'total':<15} {gib(est.total_bytes):>11}")
    if est.trainable_params:
        print(f"  trainable params: {est.trainable_params:,}")
    for note in est.notes:
        print(f"  note: {note}")
    if bud:
        verdict = "fits" if est.fits else "does NOT fit"
        print(f"  budget {gib(bud.bytes)} ({bud.source}): {verdict}, headroom {gib(bud.bytes - est.total_bytes)}")
    return 0


def _pick(args) -> int:
    from toolkit.estimate import budget as B
    from toolkit.estimate import planner as E
    if args.quant:
        raise UserError("--quant needs --model (without it, the pick tries the task's usual quants)")
    bud = B.resolve_budget(args.vram, args.gpu)
    seq, batch, rank = (E._positive(f, v) for f, v in
                        (("--seq-len", args.seq_len), ("--batch", args.batch), ("--lora-r", args.lora_r)))
    p = E.pick(args.task, bud.bytes, seq, batch, rank, device=bud.device)
    if args.json:
        d = p.to_dict()
        d["budget_source"] = bud.source
        d["device"] = bud.device
        print(json.dumps(d))
        return 0
    print(f"Budget: {gib(bud.bytes)} — {bud.source}")
    print(f"Task: {args.task}, seq {args.seq_len} x batch {args.batch}"
          + (f", LoRA r{args.lora_r}" if args.task in ("lora", "qlora") else ""))
    print(f"{'model':<38} {'quant':<7} {'params':>7} {'estimate':>11} {'fits':>5} {'headroom':>11}")
    for c in p.candidates:
        mark = "yes" if c.fits else "no"
        star = " <- pick" if (c.model == p.model and c.quant == p.quant and p.fits) else ""
        print(f"{c.model:<38} {c.quant:<7} {c.params / 1e9:>6.2f}B {gib(c.total_bytes):>11} {mark:>5} "
              f"{gib(c.headroom_bytes):>11}{star}")
    print(f"Pick: {p.model} ({p.quant})" if p.fits else "Pick: none fits")
    print(f"Why: {p.reason}")
    return 0

