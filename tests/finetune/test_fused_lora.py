"""fused_lora against PEFT's own LoRA forward: same loss, same gradients, and the fused path is
the one taken for the recipes' plain LoRA (fails if PEFT renames what it reads)."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")


def _peft(tiny, **lora):
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(tiny[0]).float()
    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, LoraConfig(**{**cfg, **lora}))
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero, which would hide a wrong adapter product
            torch.nn.init.normal_(p, std=0.05)
    return model


def _loss_and_grads(model, ids):
    model.zero_grad()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packed", [False, True], ids=["torch matmul", "pre-packed base"])
def test_same_loss_and_gradients_as_peft(tiny, packed):
    import contextlib

    from toolkit.core import packed_linear
    from toolkit.finetune.fused_lora import fused_on_cpu

    if packed and not packed_linear.available():
        pytest.skip("this torch has no oneDNN packed linear")
    model = _peft(tiny)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    calls = []  # PEFT's path calls the lora_A modules; the fused one multiplies by their weights directly
    for name, m in model.named_modules():
        if name.endswith("lora_A.default"):
            m.register_forward_hook(lambda *a: calls.append(1))
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    assert calls
    calls.clear()
    pack = packed_linear.packed_linears(model, torch.float32) if packed else contextlib.nullcontext(0)
    with fused_on_cpu(model, "cpu") as n, pack as n_packed:
        loss, grads = _loss_and_grads(model, ids)
    assert not calls
    # every base layer, and the LM head when it is an nn.Linear of its own (tied or not)
    assert n_packed == (n + 1 if packed else 0)
    assert n == sum(1 for name, _ in model.named_modules() if name.endswith(".base_layer"))
    # oneDNN sums in another order than the BLAS: equal to float32 rounding, not bit for bit
    tol = dict(rtol=1e-5, atol=1e-5) if packed else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, loss_ref, **tol)
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * n
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5 if packed else 1e-6, msg=name)


def test_plain_lora_takes_the_fused_path(tiny):
    from toolkit.finetune.fused_lora import fused_on_cpu

    model = _peft(tiny)
    x = torch.randn(1, 3, model.config.hidden_size)
    with fused_on_cpu(model, "cpu"):
        layers = [m for m in model.modules() if hasattr(m, "fused_key")]
        q = next(m for m in layers if m.base_layer.in_features == model.config.hidden_size)
        assert layers and q.fused_key(x, (), {}) == "default"


def test_a_dropout_that_is_on_takes_the_fused_path_with_a_gradient_only(tiny):
    from toolkit.finetune.fused_lora import fused_on_cpu

    model = _peft(tiny, lora_dropout=0.1)
    x = torch.randn(1, 3, model.config.hidden_size)
    with fused_on_cpu(model, "cpu"):
        layer = next(m for m in model.modules() if hasattr(m, "fused_key"))
        model.train()
        assert layer.fused_key(x, (), {}) == "default"
        with torch.no_grad():  # dropped inside the autograd node only: PEFT's forward does it here
            assert layer.fused_key(x, (), {}) is None
        model.eval()  # off: nothing to drop
        with torch.no_grad():
            assert layer.fused_key(x, (), {}) == "default"


@pytest.mark.parametrize("case", ["another dropout module", "disabled", "merged", "extra kwargs", "dora",
                                  "trained base bias"])
def test_other_cases_go_to_peft(tiny, case):
    from toolkit.finetune.fused_lora import fused_on_cpu

    model = _peft(tiny, **({"use_dora": True} if case == "dora" else {}))
    model.eval()
    x = torch.randn(1, 3, model.config.hidden_size)
    with fused_on_cpu(model, "cpu"):
        layer = next(m for m in model.modules() if hasattr(m, "fused_key"))
        if case == "another dropout module":
            layer.lora_dropout["default"] = torch.nn.AlphaDropout(0.1).eval()
        if case == "disabled":
            layer.enable_adapters(False)
        if case == "merged":
            layer.merge()
        if case == "trained base bias":  # PEFT's bias="all": the fused node would give it no gradient
            layer.base_layer.bias = torch.nn.Parameter(torch.zeros(layer.base_layer.out_features))
        kwargs = {"adapter_names": ["default"] * 1} if case == "extra kwargs" else {}
        assert layer.fused_key(x, (), kwargs) is None
        want = layer.forward(x, **kwargs)  # PEFT's path, through the subclass
    assert torch.equal(want, layer.forward(x, **kwargs))


def test_scoped_to_the_block(tiny):
    from peft.tuners.lora import Linear

    from toolkit.finetune.fused_lora import fused_on_cpu

    model = _peft(tiny)
    with pytest.raises(RuntimeError):
        with fused_on_cpu(model, "cpu"):
            assert all(type(m) is not Linear for m in model.modules())
            raise RuntimeError("interrupted")
    assert any(type(m) is Linear for m in model.modules())
    assert not any(hasattr(m, "fused_key") for m in model.modules())
    with fused_on_cpu(model, "cuda:0") as n:
        assert n == 0


def test_a_peft_without_what_it_reads_keeps_its_own_forward(tiny, monkeypatch):
    from peft.tuners.lora import Linear

    from toolkit.finetune.fused_lora import READS, fused_on_cpu

    model = _peft(tiny)
    layer = next(m for m in model.modules() if type(m) is Linear)
    assert all(hasattr(layer, name) for name in READS)  # fails when PEFT renames one of them
    monkeypatch.delattr(Linear, "lora_variant", raising=False)
    for m in model.modules():
        m.__dict__.pop("lora_variant", None)
        m._modules.pop("lora_variant", None)
    said = []
    with fused_on_cpu(model, "cpu", said.append) as n:
        assert n == 0 and not any(hasattr(m, "fused_key") for m in model.modules())
    assert said and "lora_variant" in said[0]


def _big_casts(model, ids, hidden):
    """Loss, gradients, and how many dtype casts of an activation-sized tensor (>= tokens x hidden
    elements) the forward and backward make."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Casts(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten._to_copy.default and out.numel() >= ids.numel() * hidden:
                Casts.n += 1
            return out

    with Casts(), torch.autocast("cpu", dtype=torch.bfloat16):
        loss, grads = _loss_and_grads(model, ids)
    return loss, grads, Casts.n


