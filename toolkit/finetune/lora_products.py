"""The products of a LoRA linear layer on a CPU, outside autograd: the base layer's (pre-packed, plain, or a
4-bit weight dequantized for the call), the adapter's r-wide middle with its dropout, and their gradients.
`fused_lora` (one layer, one autograd node) and `lora_groups` (sibling layers that read one input, one node a
group) both build on them; the measurements behind each are in their docstrings and docs/cpu-training.md."""

from __future__ import annotations


def four_bit_weight(base):
    """`base`'s 4-bit weight and its quantization state where `base` is bitsandbytes' Linear4bit (QLoRA),
    else None."""
    state = getattr(base.weight, "quant_state", None)
    return None if state is None else (base.weight, state)


def base_product(x2, base):
    """`x2 @ W.T + b` outside autograd: a 4-bit base dequantized for this call (QLoRA keeps no
    unquantized copy), any other through `packed_linear.product` (its packs where it is packed)."""
    four_bit = four_bit_weight(base)
    if four_bit is None:
        from toolkit.core import packed_linear

        return packed_linear.product(x2, base)
    import torch

    bias = None if base.bias is None else base.bias.to(x2.dtype)
    return torch.nn.functional.linear(x2, dequantized(four_bit, x2.dtype), bias)


def base_input_grad(g, base, into=None):
    """`g @ W`, the input's gradient through `base` (see `base_product`); with `into`, added into
    that tensor (by the GEMM itself where it can) and returned."""
    four_bit = four_bit_weight(base)
    if four_bit is None:
        from toolkit.core import packed_linear

        return packed_linear.input_grad(g, base, into=into)
    weight = dequantized(four_bit, g.dtype)
    return g @ weight if into is None else into.addmm_(g, weight)


def dequantized(four_bit, dtype):
    """A 4-bit weight (`four_bit_weight`) dequantized by bitsandbytes, in `dtype`."""
    from bitsandbytes.functional import dequantize_4bit

    weight, state = four_bit
    return dequantize_4bit(weight.data, state).to(dtype)


def dropout_p(module) -> float | None:
    """The probability with which a LoRA layer's dropout module drops an element now: 0.0 for none
    (PEFT's `nn.Identity`, or an `nn.Dropout` in eval mode), None for a module the fused path does not
    know."""
    import torch

    if isinstance(module, torch.nn.Identity):
        return 0.0
    if type(module) is torch.nn.Dropout:
        return float(module.p) if module.training else 0.0
    return None


def dropped(shape, p: float, device):
    """A bool tensor of `shape`, True where dropout drops, each element with probability p (to
    1/65,536) from torch's default generator, so a run's seed fixes it. Each 64-bit draw gives four
    16-bit lanes: `F.dropout` (one float an element) took 3.4 ms for a 1000 x 576 input on the Zen 4
    EPYC, this 0.84 ms; per step of the finance CPU profile that is most of what a dropout costs."""
    import math

    import torch

    n = math.prod(shape)
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, 2 ** 63 - 1)
    # a lane drops below p's share of the 65,536 values (int16 holds up to 32,767: p near 1 keeps 1 in 65,536)
    return words.view(torch.int16)[:n].view(shape) < min(round(p * 65536), 65535) - 32768


def adapter_middle(x2, a_x, drop, p: float):
    """(xa @ a_x.T / (1 - p), xa): the adapter's r-wide middle from xa, x2 with the elements `drop`
    marks zeroed (x2 itself, and no scaling, without a dropout)."""
    import torch

    if drop is None:
        return torch.mm(x2, a_x.t()), x2
    xa = x2.masked_fill(drop, 0)
    return torch.mm(xa, a_x.t()).mul_(1.0 / (1.0 - p)), xa


def add_adapter_input_grad(grad_x, gh, a_x, drop):
    """grad_x += gh @ a_x, the dropped elements' share zeroed: inside the GEMM where nothing was dropped."""
    import torch

    if drop is None:
        return grad_x.addmm_(gh, a_x)
    return grad_x.add_(torch.mm(gh, a_x).masked_fill_(drop, 0))


def b_grad(g, h, scaling: float, dtype):
    """B's gradient `scaling * g.T @ h` (g [M, N] the output's gradient, h [M, r] the adapter's middle) in
    `dtype` (the adapter's), contiguous. In bf16 as `(h.T @ g).T`: oneDNN's bf16 product with the output's
    N columns as its wide dimension took 509 against 737 us for g of 990 x 1536 (gate and up), 198 against
    225 at 576 outputs, 87 against 86 at 192 (the Zen 4 EPYC, each g fresh from a set of 24 as in a step;
    docs/cpu-training.md, twenty-ninth session). In fp32 MKL's way round is the faster: 739 against 1,151 us
    at 1,536 outputs (885 capped at AVX2)."""
    import torch

    if g.dtype == torch.bfloat16:
        return torch.mm(h.t(), g).t().to(dtype, memory_format=torch.contiguous_format).mul_(scaling)
    return torch.mm(g.t(), h).mul_(scaling).to(dtype)


def lora_product(x2, base, a_x, b_x, scaling, mask, drop=None, p=0.0):
    """(x2 @ W.T + bias + scaling * (mask * (xa @ a_x.T) / (1 - p)) @ b_x.T, the adapter's middle h,
    xa), outside autograd and autocast, the adapter's weights already in x2's dtype; xa is x2 with
    the elements `drop` marks zeroed (x2 itself without a dropout)."""
    import torch

    with torch.autocast(x2.device.type, enabled=False):
        x2 = x2.contiguous()
        out = base_product(x2, base)  # pre-packed inside `packed_linears`, or dequantized
        h, xa = adapter_middle(x2, a_x, drop, p)
        if mask is not None:
            h.mul_(mask)
        # Into the fresh base output: the adapter's product costs no pass of its own.
        out.addmm_(h, b_x.t(), alpha=scaling)
    return out, h, xa
