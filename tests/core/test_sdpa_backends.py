"""toolkit.core.sdpa_backends: CUDA work keeps SDPA off cuDNN's kernel (which plans per shape);
the context names torch's backends, restricts them, and gives the same attention."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("device,want", [("cuda", True), ("cuda:1", True), ("cpu", False), ("mps", False)])
def test_cuda_keeps_off_cudnn_elsewhere_torch_chooses(device, want):
    from toolkit.core.sdpa_backends import CUDA_SDPA_BACKENDS, for_device

    assert "CUDNN_ATTENTION" not in CUDA_SDPA_BACKENDS
    assert for_device(device) == (CUDA_SDPA_BACKENDS if want else None)
    assert for_device(device, "transformers+peft+bitsandbytes") == for_device(device)
    assert for_device(device, "unsloth") is None  # Unsloth brings its own attention


def test_context_names_torch_backends_restricts_and_restores():
    import torch
    from torch.nn.attention import SDPBackend

    from toolkit.core.sdpa_backends import CUDA_SDPA_BACKENDS, kept_to

    # Fails when torch renames a backend this module names (and the cuDNN one it leaves out).
    assert all(hasattr(SDPBackend, n) for n in (*CUDA_SDPA_BACKENDS, "CUDNN_ATTENTION"))
    before = torch.backends.cuda.cudnn_sdp_enabled()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 12, 8, generator=g) for _ in range(3))
    mask = torch.ones(12, 12, dtype=torch.bool).tril()
    mask[6:, :6] = False  # two packed conversations of 6 tokens
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    with kept_to(CUDA_SDPA_BACKENDS):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.mem_efficient_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
        got = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.backends.cuda.cudnn_sdp_enabled() == before
    with kept_to(None):
        assert torch.backends.cuda.cudnn_sdp_enabled() == before
        same = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, want)
    assert torch.equal(same, want)
