"""Attention for padding-free packed batches that costs what the conversations cost, not the pack.

TRL's padding-free collator flattens a batch into one row (2 packs of 512 tokens -> one row of
1024 holding ~10 conversations) and gives `cu_seq_lens_q` (where each conversation starts).
With `sdpa`, transformers turns that into a 1024 x 1024 block-diagonal mask: attention over the
whole row, O(n^2) in the row length, ~5x the work of the conversations themselves, and SDPA's
masked CPU kernel is slow besides. flash-attn's varlen kernel, which is what the padding-free
format is built for, exists only on CUDA.

Here each conversation is attended on its own, with SDPA's causal kernel (no mask). The segment
bounds come from the collator's `cu_seq_lens_q` (or from restarts in `position_ids`), so no token
can see another conversation: `tests/finetune/test_packed_attention.py` checks that the loss on a
packed batch equals the loss on the same conversations run one by one. Anything that is not a
packed single row (padding masks, generation with a KV cache) goes to transformers' own `sdpa`.

On a CPU without AMX, PyTorch's bf16 flash-attention kernel is slower than its fp32 one (measured
on an AVX512-BF16 EPYC, 9 query / 3 KV heads of 64, forward + backward, 2 threads: 1.33 vs 0.68 ms
at 60 tokens, 3.59 vs 2.19 ms at 110, 5.28 vs 4.33 ms at 200), so a bf16 run can take the variant
registered as NAME_FP32, which attends in fp32 and hands bf16 back;
`toolkit.core.capability.attention_dtype` decides.

It plugs in through transformers' public registries (`AttentionInterface` and
`AttentionMaskInterface`), under its own names; nothing upstream is patched.
"""

from __future__ import annotations

import contextlib

NAME = "toolkit_packed_sdpa"
NAME_FP32 = "toolkit_packed_sdpa_fp32"


def wanted(device: str, packing: bool, engine: str) -> bool:
    """Use it for padding-free packed training on a CPU with the transformers engine.

    On CUDA, SDPA's masked kernels are fast and flash-attn varlen is the better tool; Unsloth brings
    its own attention.
    """
    return packing and not device.startswith("cuda") and engine != "unsloth"


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
                      is_causal=None, upcast: bool = False, **kwargs):
    """Same contract as transformers' `sdpa_attention_forward`: (B, H, T, D) in, (B, T, H, D) out.
    `upcast`: attend in fp32 and return the query's dtype (packed rows only)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    bounds = None
    if attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2] > 1:
        bounds = segment_bounds(kwargs.get("cu_seq_lens_q"), kwargs.get("position_ids"))
    if bounds is None or bounds[-1] != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    # Grouped-query attention in the kernel (enable_gqa) instead of repeat_kv's copies of K and V.
    gqa = getattr(module, "num_key_value_groups", 1) > 1
    # split, not slicing: its backward is one cat of the pieces' gradients, where each slice's
    # backward zero-fills a full-size tensor and adds it up (~10 conversations a row, 3 tensors a layer).
    sizes = [e - s for s, e in zip(bounds, bounds[1:]) if e > s]
    dtype = query.dtype
    upcast = upcast and dtype != torch.float32
    if upcast:
        query, key, value = query.float(), key.float(), value.float()
    # bf16 autocast puts SDPA on its lower-precision list: it would cast the fp32 copies straight back.
    with torch.autocast(query.device.type, enabled=False) if upcast else contextlib.nullcontext():
        out = torch.cat([
            torch.nn.functional.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)
            for q, k, v in zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2))
        ], dim=2)
    return out.transpose(1, 2).to(dtype).contiguous(), None


def attention_forward_fp32(module, query, key, value, attention_mask, **kwargs):
    """attention_forward, attending in fp32 (see the module)."""
    return attention_forward(module, query, key, value, attention_mask, upcast=True, **kwargs)


def mask(*args, **kwargs):
    """No mask for a packed or unpadded row (attention_forward splits it); sdpa's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if kwargs.get("attention_mask") is None:
        return None
    return sdpa_mask(*args, **kwargs)


def register(attn_dtype: str | None = None) -> str:
    """Register NAME and NAME_FP32 with transformers (idempotent); returns the name for
    `model.set_attn_implementation`: NAME_FP32 when `attn_dtype` is "float32", else NAME."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name, forward in ((NAME, attention_forward), (NAME_FP32, attention_forward_fp32)):
        AttentionInterface.register(name, forward)
        AttentionMaskInterface.register(name, mask)
    return NAME_FP32 if attn_dtype == "float32" else NAME


def use_on(model, attn_dtype: str | None = None) -> str:
    """Switch `model` (PEFT-wrapped or not) to the packed attention, attending in `attn_dtype`
    ("float32" or None: the model's own dtype); returns the implementation it had."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    before = base.config._attn_implementation
    base.set_attn_implementation(register(attn_dtype))
    return before
