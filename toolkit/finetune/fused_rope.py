"""Rotary position embedding in three operations each way, for CPU training.

transformers' `apply_rotary_pos_emb` computes `q * cos + rotate_half(q) * sin`: a multiply, a slice,
a negation and a concatenation (`rotate_half`), another multiply and an add, each writing a fresh
tensor of the query's (or key's) size, and autograd's backward walks them again; its gradient
arrives laid out per head, so transformers' `view` back to the projection's shape copies it. Here
the rotation is one autograd function: `x * cos` into the output, then over the two halves of the
head dimension y1 -= x2 s1 and y2 += x1 s2 (`addcmul_`), and the backward the transposed rotation
in the same three operations, the gradient returned in the projection's layout (no copy).

Measured on the Zen 4 EPYC (AVX512-BF16, 2 cores), finance CPU profile, every step's batch through
both in one run (docs/cpu-training.md, eighth session), steps 3-30: bf16 0.988, forced fp32 0.993
of the step time with transformers' function. Alone (1,000 tokens, q and k, forward and backward):
bf16 0.87 against 1.22 ms a layer, fp32 0.78 against 2.45.

The values equal transformers' within one rounding of the dtype (`addcmul_` rounds the product and
the sum once, where transformers rounds each); tests/finetune/test_fused_rope.py compares values and
gradients with each listed module's own function, and fails if one of them is renamed or changes
its formula. Like `fused_norm`, the swap holds only for the training block (`fused_rope_on_cpu`);
anything but the plain case (CPU float tensors of one dtype, cos and sin of the head size without
gradients, `unsqueeze_dim=1`) goes to transformers' own function.
"""

from __future__ import annotations

import contextlib
import functools
import importlib

# transformers' model modules whose `apply_rotary_pos_emb` is Llama's formula (a test checks each).
MODULES = ("llama", "mistral", "qwen2", "qwen3")
NAME = "apply_rotary_pos_emb"


def _rotate(x, cos, sin, out, transposed: bool):
    """`out` = x rotated by (cos, sin) over the two halves of its last dimension, or by the transposed
    rotation (the gradient's); cos and sin broadcast over x's heads."""
    import torch

    h = x.shape[-1] // 2
    torch.mul(x, cos, out=out)
    x1, x2, o1, o2 = x[..., :h], x[..., h:], out[..., :h], out[..., h:]
    s1, s2 = sin[..., :h], sin[..., h:]
    if transposed:  # dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1
        o1.addcmul_(x2, s2)
        o2.addcmul_(x1, s1, value=-1)
    else:  # y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2
        o1.addcmul_(x2, s1, value=-1)
        o2.addcmul_(x1, s2)
    return out


@functools.cache
def _function():
    import torch

    class Rotary(torch.autograd.Function):
        """(q, k, cos [B, T, D], sin [B, T, D]) -> (q, k) rotated, as `apply_rotary_pos_emb(q, k, cos, sin)`."""

        @staticmethod
        def forward(ctx, q, k, cos, sin):
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            ctx.save_for_backward(cos, sin)
            # The inputs' layouts, for the gradients (see the module). As sizes and strides: allocating
            # like a meta tensor took ~100 us a call here (402 ms the first time), `empty_strided` ~2.
            ctx.layouts = ((q.shape, q.stride()), (k.shape, k.stride()))
            return (_rotate(q, cos, sin, torch.empty_like(q), False),
                    _rotate(k, cos, sin, torch.empty_like(k), False))

        @staticmethod
        def backward(ctx, gq, gk):
            cos, sin = ctx.saved_tensors
            grads = [None if g is None else
                     _rotate(g, cos, sin, torch.empty_strided(*layout, dtype=g.dtype, device=g.device), True)
                     for g, layout in zip((gq, gk), ctx.layouts)]
            return grads[0], grads[1], None, None

    return Rotary


def fits(q, k, cos, sin, unsqueeze_dim) -> bool:
    """Whether the fused function takes this call (see the module)."""
    d = q.shape[-1]
    return (unsqueeze_dim == 1 and q.device.type == "cpu" and q.dtype.is_floating_point
            and q.dtype == k.dtype == cos.dtype == sin.dtype and d % 2 == 0 and k.shape[-1] == d
            and q.dim() == k.dim() == 4 and cos.dim() == 3 and cos.shape == sin.shape and cos.shape[-1] == d
            and not (cos.requires_grad or sin.requires_grad))


def fused(upstream):
    """`upstream` (a module's `apply_rotary_pos_emb`) with the fused function for the calls that fit."""
    @functools.wraps(upstream)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if not fits(q, k, cos, sin, unsqueeze_dim):
            return upstream(q, k, cos, sin, unsqueeze_dim)
        return _function().apply(q, k, cos, sin)

    return apply_rotary_pos_emb


def _modules_of(model) -> list:
    """The transformers modules among MODULES that `model`'s layers are defined in."""
    names = {f"transformers.models.{m}.modeling_{m}" for m in MODULES}
    return [importlib.import_module(n) for n in sorted({type(m).__module__ for m in model.modules()} & names)]


@contextlib.contextmanager
def fused_rope_on_cpu(model, device: str):
    """Within the block, the rotary embedding of `model`'s attention (transformers' modules in MODULES)
    runs the fused function (see the module); on exit transformers' own function is back, also after an
    error. Yields how many modules it swapped. On CUDA it changes nothing: only the CPU was measured."""
    mods = [] if device.startswith("cuda") else [m for m in _modules_of(model) if callable(getattr(m, NAME, None))]
    before = [getattr(m, NAME) for m in mods]
    for m, fn in zip(mods, before):
        setattr(m, NAME, fused(fn))
    try:
        yield len(mods)
    finally:
        for m, fn in zip(mods, before):
            setattr(m, NAME, fn)
