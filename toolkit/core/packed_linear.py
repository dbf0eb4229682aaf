"""Frozen linear layers run through oneDNN with their weights pre-packed, on a CPU.

PyTorch's CPU `F.linear` in fp32 goes to the BLAS (MKL), which re-packs the weight matrix at every
call. A frozen weight (the base model under LoRA, the base and merged models under evaluation) can be
packed once into oneDNN's blocked layout, as inductor's freezing pass does. Measured on the 2-core
AMD EPYC (Zen 4, AVX512-BF16), torch 2.13, fp32: 176-201 against 114-167 GFLOP/s at the finance
recipe's training shapes (~1000 x 576 by 576 x 1536 and their input-gradient layout), and 137 against
54 GFLOP/s for the LM head of a 32-row decode step; bf16 gains ~10%. Whether a machine gains is
measured by its calibration in a training step's and a decode step's own matmuls
(`toolkit.core.calibration`: `packed_gain`) and decided by `toolkit.core.capability.packed_matmuls`.

The two oneDNN operators used are private to PyTorch (`torch.ops.mkldnn._reorder_linear_weight`,
`torch.ops.mkldnn._linear_pointwise`); they are called here only, `available()` says whether this
torch has them, and `tests/core/test_packed_linear.py` fails when upstream renames them.

A layer is packed only inside `packed_linears(model)`: its class becomes `PackedLinear` (a subclass
of `nn.Linear`: the same parameters and state dict) and back to `nn.Linear` on exit, so nothing
outside the block (saving, merging an adapter into the weights) sees a packed layer. A pack is a copy
of the weight, and a training block (`backward`) makes a second one, transposed, for the input gradient
on entry: oneDNN's reorder copies a transposed weight whole before packing it (strided or not), and made
at the first backward that transient copy came on top of the step's activations (Llama-3.2-1B's fp32
head: +0.98 GiB, a QLoRA run's peak 8.39 GiB against 7.95 planned on the Zen 3). The block must not
change weights, and the caller checks the memory (`pack_bytes`).
"""

from __future__ import annotations

import contextlib
import functools

# Set on each packed layer: [weight packed for x @ W.T, for g @ W (made on a training block's entry, or at
# the first backward)].
PACK = "_toolkit_pack"
DTYPES = ("float32", "bfloat16")
# id(weight) -> its packs while an open `packed_linears` block has it packed: for callers handed a
# weight rather than a layer (TRL gives the CPU LM head `lm_head.weight`).
_BY_WEIGHT: dict = {}


def available() -> bool:
    """Whether this torch has the oneDNN operators used here (CPU builds with mkldnn)."""
    try:
        import torch
    except ImportError:
        return False
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available() and hasattr(ops, "_reorder_linear_weight")
            and hasattr(ops, "_linear_pointwise"))


@functools.cache
def packs(dtype: str) -> bool:
    """Whether oneDNN packs `dtype` ("float32", "bfloat16") weights on this CPU. Its bf16 packing needs
    AVX512-BW/VL/DQ or AVX-NE-CONVERT and raises on an AVX2-only CPU (Zen 3, Alder Lake ...), where a
    many-core machine may still run emulated bf16 fast enough for the calibration to time it."""
    if not available():
        return False
    import torch

    try:
        pack(torch.zeros(16, 16, dtype=getattr(torch, dtype)), 16)
    except RuntimeError:
        return False
    return True


def pack(weight, rows_hint: int = 1024):
    """`weight` (out x in) in oneDNN's layout for `x @ weight.T`; `rows_hint` is the expected row
    count of x (it steers the blocking; measured within ~10% between 32 and 1000 rows)."""
    import torch

    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), rows_hint)


def matmul(x2, packed, bias=None):
    """`x2 @ W.T + bias` for a 2-D contiguous `x2` and `packed = pack(W)`."""
    import torch

    return torch.ops.mkldnn._linear_pointwise(x2, packed, bias, "none", [], "")


def packs_of(weight):
    """`weight`'s packs (see PACK) while a `packed_linears` block has it packed, else None."""
    return _BY_WEIGHT.get(id(weight))


