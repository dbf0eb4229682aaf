"""Time beside memory: a device's rates (this machine's calibration or a named GPU's datasheet),
the time fields of an estimate, and time budgets ("30m", "1.5h", "2h30m").

The arithmetic is `toolkit.estimate.timing`'s; this module only gathers its inputs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from toolkit.core.errors import UserError
from toolkit.estimate import timing as T

# With no --time-budget: a CPU run must finish within 30 minutes (a first run should be a quick
# one there); a GPU run has no time limit.
DEFAULT_TIME_BUDGET_S = {"cpu": 30 * 60, "cuda": None}
_DUR = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(text: str, what: str = "--time-budget") -> float:
    """Seconds in "90s", "30m", "1.5h", "2h30m" (h, m, s in that order; a bare number is seconds)."""
    raw = str(text).strip().lower().replace(" ", "")
    if re.fullmatch(r"-.*", raw):
        raise UserError(f"{what}: must be positive, got {text!r}")
    if re.fullmatch(r"\d+(\.\d+)?", raw):
        secs = float(raw)
    else:
        m = _DUR.match(raw)
        if not raw or not m or not any(m.groups()):
            raise UserError(f"{what}: cannot read {text!r} as a duration (examples: 90s, 30m, 1.5h, 2h30m)")
        h, mi, s = (float(g) if g else 0.0 for g in m.groups())
        secs = h * 3600 + mi * 60 + s
    if secs <= 0:
        raise UserError(f"{what}: must be positive, got {text!r}")
    return secs


def fmt_duration(seconds: float) -> str:
    """"~40 s", "~12 min", "~3 h" for people."""
    if seconds < 90:
        return f"~{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"~{seconds / 60:.0f} min"
    return f"~{seconds / 3600:.1f} h"


@dataclass(frozen=True)
class Rates:
    """What the time model needs of a device: matmul FLOP/s in the compute dtype, bandwidth."""

    device: str  # cpu | cuda
    flops: float
    bandwidth_bytes_per_s: float
    source: str
    dtype: str = "float32"  # the compute dtype `flops` was measured in (picks the efficiency)
    # The rate of torch's own matmul where `flops` is that of frozen layers pre-packed for oneDNN
    # (toolkit.core.packed_linear): QLoRA's 4-bit layers are not packed.
    unpacked_flops: float | None = None
    # The C allocator a CPU training process runs under ("glibc", "tcmalloc"; toolkit.core.allocator).
    malloc: str = "glibc"
    # A CPU's host work a decoder layer pays in a one-row decoding step, as calibrated (0: not measured).
    host_layer_s: float = 0.0


def rates_for_gpu(name: str, dtype: str = "bfloat16") -> Rates | None:
    """A named GPU's datasheet rates (toolkit.estimate.gpus) computing in `dtype`; None when only its
    memory is known."""
    from toolkit.estimate.gpus import spec

    s = spec(name)
    if s is None:
        return None
    flops = s.flops_in(dtype)
    kind = "fp32" if dtype == "float32" else "16-bit"
    return Rates("cuda", flops, s.bandwidth_bytes_per_s, f"{s.name} datasheet: {flops / 1e12:.3g} TFLOPS {kind}, "
                 f"{s.bandwidth_gbs:g} GB/s", dtype)


# A bare --vram size names no GPU: the estimate assumes one from sm80 on (bf16), as most are now.
VRAM_ONLY_DTYPE = ("bfloat16", "bf16 assumed: --vram names no GPU (a GTX 10xx computes in fp32: give --gpu)")


def device_dtype(gpu: str | None, vram: str | None, purpose: str = "train") -> tuple[str, str]:
    """(torch dtype name, reason) the toolkit computes in on the estimate's device for `purpose`
    ("train", "infer"): `toolkit.core.capability.choose_dtype` of the named GPU's record
    (`--gpu`), of this machine (neither flag), or VRAM_ONLY_DTYPE for a bare `--vram` size."""
    from toolkit.core.hardware import auto_dtype

    if gpu is not None:
        from toolkit.estimate.gpus import capability

        return auto_dtype(capability(gpu), purpose)
    if vram is not None:
        return VRAM_ONLY_DTYPE
    from toolkit.core.hardware import detect, nvidia_smi_compute_capability

    hw = detect()
    if hw.kind == "cuda" and nvidia_smi_compute_capability() is None:  # not worth importing torch for
        return "bfloat16", f"bf16 assumed: nvidia-smi gives no compute capability for {hw.name} (an old driver)"
    return auto_dtype(host_capability(hw), purpose)


def host_capability(hw=None):
    """toolkit.core.capability's record of this machine (the GPU when nvidia-smi sees one), without
    importing torch: torch's own ISA probe is read by neither the calibration's cache key nor the
    dtype choice, a GPU's compute capability comes from nvidia-smi where the driver gives it, and
    `toolkit estimate` must stay instant. `hw`: `toolkit.core.hardware.detect()`'s answer where the
    caller has it (on a GPU host each asks nvidia-smi again)."""
    from toolkit.core import capability
    from toolkit.core.hardware import detect, nvidia_smi_compute_capability

    hw = hw or detect()
    cc = nvidia_smi_compute_capability() if hw.kind == "cuda" else None
    if cc is not None:
        return capability.cuda_record(hw.name, cc, capability.detect("cpu", use_torch=False))
    return capability.detect("cuda" if hw.kind == "cuda" else "cpu", use_torch=False)


def training_dtype(cap=None) -> str:
    """The compute dtype the toolkit trains in here: what `compute_dtype: auto` means
    (toolkit.core.hardware.auto_dtype)."""
    from toolkit.core.hardware import auto_dtype

    return auto_dtype(cap or host_capability(), "train")[0]


def rates_here(dtype: str | None = None, purpose: str = "train") -> Rates:
    """This machine's measured rates (toolkit.core.calibration, cached; first call measures ~3 s),
    for the compute dtype the toolkit would choose here for `purpose` ("train", "infer": a CPU
    answers in fp32 whatever it trains in) unless `dtype` is given."""
    from toolkit.core import calibration
    from toolkit.core.hardware import auto_dtype

    cap = host_capability()
    cal = calibration.load(cap)
    dtype = dtype or auto_dtype(cap, purpose)[0]
    if dtype not in cal.matmul_flops:
        dtype = "float32"
    from toolkit.core.capability import matmul_rate

    flops = matmul_rate(cap, dtype, cal)  # pre-packed where that path is taken
    kind = "cuda" if cap.kind == "cuda" else "cpu"
    unpacked = cal.matmul_flops[dtype]
    # Training's 4-bit layers can't be packed: QLoRA is timed at the unpacked rate.
    why = ", QLoRA's 4-bit layers' rate" if purpose == "train" else ""
    packed = f" pre-packed ({unpacked / 1e9:.1f} unpacked{why})" if flops != unpacked else ""
    from toolkit.core import allocator

    malloc = allocator.training_allocator_on(kind)
    under = ", tcmalloc" if malloc == "tcmalloc" else ""
    return Rates(kind, flops, cal.bandwidth_bytes_per_s, f"calibration: {dtype} {flops / 1e9:.1f} GFLOP/s{packed}, "
                 f"{cal.bandwidth_bytes_per_s / 1e9:.1f} GB/s{under}", dtype, unpacked, malloc, cal.host_layer_s)


def time_fields(m, est, rates: Rates, *, targets: tuple[str, ...], labelled_fraction: float = 1.0,
                run=None, prompt_tokens: int | None = None, lora_dropout: float = 0.0) -> dict:
    """The `time` object of an estimate: train_tokens_per_s (training tasks; a LoRA dropout on a CPU
    priced, `lora_dropout`), train_wall_s and the parts of it the in-training evals and the report
    take, evals_and_report_s, and the process's start-up and loading, startup_s (with a RunShape
    `run`), decode_tokens_per_s and prefill_s (a prompt of `prompt_tokens`, default the estimate's
    seq_len)."""
    eff = T.train_efficiency(rates.device, rates.dtype)
    out: dict = {"source": rates.source}
    seq = est.seq_len
    full = T.forward_flops_per_token(m, seq)
    fwd = sum(full.values())
    bw = T.CPU_ELEMENTWISE_BYTES_PER_S
    # A CPU's elementwise work (fwd + bwd); a forward alone does about a third of it.
    rest = step_s = 0.0
    if rates.device == "cpu":
        rest = T.cpu_elementwise_bytes_per_token(m, rates.malloc)
        step_s = T.cpu_step_seconds(m, rates.host_layer_s)
    unpacked_rate = rates.unpacked_flops or rates.flops

    def prefill(tokens: float, flops_per_token: float) -> float:  # attention's matmuls at torch's rate
        return T.prefill_seconds(tokens, flops_per_token, rates.flops, eff, rest / 3, bw, full["attention"],
                                 unpacked_rate)

    if est.task != "inference":
        f = T.train_flops_per_token(m, method=est.task, seq_len=seq, lora_r=est.lora_r or 0, targets=targets,
                                    grad_ckpt=bool(est.grad_ckpt), labelled_fraction=labelled_fraction)
        # QLoRA's 4-bit layers run torch's matmul (only plain nn.Linear layers are pre-packed).
        train_flops = unpacked_rate if est.task == "qlora" else rates.flops
        # A micro-batch holds what the run's packing counted, else batch x seq_len tokens (a packed row
        # filled to about that).
        micro = run.micro_batch_tokens if run is not None and run.micro_batch_tokens else est.batch * seq
        host_s = T.cuda_step_seconds(m, est.task) if rates.device == "cuda" else 0.0
        # Only training draws the dropout (evaluation turns it off).
        drop = T.cpu_dropout_bytes_per_token(m, targets) if lora_dropout and rates.device == "cpu" \
            and est.task != "full" else 0.0
        tps = T.train_tokens_per_s(f.total, train_flops, eff, rest + drop, bw, step_s, micro, host_s,
                                   f.unpacked, unpacked_rate)
        out["train_flops_per_token"] = f.total
        out["train_tokens_per_s"] = round(tps, 2)
        if run is not None:
            # Held-out loss (in-training evals, the report's) projects only labelled positions onto the
            # vocabulary, as training does; an answer's prompt only its last (transformers' generate).
            scored = run.eval_rounds * run.eval_tokens + run.report_tokens
            loss_fwd = fwd - (1.0 - labelled_fraction) * full["lm_head"]
            # The report's general-text perplexity scores every position of its text.
            eval_s = (prefill(scored, loss_fwd) + prefill(run.report_text_tokens, fwd)
                      + prefill(run.report_prompt_tokens, fwd - full["lm_head"]))
            weight_s = est.components["weights"] / rates.bandwidth_bytes_per_s
            if rates.device == "cuda":  # batched answers, each step waiting on the host
                # QLoRA's sides differ: the base runs with the adapter off, the fine-tuned side unmerged
                # (4-bit weights can't take the merge); a LoRA model's adapter is merged for its side.
                sides = ("answers 4-bit base", "answers 4-bit") if est.task == "qlora" else ("answers", "answers")
                report_s = sum(run.report_decode_steps / 2 * max(weight_s, T.cuda_decode_step_seconds(m, side))
                               for side in sides)
            else:
                # Both sides in one generation (scoring.paired_greedy_answers), except after a full
                # fine-tune, whose base is loaded again and answers apart. A step's matmuls are those of
                # a prefill of its rows, overlapping the read of the weights; its host work adds to both.
                apart = est.task == "full"
                steps = run.report_decode_steps if apart else run.report_decode_steps / 2
                rows = run.report_answer_rows * (1 if apart else 2)
                report_s = steps * (T.cpu_answers_step_seconds(m) + max(weight_s, prefill(rows, fwd)))
            # The process's start-up, imports, loading and set-up (STARTUP_SECONDS, measured on the finance
            # recipe's small models), plus reading the weights and (QLoRA) quantizing them, a few passes
            # over the bytes, which grows with the model.
            prepare_s = T.STARTUP_SECONDS[rates.device] + 4 * weight_s
            out["train_wall_s"] = round(T.train_wall_seconds(run.steps, run.tokens_per_step, tps, prepare_s=prepare_s,
                                                             eval_s=eval_s, report_s=report_s), 1)
            out["evals_and_report_s"] = round(eval_s + report_s, 1)
            out["startup_s"] = round(prepare_s, 1)
            out["steps"] = run.steps
            out["tokens_per_step"] = run.tokens_per_step
    kv_per_token = 2 * m.layers * m.kv_dim * (4 if est.quant == "fp32" else 2)
    ctx = est.seq_len
    # On a GPU, the toolkit's own decoding loop (transformers backend) waits on the host.
    host = T.cuda_decode_step_seconds(m, "loop") if rates.device == "cuda" else 0.0
    cpu = rates.device == "cpu"
    serial = T.cpu_decode_step_seconds(m, est.backend, est.quant, rates.host_layer_s) if cpu else 0.0
    read = T.cpu_decode_read_rate(rates.bandwidth_bytes_per_s, est.backend) if cpu else rates.bandwidth_bytes_per_s
    out["decode_tokens_per_s"] = round(T.decode_tokens_per_s(
        T.decode_bytes_per_token(est.components["weights"], kv_per_token, ctx), read,
        host_step_s=host, serial_step_s=serial), 2)
    out["prefill_s"] = round(prefill(prompt_tokens or ctx, fwd), 3)
    return out
