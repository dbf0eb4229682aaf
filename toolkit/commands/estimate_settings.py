"""What `toolkit estimate`'s flags, or the recipe given with `--recipe`, mean for the planner: the
task, sequence, batch, LoRA settings and the dtype the toolkit would compute in on the device (the
capability decision, or a dense `--quant` where the base loads in it), and the run to time.
"""

from __future__ import annotations

from toolkit.core.errors import UserError


# Flags a recipe sets (--quant aside, which may override the recipe's) and their defaults without one.
_DEFAULTS = {"task": ("--task", "qlora"), "seq_len": ("--seq-len", "512"), "batch": ("--batch", "1"),
             "lora_r": ("--lora-r", "16"), "target_modules": ("--target-modules", "all-linear"),
             "optimizer": ("--optimizer", "adamw"), "grad_ckpt": ("--grad-ckpt/--no-grad-ckpt", True)}


def fill_defaults(args) -> None:
    """The defaults of the flags a recipe sets; given with --recipe they would be ignored: an error."""
    for key, (flag, default) in _DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
        elif args.recipe:
            raise UserError(f"{flag} does not go with --recipe: the recipe sets it (edit the recipe, or drop --recipe)")


def settings(args, device: str) -> dict:
    """The estimate's settings: from --recipe (through toolkit.finetune.plan.plan_inputs, the one
    recipe -> planner mapping) or from the flags. Without --recipe the CPU time budget is judged
    on the finance recipe's run (recipes/finance), the toolkit's reference workload."""
    from pathlib import Path

    from toolkit.estimate import planner as E
    from toolkit.estimate.timeplan import device_dtype
    from toolkit.finetune.plan import DTYPE_QUANT, PlanInputs

    # The dtype the toolkit would compute in on that device: fp32 on a GTX 10xx or a CPU without
    # native bf16 changes the activations' size, QLoRA's unquantized weights and the matmul rate.
    dtype, why = device_dtype(args.gpu, args.vram, "infer" if args.task == "inference" and not args.recipe else "train")
    if args.recipe:
        plan, run, forced, method = _recipe_plan(args.recipe, "--recipe", device, dtype)
        s = plan.as_kwargs()
        if args.quant:
            s["quant"] = args.quant
        s.update(run=run, run_name=f"the {args.recipe} recipe's run", dtype=forced or dtype,
                 dtype_reason=f"the recipe's method.compute_dtype: {forced}" if forced else why)
        if method == "auto":  # each base's own choice needs its estimate against the memory free then
            s["method_note"] = ("method auto: estimated as qlora, its memory-lean branch; a run takes plain LoRA "
                                "where that needs at most half the usable memory (`toolkit finetune --dry-run` says which)")
        return _packs(_dense_quant_is_the_dtype(s), device)
    s = PlanInputs(task=args.task, quant=args.quant, seq_len=E._positive("--seq-len", args.seq_len),
                   batch=E._positive("--batch", args.batch), lora_r=E._positive("--lora-r", args.lora_r),
                   grad_ckpt=args.grad_ckpt, targets=_parse_targets(args.target_modules),
                   optimizer=args.optimizer, lora_dropout=0.0, device=device,
                   compute=DTYPE_QUANT[dtype], conversation_tokens=None).as_kwargs()
    ref = Path(__file__).resolve().parents[2] / "recipes" / "finance"
    run = None
    if (ref / "recipe.yaml").is_file() and args.task != "inference":
        try:
            _, run, _, _ = _recipe_plan(str(ref), "reference recipe", device, dtype)
            run = _rescale(run, s["seq_len"], s["batch"])
        except UserError:
            run = None
    s.update(run=run, run_name="the finance recipe's work" if run else "", dtype=dtype, dtype_reason=why)
    return _packs(_dense_quant_is_the_dtype(s), device)


def _packs(s: dict, device: str) -> dict:
    """`s` with `packed_weights` as a training run computing in its dtype on `device` would have them,
    and the C allocator it would train under."""
    from toolkit.core.allocator import training_allocator_on
    from toolkit.finetune.plan import cpu_packs

    return {**s, "packed_weights": cpu_packs(device, s["dtype"], s["task"]), "allocator": training_allocator_on(device)}


def _dense_quant_is_the_dtype(s: dict) -> dict:
    """A LoRA base and a transformers model answering load in the dtype they compute in, so a dense
    `--quant` there is the compute dtype (QLoRA's and a full run's weights are not: 4-bit, fp32 masters)."""
    from toolkit.finetune.plan import DTYPE_QUANT

    if s["task"] in ("lora", "inference") and s["quant"] in DTYPE_QUANT.values() \
            and DTYPE_QUANT[s["dtype"]] != s["quant"]:
        s.update(compute=s["quant"], dtype={q: d for d, q in DTYPE_QUANT.items()}[s["quant"]],
                 dtype_reason=f"{s['quant']}: set by --quant")
    return s


def _rescale(run, seq_len: int, batch: int):
    """The reference recipe's tokens trained at the flags' seq x batch per step."""
    from dataclasses import replace
    import math

    total = run.steps * run.tokens_per_step
    per_step = seq_len * batch
    return replace(run, steps=max(1, math.ceil(total / per_step)), tokens_per_step=per_step)


def _recipe_plan(path: str, flag: str, device: str, dtype: str):
    """(plan inputs, run shape, the recipe's own compute dtype or None, its method name) of the
    recipe at `path` computing in `dtype` unless the recipe sets one."""
    from toolkit.finetune import recipe as R
    from toolkit.finetune.plan import plan_inputs, run_shape

    try:
        rec = R.load(path, gpu=device == "cuda")
    except UserError as exc:
        raise UserError(f"{flag} {path}: {exc}") from None
    forced = rec.method.compute_dtype if rec.method.compute_dtype not in ("auto", "", None) else None
    return plan_inputs(rec, device, forced or dtype), run_shape(rec), forced, rec.method.name


def _parse_targets(text: str) -> tuple[str, ...]:
    from toolkit.estimate.planner import ALL_LINEAR

    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise UserError("--target-modules is empty (all-linear or a comma list such as q_proj,v_proj)")
    if items == ["all-linear"]:
        return ALL_LINEAR
    bad = [t for t in items if t not in ALL_LINEAR]
    if bad:
        raise UserError(f"--target-modules: unknown module {', '.join(bad)} (known: all-linear, {', '.join(ALL_LINEAR)})")
    return tuple(items)


def targets_of(targets, facts) -> tuple[str, ...]:
    """Targets checked against the model's own linear layers (every catalog model has all seven)."""
    if facts is not None:
        bad = [t for t in targets if t not in facts.linears()]
        if bad:
            raise UserError(f"--target-modules: {facts.name} has no {', '.join(bad)}")
    return tuple(targets)
