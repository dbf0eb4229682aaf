"""Where we lean on a private TRL function, wrapped in one place and tested against upstream.

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
