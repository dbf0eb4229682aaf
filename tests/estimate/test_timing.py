"""Time formulas against an independent count (torch's FlopCounterMode on a tiny Llama), the
GPU catalog, durations, and the pick under a time budget."""

from __future__ import annotations

import dataclasses

import pytest

from toolkit.core.errors import UserError
from toolkit.estimate import timing as T
from toolkit.estimate.catalog import from_hf_config
from toolkit.estimate.pick import pick
from toolkit.estimate.planner import ALL_LINEAR
from toolkit.estimate.timeplan import fmt_duration, parse_duration

CFG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
       "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 300, "tie_word_embeddings": False}


def _torch_flops(seq: int, backward: bool) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG, attn_implementation="eager"))
    ids = torch.randint(0, 300, (1, seq))
    with FlopCounterMode(display=False) as fc:
        out = model(input_ids=ids, labels=ids)
        if backward:
            out.loss.backward()
    return fc.get_total_flops() / seq


def test_forward_flops_match_torch_count_at_one_token():
    # one token: the causal context is 1 position, where torch's dense count is exact too
    m = from_hf_config(CFG, "tiny")
    ours = sum(T.forward_flops_per_token(m, 1).values())
    assert ours == pytest.approx(_torch_flops(1, backward=False), rel=1e-9)


def test_full_backward_is_twice_forward_like_torch():
    m = from_hf_config(CFG, "tiny")
    f = T.train_flops_per_token(m, method="full", seq_len=1)
    assert f.total == pytest.approx(_torch_flops(1, backward=True), rel=0.02)
    assert f.backward == 2 * f.forward and f.recompute == 0


def test_frozen_base_backward_and_checkpoint_recompute():
    m = from_hf_config(CFG, "tiny")
    lora = T.train_flops_per_token(m, method="lora", seq_len=64, lora_r=8, targets=ALL_LINEAR)
    full = T.train_flops_per_token(m, method="full", seq_len=64)
    assert lora.total < full.total + 3 * lora.forward - 3 * full.forward + 1  # adapters add, frozen base saves
    ck = T.train_flops_per_token(m, method="lora", seq_len=64, lora_r=8, targets=ALL_LINEAR, grad_ckpt=True)
    head = 2 * m.vocab * m.hidden
    assert ck.recompute == pytest.approx(ck.forward - head)  # the head is not checkpointed
    half = T.train_flops_per_token(m, method="lora", seq_len=64, lora_r=8, targets=ALL_LINEAR, labelled_fraction=0.5)
    assert lora.total - half.total == pytest.approx(2 * 0.5 * head)  # forward + input grad of the head


def test_rates_arithmetic():
    assert T.train_tokens_per_s(1e9, 100e9, 0.5) == pytest.approx(50)
    assert T.decode_tokens_per_s(T.decode_bytes_per_token(1_000, 10, 100), 2_000, 1.0) == pytest.approx(1.0)
    assert T.prefill_seconds(100, 1e9, 1e11, 0.5) == pytest.approx(2.0)
    assert T.train_wall_seconds(10, 100, 50, prepare_s=1, eval_s=2, report_s=3) == pytest.approx(26)
    # 1e9 FLOPs at 50 GFLOP/s (20 ms) plus 1e9 bytes at 100 GB/s (10 ms): 30 ms a token.
    assert T.train_tokens_per_s(1e9, 100e9, 0.5, 1e9, 100e9) == pytest.approx(1 / 0.03)
    assert T.prefill_seconds(100, 1e9, 1e11, 0.5, 1e8, 1e10) == pytest.approx(3.0)
    with pytest.raises(ValueError):
        T.train_tokens_per_s(0, 1, 1)
    with pytest.raises(ValueError):
        T.train_tokens_per_s(1e9, 1e11, 0.5, 1e9, 0)
    # a fixed 0.1 s per micro-batch of 1000 tokens adds 0.1 ms a token; half the tokens, twice that
    assert T.train_tokens_per_s(1e9, 100e9, 0.5, 0, 0, 0.1, 1000) == pytest.approx(1 / 0.0201)
    assert T.train_tokens_per_s(1e9, 100e9, 0.5, 0, 0, 0.1, 500) == pytest.approx(1 / 0.0202)
    with pytest.raises(ValueError):
        T.train_tokens_per_s(1e9, 1e11, 0.5, 0, 0, 0.1, 0)