def test_bf16_autocast_with_fp32_adapter_takes_the_fused_path_without_activation_casts(tiny):
    """The bf16 CPU recipe's mix (bf16 base, fp32 adapter, bf16 autocast): fused, the same loss and
    gradients as PEFT within bf16 rounding, and none of PEFT's fp32 round trips of each input."""
    from toolkit.finetune.fused_lora import fused_on_cpu

    model = _peft(tiny)
    for name, p in model.named_parameters():
        if not p.requires_grad:
            p.data = p.data.bfloat16()
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    hidden = model.config.hidden_size
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    calls = []
    for name, m in model.named_modules():
        if name.endswith("lora_A.default"):
            m.register_forward_hook(lambda *a: calls.append(1))
    loss_ref, grads_ref, casts_ref = _big_casts(model, ids, hidden)
    assert calls and casts_ref > 0
    calls.clear()
    with fused_on_cpu(model, "cpu") as n:
        loss, grads, casts = _big_casts(model, ids, hidden)
    # PEFT: x to fp32 and autocast's cast back, per LoRA layer (and their backward); measured 70 vs 20
    # (the 20 are the RMSNorms' fp32 upcasts, in both).
    assert not calls and casts_ref - casts >= 2 * n > 0
    torch.testing.assert_close(loss, loss_ref, rtol=2e-2, atol=2e-2)
    assert grads.keys() == grads_ref.keys() and all(g.dtype == torch.float32 for g in grads.values())
    for name in grads:  # bf16 rounding: compare directions and sizes, not elements
        cos = torch.nn.functional.cosine_similarity(grads[name].flatten(), grads_ref[name].flatten(), dim=0)
        assert cos > 0.99 and 0.9 < grads[name].norm() / grads_ref[name].norm() < 1.1, name


