"""The timed probes a calibration runs (`toolkit.core.calibration` caches what they measure): a
frozen layer's matmul rate per dtype, plain and pre-packed for oneDNN, what packing gains in the matmuls
a training step and a decode step run, how fast a CPU reads weights as decoding does (a GPU: a copy),
and each packed-row attention kernel. Each takes torch as an argument: importing this module costs
nothing. A change to what a probe measures is a new `calibration.FORMAT`, so caches measure again.
"""

from __future__ import annotations

import time

# (M, K, N) of one LoRA-era linear layer at a training step: a 2048-token batch through a
# 576 -> 1536 MLP projection (SmolLM2-135M). A GPU needs a bigger one to leave launch overhead behind.
CPU_SHAPE = (2048, 576, 1536)
CUDA_SHAPE = (8192, 2048, 8192)
# A dtype the CPU only emulates (bf16 without avx512_bf16: ~7 GFLOP/s for a layer's two products)
# would take seconds at the full shape: when its small probe projects one full pair of products past
# this, the probe's rate is the measurement. (A probe's rate understates a fast dtype several-fold, and
# a native fp32 pair takes ~30 ms here, so the bar is generous.)
FULL_SHAPE_LIMIT_S = 0.25
# The packed row the attention kernels are timed on: 8 conversations of 128 tokens, 9 query / 3 KV
# heads of 64 (a SmolLM2-135M layer), forward and backward. Equal lengths: the batched-matmul
# kernel's gain with no padding, which `attention_kernels.packed_attention` scales by each row's padding
# (a row of 60-130 tokens had hidden a 1.3-1.4x fp32 gain on the finance recipe's rows).
ATTENTION_SIZES = (128,) * 8
ATTENTION_HEADS = (9, 3, 64)
# What packing is decided on (`capability.packed_matmuls`): torch's matmuls against the packed ones in
# the forms a use runs, over PACKED_GAIN_WEIGHTS distinct weights of CPU_SHAPE's layer (a step reads
# each weight once, not one weight in a loop). "train": a frozen layer's forward `x @ W.T` and input
# gradient `g @ W` at a step's ~1000 rows; "infer": the forward of a 32-row decode step. The hot
# 2048-row product of `packed_flops` had hidden both: on the Zen 5 it read bf16 packing 1.00x, where
# the recipe trained 8% faster packed and its report ran 18% faster (docs/cpu-training.md).
PACKED_GAIN_ROWS = {"train": 1024, "infer": 32}
PACKED_GAIN_WEIGHTS = 4
# A CPU's memory rate is what a decoding step runs at: its weights read once by one-row products
# (`read_rate`), over more bytes than a last-level cache holds. A copy is not that: on the Zen 5 a
# 128 MiB fp32 copy read 38-90 GB/s from one calibration to the next, while the toolkit's greedy
# decode held at 41-49 tok/s; at 78-88 GB/s copied, the embedded model's 538 MB of linear and
# LM-head weights took 15.9 ms pre-packed (34 GB/s) and 29.3 ms through torch's (18 GB/s).
READ_BYTES = 256 * 2**20
# A one-row decoding step's host work is timed on a decoder layer this small (hidden, query heads, KV
# heads, head dim): its products and reads take next to nothing, so what is left is what every layer of a
# real model pays beside its weights' read (`host_layer_seconds`).
HOST_LAYER = (64, 4, 2, 16)


def native(flops: dict[str, float]) -> list[str]:
    """The dtypes whose measured matmul rate is not an emulation's (one full CPU_SHAPE product within
    FULL_SHAPE_LIMIT_S: >= 14.5 GFLOP/s, twice an emulated bf16's pair): the only ones worth timing
    further."""
    m, k, n = CPU_SHAPE
    return [dt for dt, rate in flops.items() if 2 * m * k * n / rate <= FULL_SHAPE_LIMIT_S]


# Rounds of `packed_gains` and `attention_times`: best of 2 and of 3. The whole calibration must stay
# within ~3 s on a 2-core CPU at a shared host's slow moment: on the Zen 4 (2026-12-07 18:3x UTC) it read
# 3.19-3.52 s with 3 and 5 (packed_gains 1.15-1.19 s, attention 0.46-0.48). Packing is decided by the median
# of a machine's last five readings (`packed_gain_seen`) and the attention kernel at a 1.2x margin, so
# neither rests on one round.
PACKED_GAIN_REPS = 2
ATTENTION_REPS = 3