# The measured runs the CPU passes are fitted to (timing.py says where): trained tokens/s of the finance
# recipe's 40-step CPU run (micro-batches of 2 x 512 tokens, 0.5586 GFLOP a token) on the Zen 5, with the
# matmul rates each run's calibration measured: pre-packed for oneDNN, and torch's own; three passes
# under each C allocator.
FIT_RUNS = [("bfloat16", 921.5, 1004.9e9, 965.8e9, "glibc"),  # bf16 as detected
            ("float32", 524.8, 530.1e9, 225.0e9, "glibc"),  # the record forced to AVX2: fp32 at AVX-512 width
            ("float32", 352.9, 272.5e9, 227.1e9, "glibc"),  # and the libraries capped at AVX2 too
            ("bfloat16", 918.8, 985.8e9, 918.1e9, "tcmalloc"),
            ("float32", 537.0, 511.9e9, 213.3e9, "tcmalloc"),
            ("float32", 357.2, 259.7e9, 218.4e9, "tcmalloc")]


def _finance_cpu_tokens_per_s(dtype: str, rate: float, torch_rate: float, malloc: str = "glibc") -> float:
    """The CPU model's tokens/s for the finance recipe's CPU run (0.5586 GFLOP a token, 1024 a
    micro-batch, the embedded model, labelled fraction 0.454) at calibrated matmul rates."""
    from toolkit.estimate.catalog import lookup

    m = lookup("embedded")
    f = T.train_flops_per_token(m, method="lora", seq_len=512, lora_r=16, targets=ALL_LINEAR,
                                labelled_fraction=0.454)
    assert f.total == pytest.approx(0.5586e9, rel=1e-3)
    return T.train_tokens_per_s(f.total, rate, T.train_efficiency("cpu", dtype), T.cpu_elementwise_bytes_per_token(m, malloc),
                                40e9, T.cpu_step_seconds(m), 1024, unpacked_flops_per_token=f.unpacked,
                                unpacked_device_flops=torch_rate)


@pytest.mark.parametrize("dtype,measured,rate,torch_rate,malloc", FIT_RUNS)
def test_cpu_model_reproduces_the_runs_it_was_fitted_to(dtype, measured, rate, torch_rate, malloc):
    assert _finance_cpu_tokens_per_s(dtype, rate, torch_rate, malloc) == pytest.approx(
        measured, rel=0.02 if malloc == "glibc" else 0.06)


