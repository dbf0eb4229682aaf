"""Pure time formulas: FLOPs per token from the architecture, tokens/s from a device's throughput.

Every function takes plain numbers (or a `ModelFacts` for the shapes) and the device's rates as
arguments; nothing here measures, imports torch or reads the calibration. Sources:
- Linear layers: 2 FLOPs per weight per token forward (one multiply-add), Kaplan et al. 2020
  (arXiv:2001.08361, table 1) and Chinchilla's appendix F (Hoffmann et al. 2022).
- Attention scores and the weighted sum of values: 2 x 2 x q_dim FLOPs per token per attended
  position; a causal mask attends to (seq_len + 1) / 2 positions on average. Korthikanti et al.
  2022 (arXiv:2205.05198) count the same two matmuls.
- Backward: the gradient of a matmul's input costs one forward, that of its weight another
  (Kaplan et al.: 2x forward). A frozen weight needs only the input gradient (LoRA, Hu et al. 2021;
  QLoRA, Dettmers et al. 2023), the attention matmuls have no weights, so both operand gradients.
- Gradient checkpointing recomputes each decoder layer's forward once (Chen et al. 2016).
- Decode is memory-bound: every new token reads all weights once plus the KV cache
  (Pope et al. 2022, "Efficiently Scaling Transformer Inference", section 2), unless the host is
  slower: a small model on a fast GPU waits on Python and kernel launches (measured, below).
"""

from __future__ import annotations

from dataclasses import dataclass

