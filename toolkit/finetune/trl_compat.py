"""Where we lean on upstream internals (a private TRL function, Unsloth's packing hook), wrapped in
one place and tested against upstream.

TRL (1.16) decides in the private `trl.trainer.utils._use_triton(device)` whether its fused LM
head projects only the labelled positions (Triton devices) or every position (elsewhere, to keep
tile shapes static for graph compilers such as Neuron). We run eager on CPU, where static shapes
buy nothing, and with completion-only loss ~55% of finance tokens have no label: the vocabulary
projection and softmax over them are pure waste (measured 176 -> 250 tokens/s on the finance
recipe's CPU profile, AVX512-BF16 CPU). The loss is the same sum over the same positions.

`tests/finetune/test_trl_compat.py` fails when TRL renames or removes `_use_triton`, so an upgrade
cannot silently drop the speed-up; at run time a missing hook is announced, not ignored.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

PRIVATE_HOOK = "_use_triton"


@contextlib.contextmanager
def score_labelled_positions_only(device: str, announce=None):
    """Within the block, TRL's fused LM head scores only labelled positions on the CPU too.

    Scoped to the block (the training loop), not the process: nothing else sees the change,
    and it is undone on exit, also after an error or Ctrl-C. On CUDA it changes nothing.
    """
    import trl.trainer.utils as trl_utils

    original = getattr(trl_utils, PRIVATE_HOOK, None)
    if device.startswith("cuda") or original is None:
        if original is None and announce is not None:
            announce(f"note: trl.trainer.utils.{PRIVATE_HOOK} is gone in this TRL: scoring every position "
                     "(slower on CPU, same loss)")
        yield
        return

    def compact(dev) -> bool:
        return dev.type == "cpu" or original(dev)

    setattr(trl_utils, PRIVATE_HOOK, compact)
    try:
        yield
    finally:
        setattr(trl_utils, PRIVATE_HOOK, original)


UNSLOTH_PACKING = ("unsloth.utils.packing", "enable_sample_packing")


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