def test_a_cpu_steps_fixed_cost_follows_the_calibrations_host_probe():
    """Where the calibration probed this CPU's host work (`probes.host_layer_seconds`), a micro-batch's
    fixed cost is CPU_STEP_OVER_PROBE x that a layer; unmeasured, the Zen 5's constant. Against the Zen 4's
    `make bench` time (2026-12-07, bf16 under tcmalloc, 430.0 GFLOP/s packed and 400.0 torch's, the probe
    0.192 ms a layer): the finance recipe's 1,024-token steps ran 495.7 tok/s and "seq 256"'s 512-token
    ones 417.9, where the constant priced +5.6% / +23.0%."""
    from toolkit.estimate.catalog import lookup

    m = lookup("embedded")
    assert T.cpu_step_seconds(m, 0.000192) == pytest.approx(30 * T.CPU_STEP_OVER_PROBE * 0.000192)
    assert T.cpu_step_seconds(m, 0.000192) == pytest.approx(0.224, rel=0.01)  # the Zen 4's fitted intercept
    assert T.cpu_step_seconds(m) == pytest.approx(30 * T.CPU_STEP_SECONDS_PER_LAYER)
    with pytest.raises(ValueError, match="host_layer_s"):
        T.cpu_step_seconds(m, -1e-4)

    def priced(seq, host):
        f = T.train_flops_per_token(m, method="lora", seq_len=seq, lora_r=16, targets=ALL_LINEAR,
                                    labelled_fraction=0.454)
        return T.train_tokens_per_s(f.total, 430.0e9, T.train_efficiency("cpu", "bfloat16"),
                                    T.cpu_elementwise_bytes_per_token(m, "tcmalloc"), 40e9,
                                    T.cpu_step_seconds(m, host), 2 * seq, unpacked_flops_per_token=f.unpacked,
                                    unpacked_device_flops=400.0e9)

    for seq, measured, within in ((512, 495.7, 0.02), (256, 417.9, 0.12)):
        probed, constant = priced(seq, 0.000192) / measured - 1, priced(seq, 0.0) / measured - 1
        assert abs(probed) < within and abs(probed) < abs(constant), seq
    # Through the planner: the probe reaches the plan's tokens/s
    from toolkit.estimate.planner import estimate
    from toolkit.estimate.timeplan import Rates, time_fields

    est = estimate(m, "lora", "bf16", 256, 2, 16, False, ALL_LINEAR, device="cpu")

    def planned(host):
        rates = Rates("cpu", 430.0e9, 20e9, "t", "bfloat16", 400.0e9, "tcmalloc", host)
        return time_fields(m, est, rates, targets=ALL_LINEAR, labelled_fraction=0.454)["train_tokens_per_s"]

    assert planned(0.000192) == pytest.approx(priced(256, 0.000192), rel=1e-3)
    assert planned(0.0) == pytest.approx(priced(256, 0.0), rel=1e-3)


def test_time_fields_price_the_allocator_training_runs_under():
    """tcmalloc's fewer passes make the same run faster; Rates default to glibc's."""
    from toolkit.estimate.catalog import lookup
    from toolkit.estimate.planner import estimate
    from toolkit.estimate.timeplan import Rates, time_fields

    m = lookup("embedded")
    est = estimate(m, "lora", "fp32", 512, 2, 16, False, ALL_LINEAR, device="cpu")
    glibc = time_fields(m, est, Rates("cpu", 500e9, 20e9, "t"), targets=ALL_LINEAR)["train_tokens_per_s"]
    assert glibc == time_fields(m, est, Rates("cpu", 500e9, 20e9, "t", malloc="glibc"),
                                targets=ALL_LINEAR)["train_tokens_per_s"]
    tc = time_fields(m, est, Rates("cpu", 500e9, 20e9, "t", malloc="tcmalloc"), targets=ALL_LINEAR)["train_tokens_per_s"]
    assert tc > glibc
    assert T.CPU_ELEMENTWISE_PASSES["tcmalloc"] < T.CPU_ELEMENTWISE_PASSES["glibc"]


