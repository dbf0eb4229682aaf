"""Estimate memory and time: pick a model for your GPU/RAM, or break down one model's needs.

Without --model: detects the GPU (nvidia-smi: free memory) or, on CPU, the available RAM — or
takes --vram SIZE / --gpu NAME — and prints every catalog model x quant for the task with its
estimate, headroom and run time, then the pick: the largest model that fits with a 10% safety
margin AND trains within --time-budget (default 30 min on a CPU, none on a GPU; the run timed is
--recipe's, else the finance recipe's tokens at the flags' settings) AND whose context window
takes --seq-len (the models skipped for that are named in a warning).

With --model (catalog id, `embedded`, an HF folder, a .gguf file or a run folder): prints the breakdown
(weights, KV cache, activations, logits, gradients, optimizer, LoRA adapter, overhead) and the
time: training tokens/s, the recipe's wall time with --recipe, decode tokens/s, prefill; with a
budget, whether it fits with the same 10% margin; a --seq-len past the model's context is warned about.
Speeds come from this machine's calibration or, with --gpu, the GPU's datasheet.

Examples:
  toolkit estimate
  toolkit estimate --recipe recipes/finance --time-budget 1h
  toolkit estimate --gpu "RTX 3060 12GB"
  toolkit estimate --model TinyLlama-1.1B-Chat-v1.0 --task lora --quant fp16 --target-modules q_proj,k_proj,v_proj,o_proj --lora-r 32 --json
  toolkit estimate --vram 8GB --task inference
  toolkit estimate --model meta-llama/Llama-3.2-1B-Instruct --task qlora --seq-len 1024 --json
  toolkit estimate --model path/to/model.gguf --task inference --seq-len 4096
"""

from __future__ import annotations

import json
import sys

from toolkit.core.errors import UserError
from toolkit.core.units import gib
from toolkit.commands.estimate_settings import fill_defaults, settings, targets_of

_TASKS = ("inference", "lora", "qlora", "full")


def add_arguments(p) -> None:
    # Values are validated in run() so that every mistake is one `error:` line with exit 2.
    p.add_argument("--model", help="catalog id (org optional), `embedded`, HF folder or .gguf file")
    p.add_argument("--task", help=f"one of {', '.join(_TASKS)} (default qlora)")
    p.add_argument("--quant", help="fp32/bf16/fp16, int8/nf4/nf4-dq (bitsandbytes), or a GGUF type "
                   "(f16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0, ...: llama.cpp inference)")
    p.add_argument("--seq-len", help="tokens per sequence / context length (default 512)")
    p.add_argument("--batch", help="sequences per step (default 1)")
    p.add_argument("--lora-r", help="LoRA rank (default 16)")
    p.add_argument("--target-modules",
                   help="LoRA targets: all-linear (default) or a comma list, e.g. q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--recipe", help="a recipe folder or YAML: its method, quant, seq, batch, rank, targets, "
                   "checkpointing and steps set the estimate (and the run whose time is budgeted); "
                   "only --quant may change them")
    p.add_argument("--time-budget", help="longest training run the pick may choose: 90s, 30m, 1.5h, 2h30m "
                   "(default 30m on a CPU, none on a GPU)")
    ck = p.add_mutually_exclusive_group()
    ck.add_argument("--grad-ckpt", dest="grad_ckpt", action="store_true", default=None,
                    help="gradient checkpointing on (default)")
    ck.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false", help="gradient checkpointing off")
    p.add_argument("--optimizer", help="adamw (default), adamw-8bit, paged-adamw, paged-adamw-8bit")
    p.add_argument("--vram", help="memory budget, e.g. 8GB, 7.5GiB, 7680MiB (GB = GiB)")
    p.add_argument("--gpu", help='budget from a GPU name, e.g. "RTX 3060 12GB" (see --list-gpus)')
    p.add_argument("--list-gpus", action="store_true", help="print the known GPUs and exit")
    p.add_argument("--calibrate", action="store_true",
                   help="measure this machine again (matmul GFLOP/s per dtype, memory GB/s, decoding's host work; ~3 s), "
                        "cache it, print it")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args) -> int:
    from toolkit.estimate import budget as B
    _measure_under_the_allocator(args)
    if args.calibrate:
        from dataclasses import asdict

        from toolkit.core import calibration
        cal = calibration.load(refresh=True)
        print(json.dumps(asdict(cal)) if args.json else cal.summary())
        return 0
    if args.list_gpus:
        if args.json:
            print(json.dumps({name: size * B.GIB for name, size in B.GPUS.items()}))
            return 0
        for name, size in B.GPUS.items():
            print(f"{name:<26} {size:>3} GiB")
        return 0
    fill_defaults(args)
    if args.task not in _TASKS:
        raise UserError(f"--task must be one of {', '.join(_TASKS)}, got {args.task!r}")
    if args.time_budget is not None:
        from toolkit.estimate.timeplan import parse_duration

        parse_duration(args.time_budget, "--time-budget")
    if args.model is not None:
        return _one_model(args)
    return _pick(args)


