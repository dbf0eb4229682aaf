"""Attention for padding-free packed batches that costs what the conversations cost, not the pack.

TRL's padding-free collator flattens a batch into one row (2 packs of 512 tokens -> one row of
1024 holding ~10 conversations) and gives `cu_seq_lens_q` (where each conversation starts).
With `sdpa`, transformers turns that into a 1024 x 1024 block-diagonal mask: attention over the
whole row, O(n^2) in the row length, ~5x the work of the conversations themselves, and SDPA's
masked CPU kernel is slow besides. flash-attn's varlen kernel, which is what the padding-free
format is built for, exists only on CUDA.

On CUDA the same flattening makes the mask cover the whole micro-batch: measured on an H200
(random-weight Llama-3.2-1B, LoRA, 2026-12-04), steps of 2048 x 4 packed tokens took 0.70 s and of
2048 x 16 tokens 5.2-7.7 s, step time growing with the square of the micro-batch's tokens
(benchmarks/gpu-results.json, "compute_masked"). There PyTorch's varlen flash kernel takes the row in
one call with the conversations' bounds (`segment_attention.varlen`), where PyTorch has it and the GPU
is sm80+ (`toolkit.core.attention_kernels.cuda_packed_attention`): the same steps took 0.31 s and 0.64-0.72 s
("compute"), 8x the tokens/s at 2048 x 16. Elsewhere the mask stays.

Here each conversation is attended on its own, with SDPA's causal kernel (no mask). The segment
bounds come from the collator's `cu_seq_lens_q` (or from restarts in `position_ids`), so no token
can see another conversation: `tests/finetune/test_packed_attention.py` checks that the loss on a
packed batch equals the loss on the same conversations run one by one. Anything that is not a
packed single row (padding masks, generation with a KV cache) goes to transformers' own `sdpa`.

Two kernels do the attending (`toolkit.core.segment_attention`): SDPA's causal kernel one
conversation at a time, or the conversations padded into one batch and attended with batched matmuls.
The calibration times both, and SDPA in fp32 for a bf16 run (PyTorch's bf16 CPU flash kernel is
slower than its fp32 one without AMX); `toolkit.core.attention_kernels.packed_attention` picks the fastest,
with an SDPA variant for rows too long for the batched kernel (which pads conversations in groups of
similar length, each padded at most `max_padding`). Each (kernel, fallback) pair is
registered under its own name (`name`).

It plugs in through transformers' public registries (`AttentionInterface` and
`AttentionMaskInterface`), under its own names; nothing upstream is patched.
"""

from __future__ import annotations

import math


def wanted(device: str, packing: bool, engine: str) -> bool:
    """Choose the packed attention (`toolkit.core.hardware.attention_choice`) for padding-free
    packed training with the transformers engine, on a CPU or CUDA; Unsloth brings its own."""
    return packing and engine != "unsloth"


def segment_bounds(cu_seq_lens=None, position_ids=None) -> list[int] | None:
    """[0, end_1, end_2, ..., n] for a packed row, or None when the row is not packed.

    From `cu_seq_lens` when the collator gives it; else a conversation starts wherever the
    position ids do not go up by one (the rule transformers uses for packed position ids).
    """
    if cu_seq_lens is not None:
        bounds = [int(x) for x in cu_seq_lens.tolist()]
        return bounds if len(bounds) > 2 else None
    if position_ids is None or position_ids.shape[0] != 1:
        return None
    pos = position_ids[0]
    starts = (pos[1:] != pos[:-1] + 1).nonzero().flatten().add(1).tolist()
    if not starts:
        return None
    return [0, *starts, int(pos.shape[0])]


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, kernel: str = "sdpa", fallback: str = "sdpa", max_padding: float = math.inf,
                      **kwargs):
    """Same contract as transformers' `sdpa_attention_forward`: (B, H, T, D) in, (B, T, H, D) out.
    A packed row goes to `segment_attention.attend` with `kernel`, `fallback` and `max_padding`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from toolkit.core import segment_attention

    bounds = None
    if attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2] > 1:
        bounds = segment_bounds(kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids"))
    if bounds is None or bounds[-1] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    sizes = [e - s for s, e in zip(bounds, bounds[1:]) if e > s]
    return segment_attention.attend(query, key, value, sizes, kernel, fallback, scaling, dropout, max_padding), None


def mask(*args, **kwargs):
    """No mask for a packed or unpadded row (attention_forward splits it); sdpa's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def name(kernel: str = "sdpa", fallback: str = "sdpa", max_padding: float = math.inf) -> str:
    """The registered name of `kernel` with `fallback` for rows bmm does not take, its groups padded at
    most `max_padding`."""
    from toolkit.core.segment_attention import FALLBACKS, KERNELS

    if kernel not in KERNELS or fallback not in FALLBACKS or not max_padding >= 1.0:
        raise ValueError(f"packed attention kernel must be one of {KERNELS} (fallback {FALLBACKS}, max_padding "
                         f">= 1); got {kernel!r}, {fallback!r}, {max_padding!r}")
    if kernel != "bmm":
        return f"toolkit_packed_{kernel}"
    return f"toolkit_packed_bmm_or_{fallback}" + ("" if math.isinf(max_padding) else f"_past_{max_padding:g}")


def register(kernel: str = "sdpa", fallback: str = "sdpa", max_padding: float = math.inf) -> str:
    """Register every kernel under its name with transformers (idempotent), and `kernel` with
    `fallback` and `max_padding`; returns its `name` for `model.set_attn_implementation`."""
    import functools

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from toolkit.core.segment_attention import FALLBACKS, KERNELS

    chosen = (kernel, fallback, max_padding)
    for k, f, pad in [*((k, f, math.inf) for k in KERNELS for f in (FALLBACKS if k == "bmm" else FALLBACKS[:1])),
                      chosen]:
        forward = functools.partial(attention_forward, kernel=k, fallback=f, max_padding=pad)
        AttentionInterface.register(name(k, f, pad), forward)
        AttentionMaskInterface.register(name(k, f, pad), mask)
    return name(*chosen)


def use_on(model, kernel: str = "sdpa", fallback: str = "sdpa", max_padding: float = math.inf) -> str:
    """Switch `model` (PEFT-wrapped or not) to the packed attention with `kernel` (see `name`);
    returns the implementation it had."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    base.set_attn_implementation(register(kernel, fallback, max_padding))
    return before
