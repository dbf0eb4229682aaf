"""`toolkit recipe new`: a commented recipe for your own data, sized for this machine.

`new_recipe` reads the data (any format `toolkit.finetune.formats` knows, detected from the first
record's keys), holds out a seeded tenth of the conversations when no eval file is given,
tokenizes everything with the chosen base's tokenizer, lets the memory planner choose
max_seq_len / batch / gradient checkpointing, and writes `recipes/NAME/recipe.yaml` with every
field commented (the comments come from `toolkit.finetune.recipe_docs`, i.e. from recipe.py).

The held-out split is written out, with the training part, as train.jsonl / heldout.jsonl in
the messages format inside the recipe folder: the base-vs-fine-tuned comparison is only fair if
every run holds out the very same conversations, and a file pins that split regardless of the
source's order or later edits. With --eval the sources are referenced where they are.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.core.errors import UserError
from toolkit.finetune import recipe_docs

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SEQ_LENS = (256, 512, 1024, 2048, 4096)
HELDOUT_FRACTION = 0.1
MAX_HELDOUT = 200
TARGET_BATCH = 8  # sequences per optimizer update
# 4 rows x grad_accum 2 against 2 x 4, the Zen 4: +2-16% tokens/s in bf16, +7-12% in fp32, +1-16% with the
# libraries capped at AVX2 (docs/cpu-training.md)
CPU_MAX_BATCH = 4
CPU_MAX_STEPS = 50  # a CPU run of the embedded model stays in the minutes


@dataclass
class Sizes:
    """What the planner chose, and why (one line each)."""

    max_seq_len: int
    batch_size: int
    grad_accum: int
    gradient_checkpointing: bool
    estimate_bytes: int | None
    reasons: list[str] = field(default_factory=list)


@dataclass
class Found:
    """What `recipe new` found and wrote (printed by the command)."""

    folder: Path
    fmt: str
    fmt_why: str
    n_train: int
    n_heldout: int
    split: str
    base: str
    lengths: list[int]
    sizes: Sizes
    n_truncated: int
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        lo, med, hi = length_stats(self.lengths)
        s = self.sizes
        out = [*self.notes,
               f"format: {self.fmt} ({self.fmt_why})",
               f"examples: {self.n_train} train, {self.n_heldout} held out ({self.split})",
               f"tokens per example ({self.base} tokenizer, chat template included): "
               f"min {lo}, median {med}, max {hi}",
               f"truncated at max_seq_len={s.max_seq_len}: {self.n_truncated} of {len(self.lengths)}",
               *s.reasons,
               f"wrote {self.folder / 'recipe.yaml'}",
               f"next: toolkit finetune {self.folder} --dry-run"]
        return out


def length_stats(lengths: list[int]) -> tuple[int, int, int]:
    """(min, median, max); the median of an even count is the lower middle value (a token count)."""
    s = sorted(lengths)
    return s[0], s[(len(s) - 1) // 2], s[-1]


def load_source(spec: str, flag: str) -> tuple[list, str, str]:
    """(examples, format, why) of one --data/--eval source; bad input → one-line UserError."""
    from toolkit.finetune import data, formats, sources

    if not sources.is_hub_id(spec):
        p = Path(spec).expanduser()
        if not p.is_file():
            raise UserError(f"{flag} {spec}: file not found")
        if p.stat().st_size == 0:
            raise UserError(f"{flag} {spec}: the file is empty")
        if p.suffix == ".txt":
            return data.read_examples(p, "text"), "text", ".txt file: blank-line separated documents"
        spec = str(p)
    records = sources.read_records(spec, flag)
    if not records:
        raise UserError(f"{flag} {spec}: no records (empty)")
    where, first = records[0]
    fmt, why = formats.explain_format(first)
    if fmt is None:
        raise UserError(f"{where}: unknown data format ({why}); expected messages, conversations (ShareGPT), "
                        "instruction/output, prompt/completion, prompt/response, question/answer or text")
    return [formats.to_example(rec, fmt, w) for w, rec in records], fmt, why


def split_heldout(examples: list, seed: int, fraction: float = HELDOUT_FRACTION,
                  max_heldout: int = MAX_HELDOUT) -> tuple[list, list]:
    """(train, held out): whole conversation groups, shuffled with `seed`, until about `fraction`
    (1 to `max_heldout`) of the examples are held out. Original order is kept within each side."""
    groups: dict[str, list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault(ex.prompt_key, []).append(i)  # same prompt, same side
    if len(groups) < 2:
        raise UserError(f"--data: {len(examples)} example(s) with {len(groups)} distinct prompt(s): need at least "
                        "2 to hold one out (or pass --eval FILE)")
    target = max(1, min(max_heldout, round(fraction * len(examples))))
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    held: set[int] = set()
    for k in keys[:-1]:  # never hold out everything
        if len(held) >= target:
            break
        held.update(groups[k])
    return ([ex for i, ex in enumerate(examples) if i not in held],
            [ex for i, ex in enumerate(examples) if i in held])


def choose_sizes(lengths: list[int], facts, plan, usable_bytes: int, device: str) -> Sizes:
    """max_seq_len covering 95% of the examples (a power of two, 256..4096, within the model's
    context), then the largest batch (<= TARGET_BATCH, <= CPU_MAX_BATCH on CPU) whose estimate
    fits `usable_bytes`, without gradient checkpointing if possible; shorter sequences only when
    nothing fits. `facts` is the catalog entry (None: unknown model, no memory check); `plan`
    the recipe's PlanInputs."""
    from toolkit.core.units import gib
    from toolkit.estimate.planner import estimate

    s = sorted(lengths)
    p95 = s[max(0, math.ceil(0.95 * len(s)) - 1)]
    cap = min(SEQ_LENS[-1], (facts.max_context if facts is not None and facts.max_context else SEQ_LENS[-1]))
    seq = next((n for n in SEQ_LENS if n >= p95 and n <= cap), cap)
    why_seq = f"max_seq_len {seq}: covers 95% of examples (95th percentile {p95} tokens)" if seq >= p95 else \
        f"max_seq_len {seq}: the model's context limit (95th percentile is {p95} tokens)"
    max_batch = CPU_MAX_BATCH if device == "cpu" else TARGET_BATCH
    batches = [b for b in (8, 4, 2, 1) if b <= max_batch]
    if facts is None:
        b = batches[0]
        return Sizes(seq, b, max(1, TARGET_BATCH // b), False, None,
                     [why_seq, f"batch {b}: {plan.task} memory not estimated (model not in the catalog)"])
    while True:
        for ckpt in (False, True):
            for b in batches:
                e = estimate(facts, **{**plan.as_kwargs(), "seq_len": seq, "batch": b, "grad_ckpt": ckpt})
                if e.total_bytes <= usable_bytes:
                    why = (f"batch {b} x grad_accum {max(1, TARGET_BATCH // b)}"
                           f"{', gradient checkpointing' if ckpt else ''}: planner estimate "
                           f"{gib(e.total_bytes)} of {gib(usable_bytes)} usable ({plan.task} {plan.quant} on {device})")
                    if device == "cpu" and b == max_batch:
                        why += (f"; batch capped at {max_batch} on CPU "
                                "(the same optimizer batch in fewer, larger micro-batches)")
                    return Sizes(seq, b, max(1, TARGET_BATCH // b), ckpt, e.total_bytes, [why_seq, why])
        if seq <= SEQ_LENS[0]:
            raise UserError(f"{facts.name}: a {plan.task} run does not fit this machine even at batch 1 and "
                            f"{seq} tokens ({gib(usable_bytes)} usable); pass a smaller --base")
        seq //= 2
        why_seq = f"max_seq_len {seq}: longer sequences do not fit in memory (95th percentile is {p95} tokens)"


def _write_jsonl(path: Path, examples: list) -> None:
    with path.open("w", encoding="utf-8") as f:
        for ex in examples:
            rec = {"messages": ex.messages} if ex.messages is not None else {"text": ex.text}
            rec.update({k: v for k, v in ex.extra.items() if k not in ("messages", "text")})
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def _rel(spec: str, folder: Path) -> str:
    from toolkit.finetune.sources import is_hub_id

    if is_hub_id(spec):
        return spec
    path = Path(spec).expanduser().resolve()
    try:
        return os.path.relpath(path, folder.resolve())
    except ValueError:  # Windows: on another drive than the recipe, so there is no relative path
        return str(path)


def new_recipe(name: str, data_specs: list[str], eval_spec: str | None = None, base: str | None = None,
               recipes_dir: str | Path = "recipes") -> Found:
    """Write `recipes_dir/NAME/recipe.yaml` (+ train.jsonl / heldout.jsonl when a split is made)
    for `data_specs` (files or hf:org/name[:split]); nothing is left behind on error. What it
    found and decided comes back in `Found` (the base resolution's announcements in `notes`)."""
    from toolkit.core import hardware
    from toolkit.estimate.catalog import CATALOG
    from toolkit.finetune import data as data_mod
    from toolkit.finetune import recipe as recipe_mod
    from toolkit.finetune.base_model import resolve_base
    from toolkit.estimate.planner import usable_bytes
    from toolkit.finetune.plan import plan_inputs, resolve_method

    if not NAME_RE.match(name):
        raise UserError(f"recipe name {name!r}: use letters, digits, '.', '_' or '-' (up to 64)")
    folder = Path(recipes_dir) / name
    if folder.exists():
        raise UserError(f"recipe {name} already exists: {folder} (pick another NAME or remove it)")
    if not data_specs:
        raise UserError("--data is required")

    train, fmts, whys = [], [], []
    for spec in data_specs:
        exs, fmt, why = load_source(spec, "--data")
        train += exs
        fmts.append(fmt)
        whys.append(why if len(data_specs) == 1 else f"{spec}: {why}")
    if eval_spec:
        held, efmt, _ = load_source(eval_spec, "--eval")
        fmts.append(efmt)
    rec = recipe_mod.Recipe(name=name, root=folder.resolve())
    rec.method.name = "auto"
    seed = rec.training.seed
    if eval_spec:
        split = f"held-out set from {eval_spec}"
    else:
        train, held = split_heldout(train, seed)
        split = f"seeded split (seed {seed}) by conversation, same first user turn kept together"

    hw = hardware.detect()
    dev = "cuda" if hardware.device().startswith("cuda") else "cpu"
    dtype = hardware.dtype_choice(dev, "train")[0]
    rec.model.base_model = base or ("auto" if dev == "cuda" else "embedded")
    notes: list[str] = []
    choice = resolve_base(rec, announce=notes.append, device=dev, dtype=dtype)
    if rec.model.base_model == "auto":
        rec.model.base_model = choice.pick.get("model", choice.spec)
    elif not base:
        notes.append("base: embedded (no GPU here: the small built-in model keeps CPU runs in the minutes)")
    tok = _tokenizer(choice.source)
    lengths, labelled = [], 0
    for ex in train + held:
        ids, labels = data_mod.tokenize_example(tok, ex, rec.data.completion_only_loss)
        lengths.append(len(ids))
        labelled += sum(1 for t in labels if t != -100)

    # The examples as tokenized here (the recipe's files are not written yet).
    plan = plan_inputs(rec, dev, dtype, lengths[:len(train)])
    sizes = choose_sizes(lengths, CATALOG.get(choice.spec), plan, usable_bytes(hw.available_bytes), dev)
    _apply_sizes(rec, sizes, lengths[:len(train)], dev, len(held))
    # The run takes plain LoRA where memory is plentiful (see plan.choose_method): timed as it will run.
    resolved, method_why = resolve_method(rec, choice.spec, dev, dtype, hw.available_bytes, lengths[:len(train)])
    if method_why:
        sizes.reasons.append(method_why)

    if eval_spec:
        rec.data.train = _rel(data_specs[0], folder) if len(data_specs) == 1 else \
            [recipe_mod.TrainSource(_rel(s, folder), 1.0) for s in data_specs]
        rec.data.eval = _rel(eval_spec, folder)
        rec.data.format = fmts[0] if len(set(fmts)) == 1 else "auto"
    else:
        rec.data.train, rec.data.eval, rec.data.format = "train.jsonl", "heldout.jsonl", "messages"
        if "text" in fmts:
            rec.data.format = "auto"  # raw text is written as {"text": ...} records
    rec.description = f"Fine-tune on {', '.join(data_specs)}."

    stage = folder.parent / f".{name}.tmp-{os.getpid()}"
    try:
        stage.mkdir(parents=True)
        if not eval_spec:
            _write_jsonl(stage / "train.jsonl", train)
            _write_jsonl(stage / "heldout.jsonl", held)
        # The stage sits beside the final folder, so relative data paths mean the same from both.
        _fit_time_budget(rec, stage, CATALOG.get(choice.spec), dev, dtype, labelled / max(1, sum(lengths)),
                         len(held), sizes.reasons, resolved.method.name, lengths[:len(train)])
        header = [f"{name}: written by `toolkit recipe new` on {time.strftime('%Y-%m-%d')} for {hw.name}.",
                  f"Data: {', '.join(data_specs)}; format {'/'.join(dict.fromkeys(fmts))} ({'; '.join(whys)}).",
                  f"Held out: {len(held)} of {len(train) + len(held)} ({split}).",
                  *[f"Sizes: {r}" for r in sizes.reasons],
                  "Each key's help is the comment above it; the same help is in toolkit/finetune/recipe.py."]
        (stage / "recipe.yaml").write_text(recipe_docs.render_yaml(rec, header), encoding="utf-8")
        recipe_mod.load(stage / "recipe.yaml")  # what we wrote must load; a failure here is a bug
        if folder.exists():
            raise UserError(f"recipe {name} already exists: {folder} (pick another NAME or remove it)")
        os.replace(stage, folder)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    n_trunc = sum(1 for n in lengths if n > sizes.max_seq_len)
    return Found(folder, "/".join(dict.fromkeys(fmts)), "; ".join(whys), len(train), len(held), split,
                 choice.spec, lengths, sizes, n_trunc, notes)


def _tokenizer(source: str):
    from toolkit.core.chat_tokens import fix_chat_special_tokens
    from toolkit.core.loading import load_tokenizer

    tok = load_tokenizer(source)
    fix_chat_special_tokens(tok)
    return tok


def _apply_sizes(rec, sizes: Sizes, train_lengths: list[int], device: str, n_held: int) -> None:
    """Write the planner's sizes and a run length into `rec`; the reasons go into `sizes.reasons`."""
    from toolkit.finetune.plan import trained_work

    d, t = rec.data, rec.training
    d.max_seq_len = sizes.max_seq_len
    t.batch_size, t.grad_accum, t.gradient_checkpointing = sizes.batch_size, sizes.grad_accum, \
        sizes.gradient_checkpointing
    t.epochs = 3.0 if len(train_lengths) < 1000 else 1.0
    sizes.reasons.append(f"epochs {t.epochs:g}: " + ("a small data set (under 1000 examples) wants a few passes"
                                                      if t.epochs > 1 else "one pass over a large data set"))
    # Packing fills each row with whole conversations: steps follow the packed rows, not examples.
    _schedule(rec, trained_work(train_lengths, rec)[0], n_held, device)


def _schedule(rec, steps: int, n_held: int, device: str) -> None:
    """Checkpoint, log and eval intervals for a run of about `steps` optimizer steps."""
    t, e = rec.training, rec.eval
    t.save_steps = max(1, steps // 2)
    t.logging_steps = max(1, min(5, steps // 10))
    e.eval_steps = max(1, steps // 4)
    e.generation_samples = min(e.generation_samples, n_held)
    e.side_by_side = min(e.side_by_side, n_held)
    if device == "cpu":  # a bounded in-training eval keeps CPU evals short
        e.eval_examples = min(n_held, 40)


def _fit_time_budget(rec, stage: Path, facts, dev: str, dtype: str, labelled_fraction: float, n_held: int,
                     reasons: list[str], method: str, train_lengths: list[int]) -> None:
    """Cap training.max_steps so the time model's estimate of the whole run (preparation, training,
    evals, report) fits the device's default time budget (toolkit.estimate.timeplan: 30 min on a
    CPU, none on a GPU); adds the estimate to `reasons`. Without a time estimate (a model the
    catalog doesn't know), a CPU run is capped at CPU_MAX_STEPS."""
    from toolkit.estimate.planner import estimate
    from toolkit.estimate.timeplan import DEFAULT_TIME_BUDGET_S, fmt_duration
    from toolkit.finetune import recipe as recipe_mod
    from toolkit.finetune.dry_run import run_time, time_lines
    from toolkit.finetune.plan import plan_inputs

    def timed():
        (stage / "recipe.yaml").write_text(recipe_docs.render_yaml(rec, []), encoding="utf-8")
        staged = recipe_mod.load(stage / "recipe.yaml")
        staged.method.name = method  # what `method: auto` resolved to
        return run_time(staged, facts, estimate(facts, **plan_inputs(staged, dev, dtype).as_kwargs()), dtype,
                        labelled_fraction, train_lengths)

    t = timed() if facts is not None else "no estimate for a model the catalog doesn't know"
    if not isinstance(t, dict) or "train_wall_s" not in t:
        if dev == "cpu":
            rec.training.max_steps = CPU_MAX_STEPS
            _schedule(rec, CPU_MAX_STEPS, n_held, dev)
            reasons.append(f"max_steps {CPU_MAX_STEPS}: keeps a CPU run short (raise training.max_steps for more)")
        reasons.extend(time_lines(t))
        return
    budget = DEFAULT_TIME_BUDGET_S.get(dev)
    full = t
    if budget and t["train_wall_s"] > budget:
        # The largest max_steps whose whole run fits (fewer steps also mean fewer evals: eval_steps
        # follows the run length, so the time is re-estimated for each candidate).
        def at(steps):
            rec.training.max_steps = steps
            _schedule(rec, steps, n_held, dev)
            return timed()

        lo, hi, best = 1, full["steps"] - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            tm = at(mid)
            if tm["train_wall_s"] <= budget:
                lo, best = mid + 1, (mid, tm)
            else:
                hi = mid - 1
        steps, t = best if best else (1, at(1))
        if best:
            t = at(steps)  # leave rec at the chosen length
    if t is not full:
        reasons.append(f"max_steps {t['steps']}: all {full['steps']} steps would take "
                       f"{fmt_duration(full['train_wall_s'])}, over the {fmt_duration(budget)} default time budget "
                       f"on {dev} (set training.max_steps for a longer run)")
    reasons.extend(time_lines(t))