def _measure_under_the_allocator(args) -> None:
    """Where this command is about to calibrate this machine, restart it first under the C allocator
    the toolkit's CPU work runs under (`allocator.relaunch`, as `toolkit finetune` and a transformers
    model's `generate` / `chat` / `serve` do), so that the calibration's host-work probe is timed
    under the malloc the decoding it prices will run under: on the Zen 3 it read 0.37-0.39 ms a layer
    under tcmalloc and 0.44-0.57 under glibc's malloc. Answering from the cache starts nothing."""
    if not getattr(args, "process_entry", False) or args.list_gpus or args.gpu is not None or args.vram is not None:
        return
    from toolkit.core import allocator, calibration, hardware
    from toolkit.estimate.timeplan import host_capability

    hw = hardware.detect()
    if hw.kind != "cpu":  # a GPU's calibration has no host-work probe, and no CPU allocator setting applies
        return
    if args.calibrate or not calibration.cached(host_capability(hw)):
        allocator.relaunch()


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
    from toolkit.estimate.catalog import lookup

    facts = lookup(args.model)
    s = settings(args, device)
    # the same rule as the pick and the fine-tune's fit check: the budget minus the safety margin
    usable = E.usable_bytes(bud.bytes) if bud else None
    est = E.estimate(facts, s["task"], s["quant"], s["seq_len"], s["batch"], s["lora_r"], s["grad_ckpt"],
                     targets_of(s["targets"], facts), s["optimizer"], s["lora_dropout"], device=device,
                     budget_bytes=usable, compute=s["compute"], packed_weights=s["packed_weights"],
                     conversation_tokens=s["conversation_tokens"], allocator=s["allocator"])
    tm = _time(args, facts, est, device, s)
    if s.get("method_note"):
        est.notes.append(s["method_note"])
    warnings = _context_warnings(args, [facts], s["seq_len"])
    if args.time_budget is not None:
        warnings.append(f"--time-budget {args.time_budget} is not applied: it limits the pick (without --model)")
    _warn(warnings)
    if args.json:
        d = est.to_dict()
        if bud:
            d.update(budget_bytes=bud.bytes, usable_bytes=usable, budget_source=bud.source)
        d["time"] = tm
        d["warnings"] = warnings
        d.update(_compute_fields(est, s))
        print(json.dumps(d))
        return 0
    head = [est.task, est.quant, f"{est.backend} on {est.device}", f"seq {est.seq_len} x batch {est.batch}"]
    compute = _compute_fields(est, s)
    if compute["compute_dtype"]:
        head.append(f"compute {compute['compute_dtype']}")
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
    if tm:
        parts = []
        if "train_tokens_per_s" in tm:
            parts.append(f"train {tm['train_tokens_per_s']:.0f} tok/s")
        if "train_wall_s" in tm:
            from toolkit.estimate.timeplan import fmt_duration

            parts.append(f"recipe run {fmt_duration(tm['train_wall_s'])} ({tm['steps']} steps)")
        parts += [f"decode {tm['decode_tokens_per_s']:.0f} tok/s", f"prefill {tm['prefill_s']:.2f} s"]
        print(f"  {'time':<15} " + " · ".join(parts) + f"  [{tm['source']}]")
    for note in est.notes + ([compute["compute_reason"]] if compute["compute_reason"] else []):
        print(f"  note: {note}")
    if bud:
        verdict = "fits" if est.fits else "does NOT fit"
        whole = ""
        if not est.fits and est.total_bytes <= bud.bytes:
            whole = f" ({gib(bud.bytes - est.total_bytes)} left of the whole budget, with no margin)"
        print(f"  budget {gib(bud.bytes)} ({bud.source}), {gib(usable)} usable after the {E.SAFETY_MARGIN:.0%} "
              f"safety margin: {verdict}, headroom {gib(usable - est.total_bytes)}{whole}")
    return 0