def attention_times(torch, flops: dict[str, float], reps: int = ATTENTION_REPS) -> dict[str, float]:
    """Seconds of each packed-row attention kernel on the ATTENTION_SIZES row, forward and backward,
    best of `reps` (the kernels alternating) after one untimed call, per dtype whose matmul is not an
    emulation's."""
    from toolkit.core import segment_attention

    heads, kv, d = ATTENTION_HEADS
    rows = sum(ATTENTION_SIZES)
    gen = torch.Generator().manual_seed(0)
    seed = backward_seed(torch)
    out = {}
    for dt in native(flops):
        dtype = getattr(torch, dt)
        q, key_, value = (torch.randn(1, h, rows, d, generator=gen).to(dtype).requires_grad_()
                          for h in (heads, kv, kv))
        grad = torch.randn(1, rows, heads, d, generator=gen).to(dtype)
        steps = {kernel: (lambda kernel=kernel: seed(segment_attention.attend(q, key_, value, ATTENTION_SIZES,
                                                                              kernel), grad))
                 for kernel in segment_attention.CPU_KERNELS if not (kernel == "sdpa_fp32" and dt == "float32")}
        for step in steps.values():
            step()
        # The kernels alternate, as `packed_gains`' two ways do: the choice reads their ratio, and a
        # shared host's slow moment (its rates moved 18-34% between calibrations) then slows each.
        best = dict.fromkeys(steps, float("inf"))
        for _ in range(reps):
            for kernel, step in steps.items():
                best[kernel] = min(best[kernel], timed(torch, "cpu", step))
        out.update({f"{dt} {kernel}": t for kernel, t in best.items()})
    return out


def backward_seed(torch):
    """A function `seed(out, grad)` that runs `out.backward(grad)` without that call's first-use ~0.4 s:
    torch checks an explicit gradient's shape through `torch.fx.experimental.symbolic_shapes`, whose
    import (sympy) the calibration had paid inside its seconds. The gradient enters through a scalar's
    backward instead; the graph's work is the same."""

    class Seed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, out, grad):
            ctx.grad = grad
            return out.new_zeros(())

        @staticmethod
        def backward(ctx, _):
            return ctx.grad, None

    return lambda out, grad: Seed.apply(out, grad).backward()


def packable(flops: dict[str, float]) -> list[str]:
    """The `native` dtypes oneDNN packs on this CPU (`packed_linear.packs`): the ones the packing
    probes time."""
    from toolkit.core import packed_linear

    return [dt for dt in native(flops) if packed_linear.packs(dt)]


def packed_rates(torch, flops: dict[str, float]) -> dict[str, float]:
    """The CPU shape's rate with the weight pre-packed for oneDNN, per `packable` dtype (packing does
    not make an emulated dtype a compute dtype)."""
    from toolkit.core import packed_linear

    if not packed_linear.available():
        return {}
    m, k, n = CPU_SHAPE
    gen = torch.Generator().manual_seed(0)
    out = {}
    for dt in packable(flops):
        dtype = getattr(torch, dt)
        a = torch.randn(m, k, generator=gen).to(dtype)
        w = packed_linear.pack(torch.randn(n, k, generator=gen).to(dtype), m)
        packed_linear.matmul(a, w)  # kernel selection, not timed
        out[dt] = max(2 * m * k * n / timed(torch, "cpu", lambda: packed_linear.matmul(a, w)) for _ in range(10))
    return out


def packed_gains(torch, flops: dict[str, float], reps: int = PACKED_GAIN_REPS) -> dict[str, float]:
    """"dtype use" -> torch's time over the pre-packed time for each PACKED_GAIN_ROWS use, per
    `packable` dtype. The two alternate (a shared host's slow moment then slows both); best of `reps`
    each."""
    from toolkit.core import packed_linear

    if not packed_linear.available():
        return {}
    _, k, n = CPU_SHAPE
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.functional.linear
    out = {}
    for dt in packable(flops):
        dtype = getattr(torch, dt)
        weights = [torch.randn(n, k, generator=gen).to(dtype) for _ in range(PACKED_GAIN_WEIGHTS)]
        for use, rows in PACKED_GAIN_ROWS.items():
            train = use == "train"
            x = torch.randn(rows, k, generator=gen).to(dtype)
            g = torch.randn(rows, n, generator=gen).to(dtype) if train else None
            packs = [(packed_linear.pack(w, rows), packed_linear.pack(w.t(), rows) if train else None)
                     for w in weights]

            def plain():
                for w in weights:
                    linear(x, w)
                    if train:
                        g @ w

            def packed():
                for p, pt in packs:
                    packed_linear.matmul(x, p)
                    if train:
                        packed_linear.matmul(g, pt)

            plain()  # kernel selection, not timed
            packed()
            t_plain = t_packed = float("inf")
            for _ in range(reps):
                t_plain = min(t_plain, timed(torch, "cpu", plain))
                t_packed = min(t_packed, timed(torch, "cpu", packed))
            out[f"{dt} {use}"] = t_plain / t_packed
    return out


