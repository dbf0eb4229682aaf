"""The two packed-row attention kernels compute the same thing: the batched-matmul kernel's values and
gradients equal SDPA's, conversation by conversation, with grouped-query and plain multi-head
attention; and where bmm would pad too much, `attend` takes the fallback."""

from __future__ import annotations

import pytest

from toolkit.core import segment_attention as S

SIZES = [13, 31, 5, 22, 1, 17]


def _inputs(heads, kv, dtype_name="float32", d=16, sizes=SIZES):
    import torch

    g = torch.Generator().manual_seed(0)
    rows = sum(sizes)
    q, k, v = (torch.randn(1, h, rows, d, generator=g).to(getattr(torch, dtype_name)).requires_grad_()
               for h in (heads, kv, kv))
    grad = torch.randn(1, rows, heads, d, generator=g).to(q.dtype)
    return q, k, v, grad


def _run(fn, q, k, v, grad):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(grad)
    return out.detach(), [t.grad.clone() for t in (q, k, v)]


def _one_by_one(q, k, v, sizes=SIZES):
    """The reference: each conversation alone, K and V repeated per query head, plain softmax."""
    import torch

    group = q.shape[1] // k.shape[1]
    outs, start = [], 0
    for n in sizes:
        a, b, c = (t[0, :, start:start + n].double() for t in (q, k, v))
        b, c = b.repeat_interleave(group, 0), c.repeat_interleave(group, 0)
        scores = a @ b.transpose(-1, -2) / a.shape[-1] ** 0.5
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
        outs.append((scores.softmax(-1) @ c).transpose(0, 1))
        start += n
    return torch.cat(outs).unsqueeze(0).to(q.dtype)


@pytest.mark.parametrize("heads, kv", [(6, 2), (4, 4), (3, 1)])
@pytest.mark.parametrize("kernel", ["sdpa", "bmm"])
def test_kernels_equal_each_conversation_alone(heads, kv, kernel):
    import torch

    q, k, v, grad = _inputs(heads, kv)
    got, got_grads = _run(lambda *t: S.attend(*t, SIZES, kernel), q, k, v, grad)
    want, want_grads = _run(_one_by_one, q, k, v, grad)
    assert got.shape == (1, sum(SIZES), heads, 16) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The comparison can fail: one long conversation instead of six moves the output.
    leaked, _ = _run(lambda *t: S.attend(*t, [sum(SIZES)], kernel), q, k, v, grad)
    assert (leaked - want).abs().max() > 1e-2


@pytest.mark.parametrize("blocks", [1, 2, 3, 5])
@pytest.mark.parametrize("sizes", [SIZES, [1, 2, 1], [4] * 3])
def test_bmm_query_blocks_change_nothing(monkeypatch, blocks, sizes):
    """However many query blocks bmm splits each conversation into (some empty where conversations are
    shorter than that), its values and gradients are each conversation's alone."""
    import torch

    monkeypatch.setattr(S, "CAUSAL_BLOCKS", blocks)
    q, k, v, grad = _inputs(6, 2, sizes=sizes)
    got, got_grads = _run(lambda *t: S.bmm(*t, sizes), q, k, v, grad)
    want, want_grads = _run(lambda *t: _one_by_one(*t, sizes=sizes), q, k, v, grad)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bmm_backward_runs_no_per_matrix_products():
    """The earlier query blocks' dK and dV shares are batched products added into the slice: `baddbmm_`
    into a slice (not contiguous) ran one `addmm_` per batch matrix, 48 calls a layer at the recipe's rows."""
    import torch

    q, k, v, grad = _inputs(6, 2, sizes=[40, 33, 38])
    out = S.bmm(q, k, v, [40, 33, 38])
    with torch.profiler.profile() as prof:
        out.backward(grad)
    names = {e.key: e.count for e in prof.key_averages()}
    # the backward ran, profiled: dS, dQ, dV and dK a block (dQ and the last block's dK scaled inside baddbmm)
    assert names.get("aten::bmm", 0) + names.get("aten::baddbmm", 0) >= 4 * S.CAUSAL_BLOCKS
    assert "aten::addmm_" not in names and "aten::baddbmm_" not in names