def _compute_fields(est, s: dict) -> dict:
    """The dtype transformers computes in, and why; None for llama.cpp, which picks its own."""
    if est.backend != "transformers":
        return {"compute_dtype": None, "compute_reason": None}
    return {"compute_dtype": s["compute"], "compute_reason": s["dtype_reason"]}


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)


def _context_warnings(args, models, seq_len: int, picking: bool = False) -> list[str]:
    """The sequence is longer than a model's context window (planner.past_context, the one check):
    the --model form's figures are still the arithmetic for that length, but no run of it would work
    as trained (positions it never saw), so say so; the pick skips such a model, and says which."""
    from toolkit.estimate.planner import past_context

    by_limit: dict[int, list[str]] = {}
    for m in models:
        limit = past_context(m, seq_len)
        if limit:
            by_limit.setdefault(limit, []).append(m.name)
    what = f"--seq-len {seq_len}" if not args.recipe else f"--recipe {args.recipe}'s sequence length {seq_len}"
    out = []
    for limit, names in by_limit.items():
        whose = (f"{names[0]}'s context window" if len(names) == 1
                 else f"the context windows of {', '.join(names[:-1])} and {names[-1]}")
        then = (f"the pick skips {'it' if len(names) == 1 else 'them'}" if picking
                else "the estimate is for a length the model was not trained for")
        out.append(f"{what} is past {whose} ({limit} tokens); {then}")
    return out


