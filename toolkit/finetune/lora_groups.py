"""LoRA layers that read the same input, trained as one autograd node on a CPU.

A Llama block projects one normed input through q, k and v, and another through gate and up. As
separate fused layers (`fused_lora`), each multiplies that input by its own r x K adapter matrix A
forward and again for A's gradient, folds its own r-wide share into the input's gradient, and
autograd then adds the siblings' K-wide input gradients (two passes over an input-sized tensor for
q/k/v, one for gate/up). Here the first sibling's call runs the whole group in one node
(`LoraGroupMatmul`), as Unsloth's `LoRA_QKV` and `LoRA_MLP` do on CUDA:

- one product with the adapters' A stacked (`x @ [A_q; A_k; A_v].T`), then each base GEMM with its
  adapter's product added inside it (`addmm_`, as in `fused_lora`);
- backward: each base layer's input gradient accumulated into one buffer by the GEMM itself, the
  stacked adapters' share added by one more GEMM, and the stacked A's gradient in one product.

The later siblings' calls return the outputs already made when they get the same input tensor
(unchanged since); any other call runs that layer alone, so a model that calls the projections
another way still gets the right numbers. Same numbers as the layers apart, to float rounding
(`tests/finetune/test_lora_groups.py`). Where it pays: docs/cpu-training.md (thirteenth session).
"""

from __future__ import annotations

import functools

from toolkit.finetune import lora_products as products

# Sibling layers a Llama-family block calls on one input, first caller first (transformers'
# LlamaAttention and LlamaMLP; Mistral, Qwen2 and the like name theirs the same).
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Set on each grouped layer for the `fused_lora.fused_on_cpu` block: its `Group`.
GROUP = "_toolkit_lora_group"


class Group:
    """Sibling fused LoRA layers sharing one input, and the outputs made for the later siblings."""

    def __init__(self, members):
        self.members = members
        self.pending = None  # (input, its version, {layer: output}) until every sibling took its own

    def take(self, layer, x):
        """`layer`'s output made by the first sibling's call on this same `x`, or None."""
        p = self.pending
        if p is None or p[0] is not x or p[1] != x._version or layer not in p[2]:
            return None
        out = p[2].pop(layer)
        if not p[2]:
            self.pending = None
        return out

    def run(self, layer, x, key):
        """The first sibling's output with the whole group run in one node (the others' kept for
        them), or None when `layer` is not the first or a sibling can't take the fused path."""
        self.pending = None
        if layer is not self.members[0]:
            return None
        a = [m.lora_A[key].weight for m in self.members]
        b = [m.lora_B[key].weight for m in self.members]
        if any(m.fused_key(x, (), {}) != key for m in self.members[1:]) or len({w.dtype for w in a + b}) != 1:
            return None
        x2 = x.reshape(-1, x.shape[-1])
        ps = tuple(products.dropout_p(m.lora_dropout[key]) for m in self.members)
        outs = _group_matmul().apply(x2, tuple(m.base_layer for m in self.members),
                                     tuple(m.scaling[key] for m in self.members), ps, *a, *b)
        outs = [o.view(*x.shape[:-1], o.shape[-1]) for o in outs]
        self.pending = (x, x._version, dict(zip(self.members[1:], outs[1:])))
        return outs[0]


def attach(model, layers) -> int:
    """Groups the siblings among `layers` (fused LoRA layers of `model`); returns how many groups."""
    ours, n = {id(m) for m in layers}, 0
    for parent in model.modules():
        for names in SIBLINGS:
            members = [parent._modules.get(name) for name in names]
            if all(m is not None and id(m) in ours for m in members):
                group = Group(members)
                for m in members:
                    setattr(m, GROUP, group)
                n += 1
    return n


def detach(layers) -> None:
    for m in layers:
        m.__dict__.pop(GROUP, None)


