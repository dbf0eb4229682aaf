"""The CPU LM head over vocabulary blocks, never materializing the logits (frozen weight; fp32, or
bf16 past what the materialized head takes).

`cpu_lm_head.LogProbs` writes the labelled positions' logits once (460 x 49,152 fp32 is 90 MB on
the finance recipe's CPU profile), reads them back for the softmax, and in the backward reads and
writes them again before its second matmul reads them: every pass goes to DRAM, past the 32 MB L3,
and evicts what the decoder layers' backward reads next. Here the vocabulary comes in blocks whose
logits, exponentials and weight rows take VOCAB_BLOCK_BYTES (2,560 rows at 460 positions of width
576), each block's two products and its softmax work done while it is in cache, with an online
log-sum-exp (the running maximum rescales what came before, as flash attention does):

- z = h @ W_b.T, then e = exp(z - m) with m the running row maximum;
- sum e, sum e * z (for the entropy), the first maximum's index (top-1), the target's logit;
- P @ W accumulated as e @ W_b: the product the backward would run on the probabilities, run
  here instead, so nothing vocabulary-sized is kept.

For the log-probabilities the hidden states' gradient is then closed-form, d log p_t / d h =
scale * (W[t] - P @ W): the backward is one gather and one subtraction. The entropy's gradient
would need (p log p) @ W as well; SFTTrainer only logs the entropy (detached), so where a caller
does differentiate it the backward recomputes the blocks for that term. A trained weight's gradient
needs the logits' own gradient: `cpu_lm_head.streams` sends such calls to the materialized head.

The same two matmuls' FLOPs as `LogProbs`; what it changes is memory. It keeps nothing
vocabulary-sized (the materialized head keeps its 90 MB logits buffer from step to step on the finance
recipe's CPU profile, 236 MB for Llama-3.2-1B's 128,256-token vocabulary at the same positions), and it
takes any number of positions, where past MAX_LOGITS_BYTES of logits TRL's three-matmul kernel ran
instead: Llama-3.2-1B's head at 1,500 positions took 10.0 s against TRL's 18.4 (`benchmarks/bench_lm_head.py`,
Zen 3 EPYC, fp32). In the finance recipe's steps (Zen 3 EPYC, fp32, every batch through both heads,
alternating, 16-18-step runs; docs/cpu-training.md, twentieth session) the two read alike: 0.993, 1.001,
0.977 and 1.024 of the materialized head's step time, inside what steps resolve on that host.
In bf16 (the weight's dtype; `cpu_lm_head.streams` sends it here only past MAX_LOGITS_BYTES) each
block's two products run in bf16, as the materialized head's do, into reused bf16 buffers widened in
cache: the logits to fp32 for the softmax, P @ W_b summed in fp32. Llama-3.2-1B's head at 1,500
positions took 4.52 s against TRL's 9.44 (`make bench` lm_head, Zen 4 EPYC, AVX512-BF16).
Tests: tests/finetune/test_cpu_lm_head.py, against TRL's kernel and a float64 softmax.
"""

from __future__ import annotations

import functools

# A block's working set: its fp32 logits and their exponentials (N x block each) and its weight rows
# (block x H), read twice. Sized to stay in a CPU's last-level cache between the two products.
VOCAB_BLOCK_BYTES = 16 * 2**20
BLOCK_ALIGN = 256


def vocab_block(n_tokens: int, vocab: int, hidden: int) -> int:
    """Vocabulary rows a block: a working set of VOCAB_BLOCK_BYTES at `n_tokens` positions of width
    `hidden` (fp32), a multiple of BLOCK_ALIGN (at least one), at most `vocab`."""
    rows = VOCAB_BLOCK_BYTES // (4 * (2 * max(1, n_tokens) + hidden)) // BLOCK_ALIGN * BLOCK_ALIGN
    return min(vocab, max(BLOCK_ALIGN, rows))


