"""bench_step's attribution of operators to parts, on operators recorded by torch's profiler."""

import pytest
import torch

from benchmarks import bench_step
from toolkit.core import packed_linear

RANK, VOCAB = 16, 49152


def recorded(fn) -> dict:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return {ev.key: ev.input_shapes for ev in prof.key_averages(group_by_input_shape=True)}


def test_plain_matmul_is_a_base_gemm_with_2mkn_flops():
    x, w = torch.randn(37, 64), torch.randn(96, 64)
    shapes = recorded(lambda: x @ w.t())["aten::mm"]
    assert bench_step.part_of("aten::mm", shapes, RANK, VOCAB) == "base GEMMs"
    assert bench_step.gemm_flops("aten::mm", shapes) == 2 * 37 * 64 * 96


def test_lora_product_is_not_a_base_gemm():
    x, a = torch.randn(37, 64), torch.randn(RANK, 64)
    shapes = recorded(lambda: x @ a.t())["aten::mm"]
    assert bench_step.part_of("aten::mm", shapes, RANK, VOCAB) == "LoRA rank-r products"


@pytest.mark.skipif(not packed_linear.available(), reason="this torch has no oneDNN packed linear")
def test_packed_matmul_is_a_base_gemm_with_2mkn_flops():
    # The profiler names the packed product by its operator; bench_step must count it as a base GEMM
    # (a run with packed matmuls once read 0% base GEMMs) with the weight's (N, K) layout.
    x, w = torch.randn(2, 37, 64), torch.randn(96, 64)
    packed = packed_linear.pack(w)
    events = recorded(lambda: packed_linear.matmul(x.reshape(-1, 64), packed))
    [name] = [k for k in events if k in bench_step.LINEARS]
    assert bench_step.part_of(name, events[name], RANK, VOCAB) == "base GEMMs"
    assert bench_step.gemm_flops(name, events[name]) == 2 * 74 * 64 * 96


def test_bmm_attention_kernel_is_attention():
    from toolkit.core import segment_attention

    q, k, v = (torch.randn(1, h, 30, 16, requires_grad=True) for h in (4, 2, 2))
    events = recorded(lambda: segment_attention.bmm(q, k, v, [10, 20]).sum().backward())
    # every batched-matmul form the kernel runs (the causal mask added inside the scores' product)
    products = {name for name in events if "bmm" in name}
    assert {"aten::bmm", "aten::baddbmm"} == products
    for name in (*products, "aten::_softmax"):
        assert bench_step.part_of(name, events[name], RANK, VOCAB) == "attention"
    sdpa = recorded(lambda: segment_attention.sdpa(q, k, v, [10, 20]))
    name = next(k for k in sdpa if "scaled_dot_product" in k)
    assert bench_step.part_of(name, sdpa[name], RANK, VOCAB) == "attention"