# A training step's time, per trained token: its FLOPs at the device's measured matmul rate x
# TRAIN_EFFICIENCY (the products no frozen weight is in, attention's and the adapters', at torch's own
# matmul rate where the frozen weights are pre-packed for oneDNN), plus on a CPU the work that does not
# speed up with the matmuls: the elementwise work (norms, rotary, SiLU, casts, the LM head's softmax) as
# CPU_ELEMENTWISE_PASSES x layers x (hidden + intermediate) elements of 4 bytes at
# CPU_ELEMENTWISE_BYTES_PER_S, and a fixed cost per micro-batch whatever its tokens (Python, operator
# dispatch, autograd, the optimizer), CPU_STEP_OVER_PROBE x the calibrated host probe x layers
# (CPU_STEP_SECONDS_PER_LAYER x layers where no probe was measured).
# - CPU: the efficiency is the share of the calibrated rate the frozen layers' GEMMs reach inside a
#   step, measured by `python -m benchmarks.run step` on the finance recipe's CPU profile (the Zen 5
#   EPYC, family 26, 2026-12-05 01:33 UTC: bf16 86.5%, fp32 forced 86.6%; capped at AVX2, 87.6% at
#   07:49). The passes are fitted to three 40-step runs of the recipe (`make finetune RECIPE=finance`
#   less the report: 2 x 512 tokens a step, LoRA r16 on all linears, padding-free packing, the LM head
#   on labelled positions only: 0.5586 GFLOP per trained token, 14.8% of it attention's and the
#   adapters'), each after its own calibration, best of two (2026-12-05 11:42-11:50 UTC): bf16 921.5
#   tok/s at 1004.9 GFLOP/s packed and 965.8 unpacked; fp32 on AVX-512 (the record forced to AVX2)
#   524.8 at 530.1 / 225.0; fp32 with the libraries capped at AVX2 352.9 at 272.5 / 227.1. Besides the
#   matmuls they leave 0.439 / 0.445 / 0.397 ms a token: the same in bf16 as in fp32, so the passes are
#   priced at 4 bytes an element whatever the dtype; less the fixed cost, 51 passes at 40 GB/s fit the
#   three within 1.4%. The fixed cost is the fit before's 3.85 ms a layer (0.116 s a micro-batch; the
#   third session of 2026-12-04 measured 0.12-0.14 s a step whatever its tokens, cutting the rows
#   short). The fit before (08:30 UTC's two end-to-end runs: 102 passes of the compute dtype's bytes,
#   every product at the packed rate) priced fp32's MKL products (the LoRA and attention matmuls, at
#   AVX2 speed on this AMD CPU, docs/cpu-training.md) as elementwise bytes, and so read the capped pass
#   7-13% slow. Older fits (a Zen 4 and this Zen 5, older code, `docs/cpu-training.md`) found the
#   remainder the same in seconds on both CPUs, so it is priced at a fixed rate, not at a copy's
#   bandwidth, which swung between 38 and 90 GB/s from one calibration to the next on the Zen 5 while
#   the training speed held. Not modelled: QLoRA's CPU layers beyond their unpacked matmul (the 4-bit
#   dequantization before each product, ~48 ms of a ~1.3-s step in a profile on the Zen 5; bench_time's
#   row).
# - "cuda": the share a compute-bound step reached on the H200 lent on 2026-12-04 (14:40 UTC, torch
#   2.11, `python -m benchmarks.gpu_check --parts compute`): the toolkit's trainer on random-weight
#   Llama-3.2-1B, r16 on all linears, gradient checkpointing, padding-free packing with the varlen
#   kernel, 2048 x 16 packed tokens a micro-batch (26-32k tokens, 0.64-0.72 s a step, 1.6-3.6x the host time):
#   LoRA 0.308, QLoRA 0.345 of the 753.5 TFLOP/s calibrated in the same process; 0.33 is their mean
#   (benchmarks/gpu-results.json "compute"). Smaller micro-batches are host-bound: see
#   CUDA_STEP_SECONDS_PER_LAYER.
TRAIN_EFFICIENCY = {"cpu": 0.866, "cpu bfloat16": 0.865, "cuda": 0.33}
# A CUDA micro-batch's host time, whatever its tokens: Python, PyTorch's dispatch and ~4,500 kernel
# launches, which a fast GPU waits on. Measured on the H200 machines lent on 2026-12-04 (16-core Xeon
# VMs, torch 2.11, Llama-3.2-1B, r16 on all linears, gradient checkpointing; benchmarks/gpu-results.json),
# flat in the tokens (447-3985 a step), the profiler having the GPU busy ~30% of a QLoRA step. Fitted
# to the trainer's path on sm80+ (the varlen attention kernel, "memory" and the attention trials):
# median steps of 0.285-0.387 s for QLoRA (nine runs, median 0.346) and 0.260-0.343 s for LoRA (five
# runs, median 0.298). With the block-diagonal mask ("memory_masked", the path a pre-Ampere GPU takes,
# measured five hours earlier) they read 0.38-0.42 s and 0.20-0.21 s: QLoRA's two paths alike in the
# same session, LoRA's never compared in one session. Per layer of that 16-layer model; QLoRA's 4-bit
# layers add bitsandbytes' Python autograd function and a dequantization per matmul. The step takes
# the longer of this and the GPU's work (the two overlap). Full fine-tuning was not measured: LoRA's
# figure stands in.
CUDA_STEP_SECONDS_PER_LAYER = {"qlora": 0.021, "lora": 0.018, "full": 0.018}
# By the C allocator the training process runs under (toolkit.core.allocator): "glibc" is the fit above
# (glibc's malloc in huge pages; its default settings were not fitted and take the same figure);
# "tcmalloc" the same fit to the same three passes under tcmalloc (TCMALLOC_RELEASE_RATE=0), best of
# two alternating rounds (2026-12-05 14:12-14:20 UTC, a slower moment of the host): bf16 918.8 tok/s at
# 985.8 / 918.1 GFLOP/s, fp32 forced 537.0 at 511.9 / 213.3, capped 357.2 at 259.7 / 218.4. They leave
# 0.426 / 0.342 / 0.246 ms a token beside the matmuls; 44 passes fit them +3.4 / -2.7 / -5.1%. In the
# same hour's alternating pairs tcmalloc trained 3-15% faster than glibc's huge pages in all nine.
CPU_ELEMENTWISE_PASSES = {"glibc": 51, "tcmalloc": 44}
CPU_STEP_SECONDS_PER_LAYER = 0.00385
# Where the calibration measured the host probe (`probes.host_layer_seconds`, the per-call cost of a
# Llama layer's operators on tiny shapes), the fixed cost follows it instead: this many times the probe a
# layer. Fitted on the Zen 4 EPYC (AVX512-BF16, bf16, tcmalloc, 2026-12-07 ~06:00 UTC): every step of four
# 12-step runs of the finance recipe at max_seq_len 128 / 256 / 512 / 1024 (202-2,048 tokens a step,
# steps 3-12) fits 1.697 ms a token plus 0.224 s a step, the probe reading 0.192-0.245 ms a layer between
# the runs (its least, as the calibration keeps the least of two: 0.224 / 30 / 0.192 ms = 38.9). The
# constant above (3.85 ms a layer, the Zen 5's fit) priced the Zen 4's step at 0.116 s, so its 512-token
# steps (`make bench` time's "seq 256") read +20.3% there. Not fitted there, the Zen 3 (AVX2, fp32; its
# probe 0.38-0.40 ms, 2026-12-06): its last bench time rows (10:15 UTC, +4.0% / +16.5% / +3.7% with the
# constant), repriced with the probe from their predictions, read -3.8 to -4.3% / 0.0 to -1.0% / -3.7 to
# -4.2% (not rerun there: it was not at hand; nor the Zen 5; docs/cpu-training.md, twenty-fourth session).
CPU_STEP_OVER_PROBE = 39.0
CPU_ELEMENTWISE_BYTES_PER_S = 40e9
# A LoRA dropout on a CPU (`toolkit.finetune.fused_lora`: the fused layers draw it, `lora_products.dropped`): per
# element of every adapted linear's input, a share of a 64-bit draw, the dropped copy its adapter
# multiplies, the masked share of the input's gradient, and the adapters' products apart where siblings
# shared one. Priced in the elementwise term's currency: this many 4-byte passes over those elements at
# CPU_ELEMENTWISE_BYTES_PER_S. Fitted on the Zen 4 EPYC (AVX512-BF16, tcmalloc; docs/cpu-training.md,
# twenty-seventh session): the finance CPU profile (149,760 such elements a token) at lora.dropout 0.05
# against 0, 16-step runs alternating, steady tokens/s: bf16 0.616 / 0.493 / 0.325 / 0.544 ms a token
# more, forced fp32 0.549 / 0.443; the same in both dtypes, 0.495 ms on the means, 3.3 ns an element.
CPU_DROPOUT_PASSES = 33
# Decode reads weights at the measured bandwidth: on a CPU the calibration measures it as a decoding
# step reads (`toolkit.core.probes.read_rate`), on a GPU a copy.
DECODE_EFFICIENCY = 1.0
# On a GPU a small model's decoding step waits on the host (Python, dispatch, a few kernels a layer),
# not on reading the weights: seconds a step per layer, measured by `python -m benchmarks.gpu_check
# --parts decode` on the same H200 (14:29 UTC; random-weight Llama-3.2-1B, 128 greedy steps, best of
# 3, benchmarks/gpu-results.json "decode"); reading its 2.5 GB of bf16 weights takes 0.5 ms there.
# - "loop": the toolkit's own loop on the transformers backend (`toolkit generate`, `toolkit chat`),
#   bf16, one stream: 11.3 ms a step, 88 tokens/s (transformers' `generate` at batch 1: 15.4 ms);
# - "answers": transformers' `generate` at the report's 16 prompts a batch, bf16: 12.4 ms a step
#   (16 copies of one prompt: no padding, so no mask to build);
# - the QLoRA report's own call (`scoring.greedy_answers` on its 24 questions, left-padded batches of
#   16, the model as the trainer loads it; `benchmarks/gpu_report_answers.py`, 18:14 UTC, the second
#   call of each, "report_answers"): "answers 4-bit base" the base side (adapter off), 37.7 ms a step;
#   "answers 4-bit" the fine-tuned side (4-bit base, unmerged LoRA r16 on all linears), 59.6 and
#   64.1 ms. (`generate` on one unpadded prompt read 39.5 ms with the adapter on.) The first call
#   read 141.5 ms a step there: cuDNN's attention planned each new KV length, which
#   `toolkit.core.sdpa_backends` now keeps the report from.
# A step takes the longer of this and reading the weights (and KV cache) at the bandwidth.
CUDA_DECODE_SECONDS_PER_LAYER = {"loop": 0.00071, "answers": 0.00078, "answers 4-bit base": 0.00236,
                                 "answers 4-bit": 0.00387}