def test_a_cpu_lora_dropout_is_priced_per_adapted_input_element():
    """The fused layers draw a mask over every adapted linear's input: the finance CPU profile's
    149,760 elements a token, 0.495 ms a token in both dtypes on the Zen 4 (timing.py says how)."""
    from toolkit.estimate.catalog import lookup
    from toolkit.estimate.planner import estimate
    from toolkit.estimate.timeplan import Rates, time_fields

    m = lookup("embedded")
    assert T.cpu_dropout_bytes_per_token(m, ALL_LINEAR) == T.CPU_DROPOUT_PASSES * 4 * 30 * 4992
    assert T.cpu_dropout_bytes_per_token(m, ("q_proj", "v_proj")) == T.CPU_DROPOUT_PASSES * 4 * 30 * 2 * 576
    seconds = T.cpu_dropout_bytes_per_token(m, ALL_LINEAR) / T.CPU_ELEMENTWISE_BYTES_PER_S
    assert seconds == pytest.approx(0.495e-3, rel=0.05)

    def tps(device, task="lora", dropout=0.05):
        est = estimate(m, task, "bf16", 512, 2, 16, False, ALL_LINEAR, device=device)
        rates = Rates(device, 430.0e9, 20e9, "t", "bfloat16", 400.0e9, "tcmalloc", 0.0002)
        return time_fields(m, est, rates, targets=ALL_LINEAR, lora_dropout=dropout)["train_tokens_per_s"]

    assert 1 / tps("cpu") - 1 / tps("cpu", dropout=0.0) == pytest.approx(seconds, rel=0.01)
    # CUDA keeps PEFT's layers (not priced here); a full fine-tune has no adapter to drop into
    assert tps("cuda") == tps("cuda", dropout=0.0) and tps("cpu", "full") == tps("cpu", "full", 0.0)


def test_the_products_no_frozen_weight_is_in_are_counted_apart():
    """Attention's matmuls and the adapters (forward, both gradients, the recompute) can't use a frozen
    weight's oneDNN pack; a full fine-tune has no frozen weight at all."""
    from toolkit.estimate.catalog import lookup

    m = lookup("embedded")
    f = T.forward_flops_per_token(m, 512, lora_r=16, targets=ALL_LINEAR)
    lora = T.train_flops_per_token(m, method="lora", seq_len=512, lora_r=16, targets=ALL_LINEAR)
    assert lora.unpacked == pytest.approx(3 * (f["attention"] + f["adapters"]))
    ckpt = T.train_flops_per_token(m, method="lora", seq_len=512, lora_r=16, targets=ALL_LINEAR, grad_ckpt=True)
    assert ckpt.unpacked == pytest.approx(4 * (f["attention"] + f["adapters"]))
    full = T.train_flops_per_token(m, method="full", seq_len=512)
    assert full.unpacked == full.total
    # priced at their own rate: 1e9 FLOPs, a quarter of them at half the rate, take 1.25x as long
    assert T.train_tokens_per_s(1e9, 100e9, 1.0, unpacked_flops_per_token=0.25e9,
                                unpacked_device_flops=50e9) == pytest.approx(100 / 1.25)
    assert T.prefill_seconds(10, 1e9, 100e9, 1.0, unpacked_flops_per_token=0.25e9,
                             unpacked_device_flops=50e9) == pytest.approx(0.125)
    with pytest.raises(ValueError):
        T.train_tokens_per_s(1e9, 100e9, 1.0, unpacked_flops_per_token=2e9, unpacked_device_flops=50e9)


def test_efficiency_follows_the_compute_dtype():
    # Each dtype's GEMMs reach their own share of the calibrated rate inside a step (bench_step).
    assert T.train_efficiency("cpu", "float32") == T.TRAIN_EFFICIENCY["cpu"]
    assert T.train_efficiency("cpu", "bfloat16") == T.TRAIN_EFFICIENCY["cpu bfloat16"] != T.TRAIN_EFFICIENCY["cpu"]
    assert T.train_efficiency("cuda", "bfloat16") == T.train_efficiency("cuda", "float16") == T.TRAIN_EFFICIENCY["cuda"]