def test_causal_blocks_cover_each_position_once():
    assert S.causal_blocks(128, 3) == [(0, 43), (43, 86), (86, 128)]
    assert S.causal_blocks(2, 3) == [(0, 1), (1, 2)]
    assert S.causal_blocks(7, 1) == [(0, 7)]
    for length in range(1, 40):
        spans = S.causal_blocks(length)
        assert spans[0][0] == 0 and spans[-1][1] == length
        assert all(a < b == c for (a, b), (c, _) in zip(spans, spans[1:] + [(length, None)]))


def test_bf16_kernels_agree_within_bf16_rounding():
    """In bf16 the kernels differ only by rounding (bmm's scores and probabilities are bf16; SDPA
    keeps them in fp32): all within 2e-2 of the fp32 result on this fixture (measured 7.8e-3 to
    7.9e-3 for all three, about one bf16 step at the outputs' size)."""
    import torch

    q, k, v, grad = _inputs(6, 2, "bfloat16")
    ref = _one_by_one(q.float(), k.float(), v.float())
    for kernel in ("sdpa", "sdpa_fp32", "bmm"):
        out = S.attend(q, k, v, SIZES, kernel)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=2e-2)


def test_sdpa_fp32_attends_in_fp32_under_autocast():
    """sdpa_fp32 on bf16 inputs under bf16 autocast is SDPA on the fp32 copies, cast back (autocast
    must not undo the upcast), and differs from attending in bf16."""
    import torch

    q, k, v, _ = _inputs(6, 2, "bfloat16")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = S.attend(q, k, v, SIZES, "sdpa_fp32")
    want = S.attend(q.float(), k.float(), v.float(), SIZES, "sdpa")
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16())
    assert not torch.equal(got, S.attend(q, k, v, SIZES, "sdpa"))


def test_bmm_fits_only_rows_whose_groups_keep_few_scores():
    assert S.bmm_fits([256] * 4, 64) and not S.bmm_fits([257] * 4, 64)
    assert S.bmm_fits([100, 60, 130, 80, 110, 90, 120, 70, 105, 95], 64)
    assert S.bmm_fits([128] * 8, 64)  # the calibration's row
    assert not S.bmm_fits([2048], 64)  # one long conversation: SDPA keeps no L x L tensor
    assert S.bmm_fits([300] + [20] * 9, 64)  # the short ones are a group of their own, not padded to 300
    assert not S.bmm_fits([300, 20], 64)  # 300^2 alone passes 4 x 320 x 64


def test_groups_split_where_padding_costs_more_than_a_group():
    assert S.groups([128] * 8, 64) == [list(range(8))]
    # a finance row: 7 x 161^2 + a group's cost against 3 x 161^2 + 4 x 124^2 + two groups' cost
    assert S.groups([124] * 4 + [161] * 3, 64) == [[4, 5, 6], [0, 1, 2, 3]]
    assert S.groups([5, 3, 1, 7], 64) == [[3, 0, 1, 2]]  # tiny ones: one group, whatever the padding
    assert S.groups([12, 6, 12], 16, max_padding=1.34) == [[0, 2, 1]]  # padding 3 x 144 / 324 = 1.333
    assert S.groups([12, 6, 12], 16, max_padding=1.33) == [[0, 2], [1]]
    # one group would pass the memory rule (2 x 60^2 > 4 x 80 x 16); the least-scores split keeps it
    assert S.groups([60, 20], 16) == [[0], [1]]
    assert S.groups([70, 2, 2], 16) is None


def test_attend_takes_the_fallback_where_bmm_does_not_fit_or_there_is_dropout():
    import torch

    sizes = [70, 2, 2]
    assert not S.bmm_fits(sizes, 16)
    q, k, v, _ = _inputs(6, 2, sizes=sizes)
    with torch.no_grad():
        for fallback in S.FALLBACKS:
            assert torch.equal(S.attend(q, k, v, sizes, "bmm", fallback), S.attend(q, k, v, sizes, fallback))
        q, k, v, _ = _inputs(6, 2, sizes=SIZES[:2])
        assert S.bmm_fits(SIZES[:2], 16)
        torch.manual_seed(0)
        dropped = S.attend(q, k, v, SIZES[:2], "bmm", dropout=0.5)
        torch.manual_seed(0)
        assert torch.equal(dropped, S.attend(q, k, v, SIZES[:2], "sdpa", dropout=0.5))


