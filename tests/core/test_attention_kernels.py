"""attention_kernels: how packed training attends, decided per machine from hand-written records
(test_capability's) and calibration timings measured on the EPYCs."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from tests.core.test_capability import A100, AMX, AVX2, AVX512_BF16, RTX3060, T4, _Cal
from toolkit.core import attention_kernels as K
from toolkit.core import capability as C
from toolkit.core import segment_attention


@pytest.mark.parametrize("cap, compute, kernel", [
    (AVX2, "float32", "sdpa"),
    (AVX2, "bfloat16", "sdpa_fp32"),  # bf16 forced on a CPU that only emulates it
    (AVX512_BF16, "bfloat16", "sdpa_fp32"),
    (AVX512_BF16, "float32", "sdpa"),
    (AMX, "bfloat16", "sdpa"),
])
def test_packed_attention_rule_per_machine_without_measurements(cap, compute, kernel):
    got = K.packed_attention(cap, compute)
    assert (got.kernel, got.fallback, got.max_padding) == (kernel, kernel, math.inf) and got.reason


def _timed(**ms):
    return replace(_Cal(100e9, 400e9), attention_s={k.replace("__", " "): v / 1e3 for k, v in ms.items()})


def test_packed_attention_takes_the_fastest_measured_kernel():
    # Measured on the Zen 5 EPYC (calibration on 8 x 128 tokens, 2026-12-04): bf16 SDPA 14.4, SDPA in
    # fp32 10.0, bmm 2.9 ms a layer; fp32 SDPA 10.0, bmm 7.0.
    zen5 = _timed(bfloat16__sdpa=14.4, bfloat16__sdpa_fp32=10.0, bfloat16__bmm=2.9, float32__sdpa=10.0, float32__bmm=7.0)
    got = K.packed_attention(AVX512_BF16, "bfloat16", zen5)
    assert (got.kernel, got.fallback) == ("bmm", "sdpa_fp32") and "3.4x" in got.reason and "2.9 vs 10.0 ms" in got.reason
    assert got.max_padding == pytest.approx(10.0 / 2.9 / K.BMM_ATTENTION_MIN_GAIN, rel=1e-3)
    fp32 = K.packed_attention(AVX512_BF16, "float32", zen5)
    assert (fp32.kernel, fp32.fallback) == ("bmm", "sdpa") and fp32.max_padding == pytest.approx(1.190, abs=1e-3)
    assert "padded up to 1.19x" in fp32.reason
    # bmm needs a clear gain; the faster SDPA variant is both kernel and fallback otherwise.
    close = _timed(bfloat16__sdpa=5.0, bfloat16__sdpa_fp32=7.9, bfloat16__bmm=4.5)
    assert K.packed_attention(AMX, "bfloat16", close)[:2] == ("sdpa", "sdpa")
    under_the_bar = K.packed_attention(AVX2, "float32", _timed(float32__sdpa=8.3, float32__bmm=7.0))
    assert under_the_bar[:2] == ("sdpa", "sdpa")
    # not "fastest": bmm measured faster on equal conversations and the reason says why it is not taken
    assert "fastest" not in under_the_bar.reason and "batched matmuls 7.0" in under_the_bar.reason
    assert "1.2x" in under_the_bar.reason
    slower = K.packed_attention(AVX2, "float32", _timed(float32__sdpa=8.3, float32__bmm=9.0))
    assert "measured fastest" in slower.reason
    # Another dtype's times do not decide this one's: unmeasured bf16 falls back to the rule.
    assert K.packed_attention(AVX512_BF16, "bfloat16", _timed(float32__sdpa=9.0, float32__bmm=1.0))[:2] == (
        "sdpa_fp32", "sdpa_fp32")
    # A CPU's timings do not decide a GPU's kernel.
    assert K.packed_attention(A100, "bfloat16", zen5) == K.cuda_packed_attention(
        A100, "bfloat16", segment_attention.varlen_call() is not None)


H200 = C.cuda_record("NVIDIA H200", (9, 0))


@pytest.mark.parametrize("cap, compute, has_varlen, kernel, words", [
    (H200, "bfloat16", True, "varlen", "varlen flash kernel (NVIDIA H200, sm90, bfloat16)"),
    (A100, "bfloat16", True, "varlen", "sm80"),
    (RTX3060, "bfloat16", True, "varlen", "sm86"),
    (RTX3060, "float16", True, "varlen", "float16"),
    (T4, "float16", True, "masked", "Tesla T4 is sm75; PyTorch's flash kernels need sm80+"),
    (A100, "float32", True, "masked", "the compute dtype is float32"),
    (H200, "bfloat16", False, "masked", "no torch.nn.attention.varlen"),
])
def test_cuda_packed_attention_per_gpu(cap, compute, has_varlen, kernel, words):
    got = K.cuda_packed_attention(cap, compute, has_varlen)
    assert got.kernel == kernel and words in got.reason
    assert got.fallback == ("sdpa" if kernel == "varlen" else "masked")


def test_padding_limit_predicts_the_faster_kernel_per_row():
    """The rule behind max_padding, against the Zen 5's fp32 timings (ms a layer, forward and
    backward, 2026-12-04): the gain on equal conversations over a row's padding foretells which
    kernel is faster on that row, wherever the two differ by more than the rule's 1.2x margin."""
    from toolkit.core import segment_attention as S

    equal_gain = 1.40  # SDPA / bmm on 8 x 128 (10.02 / 6.99 ms; 16 x 64: 6.72 / 4.71)
    limit = K.packed_attention(AVX512_BF16, "float32", _timed(float32__sdpa=equal_gain, float32__bmm=1.0)).max_padding
    rows = {(91, *[101] * 4, *[105] * 5): (9.49, 6.87), (110, 121, 129, 130, 130, 133, 133, 133): (10.78, 8.31),
            (*[114] * 4, *[126] * 4): (9.55, 7.46), (100, 60, 130, 80, 110, 90, 120, 70, 105, 95): (8.63, 10.18),
            (*[124] * 4, *[161] * 3): (10.89, 10.79)}
    for sizes, (sdpa, bmm) in rows.items():
        if sdpa / bmm >= K.BMM_ATTENTION_MIN_GAIN:
            assert S.padding(sizes) <= limit, sizes
        elif sdpa / bmm < 1.0:
            assert S.padding(sizes) > limit, sizes