def test_time_fields_use_the_rates_dtype():
    from toolkit.estimate.catalog import lookup
    from toolkit.estimate.planner import estimate
    from toolkit.estimate.timeplan import Rates, time_fields

    m = lookup("embedded")
    est = estimate(m, "lora", "fp32", 512, 2, 16, False, ALL_LINEAR, device="cpu")
    f32 = time_fields(m, est, Rates("cpu", 100e9, 20e9, "t"), targets=ALL_LINEAR)["train_tokens_per_s"]
    b16 = time_fields(m, est, Rates("cpu", 100e9, 20e9, "t", "bfloat16"), targets=ALL_LINEAR)["train_tokens_per_s"]
    flops = T.train_flops_per_token(m, method="lora", seq_len=512, lora_r=16, targets=ALL_LINEAR).total
    # By hand: FLOPs at the rate x efficiency, plus 51 passes over 30 x (576 + 1536) elements of 4 bytes
    # in either dtype at 40 GB/s (a fixed rate: not the rates' bandwidth), plus 30 x 3.85 ms per
    # micro-batch of 2 x 512.
    for got, eff in ((f32, 0.866), (b16, 0.865)):
        seconds = flops / (100e9 * eff) + 51 * 30 * (576 + 1536) * 4 / 40e9 + 30 * 0.00385 / 1024
        assert got == pytest.approx(1 / seconds, rel=1e-3)
    # QLoRA's 4-bit layers are not pre-packed: they train at torch's own matmul rate.
    qlora = estimate(m, "qlora", "nf4-dq", 512, 2, 16, False, ALL_LINEAR, device="cpu")
    packed = Rates("cpu", 200e9, 20e9, "t", "float32", unpacked_flops=100e9)
    assert (time_fields(m, qlora, packed, targets=ALL_LINEAR)["train_tokens_per_s"]
            == time_fields(m, qlora, Rates("cpu", 100e9, 20e9, "t"), targets=ALL_LINEAR)["train_tokens_per_s"])
    # LoRA's frozen layers run pre-packed; attention's matmuls and the adapters at torch's rate.
    assert (time_fields(m, est, Rates("cpu", 200e9, 20e9, "t"), targets=ALL_LINEAR)["train_tokens_per_s"]
            > time_fields(m, est, packed, targets=ALL_LINEAR)["train_tokens_per_s"]
            > time_fields(m, est, Rates("cpu", 100e9, 20e9, "t"), targets=ALL_LINEAR)["train_tokens_per_s"])


@pytest.mark.parametrize("text,secs", [("90s", 90), ("30m", 1800), ("1.5h", 5400), ("2h30m", 9000), ("45", 45)])
def test_parse_duration(text, secs):
    assert parse_duration(text) == secs


@pytest.mark.parametrize("text", ["soon", "0", "-5m", "", "0m", "5x"])
def test_parse_duration_rejects(text):
    with pytest.raises(UserError, match="--time-budget"):
        parse_duration(text)


def test_fmt_duration():
    assert fmt_duration(40) == "~40 s" and fmt_duration(600) == "~10 min" and fmt_duration(3 * 3600) == "~3.0 h"


def test_gpu_catalog_resolves_names():
    from toolkit.estimate.budget import GPUS
    from toolkit.estimate.gpus import SPECS, spec

    assert set(SPECS) <= set(GPUS)
    assert spec("rtx 4060 8gb").name == "RTX 4060 8GB" and spec("H100").tflops == 989.0
    assert spec("RTX 2060 6GB") is None  # memory known, rates not
    with pytest.raises(UserError, match="--gpu"):
        spec("Voodoo 5")


def test_pick_respects_time_budget_and_names_both_limits():
    def secs(m, e):  # time proportional to the parameter count: 1 s per million
        return m.param_count() / 1e6

    p = pick("qlora", 64 * 1024**3, 512, 1, 16, "cuda", seconds_of=secs, time_budget_s=450)
    assert p.fits and p.model == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert "would take" in p.reason and "Qwen2.5-0.5B" in p.reason
    free = pick("qlora", 64 * 1024**3, 512, 1, 16, "cuda", seconds_of=secs, time_budget_s=None)
    assert free.model == "meta-llama/Llama-3.1-8B-Instruct"
    none = pick("qlora", 64 * 1024**3, 512, 1, 16, "cuda", seconds_of=secs, time_budget_s=10)
    assert not none.fits and "would take" in none.reason


