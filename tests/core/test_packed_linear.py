"""packed_linear against F.linear: values and input gradients in fp32 and bf16, the block's
bookkeeping (what it packs, that it always unpacks), its memory gate, and the upstream operators it
calls (fails when PyTorch renames them)."""

from __future__ import annotations

import contextlib

import pytest

torch = pytest.importorskip("torch")

from toolkit.core import packed_linear as P  # noqa: E402


def test_this_torch_has_the_onednn_operators():
    # Private to PyTorch: a rename upstream must fail here, not fall back silently in every run.
    assert torch.backends.mkldnn.is_available()
    assert hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    assert P.available()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("bias", [False, True])
def test_values_and_input_gradient_match_f_linear(dtype, tol, bias):
    if not P.packs(str(dtype).removeprefix("torch.")):
        pytest.skip(f"oneDNN does not pack {dtype} on this CPU (bf16 needs AVX512-BW/VL/DQ or AVX-NE-CONVERT)")
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(48, 80, bias=bias).to(dtype).requires_grad_(False)
    x = torch.randn(2, 37, 48, generator=gen).to(dtype).requires_grad_(True)
    g = torch.randn(2, 37, 80, generator=gen).to(dtype)
    ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
    (gx_ref,) = torch.autograd.grad(ref, x, g)
    with P.packed_linears(layer, dtype) as n:
        assert n == 1 and type(layer) is P.packed_class()
        out = layer(x)
        (gx,) = torch.autograd.grad(out, x, g)
    assert out.shape == ref.shape and out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(gx, gx_ref, rtol=tol, atol=tol)


def test_a_training_block_makes_the_input_gradient_packs_on_entry():
    """Packing a transposed weight copies it whole first: made at the first backward, that copy landed on
    top of the step's activations (+0.98 GiB for Llama-3.2-1B's fp32 head), so a training block makes them
    on entry, once per tied weight; a block that does not train makes none until a backward asks."""
    gen = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(48, 80, bias=False).requires_grad_(False)
    tied = torch.nn.Linear(48, 80, bias=False).requires_grad_(False)
    tied.weight = head.weight
    model = torch.nn.ModuleList([head, tied])
    x = torch.randn(5, 48, generator=gen, requires_grad=True)
    g = torch.randn(5, 80, generator=gen)
    (want,) = torch.autograd.grad(torch.nn.functional.linear(x, head.weight), x, g)
    with P.packed_linears(model, torch.float32, backward=True) as n:
        packs = getattr(head, P.PACK)
        assert n == 2 and packs is getattr(tied, P.PACK) and packs[1] is not None
        made = packs[1]
        (got,) = torch.autograd.grad(head(x), x, g)
        assert packs[1] is made  # the backward used it, made nothing new
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    with P.packed_linears(model, torch.float32) as n:
        assert getattr(head, P.PACK)[1] is None
        torch.autograd.grad(head(x), x, g)
        assert getattr(head, P.PACK)[1] is not None


