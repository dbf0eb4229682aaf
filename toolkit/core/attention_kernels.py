"""How packed training attends each conversation of a row, decided from the machine's record
(`toolkit.core.capability`) and, on a CPU, from the kernels its calibration timed
(`toolkit.core.calibration`); `toolkit.core.segment_attention` runs the choice. Pure functions:
tested with hand-written records and timings for machines we do not have."""

from __future__ import annotations

import math
from typing import NamedTuple

from toolkit.core.capability import Capability

# The batched-matmul attention keeps an L x L tensor a layer and pads conversations to their group's
# longest: taken only for a clear gain over the fastest SDPA variant, on the calibration's row and on
# each group of a row.
BMM_ATTENTION_MIN_GAIN = 1.2
_KERNEL_WORDS = {"sdpa": "SDPA", "sdpa_fp32": "SDPA in fp32", "bmm": "batched matmuls"}


class AttentionChoice(NamedTuple):
    """How packed training attends (`toolkit.core.segment_attention.attend`'s arguments); on CUDA
    kernel "masked" means transformers' own SDPA over the row's block-diagonal mask."""

    kernel: str
    fallback: str  # an SDPA variant: the rows bmm does not take
    reason: str
    max_padding: float = math.inf  # bmm's groups are padded at most this much (`segment_attention.groups`)


def attention_times(calibration, dtype: str) -> dict[str, float]:
    """kernel -> seconds a layer, of the packed-row attention kernels `calibration` timed in `dtype`
    (its `attention_s` keys are "dtype kernel"); empty when it timed none."""
    timed = getattr(calibration, "attention_s", None) or {}
    return {k.split()[1]: v for k, v in timed.items() if k.split()[0] == dtype}


# PyTorch's flash kernels, varlen among them, run on Ampere (sm80) and newer.
VARLEN_MIN_CC = (8, 0)


def cuda_packed_attention(cap: Capability, compute_dtype: str, has_varlen: bool) -> AttentionChoice:
    """How padding-free packed training attends on CUDA: PyTorch's varlen flash kernel, each
    conversation alone in one call, where this PyTorch has it (`has_varlen`), the GPU is sm80+ and
    the compute dtype is bf16 or fp16; else transformers' SDPA over the block-diagonal mask of the
    whole micro-batch (O((batch x seq_len)^2): measured on an H200, 2048 x 16 tokens took 7.5x the
    steps of 2048 x 4, see toolkit.finetune.packed_attention)."""
    cc = cap.compute_capability or (0, 0)
    sm = f"sm{cc[0]}{cc[1]}"
    if has_varlen and cc >= VARLEN_MIN_CC and compute_dtype in ("bfloat16", "float16"):
        return AttentionChoice("varlen", "sdpa", f"attention: each conversation alone, PyTorch's varlen flash "
                                                 f"kernel ({cap.name}, {sm}, {compute_dtype})")
    if not has_varlen:
        why = "this PyTorch has no torch.nn.attention.varlen"
    elif cc < VARLEN_MIN_CC:
        why = f"{cap.name} is {sm}; PyTorch's flash kernels need sm80+"
    else:
        why = f"flash kernels take bf16 or fp16, the compute dtype is {compute_dtype}"
    return AttentionChoice("masked", "masked", f"attention: SDPA over the packed row's block-diagonal mask ({why})")


def packed_attention(cap: Capability, compute_dtype: str, calibration=None) -> AttentionChoice:
    """How packed CPU training attends each conversation of a row (`toolkit.core.segment_attention`),
    computing in `compute_dtype`.

    Given a `toolkit.core.calibration.Calibration` that timed the kernels in `compute_dtype` on a row
    of equal conversations, the fastest SDPA variant is the fallback, and "bmm" is the kernel where
    it measured more than BMM_ATTENTION_MIN_GAIN times faster than that: it then splits each row into
    groups of conversations whose padding (`segment_attention.padding`, which costs bmm time and SDPA
    none) leaves that margin, `max_padding` = gain / BMM_ATTENTION_MIN_GAIN (`segment_attention.groups`).
    Unmeasured, the rule measured on the AVX512-BF16 EPYCs: PyTorch's bf16 CPU flash kernel is slower
    than its fp32 one wherever it has no AMX tiles to run on (and an AVX2 CPU only emulates bf16), so a
    bf16 run attends in fp32 there; AMX CPUs, not measured here, and CUDA keep the compute dtype."""
    if cap.kind == "cuda":
        from toolkit.core.segment_attention import varlen_call

        return cuda_packed_attention(cap, compute_dtype, varlen_call() is not None)
    if compute_dtype not in ("float32", "bfloat16"):
        return AttentionChoice("sdpa", "sdpa", f"attention: SDPA in the compute dtype ({compute_dtype})")
    times = attention_times(calibration, compute_dtype)
    sdpa = {k: v for k, v in times.items() if k.startswith("sdpa")}
    if not sdpa:
        if compute_dtype == "float32":
            return AttentionChoice("sdpa", "sdpa", "attention: SDPA in fp32 (the compute dtype)")
        if cap.isa == "amx":
            return AttentionChoice("sdpa", "sdpa", "attention: SDPA in bf16 (AMX)")
        return AttentionChoice("sdpa_fp32", "sdpa_fp32",
                               f"attention: SDPA in fp32, CPU bf16 flash attention is slower without AMX ({cap.isa})")
    fallback = min(sdpa, key=sdpa.get)
    ms = lambda k: f"{times[k] * 1e3:.1f}"  # noqa: E731
    bmm = times.get("bmm")
    if bmm and bmm * BMM_ATTENTION_MIN_GAIN < times[fallback]:
        limit = times[fallback] / bmm / BMM_ATTENTION_MIN_GAIN
        words = _KERNEL_WORDS[fallback]
        return AttentionChoice("bmm", fallback, (
            f"attention: batched matmuls in {compute_dtype}, measured {times[fallback] / bmm:.1f}x {words} on "
            f"equal conversations ({ms('bmm')} vs {ms(fallback)} ms a layer), in groups of conversations padded up to "
            f"{limit:.2f}x; {words} for rows too long for it"), round(limit, 3))
    others = ", ".join(f"{_KERNEL_WORDS[k]} {ms(k)}" for k in times if k != fallback)
    if bmm and bmm < times[fallback]:  # faster on equal conversations, not by enough to pay for a row's padding
        return AttentionChoice(fallback, fallback, (
            f"attention: {_KERNEL_WORDS[fallback]} in {compute_dtype} ({ms(fallback)} ms a layer; {others}: "
            f"batched matmuls pad each conversation to its group's longest, and gain less than the "
            f"{BMM_ATTENTION_MIN_GAIN}x that needs)"))
    return AttentionChoice(fallback, fallback, (f"attention: {_KERNEL_WORDS[fallback]}, measured fastest in "
                                                f"{compute_dtype} ({ms(fallback)} ms a layer; {others})"))
