"""The estimate against this project's own CUDA measurements: `make gpu-check` on the H200 machines
lent on 2026-12-04 (benchmarks/gpu-results.json: Llama-3.2-1B with random weights trained by the
toolkit's own path, torch.cuda.max_memory_allocated and median step times). "memory" is the trainer's
path on sm80+ (the varlen attention kernel, 16:47 UTC); "memory_masked" the block-diagonal mask a
pre-Ampere GPU gets (11:22 UTC). The QLoRA rows' activations were re-modelled after the varlen rows
(PEFT's 4-bit layers under CUDA autocast, benchmarks/cuda_autocast_peak.py); the host-time constants
of the time model were fitted to the varlen runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit.estimate import formulas as F
from toolkit.estimate import timing as T
from toolkit.estimate.catalog import CATALOG
from toolkit.estimate.planner import estimate

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu-results.json"
H200_BF16_FLOPS = 747.6e12  # that machine's calibration (toolkit estimate --calibrate), bf16 matmul
MODEL = "meta-llama/Llama-3.2-1B-Instruct"


MEMORY_SETS = ("memory", "memory_masked")


def _memory_rows(sets=MEMORY_SETS):
    data = json.loads(RESULTS.read_text())
    return [dict(r, set=key) for key in sets for r in data[key]]


def _plan(row):
    from toolkit.finetune import recipe as recipe_mod
    from toolkit.finetune.plan import plan_inputs
    from benchmarks.gpu_check import RECIPE, memory_overrides

    rec = recipe_mod.load(RECIPE, memory_overrides(row["method"], row["seq_len"], "unused", row["batch"]), gpu=True)
    return plan_inputs(rec, "cuda", "bfloat16").as_kwargs()


def test_results_cover_both_methods_at_the_recipes_batch():
    rows = _memory_rows()
    assert {(r["method"], r["seq_len"], r["batch"]) for r in rows} >= {("qlora", 512, 8), ("lora", 512, 8),
                                                                      ("qlora", 2048, 1), ("lora", 2048, 1)}
    assert all("error" not in r for r in rows)


def _row_id(r):
    return f"{r['set']}-{r['method']}-{r['seq_len']}x{r['batch']}"


@pytest.mark.parametrize("row", _memory_rows(), ids=_row_id)
def test_training_peak_within_5_percent_of_measured(row):
    est = estimate(CATALOG[MODEL], **_plan(row))
    measured = row["measured_max_allocated_bytes"]
    assert est.allocated_bytes == pytest.approx(measured, rel=0.05)
    # transformers' own loss (fp32 logits for every token) is not what SFTTrainer runs: 1.3-4.2x high here
    full = estimate(CATALOG[MODEL], **_plan(row), loss="transformers")
    assert full.allocated_bytes > 1.25 * measured


@pytest.mark.parametrize("row", _memory_rows(("memory",)), ids=_row_id)
def test_step_time_model_matches_measured_medians(row):
    """Host-bound steps on the trainer's sm80+ path, within 20%: the spread of the nine QLoRA medians
    measured there (0.285-0.387 s) is +-15% about their middle."""
    assert "varlen" in row["attention"]
    m = CATALOG[MODEL]
    kw = _plan(row)
    f = T.train_flops_per_token(m, method=row["method"], seq_len=row["seq_len"], lora_r=kw["lora_r"],
                                targets=kw["targets"], grad_ckpt=kw["grad_ckpt"])
    tokens = row["tokens_per_step_median"]
    tps = T.train_tokens_per_s(f.total, H200_BF16_FLOPS, T.train_efficiency("cuda", "bfloat16"),
                               tokens_per_step=tokens, host_step_s=T.cuda_step_seconds(m, row["method"]))
    assert tokens / tps == pytest.approx(row["step_s_median"], rel=0.20)


def _results(part):
    return json.loads(RESULTS.read_text())[part]


@pytest.mark.parametrize("row", [r for r in _results("compute") if r["batch"] == 16],
                         ids=lambda r: f"{r['method']}-{r['seq_len']}x{r['batch']}")
def test_compute_bound_steps_match_the_cuda_share(row):
    """TRAIN_EFFICIENCY["cuda"] against the compute-bound runs it was fitted to (2048 x 16 packed
    tokens, varlen attention): the time model's tokens/s within 10% of the measured steps'."""
    m = CATALOG[MODEL]
    tokens = row["tokens_per_step_median"]
    tps = T.train_tokens_per_s(row["gflop_per_token"] * 1e9, row["matmul_tflops"] * 1e12,
                               T.train_efficiency("cuda", "bfloat16"), tokens_per_step=tokens,
                               host_step_s=T.cuda_step_seconds(m, row["method"]))
    assert tokens / tps > T.cuda_step_seconds(m, row["method"])  # compute-bound: the share decides
    assert tps == pytest.approx(row["tokens_per_s_after_first"], rel=0.10)
    assert "varlen" in row["attention"]


def test_cuda_decode_constants_are_the_measured_steps():
    m = CATALOG[MODEL]
    rows = {r["model"]: {x["decoder"]: x for x in r["runs"]} for r in _results("decode")}
    bf16 = rows["bf16"]
    for decoder, run in (("loop", bf16["toolkit loop (toolkit generate)"]),
                         ("answers", bf16["transformers generate, batch 16"])):
        assert T.cuda_decode_step_seconds(m, decoder) == pytest.approx(run["step_ms"] / 1e3, rel=0.02), decoder
    # The QLoRA report's own call: each side's calls after the first (which paid cuDNN's plans).
    report = json.loads(RESULTS.read_text())["report_answers"]["runs"]
    for decoder, side in (("answers 4-bit base", "base"), ("answers 4-bit", "adapter")):
        warm = [r["ms_per_step"] for r in report if r.get("side") == side][1 if side == "base" else 0:]
        assert T.cuda_decode_step_seconds(m, decoder) == pytest.approx(sum(warm) / len(warm) / 1e3, rel=0.02), decoder


def test_cuda_startup_is_the_measured_runs_time_outside_training_and_report():
    """STARTUP_SECONDS["cuda"]: the median over the recorded end-to-end runs of the process's wall
    minus training and the report (imports, CUDA's start, loading and quantizing, set-up, saving)."""
    import statistics

    rows = _results("e2e")
    outside = [r["process_wall_s"] - r["train_runtime_s"] - r["report_s"] for r in rows]
    assert len(outside) >= 3
    assert T.STARTUP_SECONDS["cuda"] == pytest.approx(statistics.median(outside), abs=0.05)


def test_varlen_attention_trains_like_the_masked_row():
    """The kernel check and the A/B of benchmarks/gpu_attention_ab: varlen's outputs and gradients
    as close to fp64 as the masked SDPA's; the same losses step by step (bf16 rounding apart)."""
    runs = {r["variant"]: r for r in _results("attention_varlen")["runs"]}
    check = runs["kernel check"]
    for part, diff in check["varlen_max_abs_diff"].items():
        assert diff <= 1.05 * check["masked_max_abs_diff"][part] + 1e-3, part
    a, b = runs["masked"]["losses"], runs["varlen"]["losses"]
    assert len(a) == len(b) == 10 and max(abs(x - y) for x, y in zip(a, b)) < 5e-3
    assert "varlen" in runs["varlen"]["attention"] and "mask" in runs["masked"]["attention"]


def test_trl_tile_sizes_are_upstreams():
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
    from trl.trainer import utils as trl_utils

    from toolkit.finetune import cpu_lm_head

    assert F.TRL_TOKEN_TILE == TOKEN_CHUNK_SIZE
    # private upstream constant: this fails when TRL renames or resizes it
    assert F.TRL_VOCAB_TILE == trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE
    assert F.CPU_LEAN_HEAD_MAX_BYTES == cpu_lm_head.MAX_LOGITS_BYTES


def test_fused_head_spike_is_one_tile_plus_hidden_gradients():
    # 4096 tokens of Llama-3.2 (vocab 128256, hidden 2048), bf16: one 4096 x 32768 bf16 tile + 8 B x hidden a token
    assert F.trl_fused_logits_bytes(4096, 128256, 2048) == 4096 * 32768 * 2 + 4096 * 2048 * 8
    assert F.trl_fused_logits_bytes(100, 1000, 64) == 100 * 1000 * 2 + 100 * 64 * 8
    assert F.trl_fused_logits_bytes(4096, 128256, 2048) < F.logits_bytes(4096, 128256) / 20
    # the CPU head materializes fp32 logits (+ the bf16 matmul buffer) while they fit, then TRL's tiles
    assert F.cpu_lean_logits_bytes(1024, 49152, 576) == 1024 * 49152 * 6 + 1024 * 576 * 2
    assert F.cpu_lean_logits_bytes(1024, 49152, 576, act_bytes=4) == 1024 * 49152 * 4 + 1024 * 576 * 4
    assert F.cpu_lean_logits_bytes(8192, 49152, 576) == F.trl_fused_logits_bytes(8192, 49152, 576)


def test_estimate_rejects_an_unknown_loss():
    from toolkit.core.errors import UserError

    with pytest.raises(UserError, match="loss must be one of trl, transformers"):
        estimate(CATALOG[MODEL], "qlora", loss="liger")
