"""LoRA linear layers that add the adapter inside the GEMM, for CPU training.

PEFT's `lora.Linear.forward` computes `result + lora_B(lora_A(x)) * scaling`: two full passes over
the layer's output (a multiply, then an add into a fresh tensor) on top of the two matmuls, and a
third in the backward. On a CPU those passes run at memory speed and are a fixed cost per layer:
on the finance CPU profile (SmolLM2-135M, all-linear r 16, ~1000 tokens a step) the profile put
~260 ms of a ~4.1 s step in them. Here the adapter's product is accumulated into the base
output by the BLAS call itself (`addmm_` with `alpha=scaling`): the same numbers, no extra passes.
The layer is one autograd node (`LoraMatmul`), whose backward adds the adapter's share of the input's
gradient into the base layer's `g @ W` the same way, where autograd's graph of the separate products
would add two input-sized gradients and walk five nodes. Alternating 12-step runs of the finance CPU
profile on the Zen 5 EPYC, steady tokens/s, three pairs (docs/cpu-training.md): bf16 982 -> 1010
(+2.8%), fp32 with the libraries capped at AVX2 368 -> 377 (+2.3%). Sibling layers that read one
input (q/k/v, gate/up) go one step further, one node a group: `lora_groups`.

Only the plain case takes the fused path: one active adapter, no DoRA or other variant, no adapter
bias, a plain `nn.Linear` base without hooks (or one that `toolkit.core.packed_linear` packed, or
bitsandbytes' 4-bit one: below), one dtype -- or the bf16 CPU run's
mix: bf16 base and input, fp32 adapter (kept fp32 for its updates), under bf16 autocast. There PEFT
casts each layer's input to fp32 and autocast casts it back, two full copies a layer forward and
two more backward (~10% of a bf16 step in the profile); here only the adapter's r-wide weights are
cast. A LoRA dropout is applied on this path too (`lora_products.dropped`: the same Bernoulli draw per element
as PEFT's `nn.Dropout`, from four 16-bit lanes of each 64-bit draw of torch's generator, where
`F.dropout` draws one float an element; measured in docs/cpu-training.md). Anything else (and any
call with extra arguments) goes to PEFT's own forward. It is a
subclass of PEFT's public `peft.tuners.lora.Linear`, swapped in for the training block only
(`fused_on_cpu`) and swapped back on exit, so saving, merging and the report see PEFT's class. `tests/finetune/test_fused_lora.py`
checks values and gradients against PEFT's forward, and fails if the attributes read here change.

QLoRA's layers (PEFT's `lora.bnb.Linear4bit` over bitsandbytes' `Linear4bit`) take the same path:
the 4-bit weight dequantized for each product (forward and input gradient, as bitsandbytes' own
autograd function does; no unquantized copy is kept), the adapter added inside the GEMM. Where
bitsandbytes would run its CPU inference kernel instead (eval mode, no gradient, weights repacked on
AVX512-BF16), that layer is left to it. On the finance CPU profile with QLoRA (Zen 5 EPYC, bf16,
2026-12-04), steady tokens/s of 12-step runs, old / new alternating, four pairs: 723 / 746, 563 /
767, 562 / 642, 577 / 735 (+19% on the means); forced fp32, three pairs, no difference (287 / 262,
257 / 253, 252 / 254: there the unpacked fp32 product runs in MKL, at AVX2 speed on this AMD CPU).

The report's greedy answers use the same layers with `adapter_rows`: base and fine-tuned rows in
one batch, the adapter's product masked on the base rows (QLoRA's too, now that its layers fuse).
Without a gradient every fused call skips autograd, and a paired block makes the mask and the adapter's
cast weights once: each layer calls the product directly (the same numbers; on the Zen 4 EPYC a 32-row decoding step
of the finance report took 97 against 104-112 ms in bf16, 106-115 against 133-151 in fp32).
"""

from __future__ import annotations

