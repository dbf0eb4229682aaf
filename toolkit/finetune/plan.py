"""A recipe in the estimator's terms: the one mapping from a fine-tune recipe to planner inputs.

`base_model: auto` (the pick) and the does-it-fit check before loading a named base both go
through `plan_inputs`, so they estimate the same run the trainer will do: same method, quant,
sequence length, batch, LoRA rank and targets, dropout, gradient checkpointing and optimizer.

One memory rule for both: a run fits when its estimate is at most the memory available now
(free GPU memory from nvidia-smi, or MemAvailable on a CPU) minus the planner's safety margin
(`toolkit.estimate.planner.SAFETY_MARGIN`), because a run that fits with no headroom at all is
one allocator fragment away from an out-of-memory error.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

# transformers' TrainingArguments default `adamw_torch`: fp32 exp_avg and exp_avg_sq per weight.
TRAINER_OPTIMIZER = "adamw"
# The dtype the base weights are held in, as the estimator names it.
DTYPE_QUANT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


@dataclass(frozen=True)
class PlanInputs:
    """What the estimator needs to know about a recipe's run (keyword arguments of `estimate`)."""

    task: str  # qlora | lora | full
    quant: str  # what the base is held in: nf4-dq / nf4 for QLoRA, else its dtype
    seq_len: int
    batch: int
    lora_r: int
    grad_ckpt: bool
    targets: tuple[str, ...]
    optimizer: str
    lora_dropout: float
    device: str  # cuda | cpu
    compute: str = "bf16"  # the compute dtype, as the estimator names it (fp32 on a CPU without native bf16)
    packed_weights: bool = False  # a CPU run pre-packs its frozen weights (`cpu_packs`)
    conversation_tokens: float | None = 0.0  # mean tokens of a packed conversation (`conversation_tokens`)
    allocator: str = "glibc"  # the C allocator a CPU run trains under (`toolkit.core.allocator.training_allocator_on`)

    def as_kwargs(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RunShape:
    """How much work a recipe's run is, for the time model (toolkit.estimate.timeplan).

    The training tokens come from the examples' token counts where the caller has tokenized them
    (the dry run, `recipe new`): then they are packed as the Trainer will pack them (`packed_rows`).
    Without them, and for the held-out set, token counts come from the data files' sizes at
    CHARS_PER_TOKEN (no tokenizer is loaded: `toolkit estimate` must stay instant and the base may
    not be downloaded yet)."""

    steps: int
    # the run's training tokens over its steps; from the files: batch x grad_accum x (seq_len when
    # packing, else the mean example)
    tokens_per_step: int
    eval_rounds: int  # in-training held-out loss passes (in_training_evals)
    eval_tokens: int  # tokens per in-training eval pass (eval_examples of them)
    # report: the prompts of base's and tuned's answers to generation_samples questions, a held-out
    # conversation's tokens each standing in for its prompt (without the answer, left-padded to the
    # batch's longest), which no tokenizer here counts
    report_prompt_tokens: int
    # report: base and tuned answer loss over the whole held-out set, less the prefix every example
    # shares (a system prompt), which `scoring.answer_loss` runs once
    report_tokens: int = 0
    # report: the general-text perplexity pass (report.GENERAL_TEXT), base and tuned, every position
    # scored: the LM head projects all of them
    report_text_tokens: int = 0
    # report: decoding steps of those answers, batched ANSWER_BATCH prompts at a time a side (a step
    # costs more than a row on either device: timeplan prices steps)
    report_decode_steps: int = 0
    # report: the prompts a side in one of those batches, on average (a CPU step's matmuls grow with them)
    report_answer_rows: float = 16.0
    # the tokens a micro-batch holds on average, over which a CPU step's fixed cost spreads (0: unknown,
    # batch x seq_len)
    micro_batch_tokens: float = 0.0


# Bytes of a JSONL data file per trained-on token: the finance train file is 261,817 bytes for
# 55,519 tokens with the SmolLM2 tokenizer and chat markup (`toolkit finetune --dry-run`), 4.72;
# English BPE text alone is about 4 characters a token (OpenAI's tokenizer guide).
CHARS_PER_TOKEN = 4.5


def _file_stats(path) -> tuple[int, int, int]:
    """(examples, approximate tokens, approximate tokens every example begins with) of a JSONL file;
    zeros when missing. The last is the lines' common prefix (the JSON up to where two examples
    differ: a shared system prompt), 0 under the minimum `scoring.shared_prefix` runs apart. Read once
    per file version: a dry run asks for the training files' counts from the plan and the time model."""
    try:
        st = path.stat()
    except OSError:
        return 0, 0, 0
    return _file_stats_of(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _file_stats_of(path: str, size: int, mtime_ns: int) -> tuple[int, int, int]:
    import os

    from toolkit.finetune.scoring import SHARED_PREFIX_MIN

    try:
        data = Path(path).read_bytes()
    except OSError:
        return 0, 0, 0
    lines = [line for line in data.splitlines() if line.strip()]
    shared = int(len(os.path.commonprefix(lines)) / CHARS_PER_TOKEN) if len(lines) > 1 else 0
    return len(lines), int(len(data) / CHARS_PER_TOKEN), shared if shared >= SHARED_PREFIX_MIN else 0


def _train_file_stats(recipe) -> tuple[int, int]:
    """(examples, tokens) of the recipe's training files, a mix's sources at their weights, tokens from
    the files' sizes (`_file_stats`); an hf: dataset is not read here and counts 0."""
    from toolkit.finetune.data import train_sources

    n_train = tok_train = 0
    for _, src, weight in train_sources(recipe):
        n, tok, _ = _file_stats(src) if isinstance(src, Path) else (0, 0, 0)
        n_train, tok_train = n_train + round(n * weight), tok_train + round(tok * weight)
    return n_train, tok_train


def conversation_tokens(recipe, train_lengths: Sequence[int] | None = None) -> float | None:
    """The mean tokens of a conversation in a packed row of `recipe`'s run, at most max_seq_len, for
    the planner's packed attention: of `train_lengths` (the examples as the trainer tokenized them)
    where the caller has them, else of the training files' sizes. 0 where it does not pack; None where
    the lengths can't be known here (an hf: dataset is not downloaded for a plan)."""
    from toolkit.finetune.data import train_sources

    if not recipe.data.packing:
        return 0.0
    if train_lengths:
        n, tokens = len(train_lengths), sum(train_lengths)
    elif any(not isinstance(src, Path) for _, src, _ in train_sources(recipe)):
        return None
    else:
        n, tokens = _train_file_stats(recipe)
    return min(float(recipe.data.max_seq_len), tokens / n) if n else None


def run_shape(recipe, train_lengths: Sequence[int] | None = None) -> RunShape:
    """The work `recipe` asks for: optimizer steps and tokens per step, eval passes and report
    generation (see RunShape). `train_lengths`: the training examples' token counts as the trainer
    gets them (tokenized, data.overlong applied), where the caller has them."""
    import math

    from toolkit.finetune.data import source_path
    from toolkit.finetune.report import GENERAL_TEXT
    from toolkit.finetune.scoring import ANSWER_BATCH, TEXT_MAX_TOKENS

    d, t, e = recipe.data, recipe.training, recipe.eval
    micro_tokens = 0.0
    if train_lengths is not None:
        steps, tokens_per_step, micro_tokens = trained_work(train_lengths, recipe)
    else:
        n_train, tok_train = _train_file_stats(recipe)
        mean = max(1, tok_train // max(1, n_train))
        per_seq = d.max_seq_len if d.packing else min(d.max_seq_len, mean)
        tokens_per_step = t.batch_size * t.grad_accum * per_seq
        if t.max_steps > 0:
            steps = t.max_steps
        else:
            seqs = math.ceil(tok_train / d.max_seq_len) if d.packing else n_train
            steps = max(1, math.ceil(t.epochs * math.ceil(seqs / (t.batch_size * t.grad_accum))))
    eval_rounds = eval_tokens = prompts = report = decode_steps = text = 0
    rows = float(ANSWER_BATCH)
    if d.eval:
        n_eval, tok_eval, shared = _file_stats(source_path(recipe, d.eval))
        if n_eval:
            used = min(n_eval, e.eval_examples) if e.eval_examples else n_eval
            eval_tokens = tok_eval * used // n_eval
            eval_rounds = len(in_training_evals(int(steps), e.eval_steps, report_ends(e)))
            if e.report:
                asked = min(n_eval, e.generation_samples)
                prompts = 2 * asked * tok_eval // n_eval
                decode_steps = 2 * math.ceil(asked / ANSWER_BATCH) * e.max_new_tokens
                rows = asked / math.ceil(asked / ANSWER_BATCH) if asked else rows
                # the shared prefix is run apart only when it is unlabelled (completion-only loss)
                report = 2 * max(0, tok_eval - n_eval * (shared if d.completion_only_loss else 0))
                text = 2 * min(TEXT_MAX_TOKENS, int(len(GENERAL_TEXT) / CHARS_PER_TOKEN))
    return RunShape(steps, tokens_per_step, eval_rounds, eval_tokens, report_prompt_tokens=prompts, report_tokens=report,
                    report_text_tokens=text, report_decode_steps=decode_steps, report_answer_rows=rows,
                    micro_batch_tokens=micro_tokens)


def trained_work(lengths: Sequence[int], recipe) -> tuple[int, int, float]:
    """(optimizer steps, training tokens a step, tokens a micro-batch) of `recipe`'s run over examples
    of `lengths` tokens, counted as transformers' Trainer runs it: the rows (`packed_rows` when
    packing, else one an example), ceil(rows / batch) micro-batches an epoch, ceil(those / grad_accum)
    steps an epoch, ceil(epochs x that) steps unless max_steps is set; a last step of an epoch holds
    what is left."""
    import math

    d, t = recipe.data, recipe.training
    rows = packed_rows(lengths, d.max_seq_len) if d.packing else [min(n, d.max_seq_len) for n in lengths]
    if not rows:
        return max(1, t.max_steps), 0, 0.0
    micro_per_epoch = math.ceil(len(rows) / t.batch_size)
    per_epoch = math.ceil(micro_per_epoch / t.grad_accum)
    steps = t.max_steps if t.max_steps > 0 else max(1, math.ceil(t.epochs * per_epoch))
    epochs, rest = divmod(steps, per_epoch)
    micro = epochs * micro_per_epoch + min(micro_per_epoch, rest * t.grad_accum)
    tokens = epochs * sum(rows) + sum(rows) / len(rows) * min(len(rows), rest * t.grad_accum * t.batch_size)
    return steps, round(tokens / steps), tokens / micro


def packed_rows(lengths: Sequence[int], max_seq_len: int) -> list[int]:
    """The tokens in each row TRL's SFTTrainer trains on when it packs examples of `lengths` tokens into
    rows of `max_seq_len`: TRL's own `pack_dataset` with the trainer's strategy (trl_compat.PACKING_STRATEGY:
    best fit decreasing, 1,000 examples at a time, in the data's order; a longer example is cut)."""
    return list(_packed_rows(tuple(lengths), max_seq_len))


@functools.lru_cache(maxsize=4)  # `recipe new` times one data set at several run lengths
def _packed_rows(lengths: tuple[int, ...], max_seq_len: int) -> tuple[int, ...]:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
    from trl import pack_dataset

    from toolkit.finetune.trl_compat import PACKING_STRATEGY

    # Only the lengths matter to the packer: a column of zeros in their shape, built without Python lists.
    offsets = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])
    ids = pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(np.zeros(int(offsets[-1]), dtype=np.int32)))
    shown = not are_progress_bars_disabled()
    disable_progress_bars()  # a run shows TRL's "Packing" bar; a plan has nothing to show
    try:
        packed = pack_dataset(Dataset.from_dict({"input_ids": ids}), max_seq_len, PACKING_STRATEGY)
    finally:
        if shown:
            enable_progress_bars()
    return tuple(pc.list_value_length(packed.with_format("arrow")["input_ids"]).to_pylist())


