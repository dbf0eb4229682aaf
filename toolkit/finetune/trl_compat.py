"""Where we lean on upstream internals (two private TRL names, Unsloth's packing hook), wrapped in
one place and tested against upstream.

TRL (1.16) scores tokens in `trl.trainer.utils.add_fused_lm_head`, which looks up two private
module-level names on every call:
- `_use_triton(device)` decides whether only the labelled positions are projected (Triton devices)
  or every position (elsewhere, to keep tile shapes static for graph compilers such as Neuron). We
  run eager on CPU, where static shapes buy nothing, and with completion-only loss ~55% of finance
  tokens have no label: projecting them is pure waste (measured 176 -> 250 tokens/s on the finance
  recipe's CPU profile, AVX512-BF16 CPU).
- `_ChunkedLogProbFunction` is the GPU-shaped chunked kernel; on a CPU, `toolkit.finetune.cpu_lm_head`
  does the same with two matmuls instead of three and a few passes instead of ~15 (0.96 -> 0.42 s a
  step on the 2-core AVX2 EPYC, benchmarks/bench_lm_head.py). Calls it can't take (soft-capping, a
  bias, logits too large to materialize where its streamed head can't run) still go to TRL's.
The loss is the same sum over the same positions, and the logged entropy and token accuracy are the same.

`tests/finetune/test_trl_compat.py` fails when TRL renames or removes either name, so an upgrade
cannot silently drop the speed-up; at run time a missing name is announced, not ignored.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

PRIVATE_HOOK = "_use_triton"
PRIVATE_KERNEL = "_ChunkedLogProbFunction"


class _LeanOnCpu:
    """Stands in for TRL's `_ChunkedLogProbFunction` (same `apply` signature): CPU calls go to the
    head `cpu_lm_head.head_for` picks (streamed or materialized), the rest to the original."""

    def __init__(self, original):
        self.original = original

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
              logit_scale=1.0, outputs=("log_probs",)):
        from toolkit.finetune import cpu_lm_head

        fn = None
        if hidden.device.type == "cpu":
            fn = cpu_lm_head.head_for(hidden, weight, bias, final_logit_softcapping, outputs)
        return (fn or self.original).apply(hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping,
                        logit_scale, outputs)


@contextlib.contextmanager
def lean_lm_head_on_cpu(device: str, announce=None):
    """Within the block, TRL's fused LM head scores only labelled positions on the CPU too, with
    `cpu_lm_head`'s kernel where it fits.

    Scoped to the block (the training loop, its evaluations included), not the process: nothing else
    sees the change, and it is undone on exit, also after an error or Ctrl-C. On CUDA it changes nothing.
    """
    import trl.trainer.utils as trl_utils

    if device.startswith("cuda"):
        yield
        return
    originals = {name: getattr(trl_utils, name, None) for name in (PRIVATE_HOOK, PRIVATE_KERNEL)}
    missing = [name for name, value in originals.items() if value is None]
    if missing and announce is not None:
        announce(f"note: trl.trainer.utils.{' and .'.join(missing)} gone in this TRL: TRL's own LM head "
                 "(slower on CPU, same loss)")
    hook, kernel = originals[PRIVATE_HOOK], originals[PRIVATE_KERNEL]
    if hook is not None:
        setattr(trl_utils, PRIVATE_HOOK, lambda dev: dev.type == "cpu" or hook(dev))
    if kernel is not None:
        setattr(trl_utils, PRIVATE_KERNEL, _LeanOnCpu(kernel))
    try:
        yield
    finally:
        for name, value in originals.items():
            if value is not None:
                setattr(trl_utils, name, value)


UNSLOTH_PACKING = ("unsloth.utils.packing", "enable_sample_packing")
# SFTConfig.packing_strategy: best fit decreasing keeps each conversation whole in one row (the trainer's,
# and plan.packed_rows's, which counts the rows ahead of a run).
PACKING_STRATEGY = "bfd"


@dataclass
class PackingPlan:
    packing: bool  # SFTConfig packing + padding_free
    mode: str  # recorded in run.json
    why: str = ""  # why packing is off although the recipe asked for it
    hook: Callable | None = None  # hook(model, trainer), called once the trainer exists


def packing_plan(packing: bool, engine: str, unsloth_hook: Callable | None = None) -> PackingPlan:
    """How to batch: padding-free packing keeps packed conversations apart only when the attention
    kernel learns where each one ends. transformers does (the mask is built from TRL's per-conversation
    position_ids); Unsloth's kernels need its own `packed_seq_lengths` metadata, which its
    `enable_sample_packing(model, trainer)` adds to every batch. Without that hook packed conversations
    would attend to each other, so the Unsloth path falls back to padded batches.
    `unsloth_hook` is for the Unsloth path: None looks it up in the installed Unsloth."""
    if not packing:
        return PackingPlan(False, "padded")
    if engine != "unsloth":
        return PackingPlan(True, "padding-free (position_ids)")
    hook = unsloth_hook or unsloth_packing_hook()
    if hook is None:
        return PackingPlan(False, "padded", f"this Unsloth has no {'.'.join(UNSLOTH_PACKING)}: padded batches, "
                           "so packed conversations cannot attend to each other")
    return PackingPlan(True, "padding-free (unsloth packed_seq_lengths)", hook=hook)


def unsloth_packing_hook() -> Callable | None:
    """Unsloth's `enable_sample_packing`, or None when the installed Unsloth (or none) lacks it."""
    import importlib

    module, name = UNSLOTH_PACKING
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
