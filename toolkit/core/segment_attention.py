"""Causal attention over the conversations of a packed row, each attending only to itself.

A padding-free packed row holds several conversations end to end (`sizes`: their lengths). Two
kernels compute the same thing; which one is faster depends on the CPU and the dtype, so the
calibration times both (`toolkit.core.calibration`) and `toolkit.core.attention_kernels.packed_attention`
picks one:

- `sdpa`: PyTorch's scaled-dot-product attention, one causal call per conversation. Its CPU flash
  kernel skips the masked half and keeps no L x L tensor, but a call costs ~0.4-0.8 ms at ~100
  tokens (9 query / 3 KV heads of 64, 2 threads), whatever the FLOPs; in bf16 without AMX it
  measured 2x slower than in fp32 (the AVX512-BF16 EPYCs here).
- `bmm`: the conversations in groups of similar length, each group right-padded into one batch and
  attended with batched matmuls (causal mask added inside the first one, softmax, second one), backward
  written out (dV = Pᵀ·dO, dS = P∘(dO·Vᵀ − rowsum(dO∘O)), dQ = dS·K, dK = dSᵀ·Q). Six large matmuls a
  group and layer instead of two kernel calls per conversation, at the compute dtype's matmul rate: on
  the Zen 5 EPYC in bf16 3.4-5.3 ms against 7.0-7.6 ms for `sdpa` in fp32 for a row of 10
  conversations of 60-130 tokens, forward and backward. Each conversation's queries go in CAUSAL_BLOCKS
  blocks of positions, a block's products reaching only the keys up to its end, so the masked corner
  above the diagonal is mostly not computed. It keeps the probabilities (n x heads x L x L a group, less
  that corner) for the backward, so it only runs where `bmm_fits` says they stay small. The rows go
  into its padded buffers and back by one `index_select` (a gather) each, with the indices made
  once a row (`_Layout`) and every block's queries one contiguous batch, so no product is copied.

Which conversations go together (`groups`): bmm's cost grows with the padded scores (n x max(L)^2),
SDPA's with the conversations' own (sum of L^2), so the calibration times both on a row of equal
conversations (no padding), and `attention_kernels.packed_attention` gives as `max_padding` the padding
that gain still covers; a row is split into groups, by length, each padded at most that much, where the
padding saved is worth a group's own calls (GROUP_COST_SCORES). On the Zen 5, fp32, whole rows of the
finance recipe (7-10 conversations of 80-161 tokens, padding 1.06-1.30): SDPA / bmm 1.01-1.44x, and
0.85x on a row of 60-130 tokens (padding 1.75); the gain measured on 8 x 128 tokens over the row's
padding predicts each within ~7% (docs/cpu-training.md). On the Zen 3, fp32, the recipe's 40 rows of a
run forward and backward: groups took 0.747 of the time of whole rows (bmm up to a padding of 1.19,
SDPA past it); 0.93 on the rows bmm took whole, 0.68 on SDPA's; in the recipe's steps 0.974 and 0.969
(docs/cpu-training.md, twenty-first session).

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
# bmm keeps n * H * L^2 probabilities a layer over its groups (`groups`): allowed up to this many times
# the row's queries (T * H * D). One conversation alone may have L <= 4 * D: 256 tokens at head size 64;
# a row past it falls back to sdpa.
BMM_MAX_SCORES_PER_QUERY_ELEMENT = 4
# bmm splits each conversation's queries into this many blocks of positions, block j attending only
# to the keys up to its end: the products and the softmax skip the masked corner above the diagonal
# (a quarter of the scores at 2 blocks). 2 against 1 and 3, every step's batch through each in one
# training run (the Zen 4 EPYC, finance CPU profile, 2026-12-05): docs/cpu-training.md, seventh session.
CAUSAL_BLOCKS = 2
# A group's own cost in the bmm kernel, in padded score positions (n * L^2): ~12 matmul and softmax
# calls whatever their size. Measured on the Zen 3 EPYC, fp32, heads 9 / 3 of 64, forward and backward:
# 1 conversation of 125 tokens 2.36 ms, 8 of them 13.04 (0.83 ms, ~8,400); of 64 tokens 1.20 and 4.15
# (0.78 ms, ~7,600). 4,000 and 16,000 read within 2% of it on the recipe's rows (docs/cpu-training.md,
# twenty-first session).
GROUP_COST_SCORES = 8000


def groups(sizes, head_dim: int, max_padding: float = math.inf, max_scores: float | None = None):
    """The bmm kernel's groups for conversations of `sizes`: lists of their indices, each group padded
    to its longest, every group's `padding` within `max_padding`, the fewest padded scores plus
    GROUP_COST_SCORES a group (conversations sorted by length, split where that costs least). None where
    the groups' padded scores pass `max_scores` (default BMM_MAX_SCORES_PER_QUERY_ELEMENT) times the
    row's T * head_dim: that row goes to SDPA."""
    limit = (BMM_MAX_SCORES_PER_QUERY_ELEMENT if max_scores is None else max_scores) * sum(sizes) * head_dim
    order = sorted(range(len(sizes)), key=lambda c: -sizes[c])
    lengths = [sizes[c] for c in order]
    for group_cost in (GROUP_COST_SCORES, 0):  # 0: the fewest scores, where the cheapest split is too big
        runs = _cheapest_split(lengths, max_padding, group_cost)
        if runs is not None and sum((b - a) * lengths[a] ** 2 for a, b in runs) <= limit:
            return [order[a:b] for a, b in runs]
    return None


