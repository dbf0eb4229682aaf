"""RMSNorm with a frozen weight in few passes each way, for CPU training.

transformers' `LlamaRMSNorm` is seven tensor operations forward (cast to fp32, square, mean, rsqrt,
multiply, cast back, weight) and about as many again in autograd's backward, each a full pass over
the layer's activations at memory speed; a decoder layer has two, so on the finance CPU profile
(SmolLM2-135M, ~1000 tokens a step) there are 61 a step. Here the same formula is one autograd
function: a bf16 x widened to fp32 once, the row norms of that copy, `x * rstd` in place on it, the
cast and the weight; the backward is the closed form dx = rstd * (g - x̂ * mean(g * x̂)), g = dy * w, with
x̂ recomputed from the saved input (tests/finetune/test_fused_norm.py compares values and gradients
with each class's own forward).

Measured on the Zen 5 EPYC, 985 x 576, forward and backward, alone in a loop: bf16 under autocast
0.60 against 1.00 ms for transformers' forward, fp32 0.30 against 0.59 (the first version, which
widened x inside both the norm, `dtype=`, and the product, by type promotion). Inside a training
step, where x arrives fresh from the residual add, each widening costs several times what a loop
over hot data shows, so this version widens once: in alternating steps of one run, 0.30 against
0.52 ms a call forward, 0.48 against 0.50 backward (~14 ms of a ~1.07 s step); in the loop it reads
0.76 against 0.65 (transformers' 1.68, at a slower moment of the host).

Only frozen weights (LoRA and QLoRA leave the norms frozen) of the input's dtype take it; anything
else runs the class's own forward. Like `fused_lora`, the classes are swapped in for the training
block only (`fused_norms_on_cpu`) and swapped back on exit. NORMS lists the transformers classes
whose forward is Llama's formula; a test fails when one of them changes it.
"""

from __future__ import annotations

import contextlib
import functools

NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


@functools.cache
def _function():
    import torch

    class FrozenRMSNorm(torch.autograd.Function):
        """y = w * (x * rsqrt(mean(x^2) + eps)), statistics in fp32, the gradient of x only."""

        @staticmethod
        def forward(ctx, x, weight, eps):
            # A narrower x is widened once, for the norm and the product both: widening it inside each
            # (vector_norm's dtype=, type promotion in x * rstd) cost 5% of a bf16 training step.
            wide = x.float()
            rstd = torch.linalg.vector_norm(wide, dim=-1, keepdim=True)
            rstd = rstd.pow_(2).div_(x.shape[-1]).add_(eps).rsqrt_()
            ctx.save_for_backward(x, weight, rstd)
            return _times(wide, x, rstd).to(x.dtype).mul_(weight)

        @staticmethod
        def backward(ctx, grad):
            x, weight, rstd = ctx.saved_tensors
            # dy * w in the weight's dtype (as autograd computes it for transformers' forward), into fp32
            g = torch.mul(grad, weight, out=torch.empty(grad.shape, dtype=torch.float32, device=grad.device))
            xhat = _times(x.float(), x, rstd)
            mean = torch.linalg.vecdot(g, xhat).unsqueeze(-1).div_(-x.shape[-1])
            return g.addcmul_(xhat, mean).mul_(rstd).to(x.dtype), None, None

    def _times(wide, x, rstd):
        """x * rstd in fp32 as a fresh tensor: in place on `wide` when it is x's widened copy (x is
        fp32 already when `wide is x`, and must not change)."""
        return x * rstd if wide is x else wide.mul_(rstd)

    return FrozenRMSNorm


@functools.cache
def _fused_class(cls):
    class Fused(cls):
        def forward(self, hidden_states):
            w = self.weight
            if w.requires_grad or hidden_states.dtype != w.dtype or hidden_states.device.type != "cpu":
                return super().forward(hidden_states)
            return _function().apply(hidden_states, w, self.variance_epsilon)

    Fused.__name__ = Fused.__qualname__ = f"Fused{cls.__name__}"
    return Fused


def swappable(module) -> bool:
    """Whether `module` is one of transformers' NORMS classes (by exact type)."""
    cls = type(module)
    return cls.__name__ in NORMS and cls.__module__.startswith("transformers.") and hasattr(module, "variance_epsilon")


@contextlib.contextmanager
def fused_norms_on_cpu(model, device: str):
    """Within the block, `model`'s RMSNorm layers of the NORMS classes run the fused function (see the
    module); on exit they are transformers' again, also after an error. Yields how many it swapped.
    On CUDA it changes nothing: only the CPU was measured."""
    swapped = [] if device.startswith("cuda") else [m for m in model.modules() if swappable(m)]
    for m in swapped:
        m.__class__ = _fused_class(type(m))
    try:
        yield len(swapped)
    finally:
        for m in swapped:
            m.__class__ = type(m).__mro__[1]
