"""Causal attention over the conversations of a packed row, each attending only to itself.

A padding-free packed row holds several conversations end to end (`sizes`: their lengths). Two
kernels compute the same thing; which one is faster depends on the CPU and the dtype, so the
calibration times both (`toolkit.core.calibration`) and `toolkit.core.attention_kernels.packed_attention`
picks one:

- `sdpa`: PyTorch's scaled-dot-product attention, one causal call per conversation. Its CPU flash
  kernel skips the masked half and keeps no L x L tensor, but a call costs ~0.4-0.8 ms at ~100
  tokens (9 query / 3 KV heads of 64, 2 threads), whatever the FLOPs; in bf16 without AMX it
  measured 2x slower than in fp32 (the AVX512-BF16 EPYCs here).
- `bmm`: the conversations right-padded into one batch, attended with batched matmuls (causal mask
  added inside the first one, softmax, second one), backward written out (dV = Pᵀ·dO, dS = P∘(dO·Vᵀ −
  rowsum(dO∘O)), dQ = dS·K, dK = dSᵀ·Q). Six large matmuls a layer instead of two kernel calls per
  conversation, at the compute dtype's matmul rate: on the Zen 5 EPYC in bf16 3.4-5.3 ms against
  7.0-7.6 ms for `sdpa` in fp32 for a row of 10 conversations of 60-130 tokens, forward and backward.
  Each conversation's queries go in CAUSAL_BLOCKS blocks of positions, a block's products reaching
  only the keys up to its end, so the masked corner above the diagonal is mostly not computed.
  It keeps the probabilities (n x heads x L x L, less that corner) for the backward and pads every
  conversation to the longest, so it only runs where `bmm_fits` says that costs little.

Which rows bmm takes: its cost grows with the padded scores (n x max(L)^2), SDPA's with the
conversations' own (sum of L^2), so the calibration times both on a row of equal conversations
(no padding) and bmm takes a row only where that gain, divided by the row's `padding`, still clears
the bar (`attention_kernels.packed_attention` gives the limit as `max_padding`). On the Zen 5, fp32, rows of
the finance recipe (7-10 conversations of 80-161 tokens, padding 1.06-1.30): SDPA / bmm 1.01-1.44x,
and 0.85x on a row of 60-130 tokens (padding 1.75); the gain measured on 8 x 128 tokens over the row's
padding predicts each within ~7% (docs/cpu-training.md).

- `varlen` (CUDA only): PyTorch's variable-length flash kernel (`torch.nn.attention.varlen`), the
  whole row in one call with the conversations' bounds, forward and backward: what flash-attn's
  varlen kernel is to transformers' `flash_attention_2`, shipped inside PyTorch (2.10+). Without it
  a packed row on CUDA is a block-diagonal mask over the whole micro-batch, O((batch x seq_len)^2)
  (`toolkit.finetune.packed_attention`).

Right-padding needs no mask beyond the causal one: a real query sees only keys at or before it, all
real; the padded queries' outputs are dropped and get no gradient, so the padded keys get none.
Both kernels take q (1, H, T, D) and k, v (1, KV, T, D) with H a multiple of KV (grouped-query
attention: query head h reads KV head h // (H / KV), as transformers' `repeat_kv`), and return
(1, T, H, D) in q's dtype.
"""

from __future__ import annotations

import functools
import math

# sdpa_fp32: sdpa on fp32 copies of bf16 inputs, the result cast back.
CPU_KERNELS = ("sdpa", "sdpa_fp32", "bmm")  # what the CPU calibration times
KERNELS = (*CPU_KERNELS, "varlen")
FALLBACKS = ("sdpa", "sdpa_fp32")
# bmm keeps n * H * L^2 probabilities a layer: allowed up to this many times the row's queries
# (T * H * D). Uniform conversations of L tokens give L <= 4 * D: 256 tokens at head size 64; a row
# whose short conversations would be padded to one long one falls back to sdpa.
BMM_MAX_SCORES_PER_QUERY_ELEMENT = 4
# bmm splits each conversation's queries into this many blocks of positions, block j attending only
# to the keys up to its end: the products and the softmax skip the masked corner above the diagonal
# (a quarter of the scores at 2 blocks). 2 against 1 and 3, every step's batch through each in one
# training run (the Zen 4 EPYC, finance CPU profile, 2026-12-05): docs/cpu-training.md, seventh session.
CAUSAL_BLOCKS = 2


def bmm_fits(sizes, head_dim: int) -> bool:
    """Whether the bmm kernel's probabilities for conversations of `sizes` stay within
    BMM_MAX_SCORES_PER_QUERY_ELEMENT times the row's queries (see the module)."""
    return len(sizes) * max(sizes) ** 2 <= BMM_MAX_SCORES_PER_QUERY_ELEMENT * sum(sizes) * head_dim


