"""The fused RMSNorm equals each listed transformers class's own forward, values and input gradients,
in fp32 and under bf16 autocast; the swap covers a real model's norms and is undone on exit."""

from __future__ import annotations

import importlib

import pytest

from toolkit.finetune import fused_norm

MODULES = {"LlamaRMSNorm": "llama", "MistralRMSNorm": "mistral", "Qwen2RMSNorm": "qwen2", "Qwen3RMSNorm": "qwen3"}


def _norm_class(name):
    # Fails when transformers renames or moves a class NORMS lists.
    return getattr(importlib.import_module(f"transformers.models.{MODULES[name]}.modeling_{MODULES[name]}"), name)


def _forward_and_grad(module, x, grad):
    x = x.detach().requires_grad_()
    out = module(x)
    out.backward(grad)
    return out.detach(), x.grad


@pytest.mark.parametrize("name", fused_norm.NORMS)
@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_fused_equals_the_class_forward(name, dtype_name):
    import torch

    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    norm = _norm_class(name)(96, eps=1e-5).to(dtype).requires_grad_(False)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96, generator=g) + 0.5)
    x = (torch.randn(2, 37, 96, generator=g) * 3).to(dtype)
    grad = torch.randn(2, 37, 96, generator=g).to(dtype)
    x0 = x.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        want, want_grad = _forward_and_grad(norm, x, grad)
        with fused_norm.fused_norms_on_cpu(norm, "cpu") as n:
            assert n == 1 and type(norm).__name__ == f"Fused{name}"
            got, got_grad = _forward_and_grad(norm, x, grad)
    assert type(norm) is _norm_class(name) and got.dtype == want.dtype == dtype
    assert torch.equal(x, x0)  # the fp32 product is computed in place only on a widened copy, never on x
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5)
    else:  # the same outputs; gradients within one bf16 rounding (the class's autograd rounds in another order)
        assert torch.equal(got, want)
        torch.testing.assert_close(got_grad.float(), want_grad.float(), rtol=1e-2, atol=1e-2)
    # The comparison can fail: a norm without its weight is far off.
    assert (got.float() - (want.float() / norm.weight.float())).abs().max() > 0.1


def test_trainable_weight_keeps_the_class_forward():
    import torch

    norm = _norm_class("LlamaRMSNorm")(8)
    x = torch.randn(3, 8)
    with fused_norm.fused_norms_on_cpu(norm, "cpu"):
        norm(x).sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def test_swaps_every_norm_of_a_model_and_undoes_it(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).requires_grad_(False)
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    ids = torch.tensor([[1, 5, 9, 4, 2]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        with fused_norm.fused_norms_on_cpu(model, "cpu") as n:
            assert n == len(norms) == 2 * model.config.num_hidden_layers + 1
            got = model(input_ids=ids).logits
        with fused_norm.fused_norms_on_cpu(model, "cuda") as n:
            assert n == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(type(m).__name__ == "LlamaRMSNorm" for m in norms)