def test_padding_counts_the_scores_bmm_adds():
    assert S.padding([128] * 8) == 1.0
    assert S.padding([100, 50]) == 2 * 100**2 / (100**2 + 50**2)  # 1.6
    assert S.padding([124] * 4 + [161] * 3) == pytest.approx(1.302, abs=1e-3)  # a finance row


@pytest.mark.parametrize("max_padding", [1.0, 1.33, 1.34])
def test_bmm_in_groups_within_the_padding_limit_equals_sdpa(max_padding):
    """Rows padded past the limit are split (1.33: [12, 12] and [6]; 1.0: one group per length), the
    values and gradients SDPA's either way; the groups' padded rows get no gradient."""
    sizes = [12, 6, 12, 5, 9]
    q, k, v, grad = _inputs(6, 2, sizes=sizes)
    want, want_grads = _run(lambda *t: S.attend(*t, sizes, "sdpa"), q, k, v, grad)
    got, got_grads = _run(lambda *t: S.attend(*t, sizes, "bmm", "sdpa", max_padding=max_padding), q, k, v, grad)
    torch = pytest.importorskip("torch")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert all(S.padding([sizes[c] for c in g]) <= max_padding for g in S.groups(sizes, 16, max_padding))


def test_varlen_call_reads_this_torchs_signature():
    """The keywords `varlen` passes exist in this PyTorch's varlen_attn: a PyTorch that renames them
    fails here, not on a user's GPU (the kernel itself runs only on CUDA; `make gpu-check` runs it)."""
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    fn, causal, takes_gqa = S.varlen_call()
    assert fn is varlen_attn
    params = inspect.signature(varlen_attn).parameters
    assert {"query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "scale"} <= set(params)
    assert set(causal) <= set(params) and takes_gqa == ("enable_gqa" in params)


@pytest.mark.parametrize("takes_gqa", [True, False])
def test_varlen_hands_the_kernel_the_row_as_it_documents(monkeypatch, takes_gqa):
    """`varlen`'s plumbing (layout, bounds, grouped-query K/V, the causal keyword) against the
    reference: the kernel here is varlen_attn's documented contract computed conversation by
    conversation, since PyTorch's own runs only on CUDA."""
    import torch

    heads, kv = 6, 2
    calls = []

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        calls.append(enable_gqa)
        assert q.shape == (sum(SIZES), heads, 16) and k.shape[1] == (kv if enable_gqa else heads)
        assert cu_q.dtype == torch.int32 and cu_q.tolist() == [0, 13, 44, 49, 71, 72, 89] and cu_k is cu_q
        assert max_q == max_k == 31 and window_size == (-1, 0)  # causal
        as_rows = lambda t: t.transpose(0, 1).unsqueeze(0)  # noqa: E731 - (T, h, D) -> (1, h, T, D)
        return _one_by_one(as_rows(q), as_rows(k), as_rows(v))[0]

    monkeypatch.setattr(S, "varlen_call", lambda: (kernel, {"window_size": (-1, 0)}, takes_gqa))
    q, k, v, grad = _inputs(heads, kv)
    got, got_grads = _run(lambda *t: S.varlen(*t, SIZES), q, k, v, grad)
    want, want_grads = _run(_one_by_one, q, k, v, grad)
    assert calls == [takes_gqa] and got.shape == (1, sum(SIZES), heads, 16)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_grads, want_grads):  # K/V repeated for the kernel: their gradients sum back
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_attend_varlen_falls_back_off_cuda():
    import torch

    q, k, v, _ = _inputs(6, 2)
    with torch.no_grad():
        assert torch.equal(S.attend(q, k, v, SIZES, "varlen", "sdpa"), S.attend(q, k, v, SIZES, "sdpa"))