def report_ends(eval_cfg) -> bool:
    """Whether the report measures both ends of the run: the base model (step 0) and the fine-tuned
    one (the last step), on the whole held-out set. Then the in-training eval skips those two steps
    (they would measure the same thing on fewer examples) unless early stopping needs the last one."""
    return bool(eval_cfg.report and not eval_cfg.early_stopping_patience)


def in_training_evals(steps: int, eval_steps: int, report_ends: bool) -> list[int]:
    """Optimizer steps at which the Trainer computes the held-out loss: step 0 and every `eval_steps`
    (the last step included when it falls on one), less both ends when the report measures them."""
    if eval_steps <= 0:
        return []
    at = [0, *range(eval_steps, steps + 1, eval_steps)]
    return [s for s in at if not (report_ends and s in (0, steps))]


def plan_inputs(recipe, device: str, dtype: str, train_lengths: Sequence[int] | None = None) -> PlanInputs:
    """The estimator's inputs for `recipe` trained on `device` ("cuda..." or "cpu") with compute
    `dtype` (a torch dtype name, as `toolkit.core.hardware.dtype_for` returns it). `train_lengths`: the
    training examples' token counts where the caller has tokenized them (`conversation_tokens`)."""
    from toolkit.core import allocator
    from toolkit.estimate.planner import ALL_LINEAR

    m, lo = recipe.method, recipe.lora
    if m.name in ("qlora", "auto"):  # auto is planned as its memory-lean branch (see choose_method)
        # fp4 packs two weights a byte with one absmax per block, exactly like nf4.
        quant = "nf4-dq" if m.double_quant else "nf4"
    elif m.name == "full":
        quant = "fp32"  # fp32 master weights; autocast supplies the low-precision compute
    else:
        quant = DTYPE_QUANT[dtype]
    targets = ALL_LINEAR if list(lo.target_modules) == ["all-linear"] else tuple(lo.target_modules)
    return PlanInputs(
        task="qlora" if m.name == "auto" else m.name, quant=quant, seq_len=recipe.data.max_seq_len, batch=recipe.training.batch_size,
        lora_r=lo.r, grad_ckpt=recipe.training.gradient_checkpointing, targets=targets,
        optimizer=TRAINER_OPTIMIZER, lora_dropout=lo.dropout, device="cuda" if device.startswith("cuda") else "cpu",
        compute=DTYPE_QUANT[dtype], packed_weights=cpu_packs(device, dtype, "full" if m.name == "full" else "lora"),
        conversation_tokens=conversation_tokens(recipe, train_lengths),
        allocator=allocator.training_allocator_on(device),
    )


