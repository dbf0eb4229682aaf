"""The LM head and per-token log-probabilities of the labelled positions, lean on a CPU.

TRL's SFTTrainer scores tokens with a fused, chunked kernel (`trl.kernels.ChunkedLogProbFunction`)
built for GPUs: it never materializes the `[N, vocab]` logits, so its backward recomputes them (a
third vocabulary-sized matmul), and on a device without Triton it folds each tile with ~15 separate
torch passes (transform, online max/sum-exp, entropy, top-1, target gather; then again for the
gradient). On the finance recipe's CPU profile (~460 labelled positions a step, SmolLM2's 49,152
vocabulary, 2-core AVX2 EPYC) that costs 0.96 s a step where the two matmuls it needs cost 0.32 s
(`benchmarks/bench_lm_head.py`; this module: 0.42 s).

On a CPU, memory is rarely what limits the labelled positions of one micro-batch (460 x 49,152 fp32
is 90 MB), so `LogProbs` materializes them once: one matmul, then in cache-sized row blocks the
softmax, the target's log-probability, and the entropy and top-1 TRL logs; the probabilities it
keeps turn into the gradient in place, so the backward is one multiply and one matmul. Same
contract and outputs as TRL's function (tests/finetune/test_cpu_lm_head.py compares values and
gradients against it); `fits` says when the logits are too large to materialize and TRL's chunked
kernel should run instead.

In fp32, where the model's frozen linears run pre-packed for oneDNN (`toolkit.core.packed_linear`),
both matmuls use the LM head weight's packs: MKL re-packs the 49,152-row weight at every call. On the
Zen 5 EPYC (AVX-512), 460 x 576 -> 49,152: 69.5 / 51.2 ms against 134.3 / 118.4 ms for torch's matmul
(forward / input gradient), and -6% a forced-fp32 step of the recipe (alternating 12-step runs:
1.684 / 1.794 / 1.682 against 1.784 / 1.811 / 1.793 s; docs/cpu-training.md). In bf16 torch's matmul
already runs in oneDNN; the packs measured no gain in training there (0.975 / 0.931 / 0.990 against
0.962 / 0.940 / 0.969 s a step) and the transposed one would take another 56 MB, so bf16 keeps it.

Two heads, one per call as `head_for` decides (`streams`): for a frozen weight that is not pre-packed,
`cpu_lm_head_streamed.StreamedLogProbs` takes the vocabulary in cache-sized blocks and keeps nothing
vocabulary-sized, for any number of positions: in fp32 always, in bf16 past MAX_LOGITS_BYTES (within it
the materialized head measured a little faster there); elsewhere (a packed or a trained weight, bf16
within the limit) `LogProbs` below, within MAX_LOGITS_BYTES.
"""

from __future__ import annotations

import contextlib

MAX_LOGITS_BYTES = 512 * 2**20  # past this the materialized head hands over: to TRL's kernel where it can't stream
ROW_BLOCK_BYTES = 4 * 2**20
SUPPORTED_OUTPUTS = frozenset({"log_probs", "entropy", "is_top1"})


def fits(n_tokens: int, vocab: int, bias, final_logit_softcapping, outputs, streamed: bool = False) -> bool:
    """Whether a CPU head handles this call: no LM-head bias or logit soft-capping (Llama, Qwen, SmolLM,
    Mistral have neither), only the outputs SFT asks for, and for the materialized head (not
    `streamed`) logits of `n_tokens` x `vocab` fp32 within MAX_LOGITS_BYTES."""
    return ((streamed or n_tokens * vocab * 4 <= MAX_LOGITS_BYTES) and bias is None
            and final_logit_softcapping is None and set(outputs) <= SUPPORTED_OUTPUTS)


def _compute_dtype(hidden):
    """The dtype the head's matmuls run in: autocast's where it is on for `hidden`'s device."""
    import torch

    dev = hidden.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype


