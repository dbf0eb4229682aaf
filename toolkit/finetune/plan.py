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

from dataclasses import asdict, dataclass

# transformers' TrainingArguments default `adamw_torch`: fp32 exp_avg and exp_avg_sq per weight.
TRAINER_OPTIMIZER = "adamw"
# The dtype the base weights are held in, as the estimator names it.
_DTYPE_QUANT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


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

    def as_kwargs(self) -> dict:
        return asdict(self)


def plan_inputs(recipe, device: str, dtype: str) -> PlanInputs:
    """The estimator's inputs for `recipe` trained on `device` ("cuda..." or "cpu") with compute
    `dtype` (a torch dtype name, as `toolkit.core.hardware.dtype_for` returns it)."""
    from toolkit.estimate.planner import ALL_LINEAR

    m, lo = recipe.method, recipe.lora
    if m.name == "qlora":
        # fp4 packs two weights a byte with one absmax per block, exactly like nf4.
        quant = "nf4-dq" if m.double_quant else "nf4"
    elif m.name == "full":
        quant = "fp32"  # fp32 master weights; autocast supplies the low-precision compute
    else:
        quant = _DTYPE_QUANT[dtype]
    targets = ALL_LINEAR if list(lo.target_modules) == ["all-linear"] else tuple(lo.target_modules)
    return PlanInputs(
        task=m.name, quant=quant, seq_len=recipe.data.max_seq_len, batch=recipe.training.batch_size,
        lora_r=lo.r, grad_ckpt=recipe.training.gradient_checkpointing, targets=targets,
        optimizer=TRAINER_OPTIMIZER, lora_dropout=lo.dropout, device="cuda" if device.startswith("cuda") else "cpu",
    )


def usable_bytes(available_bytes: int) -> int:
    """The memory a run may plan on: what is available minus the safety margin."""
    from toolkit.estimate.planner import SAFETY_MARGIN

    return int(available_bytes * (1 - SAFETY_MARGIN))