def input_grad_pack(packs, weight, rows: int):
    """The pack for `g @ weight` (made on first use and kept with the others)."""
    if packs[1] is None:
        packs[1] = pack(weight.t(), rows)
    return packs[1]


def product(x2, layer):
    """`x2 @ W.T + b` for a 2-D contiguous `x2`, outside autograd: through `layer`'s packs where it
    is packed and `x2` has its dtype, else torch's matmul (the weight cast to `x2`'s dtype)."""
    import torch

    packs = getattr(layer, PACK, None)
    if packs is not None and layer.weight.dtype == x2.dtype:
        return matmul(x2, packs[0], layer.bias)
    bias = None if layer.bias is None else layer.bias.to(x2.dtype)
    return torch.nn.functional.linear(x2, layer.weight.to(x2.dtype), bias)


def input_grad(g, layer, into=None):
    """`g @ W`, the input's gradient through `layer` for an output gradient `g` (2-D), outside
    autograd: through the input-gradient pack where `layer` is packed (made on first use), else
    torch's matmul. A block that ended between forward and backward has taken the packs away.
    With `into`, added into that tensor (by the BLAS call itself where unpacked) and returned."""
    packs = getattr(layer, PACK, None)
    if packs is not None and layer.weight.dtype == g.dtype:
        grad = matmul(g.contiguous(), input_grad_pack(packs, layer.weight, g.shape[0]))
        return grad if into is None else into.add_(grad)
    if into is not None:
        return into.addmm_(g, layer.weight.to(g.dtype))
    return g @ layer.weight.to(g.dtype)


@functools.cache
def _function():
    import torch

    class PackedMatmul(torch.autograd.Function):
        """y = x @ W.T + b for a frozen W: the backward gives x's gradient only (g @ W, packed too)."""

        @staticmethod
        def forward(ctx, x2, layer):
            ctx.layer = layer
            with torch.autocast("cpu", enabled=False):
                return product(x2, layer)

        @staticmethod
        def backward(ctx, g):
            with torch.autocast("cpu", enabled=False):
                return input_grad(g, ctx.layer), None

    return PackedMatmul


def linear(x, layer):
    """`layer`'s output for `x`: through its packs when `layer` is packed and x has its dtype, else
    `F.linear`. The fused LoRA layers call this for their base layer."""
    import torch

    packs = getattr(layer, PACK, None)
    if packs is None or x.dtype != layer.weight.dtype:
        return torch.nn.functional.linear(x, layer.weight, layer.bias)
    x2 = x.contiguous() if x.dim() == 2 else x.reshape(-1, x.shape[-1]).contiguous()
    if torch.is_grad_enabled() and x.requires_grad:
        out = _function().apply(x2, layer)
    else:
        # No graph to record: the autograd Function's own cost (~50 us a call on the Zen 3, 11 ms of a
        # 55-ms one-row decode step of the embedded model) buys nothing. (Autocast leaves oneDNN's
        # packed product in the weight's dtype, as the Function does.)
        out = matmul(x2, packs[0], layer.bias)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], out.shape[-1])


@functools.cache
def packed_class():
    import torch

    class PackedLinear(torch.nn.Linear):
        """An `nn.Linear` whose frozen weight runs pre-packed (see the module)."""

        def forward(self, x):
            return linear(x, self)

    return PackedLinear


def frozen_linears(model, dtype, skip=()) -> list:
    """The layers `packed_linears` would pack: plain `nn.Linear`s (no hooks) on the CPU whose weight
    (and bias) is frozen and of `dtype` (a torch dtype), other than those in `skip`."""
    import torch

    skipped = {id(m) for m in skip}
    return [m for m in model.modules()
            if type(m) is torch.nn.Linear and not m.weight.requires_grad and m.weight.device.type == "cpu"
            and (m.bias is None or not m.bias.requires_grad)  # PackedMatmul gives no bias gradient
            and m.weight.dtype == dtype and not m._forward_hooks and not m._forward_pre_hooks
            and id(m) not in skipped]


def pack_bytes(model, dtype, backward: bool, skip=()) -> int:
    """Memory the packs of `model`'s frozen linears of `dtype` (but `skip`) take: a copy of each
    weight, two when the block trains (tied weights counted once)."""
    seen = {id(m.weight): m.weight.numel() * m.weight.element_size() for m in frozen_linears(model, dtype, skip)}
    return sum(seen.values()) * (2 if backward else 1)


