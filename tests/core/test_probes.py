"""The calibration's probes (toolkit.core.probes): each measures what its use runs."""

from __future__ import annotations

from toolkit.core import capability as C
from toolkit.core import probes as P


def test_packing_is_timed_for_each_use_the_decision_names():
    assert set(P.PACKED_GAIN_ROWS) == set(C.PACKED_USES) == set(C.PACKED_GAIN_OF.values())
    assert C.PACKED_USES["infer"] == f"a {P.PACKED_GAIN_ROWS['infer']}-row decode forward"


def test_a_cpus_bandwidth_is_the_rate_a_decoding_step_reads_weights_at():
    """The calibration's CPU bandwidth is one-row products over READ_BYTES of one layer shape: it
    reads like a decoding step over the embedded model's own shapes (30 layers of q/k/v/o/gate/up/down
    and the LM head, pre-packed as the toolkit decodes them), timed here apart as the reference. A
    copy's rate, measured before, read ~2x the reference on the Zen 5 (78-88 against 34 GB/s)."""
    import time

    import torch

    from toolkit.core import packed_linear

    h, i, kv, vocab = 576, 1536, 192, 49152
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)] * 30 + [(vocab, h)]
    weights = [torch.full(s, 0.01) for s in shapes]
    nbytes = sum(w.numel() * 4 for w in weights)
    if packed_linear.available():
        weights = [packed_linear.pack(w, 1) for w in weights]
        step = lambda: [packed_linear.matmul(x[n], w) for n, w in zip((s[1] for s in shapes), weights)]  # noqa: E731
    else:
        step = lambda: [torch.nn.functional.linear(x[s[1]], w) for s, w in zip(shapes, weights)]  # noqa: E731
    x = {h: torch.full((1, h), 0.5), i: torch.full((1, i), 0.5)}
    step()
    reference, measured = [], []
    for _ in range(3):  # alternating: a slow moment of a shared host slows both
        t = time.perf_counter()
        step()
        reference.append(nbytes / (time.perf_counter() - t))
        measured.append(P.read_rate(torch))
    assert 0.6 < max(measured) / max(reference) < 1.6


def test_the_read_rate_is_measured_without_onednn_too(monkeypatch):
    """A torch without oneDNN's operators (an ARM build, say) times torch's one-row products alone."""
    import torch

    from toolkit.core import packed_linear

    monkeypatch.setattr(packed_linear, "available", lambda: False)
    monkeypatch.setattr(P, "READ_BYTES", 64 * 2**20)
    assert P.read_rate(torch) > 1e9


def test_packing_probes_skip_a_dtype_onednn_cannot_pack_here(monkeypatch):
    """oneDNN packs bf16 only with AVX512-BW/VL/DQ or AVX-NE-CONVERT and raises on an AVX2-only CPU,
    where a many-core machine's emulated bf16 can still read fast enough to pass `native`: the probes
    leave such a dtype out instead of failing the calibration."""
    import pytest
    import torch

    from toolkit.core import packed_linear

    if not packed_linear.available():
        pytest.skip("this torch lacks the oneDNN operators")
    both_native = {"float32": 1e12, "bfloat16": 1e12}
    assert P.native(both_native) == ["float32", "bfloat16"]
    monkeypatch.setattr(packed_linear, "packs", lambda dtype: dtype == "float32")
    assert set(P.packed_rates(torch, both_native)) == {"float32"}
    assert set(P.packed_gains(torch, both_native, reps=1)) == {"float32 train", "float32 infer"}


def test_whether_onednn_packs_bf16_is_asked_of_onednn():
    """`packs` tries a reorder: True exactly where one succeeds (on the Zen 3 EPYC, AVX2 only, oneDNN
    raises for bf16; on the Zen 4 and Zen 5, AVX-512, it packs)."""
    import torch

    from toolkit.core import packed_linear

    packed_linear.packs.cache_clear()
    for dtype in packed_linear.DTYPES:
        try:
            torch.ops.mkldnn._reorder_linear_weight(torch.ones(8, 8, dtype=getattr(torch, dtype)), 8)
            expected = True
        except RuntimeError:
            expected = False
        assert packed_linear.packs(dtype) is (expected and packed_linear.available()), dtype
    assert packed_linear.packs("float32") is packed_linear.available()


def test_the_host_probe_reads_like_the_transformers_backends_own_layers():
    """`host_layer_seconds` stands for what a layer of the transformers backend's one-row decoding step
    costs beside its weights' read. The time model takes CPU_DECODE_HOST_OVER_PROBE x the probe (1.80,
    fitted on the Zen 3); the backend itself, on a random-weight Llama of the probe's shapes
    (`benchmarks.bench_decode.host_probe_ratio`, which `make bench` reports), must agree with it within
    a factor of 1.6 either way on this machine, in one of three alternating rounds (a slow moment of a
    shared host slows a round)."""
    import torch

    from benchmarks.bench_decode import host_probe_ratio
    from toolkit.estimate.timing import CPU_DECODE_HOST_OVER_PROBE

    prev = torch.get_num_threads()
    torch.set_num_threads(min(2, prev))
    try:
        ratios = host_probe_ratio()
    finally:
        torch.set_num_threads(prev)
    assert any(CPU_DECODE_HOST_OVER_PROBE / 1.6 < r < CPU_DECODE_HOST_OVER_PROBE * 1.6 for r in ratios), ratios


def test_the_attention_probe_seeds_backward_as_an_explicit_gradient_would_without_importing_sympy():
    """`backward_seed` gives the same gradients as `out.backward(grad)`, through the packed-row kernels
    the probe times, and imports nothing: torch's explicit-gradient path imports sympy on first use
    (~0.4 s of the calibration's seconds on the Zen 3)."""
    import subprocess
    import sys

    import torch

    from toolkit.core import segment_attention

    sizes = (5, 7, 4)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, sum(sizes), 8, generator=gen) for h in (4, 2, 2))
    grad = torch.randn(1, sum(sizes), 4, 8, generator=gen)
    seed = P.backward_seed(torch)
    for kernel in ("sdpa", "bmm"):
        grads = []
        for run in (lambda out: out.backward(grad), lambda out: seed(out, grad)):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            run(segment_attention.attend(*leaves, sizes, kernel))
            grads.append([t.grad for t in leaves])
        for explicit, seeded in zip(*grads):
            assert torch.equal(explicit, seeded), kernel

    code = ("import sys, torch; from toolkit.core import probes as P; before = 'sympy' in sys.modules; "
            "x = torch.ones(3, requires_grad=True); P.backward_seed(torch)(x * 2, torch.ones(3)); "
            "assert x.grad.tolist() == [2.0] * 3; print(before, 'sympy' in sys.modules)")
    before, after = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                   check=True).stdout.split()
    assert after == before