def test_gpu_step_takes_the_longer_of_host_and_device_time():
    # device-bound: 1e9 FLOP a token at 50 GFLOP/s effective = 20 s per 1000 tokens, over a 0.4-s host floor
    assert T.train_tokens_per_s(1e9, 100e9, 0.5, tokens_per_step=1000, host_step_s=0.4) == pytest.approx(50)
    # host-bound: 0.02 s of GPU work under a 0.4-s host step
    assert T.train_tokens_per_s(1e6, 100e9, 0.5, tokens_per_step=1000, host_step_s=0.4) == pytest.approx(2500)
    with pytest.raises(ValueError):
        T.train_tokens_per_s(1e6, 100e9, 0.5, host_step_s=0.4)


def test_cuda_host_time_scales_with_layers_and_is_longer_for_qlora():
    from toolkit.estimate.catalog import CATALOG

    m = CATALOG["meta-llama/Llama-3.2-1B-Instruct"]
    assert T.cuda_step_seconds(m, "qlora") == pytest.approx(0.336)
    assert T.cuda_step_seconds(m, "lora") == pytest.approx(0.288) == T.cuda_step_seconds(m, "full")


def test_wall_adds_the_processs_startup_to_training_evals_and_report():
    """A run's predicted wall is its training steps, the evals and report, and the process's start-up
    and loading: STARTUP_SECONDS for the device (imports, loading, set-up; measured) plus the
    weights' read, which grows with the model."""
    from toolkit.estimate.catalog import CATALOG
    from toolkit.estimate.planner import estimate
    from toolkit.estimate.timeplan import Rates, time_fields
    from toolkit.finetune.plan import RunShape

    m = CATALOG["meta-llama/Llama-3.2-1B-Instruct"]
    est = estimate(m, "qlora", seq_len=512, batch=8, lora_r=16)
    run = RunShape(steps=40, tokens_per_step=4096, eval_rounds=2, eval_tokens=5000, report_prompt_tokens=2000,
                   report_tokens=8000, report_decode_steps=96)
    for rates in (Rates("cuda", 750e12, 4.8e12, "test", "bfloat16"), Rates("cpu", 1e12, 20e9, "test", "bfloat16")):
        t = time_fields(m, est, rates, targets=("q_proj",), run=run)
        training = run.steps * run.tokens_per_step / t["train_tokens_per_s"]
        assert t["startup_s"] == pytest.approx(T.STARTUP_SECONDS[rates.device]
                                               + 4 * est.components["weights"] / rates.bandwidth_bytes_per_s, abs=0.05)
        assert t["train_wall_s"] == pytest.approx(training + t["evals_and_report_s"] + t["startup_s"], abs=0.2)
    assert T.STARTUP_SECONDS["cuda"] > T.STARTUP_SECONDS["cpu"] > 0  # CUDA's start and bitsandbytes on top