import contextlib
import functools

from toolkit.finetune import lora_products as products


@functools.cache
def _fused_classes() -> dict:
    """{PEFT's LoRA layer class: its fused subclass}: plain `lora.Linear`, and `lora.bnb.Linear4bit`
    (QLoRA) where bitsandbytes is installed."""
    import torch
    from peft.tuners.lora import Linear as LoraLinear

    from toolkit.core import packed_linear
    from toolkit.finetune import lora_groups

    plain = (torch.nn.Linear, packed_linear.packed_class())

    class Fused:
        def forward(self, x, *args, **kwargs):
            group = self.__dict__.get(lora_groups.GROUP)
            if group is not None and not args and not kwargs and torch.is_grad_enabled():
                out = group.take(self, x)  # made by the first sibling's call on this same input
                if out is not None:
                    return out
            key = self.fused_key(x, args, kwargs)
            rows = getattr(self, ROWS, None)
            if key is None:
                if rows is not None:
                    raise NotFused(f"{type(self.base_layer).__name__} layer can't take the fused path")
                return super().forward(x, *args, **kwargs)
            base, a, b = self.base_layer, self.lora_A[key].weight, self.lora_B[key].weight
            x2 = x.reshape(-1, x.shape[-1])
            # A paired batch: the adapter's product zeroed on its base rows (one 0/1 per token).
            mask = None if rows is None else rows.mask(len(x2), x.dtype)
            if torch.is_grad_enabled():
                if group is not None and mask is None:
                    out = group.run(self, x, key)
                    if out is not None:
                        return out
                out = _lora_matmul().apply(x2, base, a, b, self.scaling[key], mask,
                                           products.dropout_p(self.lora_dropout[key]))
            else:
                # No gradient (decoding, evaluation): the product runs outside autograd, and a paired
                # batch's cast weights are made once for its block; with the per-call mask and casts,
                # 6-25% of the report's decoding step (docs/cpu-training.md, ninth session).
                cast = (lambda w: w.to(x2.dtype)) if rows is None else (lambda w: rows.cast(w, x2.dtype))
                out = products.lora_product(x2, base, cast(a), cast(b), self.scaling[key], mask)[0]
            return out.view(*x.shape[:-1], out.shape[-1])

        def fused_key(self, x, args, kwargs):
            """The active adapter's name when the call can take the fused path, else None."""
            if args or kwargs or self.disable_adapters or self.merged:
                return None
            active = [k for k in self.active_adapters if k in self.lora_A]
            if len(active) != 1:
                return None
            key = active[0]
            base, la, lb = self.base_layer, self.lora_A[key], self.lora_B[key]
            p = products.dropout_p(self.lora_dropout[key])
            # A dropout that is on is applied inside the autograd node only (no call without a gradient
            # trains, and evaluation turns it off).
            if (key in self.lora_variant or not self.base_fits(base, x) or base._forward_hooks
                    or base._forward_pre_hooks or p is None or (p and not torch.is_grad_enabled())
                    or la.bias is not None or lb.bias is not None
                    or (base.bias is not None and base.bias.requires_grad)):  # LoraMatmul gives no bias gradient
                return None
            if la.weight.dtype != lb.weight.dtype:
                return None
            if la.weight.dtype != x.dtype and not (
                    la.weight.dtype == torch.float32 and torch.is_autocast_enabled(x.device.type)
                    and torch.get_autocast_dtype(x.device.type) == x.dtype):
                return None
            return key

    class FusedLoraLinear(Fused, LoraLinear):
        @staticmethod
        def base_fits(base, x):
            return type(base) in plain and x.dtype == base.weight.dtype

    classes = {LoraLinear: FusedLoraLinear}
    try:
        import bitsandbytes as bnb
        from peft.tuners.lora.bnb import Linear4bit as Lora4bit
    except ImportError:
        return classes

    class FusedLora4bit(Fused, Lora4bit):
        @staticmethod
        def base_fits(base, x):
            # Where bitsandbytes would run its CPU inference kernel (eval mode, no gradient, weights
            # repacked on AVX512-BF16; `base_model.keep_4bit_weights_trainable` turns it off for a
            # trained model) or already has, that layer is left to it. Elsewhere its path is ours:
            # dequantize, then matmul.
            four_bit = products.four_bit_weight(base)
            inference_kernel = getattr(base, "support_avx512bf16_for_cpu", False) and not base.training \
                and not x.requires_grad
            return (type(base) is bnb.nn.Linear4bit and four_bit is not None and not inference_kernel
                    and x.dtype == (base.compute_dtype or x.dtype)
                    and not getattr(four_bit[1], "packing_format_for_cpu", False))

    classes[Lora4bit] = FusedLora4bit
    return classes