def cpu_packs(device: str, dtype: str, task: str) -> bool:
    """Whether a training run of `task` on `device` computing in `dtype` (a torch dtype name)
    pre-packs its frozen weights: on a CPU, for LoRA and QLoRA, where this machine's calibration
    measured the packed matmuls faster (`hardware.packed_choice`, as the trainer decides, without
    importing torch; the trainer also skips them where they would take over half the RAM available,
    which a plan does not know)."""
    if device.startswith("cuda") or task not in ("lora", "qlora"):
        return False
    from toolkit.core.hardware import packed_choice

    return packed_choice("cpu", dtype, "train", use_torch=False)[0]


# `method.name: auto` takes plain LoRA when its 16/32-bit base needs at most this share of the usable
# memory: QLoRA's 4-bit weights are dequantized on every forward and backward (bitsandbytes has no
# fused 4-bit training matmul), which costs time and buys nothing when memory is plentiful.
AUTO_LORA_SHARE = 0.5


def choose_method(lora_bytes: int | None, usable: int, no_estimate: str = "") -> tuple[str, str]:
    """What `method.name: auto` means for a base whose LoRA run needs `lora_bytes` (None: no
    estimate, for the reason `no_estimate`, by default that the estimator doesn't know the model)
    with `usable` bytes to plan on: (method, why)."""
    from toolkit.core.units import gib

    if lora_bytes is None:
        why = no_estimate or "the estimator doesn't know this model"
        return "qlora", f"method auto: qlora ({why}; 4-bit is the safe choice)"
    if lora_bytes <= AUTO_LORA_SHARE * usable:
        return "lora", (f"method auto: lora (~{gib(lora_bytes, 1)} of {gib(usable, 1)} usable: memory is plentiful, "
                        "and an unquantized base skips the 4-bit dequantization QLoRA pays every step)")
    return "qlora", (f"method auto: qlora (plain LoRA would need ~{gib(lora_bytes, 1)} of {gib(usable, 1)} usable; "
                     "4-bit weights leave room)")


def resolve_method(recipe, spec: str, device: str, dtype: str, available_bytes: int,
                   train_lengths: Sequence[int] | None = None):
    """(recipe with `method.name: auto` resolved for base `spec`, why); unchanged with "" otherwise.
    `train_lengths`: as `plan_inputs` takes them."""
    import copy

    from toolkit.core.errors import UserError
    from toolkit.estimate.catalog import CATALOG
    from toolkit.estimate.planner import estimate, usable_bytes

    if recipe.method.name != "auto":
        return recipe, ""
    lora_bytes, no_estimate = None, ""
    if spec in CATALOG:
        kw = plan_inputs(recipe, device, dtype, train_lengths).as_kwargs()
        kw.update(task="lora", quant=DTYPE_QUANT[dtype])
        try:
            lora_bytes = estimate(CATALOG[spec], **kw).total_bytes
        except UserError as exc:
            # The model is known; say what the estimator refused rather than that it isn't.
            no_estimate = f"no estimate for {spec}: {exc}"
    method, why = choose_method(lora_bytes, usable_bytes(available_bytes), no_estimate)
    out = copy.deepcopy(recipe)
    out.method.name = method
    return out, why