def padding(sizes) -> float:
    """The bmm kernel's scores for conversations of `sizes` over theirs alone: n * max(L)^2 / sum(L^2)
    (1.0 for equal lengths)."""
    return len(sizes) * max(sizes) ** 2 / sum(s * s for s in sizes)


def attend(q, k, v, sizes, kernel: str = "sdpa", fallback: str = "sdpa", scale=None, dropout: float = 0.0,
           max_padding: float = math.inf):
    """The packed row's attention with `kernel`; with `fallback` where bmm does not fit the row
    (`bmm_fits`), would pad it more than `max_padding` (`padding`), or there is dropout (bmm has none)."""
    import torch

    if kernel == "varlen":
        if dropout == 0.0 and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
            return varlen(q, k, v, sizes, scale)
        kernel = fallback
    if kernel == "bmm":
        if dropout == 0.0 and bmm_fits(sizes, q.shape[-1]) and padding(sizes) <= max_padding:
            return bmm(q, k, v, sizes, scale)
        kernel = fallback
    if kernel == "sdpa_fp32" and q.dtype != torch.float32:
        # bf16 autocast puts SDPA on its lower-precision list: it would cast the fp32 copies straight back.
        with torch.autocast(q.device.type, enabled=False):
            return sdpa(q.float(), k.float(), v.float(), sizes, scale, dropout).to(q.dtype)
    return sdpa(q, k, v, sizes, scale, dropout)


def sdpa(q, k, v, sizes, scale=None, dropout: float = 0.0):
    """Each conversation through SDPA's causal kernel, grouped-query attention in the kernel."""
    import torch

    gqa = q.shape[1] != k.shape[1]
    # split, not slicing: its backward is one cat of the pieces' gradients, where each slice's
    # backward zero-fills a full-size tensor and adds it up (~10 conversations a row, 3 tensors a layer).
    out = torch.cat([
        torch.nn.functional.scaled_dot_product_attention(
            a, b, c, dropout_p=dropout, scale=scale, is_causal=True, enable_gqa=gqa)
        for a, b, c in zip(q.split(sizes, dim=2), k.split(sizes, dim=2), v.split(sizes, dim=2))
    ], dim=2)
    return out.transpose(1, 2).contiguous()


@functools.cache
def varlen_call():
    """(torch's varlen_attn, its causal keyword arguments, whether it takes grouped-query K/V), or
    None where this PyTorch has none. Its keywords changed between releases: 2.10 took
    `is_causal=True`, later ones `window_size=(-1, 0)` and `enable_gqa`; a PyTorch with neither
    causal form is treated as having none (tests/core/test_segment_attention.py reads the signature)."""
    import inspect

    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal, "enable_gqa" in params


def varlen(q, k, v, sizes, scale=None):
    """The row through PyTorch's varlen flash kernel: q (1, H, T, D), k and v (1, KV, T, D) in,
    (1, T, H, D) out. transformers' q, k, v are (1, T, h, D) projections transposed, so the kernel's
    (T, h, D) layout is a view of them, not a copy."""
    import torch

    call = varlen_call()
    if call is None:
        raise RuntimeError("this PyTorch has no torch.nn.attention.varlen.varlen_attn")
    fn, causal, takes_gqa = call
    heads, kv = q.shape[1], k.shape[1]
    qt, kt, vt = (x[0].transpose(0, 1).contiguous() for x in (q, k, v))  # no copy for transformers' layout
    extra = dict(causal)
    if kv != heads:
        if takes_gqa:
            extra["enable_gqa"] = True
        else:
            kt, vt = kt.repeat_interleave(heads // kv, dim=1), vt.repeat_interleave(heads // kv, dim=1)
    cu = _cumulative(tuple(sizes), q.device)
    longest = max(sizes)
    return fn(qt, kt, vt, cu, cu, longest, longest, scale=scale, **extra).unsqueeze(0)


def _cumulative(sizes: tuple[int, ...], device):
    """The kernel's int32 conversation starts on `device`, made in every layer. Making them once a
    forward (benchmarks/gpu_attention_ab.py `varlen_once`) read no different on an H200 for QLoRA
    (median steps 0.314 / 0.323 s against 0.346 / 0.296, 2026-12-04); LoRA's is not measured yet."""
    import itertools

    import torch

    return torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.int32, device=device)


