"""The fused rotary embedding equals each listed transformers module's own `apply_rotary_pos_emb`, values
and gradients, in fp32 and bf16, and returns the gradients in the inputs' layout; the swap covers a
real model and is undone on exit; calls it does not fit go to transformers' function."""

from __future__ import annotations

import importlib

import pytest

from toolkit.finetune import fused_rope


def _upstream(module):
    # Fails when transformers renames or moves a module MODULES lists, or its function.
    return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), fused_rope.NAME)


def _inputs(dtype, heads=6, kv=2, tokens=29, head_dim=16, seed=0):
    """q, k as transformers makes them (projections viewed per head and transposed), Llama's cos/sin
    (the frequencies twice over; the halves also made to differ, so each half's own cos/sin is used)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    qp = torch.randn(2, tokens, heads * head_dim, generator=g).to(dtype).requires_grad_()
    kp = torch.randn(2, tokens, kv * head_dim, generator=g).to(dtype).requires_grad_()
    angles = torch.rand(2, tokens, head_dim, generator=g) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    grads = (torch.randn(2, heads, tokens, head_dim, generator=g).to(dtype),
             torch.randn(2, kv, tokens, head_dim, generator=g).to(dtype))
    return qp, kp, cos, sin, grads, (heads, kv, head_dim)


def _run(fn, qp, kp, cos, sin, grads, dims):
    import torch

    heads, kv, d = dims
    q = qp.view(qp.shape[0], qp.shape[1], heads, d).transpose(1, 2)
    k = kp.view(kp.shape[0], kp.shape[1], kv, d).transpose(1, 2)
    qe, ke = fn(q, k, cos, sin)
    torch.autograd.backward([qe, ke], list(grads))
    out = (qe.detach(), ke.detach(), qp.grad, kp.grad)
    qp.grad = kp.grad = None
    return out


@pytest.mark.parametrize("module", fused_rope.MODULES)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_fused_equals_the_module_function(module, dtype_name):
    import torch

    dtype = getattr(torch, dtype_name)
    upstream = _upstream(module)
    qp, kp, cos, sin, grads, dims = _inputs(dtype)
    want = _run(upstream, qp, kp, cos, sin, grads, dims)
    got = _run(fused_rope.fused(upstream), qp, kp, cos, sin, grads, dims)
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)  # one rounding
    for g, w in zip(got, want):
        assert g.dtype == w.dtype == dtype
        torch.testing.assert_close(g.float(), w.float(), **tol)
    assert got[0].stride() == want[0].stride()  # the same layout downstream as transformers' output
    # The comparison can fail: the rotation's sign flipped is far off.
    wrong = _run(lambda q, k, c, s: upstream(q, k, c, -s), qp, kp, cos, sin, grads, dims)
    assert (wrong[0].float() - got[0].float()).abs().max() > 0.5


def test_gradients_come_back_in_the_projection_layout():
    import torch

    qp, kp, cos, sin, grads, (heads, kv, d) = _inputs(torch.float32)
    q = qp.view(2, -1, heads, d).transpose(1, 2)
    k = kp.view(2, -1, kv, d).transpose(1, 2)
    seen = {}
    q.register_hook(lambda g: seen.setdefault("q", g))
    k.register_hook(lambda g: seen.setdefault("k", g))
    qe, ke = fused_rope.fused(_upstream("llama"))(q, k, cos, sin)
    torch.autograd.backward([qe, ke], [g.contiguous() for g in grads])  # laid out per head, as attention gives them
    # The (batch, tokens, heads, head_dim) layout that transformers' view back to the projection reads without a copy.
    assert seen["q"].stride() == q.stride() and seen["k"].stride() == k.stride()
    assert qp.grad.is_contiguous()


def test_calls_that_do_not_fit_go_to_transformers():
    import torch

    calls = []

    def upstream(q, k, cos, sin, unsqueeze_dim=1):
        calls.append(unsqueeze_dim)
        return q, k

    fn = fused_rope.fused(upstream)
    qp, kp, cos, sin, grads, (heads, kv, d) = _inputs(torch.float32)
    q, k = qp.view(2, -1, heads, d), kp.view(2, -1, kv, d)  # (batch, tokens, heads, D): unsqueeze_dim=2
    fn(q, k, cos, sin, unsqueeze_dim=2)
    fn(q.transpose(1, 2), k.transpose(1, 2), cos.double(), sin.double())  # mixed dtypes
    fn(q.transpose(1, 2), k.transpose(1, 2), cos.requires_grad_(), sin)  # learned positions
    assert calls == [2, 1, 1]


def test_swaps_a_model_and_undoes_it(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.llama import modeling_llama

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    upstream = modeling_llama.apply_rotary_pos_emb
    ids = torch.tensor([[1, 5, 9, 4, 2, 7, 3]])
    want = model(input_ids=ids).logits
    want.sum().backward()
    want_grad = model.model.layers[0].self_attn.q_proj.weight.grad.clone()
    model.zero_grad()
    with fused_rope.fused_rope_on_cpu(model, "cpu") as n:
        assert n == 1 and modeling_llama.apply_rotary_pos_emb is not upstream
        got = model(input_ids=ids).logits
        got.sum().backward()
    assert modeling_llama.apply_rotary_pos_emb is upstream
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.weight.grad, want_grad, rtol=1e-4, atol=1e-5)
    with fused_rope.fused_rope_on_cpu(model, "cuda:0") as n:
        assert n == 0 and modeling_llama.apply_rotary_pos_emb is upstream
    with pytest.raises(RuntimeError), fused_rope.fused_rope_on_cpu(model, "cpu"):
        raise RuntimeError("a failed step")
    assert modeling_llama.apply_rotary_pos_emb is upstream