@functools.cache
def function():
    """The autograd Function (built on first use, so importing this module does not import torch)."""
    import torch

    def scaled(hidden, scale):
        """The hidden states times the logit scale (N x H multiplies, not N x V)."""
        return hidden.contiguous() if scale == 1.0 else hidden * scale

    def blocks(hidden, weight, scale):
        """(first row, W_b, the block's fp32 logits scale * h @ W_b.T in a reused buffer) for each block.
        In a lower dtype (the weight's; bf16 training) the product lands in a reused buffer of that dtype
        and is widened into the fp32 one while it is in cache, the scale applied there in fp32."""
        narrow = weight.dtype != torch.float32
        h = hidden.to(weight.dtype).contiguous() if narrow else scaled(hidden, scale)
        n, vocab = h.shape[0], weight.shape[0]
        cols = vocab_block(n, vocab, h.shape[1])
        buf = torch.empty(n * cols, dtype=torch.float32, device=h.device)
        low = torch.empty(n * cols, dtype=h.dtype, device=h.device) if narrow else None
        for start in range(0, vocab, cols):
            w = weight[start:start + cols]
            z = buf[:n * w.shape[0]].view(n, w.shape[0])
            if low is None:
                yield start, w, torch.mm(h, w.t(), out=z)
            else:
                z.copy_(torch.mm(h, w.t(), out=low[:z.numel()].view_as(z)))
                yield start, w, (z if scale == 1.0 else z.mul_(scale))

    def _first_maxima(z, better, start, top):
        """`top` = the first maximum's index (+ `start`), as TRL's top-1 test, in the rows `better`
        (the block holds a new running maximum). torch's `max(dim)`/`argmax` ran at ~1/7 the speed of
        `amax` on these blocks (1.3 against 0.19 ms at 460 x 2,560, the Zen 3): the index is taken only
        for the rows whose maximum moved, all of them in the first block, fewer and fewer after."""
        if bool(better.all()):
            torch.add(z.argmax(-1), start, out=top)
        elif bool(better.any()):
            rows = better.nonzero().squeeze(1)
            top.index_copy_(0, rows, z.index_select(0, rows).argmax(-1).add_(start))

    class StreamedLogProbs(torch.autograd.Function):
        """(hidden [N, H], weight [V, H], targets [N]) -> (log p(target), entropy, None, None, is_top1),
        TRL's `ChunkedLogProbFunction` outputs for `outputs` within `cpu_lm_head.SUPPORTED_OUTPUTS`."""

        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                    logit_scale=1.0, outputs=("log_probs",)):
            ctx.set_materialize_grads(False)
            scale = logit_scale / temperature
            n = hidden.shape[0]
            wants_grad = ctx.needs_input_grad[0]
            with torch.autocast(hidden.device.type, enabled=False):
                dev = hidden.device
                peak = torch.full((n,), -torch.inf, device=dev)
                sum_e = torch.zeros(n, device=dev)
                sum_ez = torch.zeros(n, device=dev) if "entropy" in outputs else None
                p_w = torch.zeros(hidden.shape, device=dev) if wants_grad else None
                top = torch.zeros(n, dtype=torch.long, device=dev)
                target_z = torch.zeros(n, device=dev)
                e_buf = e_low = pw_low = None
                for start, w, z in blocks(hidden, weight, scale):
                    block_peak = z.amax(-1)
                    _first_maxima(z, block_peak > peak, start, top)  # an earlier block's tie stays
                    new_peak = torch.maximum(peak, block_peak)
                    rescale = torch.exp(peak - new_peak)  # 0 at the first block
                    peak = new_peak
                    rel = targets - start
                    inside = (rel >= 0) & (rel < w.shape[0])
                    target_z += torch.where(inside, z.gather(1, rel.clamp(0, w.shape[0] - 1).unsqueeze(1)).squeeze(1),
                                            0.0)
                    if e_buf is None:
                        e_buf = torch.empty_like(z.view(-1))
                    e = torch.sub(z, peak.unsqueeze(1), out=e_buf[:z.numel()].view_as(z)).exp_()
                    sum_e.mul_(rescale).add_(e.sum(-1))
                    if sum_ez is not None:
                        sum_ez.mul_(rescale).add_(torch.linalg.vecdot(e, z))
                    if p_w is not None and w.dtype == torch.float32:
                        p_w.mul_(rescale.unsqueeze(1)).addmm_(e, w)
                    elif p_w is not None:  # e in the weight's dtype, as the materialized head's gradient is
                        if e_low is None:
                            e_low = torch.empty_like(e_buf, dtype=w.dtype)
                            pw_low = torch.empty(hidden.shape, dtype=w.dtype, device=dev)
                        el = e_low[:e.numel()].view_as(e).copy_(e)
                        p_w.mul_(rescale.unsqueeze(1)).add_(torch.mm(el, w, out=pw_low))
                log_z = peak + sum_e.log()
                entropy = None if sum_ez is None else log_z - sum_ez / sum_e
                if p_w is not None:
                    p_w.div_(sum_e.unsqueeze(1))
            is_top1 = top == targets if "is_top1" in outputs else None
            ctx.save_for_backward(hidden, weight, targets, p_w, log_z, entropy)
            ctx.scale = scale
            if is_top1 is not None:
                ctx.mark_non_differentiable(is_top1)
            return target_z - log_z, entropy, None, None, is_top1

        @staticmethod
        def backward(ctx, grad_log_probs, grad_entropy, *_):
            hidden, weight, targets, p_w, log_z, entropy = ctx.saved_tensors
            if ctx.needs_input_grad[1]:
                raise RuntimeError("the streamed LM head has no weight gradient (cpu_lm_head.streams sends such "
                                   "calls to the materialized head)")
            if not ctx.needs_input_grad[0]:
                return (None,) * 9
            with torch.autocast(hidden.device.type, enabled=False):
                grad = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
                if grad_log_probs is not None:  # d log p_t / dh = scale * (W[t] - sum_j p_j W_j)
                    grad.add_(weight[targets].float() - p_w).mul_(grad_log_probs.float().unsqueeze(1))
                if grad_entropy is not None:
                    # d H / dz_j = -p_j (log p_j + H): recomputed by blocks (SFTTrainer never asks)
                    g = grad_entropy.float().unsqueeze(1)
                    for _, w, z in blocks(hidden, weight, ctx.scale):
                        log_p = z.sub_(log_z.unsqueeze(1))
                        grad.addmm_(log_p.exp() * (log_p + entropy.unsqueeze(1)) * g, w.float(), alpha=-1.0)
                if ctx.scale != 1.0:
                    grad.mul_(ctx.scale)
            return grad.to(hidden.dtype), None, None, None, None, None, None, None, None

    return StreamedLogProbs