# On a CPU a decoding step also pays per-layer work the bytes don't count (Python and dispatch on the
# transformers backend; llama.cpp's graph), on the same cores that read the weights, so it adds to the
# read rather than overlapping it.
# - "transformers": the toolkit's loop on the Zen 5 EPYC (2 cores), embedded SmolLM2-135M (30 layers),
#   fp32 pre-packed, greedy, 48 tokens (prefill included), best of 5, between ten calibrations of the
#   weight-read rate (32-41 GB/s, median 35.4), 2026-12-05 01:5x UTC: 45.4 tok/s, 15.3 ms of a 22.0-ms
#   step reading 542 MB -> 0.22 ms a layer.
# - "llama.cpp": fitted with LLAMA_CPP_SECONDS_PER_QUANT_WEIGHT to 18 decode timings on two 2-core
#   EPYC guests (tests/data/estimate/llama_cpp_decode.csv: a Zen 4 with AVX512-BF16 and a Zen 3 with AVX2
#   only; f16 / q8_0 / q4_k_m / q4_0 of SmolLM2-135M and of a random-weight Llama-3.2-1B, and the
#   shipped Q4_1; medians of two rounds): 0.16 ms a layer. The model reads every median within -23% to
#   +11% in tokens/s (9.0% off on average), and the Zen 5's (not in the fit) f16 / Q4_1 at 99 / 129
#   tok/s against 112.2 / 132.1. One constant a layer alone at the probe's rate (0.11 ms, fitted on the
#   Zen 5) had read -34% to +26% (13.7% on average; docs/estimate.md).
# Before this term the estimate read CPU decoding 1.3-3.3x too fast (74 / 148 / 412 tok/s against
# 41 / 110 / 127 measured).
CPU_DECODE_SECONDS_PER_LAYER = {"transformers": 0.00022, "llama.cpp": 0.00016}
# The transformers backend's host work a layer, where the calibration measured its probe
# (`probes.host_layer_seconds`: a Llama layer's operators in plain torch on tiny shapes): this many
# times the probe. The backend's own step on a random-weight Llama of the probe's shapes (hidden 64,
# 8 layers against 2, so a layer's cost apart from the step's), in five rounds alternating with the
# probe on the Zen 3 EPYC (AVX2 only, 2 cores, 2026-12-06 14:1x UTC): 0.68-0.73 ms a layer against the
# probe's 0.38-0.40, ratios 1.69-1.83, median 1.80. The rest is transformers' modules (their calls,
# the cache object, the mask and rotary set-up). The Zen 5's constant above, 0.22 ms, was fitted as
# its step less the read; on the Zen 3 that constant priced the embedded model at 33 tok/s against 21.8
# measured, a host work 2.5-2.9x the Zen 5's that the probe now follows. `make bench` decode checks the
# ratio on the machine it runs on.
CPU_DECODE_HOST_OVER_PROBE = 1.80
# llama.cpp's own kernels stream weights faster than the calibration's probe (fp32 one-row products
# through torch or oneDNN, `probes.read_rate`, the rate the transformers backend decodes at): a plain
# `torch.sum` over 256 MiB read 1.46x the probe on both guests above (33.0 against 22.6 GB/s on the
# Zen 4, 34.5 against 23.7 on the Zen 3), and llama.cpp reads a 1B model's f16 weights at 28-38 GB/s.
CPU_DECODE_READ_OVER_PROBE = {"transformers": 1.0, "llama.cpp": 1.45}
# llama.cpp's block-quantized types (q8_0, q4_0, the k-quants ...) unpack each block before its dot
# product: compute the bytes don't count, on the cores that read them. Seconds per weight multiplied a
# token (the decoder's linears and the output head), one constant for every such type (fitted per type
# they read 5.4-9.8 ps, within the rounds' spread); float types (f32, f16, bf16) pay none.
LLAMA_CPP_SECONDS_PER_QUANT_WEIGHT = 7.9e-12
LLAMA_CPP_FLOAT_TYPES = ("f32", "f16", "bf16")
# The report's answers on a CPU: both sides in one generation (`scoring.paired_greedy_answers`: the
# 16 prompts of a batch twice, 32 rows a step, the adapter masked on the base rows). A row leaves the
# batch when its answer ends (`scoring.greedy_rows`), which a plan can't foresee: every row is priced
# for every step, an upper bound (on the finance report of the Zen 3, ~1.7 s of ~15 s: 2026-12-07,
# when rows began to leave; the steps below were measured with every row to the end). A step costs
# its rows' matmuls (priced as a prefill of that many tokens, overlapping the read of the weights)
# plus per-layer host work that neither counts: Python, dispatch, the masked LoRA products, the KV
# cache's concatenations. Measured steps (embedded SmolLM2-135M, 30 layers, the
# finance recipe's last run, 71 decoding steps after a 32 x 75-token prefill):
# - Zen 5 EPYC (2 cores; 2026-12-05 03:2x UTC, 7 and 3 runs; calibrated 1058 GFLOP/s bf16, 560 fp32
#   pre-packed at 03:35): bf16 60-73 ms a step, fp32 70-73; less their matmuls (13 / 24 ms priced),
#   1.77 / 1.59 ms a layer.
# - Zen 4 EPYC (family 25 model 17, 2 cores; 2026-12-05 23:1x UTC, 2 runs each; 433 bf16, 229 fp32):
#   bf16 106-108 ms, fp32 118-134; less their matmuls (28 / 49 ms), 2.6-2.8 ms a layer: this guest's
#   host work is ~1.5x the Zen 5's, which no calibrated rate follows (docs/estimate.md).
# The constant is the Zen 5's, the machine the other CPU constants come from. All of the above predates
# the paired decode's products leaving autograd (`fused_lora._Rows`, 2026-12-05): on the Zen 4, in
# alternating runs, that cut a bf16 step from 104-112 to 97 ms and an fp32 one from 133-151 to 106-115,
# so on the Zen 5 this term may now read high by up to a sixth. Before the matmul term, a
# step was priced at the longer of 2.3 ms a layer and the read, whatever the CPU's rate: Llama-3.2-1B's
# 32-row step (~80 GFLOP, ~0.2 s at the Zen 4's bf16 rate) read as ~0.1 s at 24 GB/s.
CPU_ANSWERS_SECONDS_PER_LAYER = 0.0017
# A `toolkit finetune` process's time outside training, the in-training evals and the report: Python's
# start-up (on a CPU twice: `allocator.relaunch` restarts it under tcmalloc or glibc's huge pages), the imports
# (torch, transformers, PEFT, TRL; on a GPU bitsandbytes and CUDA's initialisation), finding and loading
# the base model from the local cache (QLoRA quantizing it), tokenizing and packing the data, building the
# Trainer and saving the run. Measured as the process's wall minus run.json's train_runtime_s and report_s
# (in-training evals are inside the training runtime):
# - "cpu": the finance recipe's CPU profile (embedded SmolLM2-135M), the Zen 5 EPYC (2 cores, torch
#   2.13.0+cpu): 7.0 / 8.4 / 7.7 s in `make bench`'s three passes (2026-12-05 03:35-03:51 UTC) and 8.0 s
#   alone (07:41 UTC; of which 5.1 s before the command's first line ran: imports, ~4.5 s, and the
#   restart); median 7.8.
# - "cuda": the finance recipe on random-weight Llama-3.2-1B, QLoRA, the H200 machines lent on 2026-12-04
#   (16-core Xeon VMs, torch 2.11; benchmarks/gpu-results.json "e2e"): 24.8 / 22.8 / 22.9 s; median 22.9.
# A slower CPU imports more slowly; a first run's download of the model is not in it (the network's).
STARTUP_SECONDS = {"cpu": 7.8, "cuda": 22.9}


@dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs per trained token, split by where they go (sum = `total`)."""

    forward: float
    backward: float
    recompute: float
    # Of the total, the products no frozen weight is in (attention's matmuls, the adapters; all of a full
    # fine-tune's): pre-packing a frozen weight for oneDNN (toolkit.core.packed_linear) can't speed them.
    unpacked: float = 0.0

    @property
    def total(self) -> float:
        return self.forward + self.backward + self.recompute


def _attn_context(seq_len: int) -> float:
    return (seq_len + 1) / 2  # causal: token t attends to t positions


def forward_flops_per_token(m, seq_len: int, *, lora_r: int = 0, targets: tuple[str, ...] = (),
                            labelled_fraction: float = 1.0) -> dict[str, float]:
    """Forward FLOPs per token of `m` (a ModelFacts) at `seq_len`, by part: "linears" (decoder
    linears, 2 per weight), "attention" (scores + weighted values over the causal context),
    "lm_head" (2 x vocab x hidden, on `labelled_fraction` of the positions: trainers that score
    only labelled positions skip the rest), "adapters" (LoRA A and B on `targets`, rank `lora_r`)."""
    ctx = _attn_context(seq_len)
    lin = m.linears()
    return {
        "linears": 2.0 * m.linear_params(),
        "attention": 2.0 * 2.0 * m.q_dim * ctx * m.layers,
        "lm_head": 2.0 * m.vocab * m.hidden * labelled_fraction,
        "adapters": 2.0 * m.layers * sum(lora_r * (a + b) for n, (a, b) in lin.items() if n in targets),
    }


def train_flops_per_token(m, *, method: str, seq_len: int, lora_r: int = 0, targets: tuple[str, ...] = (),
                          grad_ckpt: bool = False, labelled_fraction: float = 1.0) -> FlopsPerToken:
    """FLOPs per trained token of one optimizer step's forward + backward (+ recompute).

    method "full": backward = 2 x forward everywhere. "lora"/"qlora" (frozen base): the base
    linears and the LM head need only input gradients (1 x their forward), the attention matmuls
    both operands (2 x), the adapters input and weight gradients (2 x). grad_ckpt adds one forward
    of the decoder layers (not of the head, which is outside the checkpointed blocks). The same
    number is the "model FLOPs" of an MFU figure (benchmarks/bench_train.py)."""
    if method not in ("full", "lora", "qlora"):
        raise ValueError(f"method must be full, lora or qlora, got {method!r}")
    if not 0.0 < labelled_fraction <= 1.0:
        raise ValueError(f"labelled_fraction must be in (0, 1], got {labelled_fraction!r}")
    f = forward_flops_per_token(m, seq_len, lora_r=0 if method == "full" else lora_r,
                                targets=() if method == "full" else targets, labelled_fraction=labelled_fraction)
    fwd = sum(f.values())
    if method == "full":
        back = 2.0 * fwd
    else:
        back = f["linears"] + f["lm_head"] + 2.0 * f["attention"] + 2.0 * f["adapters"]
    recompute = (f["linears"] + f["attention"] + f["adapters"]) if grad_ckpt else 0.0
    # attention and the adapters: the forward, both operands' gradients, the recompute
    unpacked = fwd + back + recompute if method == "full" else \
        (3.0 + bool(grad_ckpt)) * (f["attention"] + f["adapters"])
    return FlopsPerToken(fwd, back, recompute, unpacked)


def train_efficiency(device: str, dtype: str) -> float:
    """TRAIN_EFFICIENCY for a device ("cpu", "cuda") training in `dtype`: the share of the calibrated
    matmul rate that dtype's GEMMs reach inside a step (on a CPU measured per dtype by bench_step; the
    elementwise work around them is priced apart); GPUs have one figure."""
    return TRAIN_EFFICIENCY.get(f"{device} {dtype}", TRAIN_EFFICIENCY[device])


def cpu_elementwise_bytes_per_token(m, malloc: str = "glibc") -> float:
    """Bytes of a CPU training step's work outside the matmuls per trained token (fwd + bwd) under the
    C allocator `malloc` ("glibc", "tcmalloc"): CPU_ELEMENTWISE_PASSES over the token's layer
    activations at 4 bytes an element whatever the compute dtype (bf16 steps measured the same time as
    fp32's); they take that / CPU_ELEMENTWISE_BYTES_PER_S seconds."""
    return CPU_ELEMENTWISE_PASSES[malloc] * m.layers * (m.hidden + m.intermediate) * 4


def cpu_dropout_bytes_per_token(m, targets: tuple[str, ...]) -> float:
    """Bytes of a CPU step's LoRA dropout per trained token (fwd + bwd), in the elementwise term's
    currency: CPU_DROPOUT_PASSES over each adapted linear's input elements, at 4 bytes."""
    inputs = sum(fin for name, (fin, _) in m.linears().items() if name in targets)
    return CPU_DROPOUT_PASSES * m.layers * inputs * 4


def cpu_step_seconds(m, host_layer_s: float = 0.0) -> float:
    """A CPU micro-batch's fixed cost, whatever its tokens: CPU_STEP_OVER_PROBE x this CPU's host probe
    (`host_layer_s`, `probes.host_layer_seconds`) x layers where the calibration measured it, else
    CPU_STEP_SECONDS_PER_LAYER x layers."""
    if host_layer_s < 0:
        raise ValueError("host_layer_s must not be negative")
    return (CPU_STEP_OVER_PROBE * host_layer_s if host_layer_s else CPU_STEP_SECONDS_PER_LAYER) * m.layers


def cuda_step_seconds(m, method: str) -> float:
    """A CUDA micro-batch's host time for `method` ("qlora", "lora", "full"): per layer x layers."""
    return CUDA_STEP_SECONDS_PER_LAYER[method] * m.layers


def train_tokens_per_s(flops_per_token: float, device_flops: float, efficiency: float,
                       bytes_per_token: float = 0.0, bandwidth_bytes_per_s: float = 0.0,
                       step_s: float = 0.0, tokens_per_step: float = 0.0, host_step_s: float = 0.0,
                       unpacked_flops_per_token: float = 0.0, unpacked_device_flops: float = 0.0) -> float:
    """Trained tokens per second: one token takes FLOPs / (device FLOP/s x efficiency), the part
    `unpacked_flops_per_token` at `unpacked_device_flops` where given (torch's own matmul, where
    `device_flops` is that of frozen weights pre-packed for oneDNN), plus
    `bytes_per_token` / bandwidth where given (a CPU's elementwise work), plus its share of a fixed
    `step_s` per micro-batch of `tokens_per_step` tokens where given (a CPU's Python and autograd).
    `host_step_s` is a GPU's host time per micro-batch, which overlaps the device's work: a step
    takes the longer of the two."""
    if flops_per_token <= 0 or device_flops <= 0 or efficiency <= 0:
        raise ValueError("flops_per_token, device_flops and efficiency must be positive")
    if bytes_per_token < 0 or (bytes_per_token and bandwidth_bytes_per_s <= 0):
        raise ValueError("bytes_per_token needs a positive bandwidth")
    if step_s < 0 or host_step_s < 0 or ((step_s or host_step_s) and tokens_per_step <= 0):
        raise ValueError("step_s and host_step_s need a positive tokens_per_step")
    seconds = _matmul_seconds(flops_per_token, device_flops, efficiency, unpacked_flops_per_token,
                              unpacked_device_flops)
    seconds += bytes_per_token / bandwidth_bytes_per_s if bytes_per_token else 0.0
    seconds += step_s / tokens_per_step if step_s else 0.0
    return 1.0 / max(seconds, host_step_s / tokens_per_step if host_step_s else 0.0)


def decode_bytes_per_token(weight_bytes: int, kv_bytes_per_token: float, context: int) -> float:
    """Bytes read to produce one token: all weights once, plus the KV cache of `context` tokens."""
    return weight_bytes + kv_bytes_per_token * context


def decode_tokens_per_s(bytes_per_token: float, bandwidth_bytes_per_s: float,
                        efficiency: float = DECODE_EFFICIENCY, host_step_s: float = 0.0,
                        serial_step_s: float = 0.0) -> float:
    """Single-stream decode rate: one step reads `bytes_per_token` at bandwidth x efficiency, or
    takes `host_step_s` where the host is slower (a GPU's, `cuda_decode_step_seconds`); a CPU's
    `serial_step_s` (`cpu_decode_step_seconds`) runs on the same cores and adds to the read."""
    if bytes_per_token <= 0 or bandwidth_bytes_per_s <= 0 or host_step_s < 0 or serial_step_s < 0:
        raise ValueError("bytes_per_token and bandwidth must be positive, host and serial times not negative")
    return 1.0 / max(bytes_per_token / (bandwidth_bytes_per_s * efficiency) + serial_step_s, host_step_s)


def cpu_decode_step_seconds(m, backend: str, quant: str, host_layer_s: float = 0.0) -> float:
    """A CPU decoding step's work beyond reading the weights, for `backend` ("transformers",
    "llama.cpp") and weight type `quant`: per layer x layers, and on llama.cpp a block-quantized type's
    dot products (LLAMA_CPP_SECONDS_PER_QUANT_WEIGHT per weight multiplied a token). A layer costs
    CPU_DECODE_SECONDS_PER_LAYER, except on the transformers backend where the calibration measured
    this CPU's host work (`host_layer_s`, `probes.host_layer_seconds`): CPU_DECODE_HOST_OVER_PROBE x
    that."""
    if host_layer_s < 0:
        raise ValueError("host_layer_s must not be negative")
    per_layer = (CPU_DECODE_HOST_OVER_PROBE * host_layer_s if backend == "transformers" and host_layer_s
                 else CPU_DECODE_SECONDS_PER_LAYER[backend])
    seconds = per_layer * m.layers
    if backend == "llama.cpp" and quant.lower() not in LLAMA_CPP_FLOAT_TYPES:
        seconds += LLAMA_CPP_SECONDS_PER_QUANT_WEIGHT * (m.linear_params() + m.vocab * m.hidden)
    return seconds


def cpu_decode_read_rate(probe_bytes_per_s: float, backend: str) -> float:
    """The rate a CPU decoding step on `backend` reads weights at, from the calibration's probe
    (`probes.read_rate`; CPU_DECODE_READ_OVER_PROBE)."""
    return probe_bytes_per_s * CPU_DECODE_READ_OVER_PROBE[backend]


def cpu_answers_step_seconds(m) -> float:
    """The host work of a CPU step of the report's answers (CPU_ANSWERS_SECONDS_PER_LAYER): per layer x
    layers. The step adds to it the longer of its rows' matmuls and reading the weights."""
    return CPU_ANSWERS_SECONDS_PER_LAYER * m.layers


def cuda_decode_step_seconds(m, decoder: str) -> float:
    """A CUDA decoding step's host time for `decoder` ("loop", "answers", "answers 4-bit base",
    "answers 4-bit"; see CUDA_DECODE_SECONDS_PER_LAYER): per layer x layers."""
    return CUDA_DECODE_SECONDS_PER_LAYER[decoder] * m.layers


def prefill_seconds(prompt_tokens: int, forward_flops_per_token: float, device_flops: float,
                    efficiency: float, bytes_per_token: float = 0.0, bandwidth_bytes_per_s: float = 0.0,
                    unpacked_flops_per_token: float = 0.0, unpacked_device_flops: float = 0.0) -> float:
    """Time to process a prompt: forward FLOPs x tokens / (FLOP/s x efficiency), the part
    `unpacked_flops_per_token` at `unpacked_device_flops` where given (as `train_tokens_per_s`), plus
    the tokens' `bytes_per_token` at the bandwidth where given (a CPU's elementwise work)."""
    rest = prompt_tokens * bytes_per_token / bandwidth_bytes_per_s if bytes_per_token else 0.0
    return prompt_tokens * _matmul_seconds(forward_flops_per_token, device_flops, efficiency,
                                           unpacked_flops_per_token, unpacked_device_flops) + rest


def _matmul_seconds(flops: float, device_flops: float, efficiency: float, unpacked: float,
                    unpacked_device_flops: float) -> float:
    if not 0 <= unpacked <= flops or (unpacked and unpacked_device_flops <= 0):
        raise ValueError("the unpacked FLOPs must be part of the FLOPs, with a positive rate")
    seconds = (flops - unpacked) / (device_flops * efficiency)
    return seconds + (unpacked / (unpacked_device_flops * efficiency) if unpacked else 0.0)


def train_wall_seconds(steps: int, tokens_per_step: int, tokens_per_s: float, *, prepare_s: float = 0.0,
                       eval_s: float = 0.0, report_s: float = 0.0) -> float:
    """A run's wall time: steps x tokens per step at `tokens_per_s`, plus start-up and model
    preparation, evaluation and the report (seconds each, as the caller estimates them)."""
    return steps * tokens_per_step / tokens_per_s + prepare_s + eval_s + report_s