def timed(torch, dev: str, fn) -> float:
    if dev == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if dev == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def matmul_rate(torch, dev: str, dtype, shape: tuple[int, int, int], reps: int = 10) -> float:
    """FLOP/s of a frozen layer's two products at a training step, `x @ W.T` (forward) and `g @ W`
    (input gradient), W stored (N, K) as a model keeps it, timed together. Where a dtype is native,
    any form runs at one rate; where it is emulated they do not: on an AVX2 CPU's bf16 (the Zen 5 with
    its libraries capped, 2026-12-05) ATen's dot-product kernel ran `x @ W.T` at ~50 GFLOP/s and
    `g @ W` and `a @ b` at ~3-4, so timing `a @ b` alone had put bf16 training ~90x behind fp32
    where its two products are ~30x behind."""
    m, k, n = shape
    gen = torch.Generator(device=dev).manual_seed(0)
    w = torch.randn(n, k, device=dev, generator=gen).to(dtype)

    def pair(x, g, out_f=None, out_g=None):
        torch.mm(x, w.t(), out=out_f) if out_f is not None else x @ w.t()
        torch.mm(g, w, out=out_g) if out_g is not None else g @ w

    def inputs(rows):
        return (torch.randn(rows, k, device=dev, generator=gen).to(dtype),
                torch.randn(rows, n, device=dev, generator=gen).to(dtype))

    # Probe at 1/16 of the rows first: an emulated dtype is measured there, within budget.
    pm = max(16, m // 16)
    px, pg = inputs(pm)
    wx, wg = inputs(16)
    timed(torch, dev, lambda: pair(wx, wg))  # one-off library init and kernel selection, not timed
    first = timed(torch, dev, lambda: pair(px, pg))
    probe = first if first > 0.05 else min(first, *(timed(torch, dev, lambda: pair(px, pg)) for _ in range(2)))
    pair_flops = 2 * 2 * m * k * n
    probe_rate = 2 * 2 * pm * k * n / probe
    if pair_flops / probe_rate > FULL_SHAPE_LIMIT_S:
        return probe_rate
    x, g = inputs(m)
    out_f, out_g = x @ w.t(), g @ w
    # A slow machine (or busy cores) times fewer: ~0.6 s a dtype at most, the whole within ~3 s.
    reps = max(1, min(reps, int(0.6 / max(timed(torch, dev, lambda: pair(x, g, out_f, out_g)), 1e-9))))
    inner = 10 if dev == "cuda" else 1  # a GPU matmul is shorter than the timer's resolution

    # Best of 10 (a CPU pair of this shape is ~15 ms, so one busy moment on a shared host can slow
    # three in a row), into output buffers: the rate of the arithmetic, not of page faults.
    def run():
        for _ in range(inner):
            pair(x, g, out_f, out_g)

    return max(pair_flops * inner / timed(torch, dev, run) for _ in range(reps))


def bandwidth(torch, dev: str, reps: int = 3) -> float:
    """Bytes a second. A GPU: a 1 GiB copy (bytes read + written). A CPU: `read_rate`."""
    if dev != "cuda":
        return read_rate(torch, reps)
    n = 256 * 2**20  # larger than a GPU's last-level cache, pages touched before timing
    src = torch.ones(n, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    nbytes = 2 * src.numel() * src.element_size()
    return max(nbytes / timed(torch, dev, lambda: dst.copy_(src)) for _ in range(reps))


def read_rate(torch, reps: int = 3) -> float:
    """Bytes a second a CPU decoding step reads its weights at: one-row products over READ_BYTES of
    fp32 weights of CPU_SHAPE's layer, each read once, the faster of torch's and the pre-packed
    product (a CPU model decodes through whichever `capability.packed_matmuls` measured faster).
    Best of `reps`."""
    from toolkit.core import packed_linear

    _, k, n = CPU_SHAPE
    count = max(1, READ_BYTES // (4 * k * n))
    weights = [torch.full((n, k), 0.01) for _ in range(count)]
    x = torch.full((1, k), 0.5)
    linear = torch.nn.functional.linear

    def plain():
        for w in weights:
            linear(x, w)

    plain()  # kernel selection, not timed
    best = min(timed(torch, "cpu", plain) for _ in range(reps))
    if packed_linear.available():
        for i, w in enumerate(weights):  # one weight at a time: READ_BYTES, not twice that, at the peak
            weights[i] = packed_linear.pack(w, 1)

        def packed():
            for w in weights:
                packed_linear.matmul(x, w)

        packed()
        best = min(best, *(timed(torch, "cpu", packed) for _ in range(reps)))
    return count * 4 * k * n / best


def host_layer_seconds(torch, layers: int = 8, steps: int = 6, reps: int = 2, context: int = 48) -> float:
    """Seconds of host work (Python, dispatch, the libraries' per-call cost) a decoder layer pays in
    a one-row decoding step: a Llama layer's operators in the order a transformers decoder layer runs
    them (norm, q/k/v, rotary, KV append, attention, o, norm, gate/up, SiLU, down, residuals), on
    shapes of HOST_LAYER so small that the products and reads cost next to nothing. Linear layers run
    as the transformers backend runs them where it can: pre-packed for oneDNN (`packed_linear`).
    The best of `reps` medians of `steps` steps (a shared host's busy moment only slows one), over
    `layers`, after two untimed steps, from a `context`-token cache."""
    import statistics

    from toolkit.core import packed_linear

    hidden, heads, kv_heads, d = HOST_LAYER
    gen = torch.Generator().manual_seed(0)
    packs = packed_linear.available()

    def linear(n, k):
        w = torch.randn(n, k, generator=gen) * 0.05
        if packs:
            p = packed_linear.pack(w, 1)
            return lambda x: packed_linear.matmul(x, p)
        return lambda x: torch.nn.functional.linear(x, w)

    def norm(x, weight):
        var = x.pow(2).mean(-1, keepdim=True)
        return weight * (x * torch.rsqrt(var + 1e-5))

    def rotate(x, cos, sin):
        half = x.shape[-1] // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin

    ffn = 2 * hidden
    blocks = [dict(q=linear(heads * d, hidden), k=linear(kv_heads * d, hidden), v=linear(kv_heads * d, hidden),
                   o=linear(hidden, heads * d), gate=linear(ffn, hidden), up=linear(ffn, hidden),
                   down=linear(hidden, ffn), n1=torch.ones(hidden), n2=torch.ones(hidden),
                   keys=torch.randn(1, kv_heads, context, d, generator=gen),
                   values=torch.randn(1, kv_heads, context, d, generator=gen)) for _ in range(layers)]
    cos, sin = torch.ones(1, 1, 1, d), torch.zeros(1, 1, 1, d)

    def step(x):
        for b in blocks:
            h = norm(x, b["n1"])
            q = b["q"](h).view(1, 1, heads, d).transpose(1, 2)
            k = b["k"](h).view(1, 1, kv_heads, d).transpose(1, 2)
            v = b["v"](h).view(1, 1, kv_heads, d).transpose(1, 2)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            b["keys"] = torch.cat((b["keys"], k), dim=-2)
            b["values"] = torch.cat((b["values"], v), dim=-2)
            a = torch.nn.functional.scaled_dot_product_attention(q, b["keys"], b["values"], enable_gqa=True)
            x = x + b["o"](a.transpose(1, 2).reshape(1, 1, heads * d))
            h = norm(x, b["n2"])
            x = x + b["down"](torch.nn.functional.silu(b["gate"](h)) * b["up"](h))
        return x

    x = torch.randn(1, 1, hidden, generator=gen)
    with torch.inference_mode():
        step(x), step(x)
        best = min(statistics.median(timed(torch, "cpu", lambda: step(x)) for _ in range(steps)) for _ in range(reps))
    return best / layers