@contextlib.contextmanager
def packed_linears(model, dtype, rows_hint: int = 1024, skip=(), backward: bool = False):
    """Within the block, `model`'s frozen CPU `nn.Linear`s of `dtype` (but `skip`) run with pre-packed
    weights; on exit they are plain `nn.Linear`s again (also after an error) and the packs are freed.
    `backward`: the block trains, so the input-gradient packs are made on entry too. Yields how many
    layers it packed (0 where this torch lacks the operators)."""
    if not available():
        yield 0
        return
    import sys

    import torch

    layers = frozen_linears(model, dtype, skip)
    cls, plain = packed_class(), torch.nn.Linear
    by_weight: dict = {}
    try:
        for m in layers:
            # Tied weights (an LM head that is the embedding) share one pack.
            setattr(m, PACK, by_weight.setdefault(id(m.weight), [pack(m.weight, rows_hint), None]))
            m.__class__ = cls
            if backward:
                input_grad_pack(getattr(m, PACK), m.weight, rows_hint)
        _BY_WEIGHT.update(by_weight)
        yield len(layers)
    finally:
        # A block still open at interpreter exit (a backend never closed) has nothing to give back, and
        # torch is half gone by then: restoring the classes printed a traceback.
        if not sys.is_finalizing():
            for key, packs in by_weight.items():
                if _BY_WEIGHT.get(key) is packs:
                    del _BY_WEIGHT[key]
            for m in layers:
                if type(m) is cls:
                    m.__class__ = plain
                if hasattr(m, PACK):
                    delattr(m, PACK)


# Packs beyond this share of the RAM available would crowd out the run's own memory.
MAX_SHARE_OF_AVAILABLE = 0.5


def for_device(model, dev: str, dtype: str, use: str, skip=()):
    """(context manager, reason): `packed_linears(model, dtype, skip=skip)` where this machine's
    calibration says packing pays for `dtype` in `use` ("train", "infer": decoding, "score": the
    report's many-row forwards; toolkit.core.hardware.packed_choice), there is a layer to pack, and
    the packs fit in half the RAM available; else a block that changes nothing. `skip`: layers whose callers would not use a pack.
    The reason goes to run.json and the log."""
    from toolkit.core import hardware

    wanted, why = hardware.packed_choice(dev, dtype, use)
    if not wanted:
        return contextlib.nullcontext(0), why
    tdtype = hardware.torch_dtype(dtype)
    n, unpackable = len(frozen_linears(model, tdtype, skip)), _unpackable(model)
    if not n:
        return contextlib.nullcontext(0), ("matmuls: torch's (no frozen nn.Linear to pre-pack"
                                           + (f"; the {unpackable} layers are dequantized for each product" if unpackable else "")
                                           + ")")
    need = pack_bytes(model, tdtype, backward=use == "train", skip=skip)
    free = hardware.cpu_memory().available_bytes
    if need > MAX_SHARE_OF_AVAILABLE * free:
        return contextlib.nullcontext(0), (f"matmuls: torch's (pre-packed weights would take {need / 2**30:.1f} "
                                           f"of {free / 2**30:.1f} GiB available)")
    # The count, and the frozen linears of another kind left unpacked: a QLoRA run's log must not
    # read as if its 4-bit base ran pre-packed.
    block = packed_linears(model, tdtype, skip=skip, backward=use == "train")
    return block, (why + f"; {n} layer{'s' if n != 1 else ''}"
                   + (f", not the {unpackable} layers" if unpackable else ""))


def _unpackable(model) -> str:
    """"N Name" for each kind of frozen linear layer that is not a plain `nn.Linear` (bitsandbytes'
    Linear4bit under QLoRA), "" when there is none."""
    import torch

    kinds: dict[str, int] = {}
    for m in model.modules():
        if (isinstance(m, torch.nn.Linear) and type(m) is not torch.nn.Linear
                and not getattr(m.weight, "requires_grad", True)):
            kinds[type(m).__name__] = kinds.get(type(m).__name__, 0) + 1
    return ", ".join(f"{k} {name}" for name, k in sorted(kinds.items()))