@pytest.mark.parametrize("packed", [False, True], ids=["torch matmul", "pre-packed"])
def test_input_gradient_added_into_a_given_tensor(packed):
    # lora_groups sums sibling layers' input gradients into one buffer this way.
    gen = torch.Generator().manual_seed(2)
    layer = torch.nn.Linear(48, 80).requires_grad_(False)
    g, into = torch.randn(7, 80, generator=gen), torch.randn(7, 48, generator=gen)
    want = into + g @ layer.weight
    with P.packed_linears(layer, torch.float32) if packed else contextlib.nullcontext():
        assert (P.PACK in layer.__dict__) == packed
        got = P.input_grad(g, layer, into=into)
    assert got is into
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad_mode", ["inference", "no_grad", "input_without_grad", "autocast"])
def test_without_a_graph_to_record_the_product_skips_the_autograd_function(grad_mode, monkeypatch):
    # Decoding runs each packed layer once a token: the Function's own cost was a fifth of a one-row
    # step on the Zen 3. Without a graph to record, the value must still be F.linear's, in fp32 under
    # autocast too.
    gen = torch.Generator().manual_seed(1)
    layer = torch.nn.Linear(48, 80).requires_grad_(False)
    x = torch.randn(3, 5, 48, generator=gen)
    ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
    mode = {"inference": torch.inference_mode, "no_grad": torch.no_grad,
            "input_without_grad": contextlib.nullcontext,
            "autocast": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}[grad_mode]
    with P.packed_linears(layer, torch.float32):
        monkeypatch.setattr(P, "_function", lambda: pytest.fail("the autograd Function ran without a graph"))
        with mode():
            out = layer(x)
    assert out.grad_fn is None and out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_block_packs_only_frozen_plain_linears_of_the_dtype_and_always_unpacks():
    emb = torch.nn.Embedding(50, 16)
    head = torch.nn.Linear(16, 50, bias=False)
    head.weight = emb.weight  # tied, as in SmolLM2
    model = torch.nn.ModuleDict({"emb": emb, "a": torch.nn.Linear(16, 16), "trained": torch.nn.Linear(16, 16),
                                 "trained_bias": torch.nn.Linear(16, 16),
                                 "b16": torch.nn.Linear(16, 16).bfloat16(), "head": head})
    for name, p in model.named_parameters():
        # A trained bias alone (PEFT's bias="all") keeps its layer unpacked: the packed product gives it no gradient.
        p.requires_grad_(name.startswith("trained") and name != "trained_bias.weight")
    hooked = torch.nn.Linear(16, 16).requires_grad_(False)
    hooked.register_forward_hook(lambda *a: None)
    model["hooked"] = hooked
    assert P.pack_bytes(model, torch.float32, backward=False) == (16 * 16 + 50 * 16) * 4
    assert P.pack_bytes(model, torch.float32, backward=True) == 2 * (16 * 16 + 50 * 16) * 4
    with pytest.raises(RuntimeError, match="boom"), P.packed_linears(model, torch.float32) as n:
        assert n == 2
        assert {k for k, m in model.items() if hasattr(m, P.PACK)} == {"a", "head"}
        raise RuntimeError("boom")
    assert all(type(m) is not P.packed_class() and not hasattr(m, P.PACK) for m in model.modules())


def test_a_pack_made_for_a_weight_is_shared_by_its_tied_layers():
    w = torch.nn.Parameter(torch.randn(8, 4), requires_grad=False)
    a, b = torch.nn.Linear(4, 8, bias=False), torch.nn.Linear(4, 8, bias=False)
    a.weight = b.weight = w
    with P.packed_linears(torch.nn.ModuleList([a, b]), torch.float32):
        assert getattr(a, P.PACK) is getattr(b, P.PACK)


def test_backward_after_the_block_ended_still_gives_the_gradient():
    layer = torch.nn.Linear(8, 6).requires_grad_(False)
    x = torch.randn(5, 8, requires_grad=True)
    with P.packed_linears(layer, torch.float32):
        out = layer(x)
    (gx,) = torch.autograd.grad(out.sum(), x)
    torch.testing.assert_close(gx, layer.weight.sum(0).expand(5, 8))


class _Cal:
    def __init__(self, plain, packed):
        self.matmul_flops, self.packed_flops = {"float32": plain}, {"float32": packed}


def test_for_device_follows_the_calibration_and_the_memory(monkeypatch):
    from toolkit.core import hardware

    layer = torch.nn.Linear(64, 64).requires_grad_(False)
    monkeypatch.setattr(hardware, "packed_choice", lambda dev, dtype, use: (False, "matmuls: torch's (slower)"))
    block, why = P.for_device(layer, "cpu", "float32", use="train")
    assert isinstance(block, contextlib.nullcontext) and why == "matmuls: torch's (slower)"

    monkeypatch.setattr(hardware, "packed_choice", lambda dev, dtype, use: (use == "train", "matmuls: oneDNN"))
    block, why = P.for_device(layer, "cpu", "float32", use="train")
    with block as n:
        assert n == 1 and why == "matmuls: oneDNN; 1 layer"
    # Inference asks for its own use's measurement (here: no gain there).
    block, _ = P.for_device(layer, "cpu", "float32", use="infer")
    assert isinstance(block, contextlib.nullcontext)
    # Packs needing more than half the available RAM: not made, and the reason says so.
    need = P.pack_bytes(layer, torch.float32, backward=True)
    monkeypatch.setattr(hardware, "cpu_memory",
                        lambda: hardware.Hardware("cpu", "test", 4 * need, need, "test"))
    block, why = P.for_device(layer, "cpu", "float32", use="train")
    assert isinstance(block, contextlib.nullcontext) and "GiB available" in why