def uses_weight_packs(dtype: str) -> bool:
    """Whether `LogProbs` multiplies through the LM head weight's oneDNN packs when it computes in
    `dtype` (a torch dtype's name): in fp32 only (see the module), so a bf16 run need not pack it."""
    return dtype == "float32"


def unpacked_head(model, dtype: str) -> tuple:
    """`model`'s LM head where a pack of its weight would serve nothing in `dtype` (`uses_weight_packs`), for
    `packed_linear`'s `skip` (56 MB made for nothing on SmolLM2 in bf16); else ()."""
    head = model.get_output_embeddings()
    return (head,) if head is not None and not uses_weight_packs(dtype) else ()


def first_maximum_at(z, peak, targets, target_z):
    """Whether each row's first maximum is at its target, TRL's top-1 test (a tie with an earlier token
    is not top-1), from the rows' maxima `peak` and target logits `target_z` without an argmax: torch's
    `max(dim)` / `argmax` took 0.88 ms a 21 x 49,152 block inside the recipe's steps, `amax` 0.07 (the
    Zen 3). Only the rows whose target holds the maximum look for an earlier equal, in that prefix."""
    hit = target_z == peak
    rows = hit.nonzero().squeeze(1).tolist()
    if rows:
        heads, tops = targets.tolist(), peak.tolist()
        for i in rows:
            t = heads[i]
            if t and z[i, :t].amax().item() >= tops[i]:
                hit[i] = False
    return hit


