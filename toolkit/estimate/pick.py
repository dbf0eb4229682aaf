"""The pick: the largest catalog model (and its quant) whose estimate fits a memory budget, and a
time budget where a time model is given. What `toolkit estimate` without `--model` prints and what
a recipe's `base_model: auto` trains. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from toolkit.core.errors import UserError
from toolkit.core.units import gib
from toolkit.estimate.catalog import CATALOG, PICKABLE
from toolkit.estimate.planner import (ALL_LINEAR, SAFETY_MARGIN, TASKS, _positive, default_quants, estimate,
                                      past_context, usable_bytes)

# What `pick` tries for each model, best fidelity first ("bf16" stands for the compute dtype).
PICK_QUANTS = {"inference": ("bf16", "q8_0", "q4_k_m"), "lora": ("bf16",), "qlora": ("nf4-dq",), "full": ("bf16",)}


@dataclass
class Candidate:
    model: str
    quant: str
    params: int
    total_bytes: int
    fits: bool  # memory and time
    headroom_bytes: int
    seconds: float | None = None  # the run's estimated wall time, when a time model was given
    in_time: bool = True
    in_context: bool = True  # the sequence length is within the model's context window


@dataclass
class Pick:
    """The chosen model for a task and budget. `model` is a catalog key (HF id or "embedded")."""

    model: str
    quant: str
    fits: bool
    headroom_bytes: int
    reason: str
    candidates: list[Candidate]
    total_bytes: int = 0
    budget_bytes: int = 0
    usable_bytes: int = 0
    task: str = "qlora"

    def to_dict(self) -> dict:
        return asdict(self)


def pick(task: str, budget_bytes: int, seq_len: int = 512, batch: int = 1, lora_r: int = 16,
         device: str | None = None, *, quants: tuple[str, ...] | None = None, grad_ckpt: bool = True,
         targets: tuple[str, ...] = ALL_LINEAR, optimizer: str = "adamw", lora_dropout: float = 0.0,
         seconds_of=None, time_budget_s: float | None = None, compute: str | None = None,
         packed_weights: bool = False, conversation_tokens: float | None = 0, allocator: str = "glibc") -> Pick:
    """The largest catalog model whose estimate fits in `budget_bytes` minus SAFETY_MARGIN (10%).

    Candidates are every pickable model (instruct variants; `embedded` stands for
    SmolLM2-135M-Instruct) x the task's quants in PICK_QUANTS. Per model the first quant that
    fits wins (bf16 before q8_0 before q4_k_m for inference, bf16 being the `compute` dtype);
    `quants` replaces that list (a recipe's own quant). The remaining settings are `estimate`'s. `device` None: detected.
    seconds_of(facts, estimate) -> seconds gives a candidate's run time (toolkit.estimate.timeplan);
    with `time_budget_s` a candidate must also finish within it. Memory rule: the estimate's total
    (framework included) against `budget_bytes` minus the margin — the caller decides whether
    that budget is total or free memory. A model whose context window `seq_len` is past
    (`past_context`) is skipped: it was not trained for sequences that long.
    """
    if task not in TASKS:
        raise UserError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    if budget_bytes is None or int(budget_bytes) <= 0:
        raise UserError(f"memory budget must be positive, got {budget_bytes!r}")
    seq_len = _positive("--seq-len", seq_len)
    if device is None:
        from toolkit.core.hardware import detect

        device = detect().kind
    usable = usable_bytes(budget_bytes)
    cands: list[Candidate] = []
    best: Candidate | None = None
    for name in PICKABLE:
        chosen = None
        in_context = past_context(CATALOG[name], seq_len) is None
        for q in quants or default_quants(device, compute, PICK_QUANTS)[task]:
            e = estimate(CATALOG[name], task, q, seq_len, batch, lora_r, grad_ckpt, targets, optimizer, lora_dropout,
                         device=device, compute=compute, packed_weights=packed_weights,
                         conversation_tokens=conversation_tokens, allocator=allocator)
            secs = seconds_of(CATALOG[name], e) if seconds_of is not None else None
            in_time = time_budget_s is None or secs is None or secs <= time_budget_s
            cand = Candidate(name, q, e.params, e.total_bytes, e.total_bytes <= usable and in_time and in_context,
                             usable - e.total_bytes, None if secs is None else round(secs, 1), in_time, in_context)
            cands.append(cand)
            if cand.fits and chosen is None:
                chosen = cand
        if chosen and (best is None or chosen.params >= best.params):
            best = chosen
    budget_txt = f"{gib(usable)} usable ({gib(budget_bytes)} budget minus the {SAFETY_MARGIN:.0%} safety margin)"
    from toolkit.estimate.timeplan import fmt_duration

    time_txt = f" and {fmt_duration(time_budget_s)} of time" if time_budget_s is not None else ""
    if best is None:
        # the smallest among the models that take the sequence, when any does
        pool = [c for c in cands if c.in_context] or cands
        smallest = min(pool, key=lambda c: c.total_bytes)
        took = f" and would take {fmt_duration(smallest.seconds)}" if smallest.seconds is not None else ""
        none_takes = ""
        if not smallest.in_context:
            longest = max(CATALOG[c.model].max_context for c in cands)
            none_takes = f" no model takes {seq_len} tokens (the longest context window is {longest});"
        return Pick(smallest.model, smallest.quant, False, smallest.headroom_bytes,
                    f"nothing fits:{none_takes} the smallest, {smallest.model} {smallest.quant}, needs "
                    f"{gib(smallest.total_bytes)}{took}, with {budget_txt}{time_txt}", cands, smallest.total_bytes,
                    budget_bytes, usable, task)
    took = f" and would take {fmt_duration(best.seconds)}" if best.seconds is not None else ""
    why = (f"largest model that fits: {best.model} {task} {best.quant} needs {gib(best.total_bytes)} of {budget_txt}"
           f"{took}{' (budget ' + fmt_duration(time_budget_s)[1:] + ')' if time_budget_s is not None else ''}")
    bigger = [c for c in cands if c.params > best.params]
    if bigger:
        nxt = min(bigger, key=lambda c: (c.params, c.total_bytes))
        short = nxt.model.split("/")[-1]
        limits = []
        if nxt.total_bytes > usable:
            limits.append(f"needs {gib(nxt.total_bytes)}")
        if not nxt.in_time and nxt.seconds is not None:
            limits.append(f"would take {fmt_duration(nxt.seconds)} here")
        if not nxt.in_context:
            limits.append(f"has a context window of {CATALOG[nxt.model].max_context} tokens")
        why += f"; the next larger, {short} {nxt.quant}, " + (" and ".join(limits) or f"needs {gib(nxt.total_bytes)}")
    return Pick(best.model, best.quant, True, best.headroom_bytes, why, cands, best.total_bytes, budget_bytes, usable, task)
