"""The CPU LM heads (cpu_lm_head.LogProbs, materialized, and cpu_lm_head_streamed.StreamedLogProbs)
against the reference they replace on a CPU: TRL's ChunkedLogProbFunction."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

OUTPUTS = ("log_probs", "entropy", "is_top1")


def _inputs(n=37, h=24, v=301, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype) * 2
    weight = torch.randn(v, h, generator=g, dtype=dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[:5] = (hidden[:5] @ weight.t()).argmax(-1)  # some targets are the top-1 token
    return hidden, weight, targets


def _run(fn, hidden, weight, targets, outputs=OUTPUTS, temperature=1.0, logit_scale=1.0, entropy_weight=0.0,
         weight_grad=False):
    hidden = hidden.clone().requires_grad_(True)
    weight = weight.clone().requires_grad_(weight_grad)
    lp, ent, _, _, top1 = fn.apply(hidden, weight, None, targets, temperature, 128, None, logit_scale, outputs)
    loss = -lp.sum() + (entropy_weight * ent.sum() if entropy_weight else 0.0)
    loss.backward()
    return lp.detach(), None if ent is None else ent.detach(), top1, hidden.grad, weight.grad


def _heads():
    """{name: head} for each CPU head: materialized, streamed, and what the trainer calls (TRL's kernel
    swapped for `cpu_lm_head.head_for`'s choice)."""
    from toolkit.finetune import cpu_lm_head

    return {"materialized": cpu_lm_head.materialized_function, "streamed": cpu_lm_head.streamed_function,
            "dispatch": _trainer_head}


def _trainer_head():
    from trl.kernels import ChunkedLogProbFunction

    from toolkit.finetune.trl_compat import _LeanOnCpu

    return _LeanOnCpu(ChunkedLogProbFunction)


@pytest.fixture(params=["materialized", "streamed", "dispatch"])
def head(request, monkeypatch):
    from toolkit.finetune import cpu_lm_head_streamed

    # The streamed head in blocks of 16 vocabulary rows, the last one short (301 = 18 x 16 + 13).
    monkeypatch.setattr(cpu_lm_head_streamed, "BLOCK_ALIGN", 16)
    monkeypatch.setattr(cpu_lm_head_streamed, "VOCAB_BLOCK_BYTES", 1)
    return _heads()[request.param]()


@pytest.mark.parametrize("case", [
    dict(),
    dict(outputs=("log_probs",)),
    dict(temperature=0.7, logit_scale=1.3),
    dict(entropy_weight=0.5),
    dict(entropy_weight=0.5, temperature=0.7),
    dict(weight_grad=True),
])
def test_equals_trl_chunked_kernel(case, head):
    from trl.kernels import ChunkedLogProbFunction

    from toolkit.finetune import cpu_lm_head

    hidden, weight, targets = _inputs()
    if case.get("weight_grad") and head is cpu_lm_head.streamed_function():
        # `head_for` sends a trained weight to the materialized head; called anyway, it says so
        with pytest.raises(RuntimeError, match="no weight gradient"):
            _run(head, hidden, weight, targets, **case)
        return
    want = _run(ChunkedLogProbFunction, hidden, weight, targets, **case)
    got = _run(head, hidden, weight, targets, **case)
    for name, a, b in zip(("log_probs", "entropy", "is_top1", "hidden grad", "weight grad"), want, got):
        if a is None:
            assert b is None, name
        elif a.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            # logits here reach ~50, where fp32 rounds at ~4e-6 (TRL's online sum-exp rounds too)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=5e-5, msg=name)
    if "is_top1" in case.get("outputs", OUTPUTS):
        assert got[2][:5].all() and not got[2].all()


def test_equals_float64_softmax(head):
    """Independent of TRL too: log-probabilities, entropy and their gradients from float64 autograd."""
    hidden, weight, targets = _inputs(seed=3)
    got = _run(head, hidden, weight, targets, temperature=0.7, entropy_weight=0.5)
    h = hidden.double().requires_grad_(True)
    log_p = torch.log_softmax(h @ weight.double().t() / 0.7, dim=-1)
    lp = log_p.gather(1, targets.unsqueeze(1)).squeeze(1)
    ent = -(log_p.exp() * log_p).sum(-1)
    (-lp.sum() + 0.5 * ent.sum()).backward()
    torch.testing.assert_close(got[0], lp.float(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(got[1], ent.float(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(got[3], h.grad.float(), rtol=1e-4, atol=1e-4)


def test_what_it_takes():
    from toolkit.finetune.cpu_lm_head import MAX_LOGITS_BYTES, fits

    assert fits(460, 49152, None, None, OUTPUTS)
    assert not fits(MAX_LOGITS_BYTES // (4 * 128256) + 1, 128256, None, None, OUTPUTS)  # too large: TRL chunks
    assert not fits(10, 100, None, 30.0, OUTPUTS)  # soft-capping
    assert not fits(10, 100, object(), None, OUTPUTS)  # a bias
    assert not fits(10, 100, None, None, ("log_probs", "mean_logits"))
    assert fits(MAX_LOGITS_BYTES // (4 * 128256) + 1, 128256, None, None, OUTPUTS, streamed=True)  # nothing materialized
    assert not fits(10, 100, None, 30.0, OUTPUTS, streamed=True)


def test_head_for_each_call():
    """Past the materialized head's limit a frozen weight still gets a CPU head (streamed), fp32 or bf16;
    a trained one goes back to TRL's kernel."""
    from toolkit.finetune import cpu_lm_head

    v = 1000
    n = cpu_lm_head.MAX_LOGITS_BYTES // (4 * v) + 1
    hidden, frozen, trained = torch.zeros(n, 8), torch.zeros(v, 8), torch.zeros(v, 8, requires_grad=True)
    streamed, materialized = cpu_lm_head.streamed_function(), cpu_lm_head.materialized_function()
    assert cpu_lm_head.head_for(hidden, frozen, None, None, OUTPUTS) is streamed
    assert cpu_lm_head.head_for(hidden, trained, None, None, OUTPUTS) is None
    assert cpu_lm_head.head_for(hidden[:10], frozen, None, None, OUTPUTS) is streamed
    assert cpu_lm_head.head_for(hidden[:10], trained, None, None, OUTPUTS) is materialized
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert cpu_lm_head.head_for(hidden[:10], frozen, None, None, OUTPUTS) is materialized
        # a bf16 weight: materialized where its logits fit, streamed past that (TRL's kernel before)
        low, low_trained = frozen.bfloat16(), trained.detach().bfloat16().requires_grad_(True)
        assert cpu_lm_head.head_for(hidden[:10], low, None, None, OUTPUTS) is materialized
        assert cpu_lm_head.head_for(hidden, low, None, None, OUTPUTS) is streamed
        assert cpu_lm_head.head_for(hidden, low_trained, None, None, OUTPUTS) is None
    assert cpu_lm_head.head_for(hidden[:10], frozen, object(), None, OUTPUTS) is None  # a bias


def test_a_tie_with_an_earlier_token_is_not_top1(head):
    """TRL counts a target as top-1 only when no earlier token has the same logit (for the streamed
    head the twins sit in different blocks)."""
    from trl.kernels import ChunkedLogProbFunction

    hidden, weight, _ = _inputs(n=4, v=50)
    best = (hidden @ weight.t()).argmax(-1)
    weight = torch.cat([weight, weight[best[:2]]])  # tokens 50, 51 tie with the top-1 of rows 0, 1
    targets = torch.tensor([50, int(best[1]), int(best[2]), 7])  # row 0 targets the later twin, row 1 the earlier
    args = (None, targets, 1.0, 16, None, 1.0, ("log_probs", "is_top1"))
    want = ChunkedLogProbFunction.apply(hidden, weight, *args)[4]
    got = head.apply(hidden, weight, *args)[4]
    assert torch.equal(got, want) and got.tolist()[:3] == [False, True, True]


def test_row_blocks_do_not_change_the_answer(monkeypatch):
    from toolkit.finetune import cpu_lm_head

    hidden, weight, targets = _inputs(n=50, v=301)
    whole = _run(cpu_lm_head.materialized_function(), hidden, weight, targets)
    monkeypatch.setattr(cpu_lm_head, "ROW_BLOCK_BYTES", 4 * 301 * 7)  # 7 rows a block, the last one short
    blocked = _run(cpu_lm_head.materialized_function(), hidden, weight, targets)
    for a, b in zip(whole, blocked):
        assert (a is None and b is None) or torch.equal(a, b)


def test_logits_buffer_is_reused_and_never_shared(monkeypatch):
    """The backward hands its logits buffer to the next forward; two forwards before their backwards
    (or a forward under no_grad in between) each work in their own, so the answers are those of
    separate runs."""
    from toolkit.finetune import cpu_lm_head

    monkeypatch.setattr(cpu_lm_head, "_SPARE", {})
    fn = cpu_lm_head.materialized_function()
    a, b = _inputs(seed=1), _inputs(n=20, seed=2)
    want_a, want_b = _run(fn, *a), _run(fn, *b)
    spare = cpu_lm_head._SPARE[torch.float32]
    got_a = _run(fn, *a)
    assert cpu_lm_head._SPARE[torch.float32] is spare  # taken by the forward, handed back by the backward

    ha, hb = a[0].clone().requires_grad_(), b[0].clone().requires_grad_()
    lp_a = fn.apply(ha, a[1], None, a[2], 1.0, 128, None, 1.0, OUTPUTS)[0]
    lp_b = fn.apply(hb, b[1], None, b[2], 1.0, 128, None, 1.0, OUTPUTS)[0]
    with torch.no_grad():
        fn.apply(b[0], b[1], None, b[2], 1.0, 128, None, 1.0, OUTPUTS)
    (-lp_b.sum()).backward()
    (-lp_a.sum()).backward()
    for got, want in ((got_a, want_a), ((lp_a.detach(), ha.grad), (want_a[0], want_a[3])),
                      ((lp_b.detach(), hb.grad), (want_b[0], want_b[3]))):
        for x, y in zip(got, want):
            if x is not None:
                assert torch.equal(x, y)
    assert len(cpu_lm_head._SPARE) == 1


def test_bf16_autocast_path(monkeypatch):
    """The bf16 CPU recipe's path: the logits matmul in bf16 (autocast), softmax in fp32. Equal to a
    float64 softmax over the same bf16-rounded logits; both buffers (fp32 logits, bf16 matmul output)
    are reused by the next call, never shared with a live one."""
    from toolkit.finetune import cpu_lm_head

    monkeypatch.setattr(cpu_lm_head, "_SPARE", {})
    fn = _trainer_head()
    hidden, weight, targets = _inputs(seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(fn, hidden, weight, targets)
    spares = dict(cpu_lm_head._SPARE)
    assert set(spares) == {torch.float32, torch.bfloat16}
    h = hidden.bfloat16().double().requires_grad_(True)
    log_p = torch.log_softmax((h @ weight.bfloat16().double().t()).bfloat16().double(), dim=-1)
    lp = log_p.gather(1, targets.unsqueeze(1)).squeeze(1)
    (-lp.sum()).backward()
    torch.testing.assert_close(got[0], lp.float(), rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(got[1], -(log_p.exp() * log_p).sum(-1).float(), rtol=1e-5, atol=2e-5)
    assert got[3].dtype == torch.float32  # the hidden's dtype; its values went through a bf16 matmul
    torch.testing.assert_close(got[3], h.grad.float(), rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        again = _run(fn, hidden, weight, targets)
    assert all(cpu_lm_head._SPARE[k] is v for k, v in spares.items())
    for x, y in zip(got, again):
        assert (x is None and y is None) or torch.equal(x, y)


def test_fp32_runs_through_the_weights_packs_where_the_model_is_packed(monkeypatch):
    """Where the model's frozen linears run pre-packed (an fp32 CPU run whose calibration chose
    oneDNN), the LM head's two matmuls use the same packs: the same answers as torch's matmul, the
    input-gradient pack made at the backward, and no logits buffer kept for a fresh output."""
    from toolkit.core import packed_linear
    from toolkit.finetune import cpu_lm_head

    if not packed_linear.available():
        pytest.skip("this torch lacks the oneDNN operators")
    monkeypatch.setattr(cpu_lm_head, "_SPARE", {})
    hidden, weight, targets = _inputs(n=45, h=32, v=509, seed=5)
    want = _run(cpu_lm_head.materialized_function(), hidden, weight, targets, entropy_weight=0.5)
    assert torch.float32 in cpu_lm_head._SPARE
    fn = _trainer_head()  # a packed weight goes to the materialized head
    monkeypatch.setattr(cpu_lm_head, "_SPARE", {})
    head = torch.nn.Linear(32, 509, bias=False).requires_grad_(False)
    head.weight.copy_(weight)
    with packed_linear.packed_linears(head, torch.float32) as n:
        packs = packed_linear.packs_of(head.weight)
        assert n == 1 and packs is not None and packs[1] is None
        h = hidden.clone().requires_grad_(True)
        lp, ent, _, _, top1 = fn.apply(h, head.weight, None, targets, 1.0, 128, None, 1.0, OUTPUTS)
        (-lp.sum() + 0.5 * ent.sum()).backward()
        assert packs[1] is not None  # the backward ran through the input-gradient pack
    assert packed_linear.packs_of(head.weight) is None  # forgotten with the block
    assert cpu_lm_head._SPARE == {}
    for name, a, b in zip(("log_probs", "entropy", "is_top1", "hidden grad"), want, (lp, ent, top1, h.grad)):
        if a.dtype == torch.bool:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(b.detach(), a, rtol=1e-5, atol=5e-5, msg=name)


def test_bf16_leaves_the_weights_packs_alone(monkeypatch):
    """bf16 keeps torch's matmul (uses_weight_packs), so a bf16 training run need not pack the LM head:
    packed or not, the same answers, and the input-gradient pack is never made."""
    from toolkit.core import packed_linear
    from toolkit.finetune import cpu_lm_head

    assert cpu_lm_head.uses_weight_packs("float32") and not cpu_lm_head.uses_weight_packs("bfloat16")
    if not packed_linear.packs("bfloat16"):
        pytest.skip("oneDNN does not pack bf16 on this CPU (or this torch lacks its operators)")
    hidden, weight, targets = _inputs(n=45, h=32, v=509, seed=6)
    fn = _trainer_head()
    head = torch.nn.Linear(32, 509, bias=False, dtype=torch.bfloat16).requires_grad_(False)
    head.weight.copy_(weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = _run(fn, hidden, head.weight, targets)
        with packed_linear.packed_linears(head, torch.bfloat16) as n:
            packs = packed_linear.packs_of(head.weight)
            got = _run(fn, hidden, head.weight, targets)
            assert n == 1 and packs[1] is None
    for a, b in zip(want, got):
        assert (a is None and b is None) or torch.equal(a, b)


def test_which_head_a_call_takes():
    """Streamed for a frozen weight that is not pre-packed, in bf16 only past the materialized head's
    limit; everything else materialized."""
    from toolkit.finetune.cpu_lm_head import streams

    assert streams("float32", weight_trained=False, packed=False)
    assert not streams("float32", weight_trained=True, packed=False)  # the weight's gradient needs the logits'
    assert not streams("float32", weight_trained=False, packed=True)  # oneDNN's whole-weight packs
    # bf16: materialized where its logits fit (a little faster on the Zen 4), streamed past that
    assert not streams("bfloat16", weight_trained=False, packed=False)
    assert streams("bfloat16", weight_trained=False, packed=False, materialized_fits=False)
    assert not streams("bfloat16", weight_trained=True, packed=False, materialized_fits=False)
    assert streams("float32", weight_trained=False, packed=False, materialized_fits=False)


@pytest.mark.parametrize("case", [dict(), dict(temperature=0.7, logit_scale=1.3, entropy_weight=0.5)])
def test_bf16_streamed_head_equals_the_materialized_one(case, monkeypatch):
    """In bf16 (a bf16 weight under autocast, as the bf16 CPU recipe trains) the streamed head, in blocks
    of 16 vocabulary rows, widens the same bf16 logits as the materialized head: the same log-probabilities,
    entropy and top-1; the hidden states' gradient within bf16 rounding of its products, and both
    within that of a float64 softmax over the bf16-rounded logits."""
    from toolkit.finetune import cpu_lm_head, cpu_lm_head_streamed

    monkeypatch.setattr(cpu_lm_head_streamed, "BLOCK_ALIGN", 16)
    monkeypatch.setattr(cpu_lm_head_streamed, "VOCAB_BLOCK_BYTES", 1)
    hidden, weight, targets = _inputs(seed=9, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _run(cpu_lm_head.streamed_function(), hidden, weight, targets, **case)
        want = _run(cpu_lm_head.materialized_function(), hidden, weight, targets, **case)
    assert got[3].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=5e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=5e-5)
    assert torch.equal(got[2], want[2]) and got[2][:5].all() and not got[2].all()
    scale = case.get("logit_scale", 1.0) / case.get("temperature", 1.0)
    h = hidden.double().requires_grad_(True)
    z = (h @ weight.double().t()).bfloat16().double() * scale  # the bf16 product's rounding, scaled in fp32
    log_p = torch.log_softmax(z, dim=-1)
    lp = log_p.gather(1, targets.unsqueeze(1)).squeeze(1)
    ent = -(log_p.exp() * log_p).sum(-1)
    (-lp.sum() + case.get("entropy_weight", 0.0) * ent.sum()).backward()
    torch.testing.assert_close(got[0], lp.float(), rtol=1e-5, atol=5e-5)
    for g in (got[3], want[3]):
        # a wrong gradient is off by O(1); bf16 products of ~40 terms round at ~1e-2 of its scale
        torch.testing.assert_close(g.float(), h.grad.float(), rtol=3e-2, atol=3e-2 * h.grad.abs().max().item())


def test_the_dispatcher_streams_a_frozen_fp32_weight(monkeypatch):
    """The trainer's head streams a frozen fp32 weight (no logits buffer kept for the next step) and
    materializes a trained one."""
    from toolkit.finetune import cpu_lm_head

    monkeypatch.setattr(cpu_lm_head, "_SPARE", {})
    hidden, weight, targets = _inputs(seed=7)
    _run(_trainer_head(), hidden, weight, targets)
    assert cpu_lm_head._SPARE == {}
    got = _run(_trainer_head(), hidden, weight, targets, weight_grad=True)
    assert got[4] is not None and torch.float32 in cpu_lm_head._SPARE


def test_the_streamed_head_keeps_nothing_vocabulary_sized(monkeypatch):
    """What its backward needs is N x H (P @ W) and N-sized vectors: no logits, no probabilities; without
    a gradient it runs the one product only, to the same answers."""
    from toolkit.finetune import cpu_lm_head, cpu_lm_head_streamed

    monkeypatch.setattr(cpu_lm_head_streamed, "BLOCK_ALIGN", 16)
    monkeypatch.setattr(cpu_lm_head_streamed, "VOCAB_BLOCK_BYTES", 1)
    n, h, v = 37, 24, 301
    hidden, weight, targets = _inputs(n, h, v, seed=8)
    fn = cpu_lm_head.streamed_function()
    x = hidden.clone().requires_grad_(True)
    lp, ent, _, _, top1 = fn.apply(x, weight, None, targets, 1.0, 128, None, 1.0, OUTPUTS)
    saved = [t for t in lp.grad_fn.saved_tensors if t is not None]
    assert all(t.numel() in (n, n * h) or t is weight for t in saved)  # targets, log Z, entropy; hidden, P @ W
    with torch.no_grad():
        again = fn.apply(hidden, weight, None, targets, 1.0, 128, None, 1.0, OUTPUTS)
    for a, b in zip((lp, ent, top1), (again[0], again[1], again[4])):
        assert torch.equal(a.detach(), b)


def test_vocabulary_blocks():
    """A block's logits, their exponentials and its weight rows within VOCAB_BLOCK_BYTES."""
    from toolkit.finetune.cpu_lm_head_streamed import BLOCK_ALIGN, VOCAB_BLOCK_BYTES, vocab_block

    for n, h in ((460, 576), (460, 2048), (1500, 2048)):
        rows = vocab_block(n, 128256, h)
        assert rows % BLOCK_ALIGN == 0 and rows * 4 * (2 * n + h) <= VOCAB_BLOCK_BYTES
        assert (rows + BLOCK_ALIGN) * 4 * (2 * n + h) > VOCAB_BLOCK_BYTES
    assert vocab_block(100_000, 49152, 576) == BLOCK_ALIGN  # at least one aligned block
    assert vocab_block(10, 300, 64) == 300  # a small vocabulary in one block
    assert vocab_block(0, 49152, 576) > 0


def test_first_maximum_at_is_argmax_equals_target_with_many_ties():
    """The materialized head's top-1 without argmax, against `argmax == target` (the first maximum) on
    small-integer logits, where most rows' maximum is tied and many targets hold one of the twins."""
    from toolkit.finetune.cpu_lm_head import first_maximum_at

    g = torch.Generator().manual_seed(3)
    z = torch.randint(0, 4, (400, 9), generator=g).float()
    targets = torch.randint(0, 9, (400,), generator=g)
    peak, target_z = z.amax(-1), z.gather(1, targets[:, None]).squeeze(1)
    got = first_maximum_at(z, peak, targets, target_z)
    want = z.argmax(-1) == targets
    # some targets are the first maximum, and some others hold the maximum after an earlier twin
    assert torch.equal(got, want) and 0 < int(want.sum()) < int((target_z == peak).sum())