def _pick(args) -> int:
    from toolkit.estimate import budget as B
    from toolkit.estimate.catalog import CATALOG
    if args.quant and not args.recipe:
        raise UserError("--quant needs --model (without it, the pick tries the task's usual quants)")
    bud = B.resolve_budget(args.vram, args.gpu)
    s = settings(args, bud.device)
    quants = (s["quant"],) if args.recipe else None
    rates, run, limit = None, None, None
    if s["task"] != "inference":
        rates = _rates(args, s)
        run = s["run"]
        limit = _time_budget(args, bud.device)
    seconds_of = None
    if rates is not None and run is not None:
        from toolkit.estimate.timeplan import time_fields

        targets = s["targets"]

        def train_wall_s(m, e):
            return time_fields(m, e, rates, targets=targets_of(targets, m), run=run)["train_wall_s"]
        seconds_of = train_wall_s
    warnings = []
    if seconds_of is None:
        limit = None  # nothing is timed: no time budget can be applied
        if args.time_budget is not None:
            why = ("the pick times training runs, not inference" if s["task"] == "inference"
                   else f"no speed is known for {bud.source}" if rates is None else "there is no run to time (give --recipe)")
            warnings.append(f"--time-budget {args.time_budget} is not applied: {why}")
    from toolkit.estimate.pick import pick

    p = pick(s["task"], bud.bytes, s["seq_len"], s["batch"], s["lora_r"], device=bud.device, quants=quants,
               grad_ckpt=s["grad_ckpt"], targets=targets_of(s["targets"], None), optimizer=s["optimizer"],
               lora_dropout=s["lora_dropout"], seconds_of=seconds_of, time_budget_s=limit, compute=s["compute"],
               packed_weights=s["packed_weights"], conversation_tokens=s["conversation_tokens"],
               allocator=s["allocator"])
    models = [CATALOG[name] for name in dict.fromkeys(c.model for c in p.candidates)]
    warnings = _context_warnings(args, models, s["seq_len"], picking=True) + warnings
    _warn(warnings)
    if args.json:
        d = p.to_dict()
        d.update(budget_source=bud.source, device=bud.device, time_budget_s=limit, compute_dtype=s["compute"],
                 compute_reason=s["dtype_reason"],
                 time_source=rates.source if rates else None, seq_len=s["seq_len"], batch=s["batch"],
                 lora_r=s["lora_r"] if s["task"] in ("lora", "qlora") else None, warnings=warnings,
                 notes=[s["method_note"]] if s.get("method_note") else [])
        print(json.dumps(d))
        return 0
    print(f"Budget: {gib(bud.bytes)} — {bud.source}")
    if limit is not None or rates is not None:
        from toolkit.estimate.timeplan import fmt_duration

        print(f"Time: {('budget ' + fmt_duration(limit)[1:]) if limit else 'no budget'}"
              + (f" for {s['run_name']}" if s.get("run_name") else "") + (f" — {rates.source}" if rates else ""))
    print(f"Task: {s['task']}, seq {s['seq_len']} x batch {s['batch']}"
          + (f", LoRA r{s['lora_r']}" if s["task"] in ("lora", "qlora") else "") + f"; compute {s['compute']} ({s['dtype_reason']})")
    print(f"{'model':<38} {'quant':<7} {'params':>7} {'estimate':>11} {'fits':>5} {'headroom':>11} {'run time':>9}")
    from toolkit.estimate.timeplan import fmt_duration

    for c in p.candidates:
        # Why not, where memory is not the reason: over the time budget, or past the context window.
        mark = "yes" if c.fits else "no" if c.headroom_bytes < 0 else "time" if not c.in_time else "ctx"
        star = " <- pick" if (c.model == p.model and c.quant == p.quant and p.fits) else ""
        secs = fmt_duration(c.seconds) if c.seconds is not None else "-"
        print(f"{c.model:<38} {c.quant:<7} {c.params / 1e9:>6.2f}B {gib(c.total_bytes):>11} {mark:>5} "
              f"{gib(c.headroom_bytes):>11} {secs:>9}{star}")
    print(f"Pick: {p.model} ({p.quant})" if p.fits else "Pick: none fits")
    print(f"Why: {p.reason}")
    if s.get("method_note"):
        print(f"Note: {s['method_note']}")
    return 0


def _rates(args, s: dict):
    from toolkit.estimate.timeplan import rates_for_gpu, rates_here

    if args.gpu is not None:
        return rates_for_gpu(args.gpu, s["dtype"])
    if args.vram is not None:
        return None  # a bare size says nothing about speed
    return rates_here(s["dtype"], "infer" if s["task"] == "inference" else "train")


def _time_budget(args, device: str):
    from toolkit.estimate.timeplan import DEFAULT_TIME_BUDGET_S, parse_duration

    if args.time_budget is not None:
        return parse_duration(args.time_budget, "--time-budget")
    return DEFAULT_TIME_BUDGET_S[device]


def _time(args, facts, est, device: str, s: dict):
    """The estimate's `time` object, or None when the device's rates are unknown (--vram)."""
    from toolkit.estimate.timeplan import time_fields

    rates = _rates(args, s)
    if rates is None:
        return None
    return time_fields(facts, est, rates, targets=targets_of(s["targets"], facts),
                       run=s["run"] if args.recipe else None)