def test_held_out_loss_projects_labelled_positions_and_prompts_only_their_last():
    """The evals' and the report's loss project only labelled positions onto the vocabulary, as
    training does (TRL's LM head; `scoring.answer_loss`); an answer's prompt projects only its last
    (transformers' generate), so a prompt token costs its forward less the LM head."""
    from toolkit.estimate.catalog import lookup
    from toolkit.estimate.planner import estimate
    from toolkit.estimate.timeplan import Rates, time_fields
    from toolkit.finetune.plan import RunShape

    m = lookup("embedded")
    est = estimate(m, "lora", "fp32", 512, 2, 16, False, ALL_LINEAR, device="cpu")
    rates = Rates("cpu", 100e9, 20e9, "t")
    empty = RunShape(steps=1, tokens_per_step=1024, eval_rounds=0, eval_tokens=0, report_prompt_tokens=0)

    def evals_s(lf, **work):
        return time_fields(m, est, rates, targets=ALL_LINEAR, labelled_fraction=lf,
                           run=dataclasses.replace(empty, **work))["evals_and_report_s"]

    f = T.forward_flops_per_token(m, 512)
    rest = 51 * 30 * (576 + 1536) * 4 / 40e9 / 3  # a forward's share of the elementwise passes
    by_hand = 10_000 * ((sum(f.values()) - 0.5 * f["lm_head"]) / (100e9 * 0.866) + rest)
    assert evals_s(0.5, report_tokens=6_000, eval_rounds=2, eval_tokens=2_000) == pytest.approx(by_hand, abs=0.05)
    assert evals_s(0.5, report_tokens=10_000) < evals_s(1.0, report_tokens=10_000)
    prompts = 10_000 * ((sum(f.values()) - f["lm_head"]) / (100e9 * 0.866) + rest)
    assert evals_s(0.5, report_prompt_tokens=10_000) == evals_s(1.0, report_prompt_tokens=10_000) \
        == pytest.approx(prompts, abs=0.05)
    # The report's general-text perplexity scores every position of its text, whatever the labels.
    text = 10_000 * (sum(f.values()) / (100e9 * 0.866) + rest)
    assert evals_s(0.5, report_text_tokens=10_000) == evals_s(1.0, report_text_tokens=10_000) \
        == pytest.approx(text, abs=0.05)


def test_report_time_counts_batched_decoding_steps():
    """The report's answers cost steps (16 prompts a batch a side). On a GPU each is a host step, half
    of them QLoRA's base side (adapter off) and half its fine-tuned side (unmerged). On a CPU both
    sides run in one generation (32 rows a step), each step its measured per-layer host work plus the
    longer of its rows' matmuls and a read of the weights; after a full fine-tune the sides run apart
    (16 rows a step), and a smaller batch of prompts makes smaller steps."""
    from toolkit.estimate.catalog import CATALOG
    from toolkit.estimate.planner import estimate
    from toolkit.estimate.timeplan import Rates, time_fields
    from toolkit.finetune.plan import RunShape

    m = CATALOG["meta-llama/Llama-3.2-1B-Instruct"]
    est = estimate(m, "qlora", seq_len=512, batch=8, lora_r=16)
    run = RunShape(steps=1, tokens_per_step=4096, eval_rounds=0, eval_tokens=0, report_prompt_tokens=0,
                   report_tokens=0, report_decode_steps=384)
    gpu = Rates("cuda", 750e12, 4.8e12, "test", "bfloat16")
    cpu = Rates("cpu", 1e12, 20e9, "test", "bfloat16")
    no_report = dataclasses.replace(run, report_decode_steps=0)

    def report_s(rates, est=est):
        return (time_fields(m, est, rates, targets=("q_proj",), run=run)["train_wall_s"]
                - time_fields(m, est, rates, targets=("q_proj",), run=no_report)["train_wall_s"])

    sides = T.cuda_decode_step_seconds(m, "answers 4-bit base") + T.cuda_decode_step_seconds(m, "answers 4-bit")
    assert report_s(gpu) == pytest.approx(192 * sides, abs=0.1)
    assert T.cuda_decode_step_seconds(m, "answers 4-bit base") < T.cuda_decode_step_seconds(m, "answers 4-bit")
    # By hand: a row's forward at the bf16 efficiency, and a forward's third of the elementwise passes
    # (glibc's count) at 40 GB/s.
    f = T.forward_flops_per_token(m, 512)
    row = sum(f.values()) / (1e12 * 0.865) + 51 * 16 * (2048 + 8192) * 4 / 40e9 / 3
    host = T.cpu_answers_step_seconds(m)
    assert host == pytest.approx(16 * 0.0017)
    assert 32 * row > est.components["weights"] / 20e9  # 32 rows of Llama-3.2-1B: the matmuls, not the read
    assert report_s(cpu) == pytest.approx(192 * (host + 32 * row), abs=0.1)
    full = estimate(m, "full", seq_len=512, batch=8)
    assert report_s(cpu, full) == pytest.approx(384 * (host + max(16 * row, full.components["weights"] / 20e9)),
                                                abs=0.1)
    slow_read = Rates("cpu", 1e12, 1e9, "test", "bfloat16")
    assert report_s(slow_read) == pytest.approx(192 * (host + est.components["weights"] / 1e9), abs=0.1)
    few = dataclasses.replace(run, report_answer_rows=4.0)
    few_s = (time_fields(m, est, cpu, targets=("q_proj",), run=few)["train_wall_s"]
             - time_fields(m, est, cpu, targets=("q_proj",), run=no_report)["train_wall_s"])
    assert few_s == pytest.approx(192 * (host + max(8 * row, est.components["weights"] / 20e9)), abs=0.1)
    slow_cpu = Rates("cpu", 1e11, 20e9, "test", "bfloat16")  # a tenth of the rate: the matmuls grow tenfold
    assert report_s(slow_cpu) > 5 * report_s(cpu)
    loop = time_fields(m, est, gpu, targets=("q_proj",))["decode_tokens_per_s"]
    assert loop == pytest.approx(1 / T.cuda_decode_step_seconds(m, "loop"), rel=1e-3)