def test_adapter_rows_give_base_and_adapter_rows_in_one_batch(tiny):
    """Under `adapter_rows`, a 0 row's logits are the base model's (adapter disabled) and a 1 row's the
    adapter's; a layer that can't take the fused path raises instead of giving a wrong row."""
    from toolkit.finetune.fused_lora import NotFused, adapter_rows, fused_on_cpu

    model = _peft(tiny).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        assert (tuned - base).abs().max() > 1e-3
        with fused_on_cpu(model, "cpu") as n, adapter_rows(model, torch.tensor([0, 1, 1, 0])) as m:
            both = model(input_ids=ids.repeat(4, 1)).logits
            m.keep(torch.tensor([2, 3]))  # rows 0 and 1 left the batch: the rest keep their sides
            kept = model(input_ids=ids.repeat(2, 1)).logits
            reading = sum(getattr(mod, "_toolkit_adapter_rows", None) is m for mod in model.modules())
        assert reading == n > 0
    for row, ref in zip([*both, *kept], (base, tuned, tuned, base, tuned, base)):
        torch.testing.assert_close(row, ref[0], rtol=1e-5, atol=1e-5)
    assert not any(hasattr(mod, "_toolkit_adapter_rows") for mod in model.modules())

    # A dropout is off in evaluation: its adapter pairs like any other.
    dropout = _peft(tiny, lora_dropout=0.1).eval()
    with torch.no_grad():
        tuned = dropout(input_ids=ids).logits
        with fused_on_cpu(dropout, "cpu"), adapter_rows(dropout, torch.tensor([1])):
            torch.testing.assert_close(dropout(input_ids=ids).logits, tuned, rtol=1e-5, atol=1e-5)
    dora = _peft(tiny, use_dora=True).eval()
    with torch.no_grad(), fused_on_cpu(dora, "cpu"), adapter_rows(dora, torch.tensor([0])):
        with pytest.raises(NotFused):
            dora(input_ids=ids)


def test_adapter_rows_decoding_outside_autograd_equals_the_autograd_path_in_bf16(tiny):
    """Decoding a paired batch (no gradient) runs the product outside autograd with the mask and the
    fp32 adapter's bf16 casts made once for the block: the same logits, to the bit, as the autograd
    path of the same rows (gradient on) in the bf16 CPU run's mix; each row within bf16 rounding of
    the base and the adapter run alone; the casts are made once per weight, not per call."""
    from toolkit.finetune import fused_lora

    model = _peft(tiny).eval()
    for p in model.parameters():
        if not p.requires_grad:
            p.data = p.data.bfloat16()
    ids = torch.randint(0, model.config.vocab_size, (1, 10), generator=torch.Generator().manual_seed(3))
    rows = torch.tensor([1, 0, 0, 1])
    casts = []
    real_cast = fused_lora._Rows.cast

    def counted(self, weight, dtype):
        casts.append((id(weight), len(self._casts)))
        return real_cast(self, weight, dtype)

    with torch.autocast("cpu", dtype=torch.bfloat16), fused_lora.fused_on_cpu(model, "cpu") as n:
        with fused_lora.adapter_rows(model, rows):
            grad_path = model(input_ids=ids.repeat(4, 1)).logits.detach()
        with torch.no_grad(), fused_lora.adapter_rows(model, rows), \
                pytest.MonkeyPatch.context() as mp:
            mp.setattr(fused_lora._Rows, "cast", counted)
            fast = model(input_ids=ids.repeat(4, 1)).logits
            again = model(input_ids=ids.repeat(4, 1)).logits
        with torch.no_grad():
            tuned = model(input_ids=ids).logits[0]
            with model.disable_adapter():
                base = model(input_ids=ids).logits[0]
    assert torch.equal(fast, grad_path) and torch.equal(again, fast)
    assert len(casts) == 2 * 2 * n and len({w for w, _ in casts}) == 2 * n  # A and B, two forwards
    assert max(k for _, k in casts) == 2 * n  # the second forward made no new cast
    for row, ref in zip(fast, (tuned, base, base, tuned)):
        torch.testing.assert_close(row.float(), ref.float(), rtol=3e-2, atol=3e-2)
    assert (tuned - base).abs().max() > 0.1