@functools.cache
def _lora_matmul():
    import torch

    class LoraMatmul(torch.autograd.Function):
        """(x [M, K], base layer, A [r, K], B [N, r], scaling, mask [M, 1] or None, dropout p) ->
        x @ W.T + bias + scaling * (mask * (dropout(x) @ A.T)) @ B.T, one autograd node. The backward
        accumulates the adapter's share of x's gradient into the base layer's (`addmm_` on g @ W)
        where autograd would add two M x K gradients; A and B get theirs in their own dtype (fp32
        under bf16 autocast)."""

        @staticmethod
        def forward(ctx, x2, base, a, b, scaling, mask, p=0.0):
            # Under autocast the fp32 adapter computes in the input's dtype, as PEFT's forward does
            # after its round trip of x through fp32; the cast of these r-wide weights is cheap.
            a_x, b_x = a.to(x2.dtype), b.to(x2.dtype)
            drop = products.dropped(x2.shape, p, x2.device) if p else None
            out, h, xa = products.lora_product(x2, base, a_x, b_x, scaling, mask, drop, p)
            ctx.save_for_backward(xa, h, a_x, b_x, drop)
            ctx.base, ctx.scaling, ctx.mask, ctx.dtypes, ctx.p = base, scaling, mask, (a.dtype, b.dtype), p
            return out

        @staticmethod
        def backward(ctx, g):
            xa, h, a_x, b_x, drop = ctx.saved_tensors
            s, (a_dtype, b_dtype) = ctx.scaling, ctx.dtypes
            grad_x = grad_a = grad_b = None
            with torch.autocast(g.device.type, enabled=False):
                g = g.contiguous()
                # the gradient at the adapter's r-wide middle, the dropout's 1 / (1 - p) included
                gh = torch.mm(g, b_x).mul_(s / (1.0 - ctx.p))
                if ctx.mask is not None:
                    gh.mul_(ctx.mask)
                if ctx.needs_input_grad[0]:
                    grad_x = products.add_adapter_input_grad(products.base_input_grad(g, ctx.base), gh, a_x, drop)
                if ctx.needs_input_grad[2]:
                    grad_a = torch.mm(gh.t(), xa).to(a_dtype)
                if ctx.needs_input_grad[3]:
                    grad_b = products.b_grad(g, h, s, b_dtype)
            return grad_x, None, grad_a, grad_b, None, None, None

    return LoraMatmul


# Set on each swapped layer by `adapter_rows`: its `_Rows`.
ROWS = "_toolkit_adapter_rows"