def _cheapest_split(lengths, max_padding: float, group_cost: float):
    """[(start, end)] splitting `lengths` (descending) into runs, each within `max_padding`, for the
    least n * longest^2 + group_cost summed (None where none is within it); by dynamic programming."""
    n = len(lengths)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        squares = 0
        for start in range(end - 1, -1, -1):  # the run lengths[start:end], its longest lengths[start]
            squares += lengths[start] ** 2
            scores = (end - start) * lengths[start] ** 2
            if scores <= max_padding * squares and best[start] + group_cost + scores < best[end]:
                best[end], cut[end] = best[start] + group_cost + scores, start
    if math.isinf(best[n]):
        return None
    runs, end = [], n
    while end > 0:
        runs.append((cut[end], end))
        end = cut[end]
    return runs[::-1]


def bmm_fits(sizes, head_dim: int) -> bool:
    """Whether the bmm kernel's probabilities for conversations of `sizes`, in its `groups`, stay within
    BMM_MAX_SCORES_PER_QUERY_ELEMENT times the row's queries (see the module)."""
    return groups(sizes, head_dim) is not None


def kept_scores_per_token(conversation_tokens: float, heads: int, head_dim: int, blocks: int | None = None) -> float:
    """The probabilities the bmm kernel keeps for the backward, entries per token of a row of equal
    conversations of `conversation_tokens` (no padding) over `heads` query heads: each conversation's
    `causal_blocks` keep (b - a) x b each a head, L (blocks + 1) / (2 blocks) a token for L divisible
    by the blocks. 0 for no packed rows (`conversation_tokens` 0) and past what `bmm_fits` takes (such
    rows go to SDPA, which keeps none). For the planner (`toolkit.estimate.formulas.cpu_fused_layer_activation_bytes`)."""
    length = float(conversation_tokens)
    if length <= 0 or length > BMM_MAX_SCORES_PER_QUERY_ELEMENT * head_dim:  # n L^2 > limit x n L x D: SDPA
        return 0.0
    blocks = CAUSAL_BLOCKS if blocks is None else blocks
    return heads * length * (blocks + 1) / (2 * blocks)


def padding(sizes) -> float:
    """The scores of conversations of `sizes` padded to their longest over theirs alone:
    n * max(L)^2 / sum(L^2) (1.0 for equal lengths)."""
    return len(sizes) * max(sizes) ** 2 / sum(s * s for s in sizes)


def attend(q, k, v, sizes, kernel: str = "sdpa", fallback: str = "sdpa", scale=None, dropout: float = 0.0,
           max_padding: float = math.inf):
    """The packed row's attention with `kernel`; bmm in `groups` each padded at most `max_padding`, with
    `fallback` where they do not fit (`bmm_fits`) or there is dropout (bmm has none)."""
    import torch

    if kernel == "varlen":
        if dropout == 0.0 and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
            return varlen(q, k, v, sizes, scale)
        kernel = fallback
    if kernel == "bmm":
        if dropout == 0.0 and _layout_for(q, k, sizes, max_padding) is not None:  # cached: bmm reuses it
            return bmm(q, k, v, sizes, scale, max_padding)
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


def bmm(q, k, v, sizes, scale=None, max_padding: float = math.inf):
    """The conversations in `groups`, each padded into one batch and attended with batched matmuls (see
    the module); raises ValueError where they do not fit (`bmm_fits`)."""
    layout = _layout_for(q, k, sizes, max_padding)
    if layout is None:
        raise ValueError(f"bmm attention: conversations of {list(sizes)} do not fit (bmm_fits)")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _bmm_function().apply(q, k, v, layout, float(scale))