def test_without_a_gradient_a_fused_call_skips_autograd_with_the_same_numbers(tiny, monkeypatch):
    """An evaluation under no_grad (no paired rows) takes the product outside autograd: the same
    logits, to the bit, as the autograd path, and no LoraMatmul call."""
    from toolkit.finetune import fused_lora, lora_groups

    # Layer by layer on both sides: a group's stacked product rounds otherwise (test_lora_groups).
    monkeypatch.setattr(lora_groups, "attach", lambda model, layers: 0)
    model = _peft(tiny).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    with fused_lora.fused_on_cpu(model, "cpu") as n:
        grad_path = model(input_ids=ids).logits.detach()
        applied = []
        real = fused_lora._lora_matmul()
        monkeypatch.setattr(real, "apply", lambda *a: applied.append(1) or real.forward(None, *a))
        with torch.no_grad():
            fast = model(input_ids=ids).logits
    assert n > 0 and not applied and torch.equal(fast, grad_path)


def test_one_layer_backward_accumulates_the_input_gradient_in_the_gemm(tiny):
    """A fused layer is one autograd node whose backward folds the adapter's share of x's gradient
    into g @ W (PEFT's graph adds the two M x K gradients): same gradients, no input-sized add."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from toolkit.finetune.fused_lora import fused_on_cpu

    model = _peft(tiny)
    layer = next(m for m in model.modules() if hasattr(m, "lora_A") and m.base_layer.out_features
                 != m.base_layer.in_features)
    x = torch.randn(2, 7, layer.base_layer.in_features, generator=torch.Generator().manual_seed(3))
    g = torch.randn(2, 7, layer.base_layer.out_features, generator=torch.Generator().manual_seed(4))

    class Adds(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.add, torch.ops.aten.add_) and args[0].numel() >= x.numel():
                Adds.n += 1
            return func(*args, **(kwargs or {}))

    def grads():
        layer.zero_grad()
        xi = x.clone().requires_grad_()
        out = layer(xi)
        with Adds():
            out.backward(g)
        return out.detach(), xi.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad

    ref = grads()
    assert Adds.n >= 1  # PEFT's graph: base and adapter gradients of x added
    Adds.n = 0
    with fused_on_cpu(model, "cpu"):
        node = layer(x).grad_fn  # the view back to (batch, seq, out) over the 2-D product
        assert type(node.next_functions[0][0]).__name__ == "LoraMatmulBackward"
        got = grads()
    assert Adds.n == 0
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("masked,p", [(False, 0.0), (True, 0.0), (False, 0.3), (True, 0.3)],
                         ids=["all rows", "adapter rows masked", "dropout", "dropout, rows masked"])
def test_lora_matmul_gradients_against_autograd_of_the_same_formula(masked, p, monkeypatch):
    from toolkit.finetune import lora_products
    from toolkit.finetune.fused_lora import _lora_matmul

    gen = torch.Generator().manual_seed(5)
    drop = torch.rand(8, 6, generator=gen) < p
    monkeypatch.setattr(lora_products, "dropped", lambda shape, q, device: drop if q == p else None)
    base = torch.nn.Linear(6, 5).requires_grad_(False)
    x = torch.randn(8, 6, generator=gen, requires_grad=True)
    a = torch.randn(3, 6, generator=gen, requires_grad=True)
    b = torch.randn(5, 3, generator=gen, requires_grad=True)
    mask = torch.tensor([0.0, 1.0]).repeat_interleave(4).unsqueeze(1) if masked else None
    g = torch.randn(8, 5, generator=gen)

    out = _lora_matmul().apply(x, base, a, b, 0.5, mask, p)
    got = (out, *torch.autograd.grad(out, (x, a, b), g))
    h = x.masked_fill(drop, 0) / (1 - p) @ a.t() * (mask if masked else 1.0)
    ref_out = base(x) + 0.5 * h @ b.t()
    ref = (ref_out, *torch.autograd.grad(ref_out, (x, a, b), g))
    for u, v in zip(got, ref):
        torch.testing.assert_close(u, v)


def _qlora(tiny_llama_dir, lora_dropout=0.0):
    """The tiny model as QLoRA loads it (nf4, double quant, fp32 compute), r 4 on all linears."""
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=quant, device_map="cpu")
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.fixture(scope="module")
def tiny_qlora(tiny_llama_dir):
    return _qlora(tiny_llama_dir)


def test_qlora_takes_the_fused_path_with_peft_and_bitsandbytes_numbers(tiny_qlora):
    """QLoRA's 4-bit layers, fused: the same loss and gradients as PEFT's forward over bitsandbytes'
    (both dequantize the same nf4 weights), no call of bitsandbytes' 4-bit matmul; paired base and
    adapter rows for the report; and where bitsandbytes would run its CPU inference kernel, its path."""
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit

    from toolkit.finetune.base_model import keep_4bit_weights_trainable
    from toolkit.finetune.fused_lora import NotFused, adapter_rows, fused_on_cpu

    model = tiny_qlora.train()  # as the trainer runs it
    keep_4bit_weights_trainable(model)
    layers = [m for m in model.modules() if type(m) is Linear4bit]
    assert layers and all(type(m.base_layer) is bnb.nn.Linear4bit for m in layers)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    calls = []
    real = bnb.matmul_4bit
    bnb.matmul_4bit = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        loss_ref, grads_ref = _loss_and_grads(model, ids)
        assert len(calls) == len(layers)
        model.eval()
        with torch.no_grad():
            tuned = model(input_ids=ids[:1]).logits
            with model.disable_adapter():
                base = model(input_ids=ids[:1]).logits
        calls.clear()
        with fused_on_cpu(model, "cpu") as n:
            model.train()
            loss, grads = _loss_and_grads(model, ids)
            model.eval()
            with torch.no_grad(), adapter_rows(model, torch.tensor([1, 0])):
                both = model(input_ids=ids[:1].repeat(2, 1)).logits
            assert n == len(layers) and not calls
            for m in layers:  # as bitsandbytes sets it on an AVX512-BF16 CPU
                m.base_layer.support_avx512bf16_for_cpu = True
            with torch.no_grad(), adapter_rows(model, torch.tensor([0])), pytest.raises(NotFused):
                model(input_ids=ids[:1])
            assert not calls
            with torch.no_grad():  # last: bitsandbytes repacks the weights for its kernel for good
                model(input_ids=ids[:1])
            assert len(calls) == len(layers)
    finally:
        bnb.matmul_4bit = real
        keep_4bit_weights_trainable(model)
    assert all(type(m) is Linear4bit for m in layers)
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * n
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    assert (tuned - base).abs().max() > 1e-3
    torch.testing.assert_close(both[0], tuned[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(both[1], base[0], rtol=1e-5, atol=1e-5)


def test_dropped_draws_each_element_with_probability_p_from_the_seeded_generator():
    from toolkit.finetune.lora_products import dropped

    for p in (0.05, 0.5):
        torch.manual_seed(3)
        drop = dropped((999, 577), p, "cpu")  # an odd count: the last 64-bit draw is used in part
        assert drop.dtype == torch.bool and drop.shape == (999, 577)
        share = drop.float().mean().item()
        assert abs(share - p) < 4 * (p * (1 - p) / drop.numel()) ** 0.5, (p, share)
        # every one of a draw's four lanes, and rows and columns alike
        lanes = drop.flatten()[:999 * 576].view(-1, 4).float().mean(0)
        assert (lanes - p).abs().max() < 0.01, lanes
        torch.manual_seed(3)
        assert torch.equal(dropped((999, 577), p, "cpu"), drop)
    assert not dropped((64, 64), 0.0, "cpu").any() and dropped((64, 64), 1.0 - 2 ** -17, "cpu").float().mean() > 0.99


@pytest.mark.parametrize("base", ["torch matmul", "pre-packed base", "4-bit base"])
def test_dropout_gives_peft_numbers_for_the_same_dropped_elements(tiny, tiny_llama_dir, base, monkeypatch):
    """With a dropout on, the fused path (sibling groups included) gives PEFT's loss and gradients when
    PEFT's dropout modules drop the elements the fused path drew: over plain, pre-packed and QLoRA's
    4-bit base layers."""
    import contextlib

    from toolkit.core import packed_linear
    from toolkit.finetune import fused_lora, lora_products
    from toolkit.finetune.base_model import keep_4bit_weights_trainable

    packed = base == "pre-packed base"
    if packed and not packed_linear.available():
        pytest.skip("this torch has no oneDNN packed linear")
    p = 0.25
    if base == "4-bit base":
        model = _qlora(tiny_llama_dir, lora_dropout=p)
        keep_4bit_weights_trainable(model)
    else:
        model = _peft(tiny, lora_dropout=p)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    drawn, real = [], lora_products.dropped
    monkeypatch.setattr(lora_products, "dropped", lambda *a: drawn.append(real(*a)) or drawn[-1])
    pack = packed_linear.packed_linears(model, torch.float32) if packed else contextlib.nullcontext(0)
    with fused_lora.fused_on_cpu(model, "cpu") as n, pack:
        loss, grads = _loss_and_grads(model, ids)
    assert n and len(drawn) == n and all(0.1 < d.float().mean() < 0.4 for d in drawn)

    class Replay(torch.nn.Module):  # PEFT calls its layers' dropouts in the model's order, as the fused path draws
        def forward(self, x):
            return x.masked_fill(drawn.pop(0).view(x.shape), 0) / (1 - p)

    for m in model.modules():
        if hasattr(m, "lora_dropout"):
            m.lora_dropout["default"] = Replay()
    loss_ref, grads_ref = _loss_and_grads(model, ids)
    assert not drawn
    tol = dict(rtol=1e-5, atol=1e-5) if base != "torch matmul" else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss, loss_ref, **tol)
    assert grads.keys() == grads_ref.keys() and len(grads) == 2 * n
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=tol["atol"], msg=name)


def test_dropout_is_noted_where_the_fused_layers_draw_it():
    from toolkit.finetune.fused_lora import dropout_note

    assert "lora.dropout 0.05" in dropout_note(0.05, "cpu")
    assert dropout_note(0.0, "cpu") == dropout_note(0.05, "cuda:0") == ""  # CUDA keeps PEFT's layers anyway


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sliced", [False, True], ids=["h alone", "h a sibling's columns"])
def test_b_grad_is_the_scaled_product_in_the_adapters_dtype_either_way_round(dtype, sliced):
    """bf16 takes the product the other way round (see `b_grad`): the same numbers as g.T @ h to the
    rounding of one bf16 product, contiguous, in the adapter's dtype, for a sibling's column slice of h too."""
    from toolkit.finetune.lora_products import b_grad

    gen = torch.Generator().manual_seed(3)
    g = torch.randn(37, 24, generator=gen).to(dtype)
    wide = torch.randn(37, 12, generator=gen).to(dtype)
    h = wide[:, 4:8] if sliced else wide[:, :4].contiguous()
    got = b_grad(g, h, 2.5, torch.float32)
    assert got.dtype == torch.float32 and got.shape == (24, 4) and got.is_contiguous()
    ref = 2.5 * (g.double().t() @ h.double())
    tol = dict(rtol=8e-3, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)  # bf16: 2 ulps
    torch.testing.assert_close(got.double(), ref, **tol)
    # the old formula's numbers, to one rounding of the bf16 product (scaled after it, not before)
    old = torch.mm(g.t(), h).mul_(2.5).to(torch.float32)
    torch.testing.assert_close(got, old, **tol)