def test_for_device_says_which_frozen_linears_stay_unpacked(monkeypatch):
    from toolkit.core import hardware

    class Linear4bit(torch.nn.Linear):  # stands for bitsandbytes' (a subclass of nn.Linear)
        pass

    model = torch.nn.Sequential(Linear4bit(8, 8), Linear4bit(8, 8), torch.nn.Linear(8, 8)).requires_grad_(False)
    monkeypatch.setattr(hardware, "packed_choice", lambda dev, dtype, use: (True, "matmuls: oneDNN"))
    block, why = P.for_device(model, "cpu", "float32", use="train")
    with block as n:
        assert n == 1 and why == "matmuls: oneDNN; 1 layer, not the 2 Linear4bit layers"
    block, why = P.for_device(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)).requires_grad_(False),
                              "cpu", "float32", use="train")
    assert why == "matmuls: oneDNN; 2 layers"
    block, why = P.for_device(torch.nn.Sequential(Linear4bit(8, 8)).requires_grad_(False), "cpu", "float32",
                              use="train")
    assert isinstance(block, contextlib.nullcontext)
    assert why == "matmuls: torch's (no frozen nn.Linear to pre-pack; the 1 Linear4bit layers are dequantized for each product)"


def test_skipped_layers_are_neither_packed_nor_counted(monkeypatch):
    from toolkit.core import hardware

    body, head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 50)
    model = torch.nn.Sequential(body, head).requires_grad_(False)
    assert P.frozen_linears(model, torch.float32, skip=(head,)) == [body]
    assert P.pack_bytes(model, torch.float32, backward=False, skip=(head,)) == 8 * 8 * 4
    with P.packed_linears(model, torch.float32, skip=(head,)) as n:
        assert n == 1 and P.packs_of(body.weight) is not None and P.packs_of(head.weight) is None
    monkeypatch.setattr(hardware, "packed_choice", lambda dev, dtype, use: (True, "matmuls: oneDNN"))
    assert P.for_device(model, "cpu", "float32", use="train", skip=(head,))[1] == "matmuls: oneDNN; 1 layer"
    # Nothing left to pack: torch's matmul, and the reason says why.
    block, why = P.for_device(model, "cpu", "float32", use="train", skip=(body, head))
    assert isinstance(block, contextlib.nullcontext) and why == "matmuls: torch's (no frozen nn.Linear to pre-pack)"


def test_packs_are_found_by_weight_only_inside_the_block():
    a, b = torch.nn.Linear(8, 6), torch.nn.Linear(8, 6)
    b.weight = a.weight  # tied: one pack
    model = torch.nn.Sequential(a, b).requires_grad_(False)
    assert P.packs_of(a.weight) is None
    with P.packed_linears(model, torch.float32):
        packs = P.packs_of(a.weight)
        assert packs is getattr(a, P.PACK) is getattr(b, P.PACK)
        pk = P.input_grad_pack(packs, a.weight, 4)
        assert P.input_grad_pack(packs, a.weight, 4) is pk  # made once
        g = torch.randn(4, 6)
        torch.testing.assert_close(P.matmul(g, pk), g @ a.weight)
    assert P.packs_of(a.weight) is None


def test_a_block_left_open_at_interpreter_exit_prints_nothing():
    # A decoding backend holds its block open until close(); a program that never closes it must not
    # end with a traceback from the block's cleanup while torch is being torn down.
    import subprocess
    import sys

    code = ("import torch\nfrom toolkit.core import packed_linear as P\n"
            "m = torch.nn.Linear(8, 8).requires_grad_(False)\n"
            "block = P.packed_linears(m, torch.float32)\nblock.__enter__()\nprint(type(m).__name__)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "PackedLinear"
    assert "Traceback" not in proc.stderr and "Exception ignored" not in proc.stderr, proc.stderr
