"""Which of PyTorch's SDPA kernels the toolkit lets run, decided in one place.

On CUDA, everything here keeps SDPA off cuDNN's attention kernel. On Hopper, PyTorch prefers it
for masked attention, and cuDNN builds an execution plan for every new shape. This toolkit's
shapes keep changing:
- a packed training row's length changes every step;
- a padded eval batch's length changes from one batch to the next;
- during decoding the KV cache grows by one token every step, and in a chat it never repeats.

Measured on an H200 (torch 2.11, random-weight Llama-3.2-1B, 2026-12-04):
- Packed QLoRA training, 8 x 512 tokens, 10 steps: steps 2-10 took 10.3 s with cuDNN (three steps
  of 1.7-2.6 s) and 3.6 s without it; the first step 7.4 s against 1.5 s; losses alike to 1e-4.
- The finance report's 24 greedy answers, 96 tokens each, batches of 16 left-padded prompts, with
  torch's choice (`benchmarks/gpu_report_answers.py`, 18:14 UTC): the first call took 27.2 s, 141.5
  ms a step; the same call again took 7.2 s, 37.7 ms a step. In the end-to-end run the base
  side's answers took 20.2 s, after training had run. The held-out loss pass took 2.8 s cold and
  1.0 s warm. Each new length paid about 0.1 s, as each new plan does (mlx and mlxcel measured
  20-70 ms a cuDNN SDPA plan: ml-explore/mlx#2743, lablup/mlxcel#1820).
The three kernels kept need no plan. The trainer's packed attention on sm80+ uses PyTorch's varlen
kernel and does not go through SDPA at all.
"""

from __future__ import annotations

import contextlib

# Every SDPA backend but cuDNN's (`torch.nn.attention.SDPBackend` names).
CUDA_SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def for_device(device: str, engine: str = "transformers") -> tuple[str, ...] | None:
    """The SDPA backends work on `device` keeps to: CUDA_SDPA_BACKENDS on CUDA, None (torch's
    own choice) elsewhere and under Unsloth, which brings its own attention."""
    return CUDA_SDPA_BACKENDS if str(device).startswith("cuda") and engine != "unsloth" else None


def kept_to(names: tuple[str, ...] | None):
    """A context in which SDPA uses only the backends `names` (None: no change). It sets
    process-wide flags and restores them on exit, so callers scope it to one call and run one
    such call at a time (the chat UI's lock does)."""
    if names is None:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, n) for n in names])


def on_device_of(model):
    """`kept_to(for_device(...))` for the device `model`'s parameters are on."""
    return kept_to(for_device(next(model.parameters()).device.type))