def test_every_gpu_has_a_compute_capability_and_the_dtype_follows_it():
    """The dtype an estimate computes in for a named GPU is `capability.choose_dtype`'s (the one
    decision the trainer makes): fp32 on Pascal's consumer cards, fp16 before Ampere, bf16 after."""
    from toolkit.estimate.budget import GPUS
    from toolkit.estimate.gpus import capability, compute_capability
    from toolkit.estimate.timeplan import VRAM_ONLY_DTYPE, device_dtype

    for name in GPUS:
        assert compute_capability(name)  # KeyError names a GPU the table lacks
    want = {"GTX 1060 6GB": "float32", "GTX 1080 Ti": "float32", "P100": "float16", "V100 32GB": "float16",
            "GTX 1660 6GB": "float16", "T4": "float16", "RTX 3060 12GB": "bfloat16", "RTX 5090": "bfloat16",
            "A100 80GB": "bfloat16"}
    for name, dtype in want.items():
        assert device_dtype(name, None)[0] == dtype, name
        assert device_dtype(name, None, "infer")[0] == dtype, name
    assert capability("gtx 1080 ti").compute_capability == (6, 1)
    assert "fp16 at a small fraction" in device_dtype("GTX 1070", None)[1]
    assert device_dtype(None, "8GB") == VRAM_ONLY_DTYPE


def test_this_machines_dtype_asks_the_hardware_once(monkeypatch):
    """On a GPU host every `hardware.detect()` starts nvidia-smi: the estimate's dtype asks once."""
    from toolkit.core import hardware
    from toolkit.estimate import timeplan

    calls = []
    real = hardware.detect
    monkeypatch.setattr(hardware, "detect", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert timeplan.device_dtype(None, None) == hardware.auto_dtype(timeplan.host_capability(real()), "train")
    assert len(calls) == 1


def test_named_gpu_rates_follow_the_compute_dtype():
    from toolkit.estimate.gpus import SPECS
    from toolkit.estimate.timeplan import rates_for_gpu

    assert all(0 < s.fp32_tflops for s in SPECS.values())
    r = rates_for_gpu("GTX 1080 Ti", "float32")
    assert r.flops == 11.3e12 and r.dtype == "float32" and "11.3 TFLOPS fp32" in r.source
    assert rates_for_gpu("GTX 1080 Ti", "float16").flops == pytest.approx(11.3e12 / 64)
    assert rates_for_gpu("T4", "float16").flops == 65e12 and rates_for_gpu("T4", "float32").flops == 8.1e12
    assert rates_for_gpu("RTX 2060 6GB", "float16") is None  # memory known, rates not