@functools.cache
def _group_matmul():
    import torch

    class LoraGroupMatmul(torch.autograd.Function):
        """(x [M, K], bases, scalings, dropout ps, A_1..A_n [r_i, K], B_1..B_n [N_i, r_i]) -> the n
        outputs x @ W_i.T + bias_i + s_i * (dropout_i(x) @ A_i.T) @ B_i.T, one autograd node (see the
        module). Each sibling draws its own dropout, as PEFT's separate layers do; then the stacked
        product over one input is no longer one, and each adapter multiplies its own dropped copy."""

        @staticmethod
        def forward(ctx, x2, bases, scalings, ps, *weights):
            n = len(bases)
            a, b = weights[:n], weights[n:]
            ranks = [w.shape[0] for w in a]
            # Under autocast the fp32 adapters compute in the input's dtype, as `fused_lora` does.
            a_x = torch.cat([w.to(x2.dtype) for w in a])
            b_x = [w.to(x2.dtype) for w in b]
            with torch.autocast(x2.device.type, enabled=False):
                x2 = x2.contiguous()
                if any(ps):
                    drops = [products.dropped(x2.shape, p, x2.device) if p else None for p in ps]
                    hs, xas = zip(*(products.adapter_middle(x2, ai, d, p)
                                    for ai, d, p in zip(a_x.split(ranks), drops, ps)))
                    h = torch.cat(hs, dim=1)
                else:
                    drops, xas = [], []
                    h = torch.mm(x2, a_x.t())
                outs = []
                for base, hi, bi, s in zip(bases, h.split(ranks, dim=1), b_x, scalings):
                    out = products.base_product(x2, base)
                    out.addmm_(hi, bi.t(), alpha=s)
                    outs.append(out)
            # With a dropout, A's gradients need each dropped copy, not x.
            ctx.save_for_backward(None if drops else x2, h, a_x, *b_x, *xas, *drops)
            ctx.bases, ctx.scalings, ctx.ranks, ctx.ps = bases, scalings, ranks, ps
            ctx.dtypes = (a[0].dtype, b[0].dtype)
            return tuple(outs)

        @staticmethod
        def backward(ctx, *grads):
            n, (a_dtype, b_dtype) = len(ctx.bases), ctx.dtypes
            x2, h, a_x, *rest = ctx.saved_tensors
            b_x, xas, drops = rest[:n], rest[n:2 * n], rest[2 * n:]
            wants_x, wants_a, wants_b = ctx.needs_input_grad[0], ctx.needs_input_grad[4:4 + n], ctx.needs_input_grad[4 + n:]
            grad_x, grad_b, gh = None, [None] * n, []
            with torch.autocast(h.device.type, enabled=False):
                for i, (g, base, bi, hi, s, p) in enumerate(zip(grads, ctx.bases, b_x, h.split(ctx.ranks, dim=1),
                                                                ctx.scalings, ctx.ps)):
                    g = g.contiguous()
                    # the gradient at adapter i's r-wide middle, its dropout's 1 / (1 - p) included
                    gh.append(torch.mm(g, bi).mul_(s / (1.0 - p)))
                    if wants_x:
                        grad_x = products.base_input_grad(g, base, into=grad_x)
                    if wants_b[i]:
                        grad_b[i] = products.b_grad(g, hi, s, b_dtype)
                grad_a = [None] * n
                if not drops:
                    gh = torch.cat(gh, dim=1)
                    if wants_x:
                        grad_x.addmm_(gh, a_x)
                    if any(wants_a):
                        grad_a = [ga.to(a_dtype) for ga in torch.mm(gh.t(), x2).split(ctx.ranks)]
                else:
                    for i, (ghi, ai, xa, drop) in enumerate(zip(gh, a_x.split(ctx.ranks), xas, drops)):
                        if wants_x:
                            products.add_adapter_input_grad(grad_x, ghi, ai, drop)
                        if wants_a[i]:
                            grad_a[i] = torch.mm(ghi.t(), xa).to(a_dtype)
            return (grad_x, None, None, None, *grad_a, *grad_b)

    return LoraGroupMatmul