class _Rows:
    """A paired batch's 0/1 per batch row, and what every layer derives from it alike, made once for
    the `adapter_rows` block: the per-token mask for an input of n tokens, and (decoding only, where no
    optimizer step can change them) the adapter's weights cast to the input's dtype."""

    def __init__(self, rows):
        self.rows, self._masks, self._casts = rows, {}, {}

    def keep(self, indices) -> None:
        """Only the batch rows at `indices` go on (a decode whose finished rows leave the batch)."""
        self.rows, self._masks = self.rows[indices], {}

    def mask(self, n: int, dtype):
        key = (n, dtype)
        if key not in self._masks:
            self._masks[key] = self.rows.to(dtype).repeat_interleave(n // len(self.rows)).unsqueeze(1)
        return self._masks[key]

    def cast(self, weight, dtype):
        if weight.dtype == dtype:
            return weight
        key = (id(weight), dtype)
        if key not in self._casts:
            self._casts[key] = weight.detach().to(dtype)
        return self._casts[key]


class NotFused(RuntimeError):
    """A layer of a paired (per-row adapter) batch could not take the fused path."""


# What the fused path reads of PEFT's layer; a PEFT without one of them trains with its own forward.
READS = ("base_layer", "lora_A", "lora_B", "scaling", "lora_dropout", "lora_variant", "active_adapters",
         "disable_adapters", "merged")


def wanted(device: str) -> bool:
    """Whether LoRA layers on `device` take the fused path: on a CPU, where it was measured. On CUDA
    PEFT's layers stay: the trial (benchmarks/gpu_attention_ab.py `varlen_fused_lora`, H200, 2026-12-04)
    read QLoRA steps 7.5% shorter on the means, inside the steps' spread, LoRA's no shorter and its
    peak 5.3% lower; switching it on means measuring the GPU memory table again (docs/estimate.md)."""
    return not device.startswith("cuda")


def dropout_note(dropout: float, device: str) -> str:
    """A note for a run whose LoRA dropout the fused layers on `device` draw (a CPU), else ""."""
    if not dropout or not wanted(device):
        return ""
    return (f"note: lora.dropout {dropout:g} draws a random mask over every adapted layer's input at each step, "
            "a cost on a CPU that the time estimate includes (docs/cpu-training.md); lora.dropout 0 skips it")


@contextlib.contextmanager
def fused_on_cpu(model, device: str, announce=None):
    """Within the block, `model`'s PEFT LoRA linear layers add their adapter inside the GEMM (see the
    module); on exit they are PEFT's again, also after an error or Ctrl-C. Yields how many layers it
    swapped. Only where `wanted(device)`."""
    if not wanted(device):
        yield 0
        return
    try:
        classes = _fused_classes()
    except ImportError:
        yield 0
        return
    swapped = [m for m in model.modules() if type(m) in classes]
    missing = [name for name in READS if swapped and not hasattr(swapped[0], name)]
    if missing:
        if announce is not None:
            announce(f"note: peft's {type(swapped[0]).__name__} has no {', '.join(missing)} in this PEFT: its own "
                     "forward (slower on CPU, same result)")
        swapped = []
    from toolkit.finetune import lora_groups

    before = [type(m) for m in swapped]
    for m in swapped:
        m.__class__ = classes[type(m)]
    # Siblings that read one input (q/k/v, gate/up) train as one node (see lora_groups).
    lora_groups.attach(model, swapped)
    try:
        yield len(swapped)
    finally:
        lora_groups.detach(swapped)
        for m, cls in zip(swapped, before):
            m.__class__ = cls


@contextlib.contextmanager
def adapter_rows(model, rows):
    """Within the block, batch row i of `model` (inside `fused_on_cpu`) runs with its LoRA adapter
    when rows[i] is 1 and as the base model when 0: base and fine-tuned in one batch, the adapter's
    r-wide product masked per row (PEFT's own mixed-adapter batch indexes and copies each layer's
    input instead, which in a CPU decode cost more than the base model's matmuls). A layer that
    can't take the fused path raises NotFused, never a silently wrong row. Yields the rows' `_Rows`,
    whose `keep(indices)` drops the other rows."""
    fused = tuple(_fused_classes().values())
    layers = [m for m in model.modules() if type(m) in fused]
    shared = _Rows(rows)
    for m in layers:
        setattr(m, ROWS, shared)
    try:
        yield shared
    finally:
        for m in layers:
            delattr(m, ROWS)