def causal_blocks(length: int, blocks: int | None = None) -> list[tuple[int, int]]:
    """The (start, end) positions of the query blocks the bmm kernel splits `length` into
    (`CAUSAL_BLOCKS` of them unless given); block (a, b) attends to keys [0, b). Empty blocks
    (length < blocks) are left out."""
    blocks = CAUSAL_BLOCKS if blocks is None else blocks
    ends = [-(-length * j // blocks) for j in range(blocks + 1)]
    return [(a, b) for a, b in zip(ends, ends[1:]) if b > a]


class _Layout:
    """Where each (token, KV head) row of a packed row goes in the bmm kernel's padded buffers, and the
    groups' views of them. Q, O and their gradients: group by group, query block by block
    (`causal_blocks`), (conversation, KV head), then position, each row holding the KV head's `group`
    query heads, so a block's queries are one contiguous (n * kv, r * group, D) batch and its output is
    written in place. K, V and theirs: group by group, (conversation, KV head), position. Padded rows are
    zeros (a padded query sees only keys of its own conversation and padding; its output is dropped)."""

    def __init__(self, sizes, kv: int, plan, blocks: int, device):
        import itertools

        import torch

        starts = [0, *itertools.accumulate(sizes)]
        q_index = torch.empty(starts[-1] * kv, dtype=torch.long)
        kv_index = torch.empty_like(q_index)
        heads = torch.arange(kv)[None, :, None]
        self.groups, row = [], 0
        for members in plan:
            n, length = len(members), max(sizes[c] for c in members)
            lens = torch.tensor([sizes[c] for c in members])[:, None, None]
            first = torch.tensor([starts[c] for c in members])[:, None, None]
            slots = torch.arange(n)[:, None, None] * kv + heads  # (n, kv, 1)
            pos = torch.arange(length)[None, None, :]
            real = (pos < lens).expand(n, kv, length)
            kv_index[((first + pos) * kv + heads).expand(n, kv, length)[real]] = (row + slots * length + pos)[real]
            spans, q_row = [], row
            for a, b in causal_blocks(length, blocks):
                p = pos[..., a:b]
                real = (p < lens).expand(n, kv, b - a)
                q_index[((first + p) * kv + heads).expand(n, kv, b - a)[real]] = (q_row + slots * (b - a) + p - a)[real]
                spans.append((a, b, q_row))
                q_row += n * kv * (b - a)
            self.groups.append((row, n, length, tuple(spans)))
            row = q_row

        def padded(index):
            free = torch.ones(row, dtype=torch.bool)
            free[index] = False
            rows = free.nonzero().flatten()
            return rows.to(device) if rows.numel() else None

        def source(index):
            # each buffer row's input row (a padded row reads row 0, then is zeroed): the buffers are
            # filled by a gather, which read 89 against 298 us for a scatter (`index_copy_`) of the
            # recipe's 3,150 x 192 bf16 Q in a step (the Zen 4 EPYC, docs/cpu-training.md)
            src = torch.zeros(row, dtype=torch.long)
            src[index] = torch.arange(index.numel())
            return src.to(device)

        self.q_pad, self.kv_pad = padded(q_index), padded(kv_index)
        self.q_source, self.kv_source = source(q_index), source(kv_index)
        self.q_index, self.kv_index = q_index.to(device), kv_index.to(device)


@functools.lru_cache(maxsize=8)
def _layout(sizes: tuple, kv: int, head_dim: int, max_padding: float, blocks: int, max_scores: float, device: str):
    plan = groups(sizes, head_dim, max_padding, max_scores)
    return None if plan is None else _Layout(sizes, kv, plan, blocks, device)


def _layout_for(q, k, sizes, max_padding: float):
    """The row's `_Layout`, or None where bmm does not take it; made once per row and reused by its
    layers (the module's constants are part of the key, so tests can change them)."""
    return _layout(tuple(int(s) for s in sizes), k.shape[1], q.shape[-1], float(max_padding), CAUSAL_BLOCKS,
                   float(BMM_MAX_SCORES_PER_QUERY_ELEMENT), str(q.device))


@functools.lru_cache(maxsize=4)
def _causal_mask(length: int, group: int, dtype, device):
    """-inf above the diagonal, a row per (position, query head): sliced to each block's queries and keys."""
    import torch

    return torch.full((length, length), float("-inf"), dtype=dtype, device=device).triu_(1).repeat_interleave(group, 0)


def _mask(length: int, group: int, dtype, device):
    # One mask serves every shorter group (a row's mask does not depend on the conversation's length).
    return _causal_mask(max(256, 1 << (length - 1).bit_length()), group, dtype, device)


def _padded(rows, source, pad):
    """The padded buffer of `rows` (one per (token, KV head)): its row i is rows[source[i]], `pad` zeroed."""
    buf = rows.index_select(0, source)
    return buf if pad is None else buf.index_fill_(0, pad, 0)


@functools.cache
def _bmm_function():
    import torch

    class PaddedBatchAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, layout, scale):
            heads, rows, d = q.shape[1], q.shape[2], q.shape[3]
            kv = k.shape[1]
            group = heads // kv
            # transformers' q, k, v are (1, T, h, D) projections transposed: (T * kv, group * D) is a view.
            Q = _padded(q[0].transpose(0, 1).reshape(rows * kv, group * d), layout.q_source, layout.q_pad)
            K, V = (_padded(x[0].transpose(0, 1).reshape(rows * kv, d), layout.kv_source, layout.kv_pad)
                    for x in (k, v))
            O = torch.empty_like(Q)
            Ps = []
            # In the inputs' dtype (the caller's choice), whatever an enclosing autocast would cast to.
            with torch.autocast(q.device.type, enabled=False):
                for row, n, length, spans in layout.groups:
                    causal = _mask(length, group, q.dtype, q.device)
                    Kg, Vg = (x[row:row + n * kv * length].view(n * kv, length, d) for x in (K, V))
                    for a, b, at in spans:
                        span = slice(at, at + n * kv * (b - a))
                        P = torch.baddbmm(causal[a * group:b * group, :b], Q[span].view(n * kv, -1, d),
                                          Kg[:, :b].transpose(1, 2), alpha=scale).softmax(-1)
                        torch.bmm(P, Vg[:, :b], out=O[span].view(n * kv, -1, d))
                        Ps.append(P)
            ctx.save_for_backward(Q, K, V, O, *Ps)
            ctx.layout, ctx.scale = layout, scale
            return O.index_select(0, layout.q_index).view(rows, heads, d).unsqueeze(0)

        @staticmethod
        def backward(ctx, grad_out):
            Q, K, V, O, *Ps = ctx.saved_tensors
            layout, scale = ctx.layout, ctx.scale
            rows, heads, d = grad_out.shape[1], grad_out.shape[2], grad_out.shape[3]
            group = Q.shape[1] // d
            kv = heads // group
            dO = _padded(grad_out[0].to(O.dtype).reshape(rows * kv, group * d), layout.q_source, layout.q_pad)
            delta = (dO.view(-1, group, d) * O.view(-1, group, d)).sum(-1, keepdim=True)  # rowsum(dO∘O)
            dQ, dK, dV = torch.empty_like(Q), torch.empty_like(K), torch.empty_like(V)
            P_of = iter(Ps)
            for row, n, length, spans in layout.groups:
                Kg, Vg, dKg, dVg = (x[row:row + n * kv * length].view(n * kv, length, d) for x in (K, V, dK, dV))
                # The last block sees every key: it writes dK and dV whole, the earlier ones add to their heads.
                for (a, b, at), P in reversed(list(zip(spans, [next(P_of) for _ in spans]))):
                    span = slice(at, at + n * kv * (b - a))
                    Qb, dOb, dQb = (x[span].view(n * kv, -1, d) for x in (Q, dO, dQ))
                    dS = torch.bmm(dOb, Vg[:, :b].transpose(1, 2)).sub_(delta[span].view(n * kv, -1, 1)).mul_(P)
                    torch.baddbmm(dQb, dS, Kg[:, :b], beta=0, alpha=scale, out=dQb)
                    if b == length:
                        torch.bmm(P.transpose(1, 2), dOb, out=dVg)
                        torch.baddbmm(dKg, dS.transpose(1, 2), Qb, beta=0, alpha=scale, out=dKg)
                    else:
                        # Into fresh products, then added: `baddbmm_` into the slice (not contiguous) runs one
                        # `addmm_` per batch matrix (24 a call at 8 conversations of 3 KV heads).
                        dVg[:, :b].add_(torch.bmm(P.transpose(1, 2), dOb))
                        dKg[:, :b].add_(torch.bmm(dS.transpose(1, 2), Qb), alpha=scale)

            def back(x, index, h):
                return x.index_select(0, index).view(rows, h, d).transpose(0, 1).unsqueeze(0)

            return (back(dQ, layout.q_index, heads), back(dK, layout.kv_index, kv), back(dV, layout.kv_index, kv),
                    None, None)

    return PaddedBatchAttention