def _autograd_function():
    import torch

    from toolkit.core import packed_linear

    class LogProbs(torch.autograd.Function):
        """(hidden [N, H], weight [V, H], targets [N]) -> (log p(target), entropy, None, None, is_top1),
        TRL's `ChunkedLogProbFunction` outputs for `outputs` within SUPPORTED_OUTPUTS."""

        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                    logit_scale=1.0, outputs=("log_probs",)):
            ctx.set_materialize_grads(False)
            dev = hidden.device.type
            compute_dtype = _compute_dtype(hidden)
            scale = logit_scale / temperature
            h = hidden.to(compute_dtype).contiguous()
            shape = (hidden.shape[0], weight.shape[0])
            # In fp32, through the weight's oneDNN packs where the model's frozen linears run packed
            # (toolkit.core.packed_linear): MKL's matmul re-packs this 49,152-row weight at every call.
            # The output is fresh (oneDNN's operator takes no `out`), so no spare buffer is kept for it.
            packs = (packed_linear.packs_of(weight) if weight.dtype == compute_dtype
                     and uses_weight_packs(str(compute_dtype).removeprefix("torch.")) else None)
            ctx.packs = packs
            if packs is not None:
                z = packed_linear.matmul(h, packs[0])
                ctx.buffer = None
            else:
                ctx.buffer = _take_buffer(shape[0] * shape[1], hidden.device)
                z = ctx.buffer[:shape[0] * shape[1]].view(shape)
                if compute_dtype == torch.float32:
                    torch.mm(h, weight.t(), out=z)
                else:  # bf16 matmul into a reused bf16 buffer, widened into the fp32 one (no fresh pages)
                    with _borrowed(shape, compute_dtype, hidden.device) as low:
                        z.copy_(torch.mm(h, weight.to(compute_dtype).t(), out=low))
            if scale != 1.0:
                z.mul_(scale)
            n = z.shape[0]
            target_z = z.gather(1, targets.unsqueeze(1)).squeeze(1)
            log_z = torch.empty(n, dtype=torch.float32, device=z.device)
            entropy = torch.empty_like(log_z) if "entropy" in outputs else None
            is_top1 = torch.empty(n, dtype=torch.bool, device=z.device) if "is_top1" in outputs else None
            # Row blocks of ~4 MB, in place: the logits become the probabilities the backward needs, and
            # the only vocabulary-sized allocation is the matmul's output (fresh large allocations
            # page-fault on every step, which cost as much as the arithmetic here).
            rows = max(1, ROW_BLOCK_BYTES // (4 * z.shape[1]))
            # fp32 throughout, under bf16 autocast too (which would run vecdot in bf16: entropy off by ~3e-3).
            with torch.autocast(dev, enabled=False):
                for s in range(0, n, rows):
                    zs, sl = z[s:s + rows], slice(s, s + rows)
                    peak = zs.amax(-1)
                    if is_top1 is not None:
                        is_top1[sl] = first_maximum_at(zs, peak, targets[sl], target_z[sl])
                    zs.sub_(peak.unsqueeze(1))
                    e = torch.exp(zs)
                    sum_e = e.sum(-1)
                    log_sum_e = sum_e.log()
                    if entropy is not None:  # H = log sum e - sum(e z) / sum e, z shifted by the peak
                        entropy[sl] = log_sum_e - torch.linalg.vecdot(e, zs) / sum_e  # ~14x faster than bmm here
                    zs.copy_(e.div_(sum_e.unsqueeze(1)))
                    log_z[sl] = peak + log_sum_e
            ctx.save_for_backward(hidden, weight, targets, z, entropy)
            if not any(ctx.needs_input_grad[:2]):  # no backward will come for this buffer
                _give_back(ctx)
            ctx.scale, ctx.compute_dtype = scale, compute_dtype
            if is_top1 is not None:
                ctx.mark_non_differentiable(is_top1)
            return target_z - log_z, entropy, None, None, is_top1

        @staticmethod
        def backward(ctx, grad_log_probs, grad_entropy, *_):
            hidden, weight, targets, p, entropy = ctx.saved_tensors
            entropy_term = None
            if grad_entropy is not None:
                # d entropy / dz_j = -p_j (log p_j + entropy); xlogy keeps p_j = 0 at 0
                entropy_term = grad_entropy.float().unsqueeze(1) * (torch.xlogy(p, p) + p * entropy.unsqueeze(1))
            # The probabilities become the logits' gradient in place: backward runs once per forward (a
            # second one would fail autograd's version check, not compute garbage).
            grad = p
            if grad_log_probs is not None:  # d log p_t / dz_j = 1[j = t] - p_j
                g = grad_log_probs.float()
                grad.mul_(-g.unsqueeze(1))
                grad[torch.arange(len(targets), device=grad.device), targets] += g
            else:
                grad.zero_()
            if entropy_term is not None:
                grad.sub_(entropy_term)
            if ctx.scale != 1.0:
                grad.mul_(ctx.scale)
            grad_hidden = grad_weight = None
            with contextlib.ExitStack() as stack:
                if ctx.compute_dtype != grad.dtype and any(ctx.needs_input_grad[:2]):
                    grad = stack.enter_context(_borrowed(grad.shape, ctx.compute_dtype, grad.device)).copy_(grad)
                if ctx.needs_input_grad[0] and ctx.packs is not None:
                    grad_hidden = packed_linear.matmul(
                        grad, packed_linear.input_grad_pack(ctx.packs, weight, grad.shape[0])).to(hidden.dtype)
                elif ctx.needs_input_grad[0]:
                    grad_hidden = torch.mm(grad, weight.to(ctx.compute_dtype)).to(hidden.dtype)
                if ctx.needs_input_grad[1]:
                    grad_weight = torch.mm(grad.t(), hidden.to(ctx.compute_dtype)).to(weight.dtype)
            _give_back(ctx)
            return grad_hidden, grad_weight, None, None, None, None, None, None, None

    return LogProbs


# One logits buffer per dtype, reused from step to step: a fresh 90 MB allocation is a fresh mmap
# (glibc maps anything over 32 MB on its own) and page-faults on every write, which made the LM
# head's matmul run at ~110 GFLOP/s where the same matmul into a reused buffer runs at ~150 (the AVX2
# EPYC); in bf16, fresh bf16 logits and their fp32 copy cost 167 ms a step where reused buffers cost
# 101 (527 positions, the AVX512-BF16 EPYC). A forward takes the fp32 one (or allocates when it is
# in use or too small) and its backward hands it back, so a buffer has one owner at a time: two
# forwards before their backwards each get their own. The bf16 one is only borrowed within a call.
_SPARE: dict = {}


def _take_buffer(numel: int, device, dtype=None):
    import torch

    dtype = dtype or torch.float32
    buf = _SPARE.get(dtype)
    if buf is not None and buf.numel() >= numel and buf.device == device:
        return _SPARE.pop(dtype)
    return torch.empty(numel, dtype=dtype, device=device)


def _keep(buf) -> None:
    if buf is not None and buf.device.type == "cpu":
        old = _SPARE.get(buf.dtype)
        _SPARE[buf.dtype] = buf if old is None or buf.numel() >= old.numel() else old


def _give_back(ctx) -> None:
    buf, ctx.buffer, ctx.packs = getattr(ctx, "buffer", None), None, None
    _keep(buf)


@contextlib.contextmanager
def _borrowed(shape, dtype, device):
    """A spare `shape` tensor of `dtype` for the duration of the block."""
    buf = _take_buffer(shape[0] * shape[1], device, dtype)
    try:
        yield buf[:shape[0] * shape[1]].view(shape)
    finally:
        _keep(buf)


_FUNCTION = None


def materialized_function():
    """`LogProbs`, the head that materializes the logits (built on first use, so importing this
    module does not import torch)."""
    global _FUNCTION
    if _FUNCTION is None:
        _FUNCTION = _autograd_function()
    return _FUNCTION


def streamed_function():
    """`StreamedLogProbs`, the head that streams the vocabulary (`cpu_lm_head_streamed`)."""
    from toolkit.finetune import cpu_lm_head_streamed

    return cpu_lm_head_streamed.function()


def streams(compute_dtype: str, weight_trained: bool, packed: bool, materialized_fits: bool = True) -> bool:
    """Whether a call streams the vocabulary (`streamed_function`) rather than materializing the
    logits (`materialized_function`), for a frozen weight that is not pre-packed: in fp32 always, in
    a lower dtype (bf16) only where the materialized head's logits would not fit. A trained weight
    needs the logits' gradient, which only the materialized head keeps; a packed one runs its matmuls
    through oneDNN's whole-weight packs (the Zen 5's choice, measured there against the materialized
    head only). In bf16, forward and backward alone on the Zen 4 EPYC (AVX512-BF16; `make bench` lm_head,
    2026-12-07): at the finance recipe's 460 x 576 -> 49,152 the materialized head took 0.176 s against
    the streamed one's 0.185; past its limit (Llama-3.2-1B's head at 1,500 positions), where TRL's kernel
    ran before, the streamed one took 4.52 s against TRL's 9.44."""
    return not weight_trained and not packed and (compute_dtype == "float32" or not materialized_fits)


def head_for(hidden, weight, bias, final_logit_softcapping, outputs):
    """The CPU head for this call of TRL's `ChunkedLogProbFunction` (same `apply`): the streamed one
    where `streams`, the materialized one where its logits `fit`, else None (TRL's kernel runs)."""
    from toolkit.core import packed_linear

    compute = _compute_dtype(hidden)
    materialized_fits = fits(hidden.shape[0], weight.shape[0], bias, final_logit_softcapping, outputs)
    streamed = weight.dtype == compute and streams(str(compute).removeprefix("torch."), weight.requires_grad,
                                                   packed_linear.packs_of(weight) is not None, materialized_fits)
    if streamed:
        return streamed_function() if fits(hidden.shape[0], weight.shape[0], bias, final_logit_softcapping,
                                           outputs, streamed=True) else None
    return materialized_function() if materialized_fits else None