def bmm(q, k, v, sizes, scale=None):
    """The conversations padded into one batch and attended with batched matmuls (see the module)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _bmm_function().apply(q, k, v, tuple(sizes), float(scale))


def causal_blocks(length: int, blocks: int | None = None) -> list[tuple[int, int]]:
    """The (start, end) positions of the query blocks the bmm kernel splits `length` into
    (`CAUSAL_BLOCKS` of them unless given); block (a, b) attends to keys [0, b). Empty blocks
    (length < blocks) are left out."""
    blocks = CAUSAL_BLOCKS if blocks is None else blocks
    ends = [-(-length * j // blocks) for j in range(blocks + 1)]
    return [(a, b) for a, b in zip(ends, ends[1:]) if b > a]


def _pad(x, index, n: int, length: int, kv: int):
    """(1, h, T, D) -> (n * kv, length * group, D) contiguous: per conversation and KV head, the rows
    of its `group` = h / kv query heads token-major ((t, g) for g fastest), zeros after each
    conversation's end. Token-major keeps a block of positions one run of rows (`causal_blocks`).

    The rows are scattered token-major, the layout transformers leaves q, k and v in (a (1, T, h, D)
    tensor transposed), then permuted in one copy."""
    h, d = x.shape[1], x.shape[3]
    buf = x.new_zeros(n * length, h, d).index_copy_(0, index, x[0].transpose(0, 1))
    return buf.view(n, length, kv, h // kv, d).transpose(1, 2).reshape(n * kv, length * (h // kv), d)


def _unpad(x, index, n: int, length: int):
    """(n * kv, length * group, D) -> (T, h, D) contiguous: the real rows back in row order,
    token-major, so that transformers' reshape of the attention output to (1, T, h * D) is a view,
    not a copy. Timed in alternating steps of one training run (finance CPU profile, the Zen 5 EPYC):
    0.07 ms a call against 0.11 for a head-major (h, T, D), plus the copy that saves."""
    rows, d = x.shape[1], x.shape[2]
    kv, group = x.shape[0] // n, rows // length
    return x.view(n, kv, length, group, d).transpose(1, 2).reshape(n * length, kv * group, d).index_select(0, index)


@functools.cache
def _bmm_function():
    import torch

    class PaddedBatchAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, sizes, scale):
            n, length = len(sizes), max(sizes)
            heads, kv, d = q.shape[1], k.shape[1], q.shape[3]
            group = heads // kv
            index = torch.cat([torch.arange(s, device=q.device) + i * length for i, s in enumerate(sizes)])
            # Query heads of one KV head stacked along the rows: one matmul per (conversation, KV head).
            Q, K, V = _pad(q, index, n, length, kv), _pad(k, index, n, length, kv), _pad(v, index, n, length, kv)
            causal = torch.full((length, length), float("-inf"), dtype=q.dtype, device=q.device).triu_(1)
            causal = causal.repeat_interleave(group, 0)  # a row per (position, query head)
            Ps, Os = [], []
            # In the inputs' dtype (the caller's choice), whatever an enclosing autocast would cast to.
            with torch.autocast(q.device.type, enabled=False):
                for a, b in causal_blocks(length):
                    rows = slice(a * group, b * group)
                    P = torch.baddbmm(causal[rows, :b], Q[:, rows], K[:, :b].transpose(1, 2), alpha=scale).softmax(-1)
                    Ps.append(P)
                    Os.append(torch.bmm(P, V[:, :b]))
            O = torch.cat(Os, 1) if len(Os) > 1 else Os[0]
            ctx.save_for_backward(Q, K, V, O, index, *Ps)
            ctx.dims = (n, length, group, scale)
            return _unpad(O, index, n, length).unsqueeze(0)

        @staticmethod
        def backward(ctx, grad_out):
            Q, K, V, O, index, *Ps = ctx.saved_tensors
            n, length, group, scale = ctx.dims
            kv = Q.shape[0] // n
            dO = _pad(grad_out.transpose(1, 2).to(O.dtype), index, n, length, kv)
            delta = (dO * O).sum(-1, keepdim=True)  # rowsum(dO∘O), the softmax's backward term
            dQs, dK, dV = [], None, None
            # The last block sees every key: it writes dK and dV whole, the earlier ones add to their heads.
            for (a, b), P in reversed(list(zip(causal_blocks(length), Ps))):
                rows = slice(a * group, b * group)
                dS = torch.bmm(dO[:, rows], V[:, :b].transpose(1, 2)).sub_(delta[:, rows]).mul_(P)
                dQs.append(torch.bmm(dS, K[:, :b]))
                if dV is None:
                    dV, dK = torch.bmm(P.transpose(1, 2), dO[:, rows]), torch.bmm(dS.transpose(1, 2), Q[:, rows])
                else:
                    # Into fresh products, then added: `baddbmm_` into the slice (not contiguous) runs one
                    # `addmm_` per batch matrix (24 a call at 8 conversations of 3 KV heads).
                    dV[:, :b].add_(torch.bmm(P.transpose(1, 2), dO[:, rows]))
                    dK[:, :b].add_(torch.bmm(dS.transpose(1, 2), Q[:, rows]))
            dQ = (torch.cat(dQs[::-1], 1) if len(dQs) > 1 else dQs[0]).mul_(scale)
            back = lambda x: _unpad(x, index, n, length).transpose(0, 1).unsqueeze(0)  # noqa: E731
            return back(dQ), back(dK.mul_(scale)), back(dV), None, None

    return PaddedBatchAttention
