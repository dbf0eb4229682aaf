"""Estimator formulas against independent references: bitsandbytes' own quantizer, llama.cpp's
quantizer and its buffer report, the tensors autograd actually saves, and published peaks."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from toolkit.estimate import formulas as F
from toolkit.estimate.catalog import CATALOG, lookup
from toolkit.core.errors import UserError
from toolkit.estimate.pick import pick
from toolkit.estimate.planner import ALL_LINEAR, SAFETY_MARGIN, estimate, weights_bytes

DATA = Path(__file__).resolve().parents[1] / "data" / "estimate"
MIB, GIB = 1024**2, 1024**3


# ------------------------------------------------------------------ weights


@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576), (2048, 512), (100, 70)])
def test_bnb_weight_bytes_match_bitsandbytes(shape):
    import torch
    from bitsandbytes import functional as bf

    fin, fout = shape
    w = torch.randn(fout, fin, dtype=torch.bfloat16)
    for dq in (False, True):
        packed, state = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
        got = packed.nbytes + state.absmax.nbytes + (state.state2.absmax.nbytes if state.nested else 0)
        assert F.bnb_4bit_bytes(fin * fout, dq) == got
    cb, scb, _ = bf.int8_vectorwise_quant(w.to(torch.float16))
    assert F.bnb_int8_bytes(fin, fout) == cb.nbytes + scb.nbytes


def test_ggml_block_table_matches_gguf_py():
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    for name, (block, size) in F.GGML_TYPES.items():
        assert GGML_QUANT_SIZES[GGMLQuantizationType[name]] == (block, size), name


def test_gguf_weights_of_the_embedded_file_are_exact():
    from toolkit.core.models import embedded_gguf_path

    # from shapes alone (llama.cpp's type rules) and from the file's tensor table
    assert weights_bytes(CATALOG["embedded"], "q4_1") == embedded_gguf_path().stat().st_size - _gguf_overhead()
    assert weights_bytes(CATALOG["embedded"], "q4_1") == lookup(str(embedded_gguf_path())).gguf.tensor_bytes


def _gguf_overhead() -> int:
    """Header + alignment bytes of the embedded file (everything that is not tensor data)."""
    from toolkit.estimate.gguf_header import read_header
    from toolkit.core.models import embedded_gguf_path

    hdr = read_header(embedded_gguf_path())
    return embedded_gguf_path().stat().st_size - hdr.tensor_bytes


@pytest.mark.parametrize("quant", ["q4_k_m", "q6_k"])
def test_gguf_weight_formula_matches_llama_cpp_quantizer(quant, embedded_f16_gguf, tmp_path):
    """llama.cpp quantizes the f16 export; its tensor bytes must equal our type rules' sum
    (SmolLM2's 576-wide rows exercise the k-quant fallbacks, 1536-wide down_proj does not)."""
    from toolkit.export.convert import quantize_gguf

    out = quantize_gguf(embedded_f16_gguf, tmp_path / f"{quant}.gguf", quant)
    assert lookup(str(out)).gguf.tensor_bytes == weights_bytes(CATALOG["embedded"], quant)
    assert lookup(str(embedded_f16_gguf)).gguf.tensor_bytes == weights_bytes(CATALOG["embedded"], "f16")


# ------------------------------------------------------------------ llama.cpp buffers


@pytest.fixture(scope="module")
def llamacpp_measured():
    from toolkit.estimate.llamacpp_report import measure
    from toolkit.core.models import embedded_gguf_path

    return {n: measure(embedded_gguf_path(), n)[0] for n in (512, 4096, 8192)}


@pytest.mark.parametrize("n_ctx", [512, 4096, 8192])
def test_llamacpp_buffers_within_5_percent(llamacpp_measured, n_ctx):
    from toolkit.core.models import embedded_gguf_path

    measured = llamacpp_measured[n_ctx]
    assert {"weights", "kv_cache", "compute_buffer"} <= set(measured), measured
    for facts in (lookup(str(embedded_gguf_path())), CATALOG["embedded"]):
        est = estimate(facts, "inference", "q4_1", seq_len=n_ctx, device="cpu")
        assert est.backend == "llama.cpp"
        for key in ("weights", "kv_cache", "compute_buffer"):
            ours = est.components[key] / MIB
            assert ours == pytest.approx(measured[key], rel=0.05), (key, ours, measured[key])


def test_buffer_log_parser():
    from toolkit.estimate.llamacpp_report import parse_buffer_lines

    log = ("load_tensors:   CPU_Mapped model buffer size =    92.10 MiB\n"
           "llama_kv_cache:        CPU KV buffer size =    11.25 MiB\n"
           "sched_reserve:        CPU compute buffer size =    98.25 MiB\n"
           "~llama_context:        CPU compute buffer size is  98.2520 MiB, matches expectation\n")
    assert parse_buffer_lines(log) == {"weights": 92.10, "kv_cache": 11.25, "compute_buffer": 98.25}


# ------------------------------------------------------------------ training activations


def _small_llama(layers, dtype, **cfg):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                                        **cfg)).to(dtype)


def _saved_bytes(model, forward) -> int:
    """Bytes of the storages autograd saves while `forward()` runs `model` in training mode, its parameters
    excluded, each storage once."""
    import torch

    model.train()
    params = {p.data_ptr() for p in model.parameters()}
    storages = {}

    def pack(t):
        if t.data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return sum(storages.values())


def _saved_bytes_per_token_layer(method, targets, dropout, autocast):
    """Bytes autograd saves per token and layer in a real transformers Llama (+ PEFT LoRA):
    the difference between a 4- and a 2-layer model, parameters excluded, storages deduplicated."""
    import torch

    def run(layers):
        model = _small_llama(layers, torch.bfloat16, attn_implementation="sdpa")
        if method == "lora":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=8, target_modules=list(targets), lora_dropout=dropout),
                                   autocast_adapter_dtype=autocast)
        ids = torch.randint(0, 1000, (2, 64))
        return _saved_bytes(model, lambda: model(input_ids=ids, labels=ids))

    return (run(4) - run(2)) / 2 / (2 * 64)


@pytest.mark.parametrize("method,targets,dropout,autocast", [
    ("full", (), 0.0, True),
    ("lora", ALL_LINEAR, 0.0, True),
    ("lora", ("q_proj", "v_proj"), 0.05, True),
    ("lora", ALL_LINEAR, 0.0, False),
])
def test_activation_formula_matches_saved_tensors(method, targets, dropout, autocast):
    h, i, kv = 256, 704, 128
    lin = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
           "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    adapter = 4 if autocast else 2
    # on CPU dropout multiplies by a mask of the input's dtype (CUDA keeps a bool mask)
    ours = F.layer_activation_bytes(h, h, kv, i, method, targets, lin, 8, dropout, act_bytes=2,
                                    adapter_bytes=adapter, mask_bytes=adapter)
    measured = _saved_bytes_per_token_layer(method, targets, dropout, autocast)
    # the only tensor not counted is flash attention's per-head fp32 logsumexp (16 B here)
    assert ours == pytest.approx(measured, rel=0.01)


def _fused_saved_bytes_per_token_layer(dtype, dropout, targets, conversation):
    """Bytes the toolkit's CPU training path saves per token and layer (its fused LoRA layers and
    sibling groups, norms, rotary and bmm packed attention, swapped in as the trainer does) on a real
    transformers Llama: the slope over layers (4 against 2) and tokens (8 against 4 conversations of
    `conversation` tokens, one packed row), so the adapters' per-layer weight casts drop out."""
    import torch
    from peft import LoraConfig, get_peft_model

    from toolkit.finetune import packed_attention
    from toolkit.finetune.fused_lora import fused_on_cpu
    from toolkit.finetune.fused_norm import fused_norms_on_cpu
    from toolkit.finetune.fused_rope import fused_rope_on_cpu

    def run(layers, conversations):
        model = get_peft_model(_small_llama(layers, dtype),
                               LoraConfig(r=8, target_modules=list(targets), lora_dropout=dropout))
        packed_attention.use_on(model, "bmm", "sdpa")
        ids = torch.randint(0, 1000, (1, conversations * conversation))
        positions = torch.arange(conversation).repeat(conversations)[None]

        def forward():
            with (fused_on_cpu(model, "cpu"), fused_norms_on_cpu(model, "cpu"), fused_rope_on_cpu(model, "cpu"),
                  torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)):
                model(input_ids=ids, position_ids=positions, labels=ids)

        return _saved_bytes(model, forward)

    per_layer = {n: (run(4, n) - run(2, n)) / 2 for n in (4, 8)}
    return (per_layer[8] - per_layer[4]) / (4 * conversation)


@pytest.mark.parametrize("dtype,dropout,targets", [
    ("bfloat16", 0.0, ALL_LINEAR),
    ("float32", 0.0, ALL_LINEAR),
    ("bfloat16", 0.05, ALL_LINEAR),
    ("float32", 0.0, ("q_proj", "v_proj", "down_proj")),
])
def test_cpu_fused_activation_formula_matches_what_the_fused_path_saves(dtype, dropout, targets):
    import torch

    from toolkit.core.segment_attention import kept_scores_per_token

    h, i, kv, conversation = 256, 704, 128, 32
    lin = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
           "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}
    act = 2 if dtype == "bfloat16" else 4
    ours = F.cpu_fused_layer_activation_bytes(h, h, kv, i, targets, lin, 8, dropout, act,
                                              kept_scores_per_token(conversation, 4, 64))
    measured = _fused_saved_bytes_per_token_layer(getattr(torch, dtype), dropout, targets, conversation)
    assert ours == pytest.approx(measured, rel=0.01)
    # PEFT's layers keep an fp32 copy of each adapted input (or share the fp32 stream's) and no scores
    peft = F.layer_activation_bytes(h, h, kv, i, "lora", targets, lin, 8, dropout, act, adapter_bytes=4,
                                    mask_bytes=act)
    assert (ours < peft) == (dtype == "bfloat16")


def test_cpu_training_plans_the_fused_path_and_its_runtime():
    """A CPU LoRA / QLoRA plan counts the toolkit's fused layers (not PEFT's), the packed attention's
    scores for the conversations' length, and the CPU trainer's runtime heap by its allocator; CUDA and
    inference don't."""
    from toolkit.core.segment_attention import BMM_MAX_SCORES_PER_QUERY_ELEMENT, kept_scores_per_token

    m = lookup("embedded")
    for compute, act in (("bf16", 2), ("fp32", 4)):
        est = estimate(m, "lora", compute, 512, 2, 16, False, device="cpu", compute=compute, conversation_tokens=120)
        per_layer = F.cpu_fused_layer_activation_bytes(m.hidden, m.q_dim, m.kv_dim, m.intermediate, ALL_LINEAR,
                                                       m.linears(), 16, 0.0, act,
                                                       kept_scores_per_token(120, m.heads, m.head_dim))
        logits, retained = F.cpu_lean_logits_bytes(1024, m.vocab, m.hidden, act), F.cpu_lean_retained_bytes(1024, m.vocab, act)
        if compute == "fp32":  # a head weight not pre-packed streams the vocabulary in fp32
            logits, retained = F.cpu_streamed_logits_bytes(1024, m.vocab, m.hidden, act), 0
        peak = F.training_peak_activation_bytes(per_layer, m.layers, m.hidden, 1024, False, logits, act, 0, 0, retained)
        assert (est.components["activations"], est.components["logits"]) == peak[:2]
        assert est.components["runtime"] == F.CPU_TRAINING_RUNTIME_BYTES["glibc"]  # the default: the larger
        unpacked = estimate(m, "lora", compute, 512, 2, 16, False, device="cpu", compute=compute)
        assert unpacked.components["activations"] < est.components["activations"]
        # data whose lengths are unknown (an hf: dataset): priced at the longest conversation the kernel keeps
        unknown = estimate(m, "lora", compute, 512, 2, 16, False, device="cpu", compute=compute, conversation_tokens=None)
        longest = estimate(m, "lora", compute, 512, 2, 16, False, device="cpu", compute=compute,
                           conversation_tokens=BMM_MAX_SCORES_PER_QUERY_ELEMENT * m.head_dim)
        assert unknown.components["activations"] == longest.components["activations"] > est.components["activations"]
        assert any("not known here" in n for n in unknown.notes)
        assert estimate(m, "lora", compute, 64, 2, 16, False, device="cpu", compute=compute, conversation_tokens=None
                        ).components == estimate(m, "lora", compute, 64, 2, 16, False, device="cpu", compute=compute,
                                                 conversation_tokens=64).components  # rows shorter than that limit
    tc = estimate(m, "lora", "bf16", 512, 2, 16, False, device="cpu", compute="bf16", allocator="tcmalloc")
    assert tc.components["runtime"] == F.CPU_TRAINING_RUNTIME_BYTES["tcmalloc"] < F.CPU_TRAINING_RUNTIME_BYTES["glibc"]
    with pytest.raises(UserError, match="allocator"):
        estimate(m, "lora", "bf16", device="cpu", allocator="jemalloc")
    assert "runtime" not in estimate(m, "lora", "bf16", 512, 2, 16, False, device="cuda").components
    assert "runtime" not in estimate(m, "inference", device="cpu").components


def test_kept_scores_follow_the_kernels_blocks_and_limit():
    from toolkit.core.segment_attention import BMM_MAX_SCORES_PER_QUERY_ELEMENT, kept_scores_per_token

    assert kept_scores_per_token(120, 9, 64) == 9 * 120 * 3 / 4  # two blocks: a quarter of the square skipped
    assert kept_scores_per_token(120, 9, 64, blocks=1) == 9 * 120
    assert kept_scores_per_token(BMM_MAX_SCORES_PER_QUERY_ELEMENT * 64 + 1, 9, 64) == 0  # SDPA's row
    assert kept_scores_per_token(0, 9, 64) == 0  # rows not packed


def test_gradient_checkpointing_and_sizes_move_the_right_way():
    base = estimate("meta-llama/Llama-3.2-1B-Instruct", "qlora", seq_len=1024, grad_ckpt=False)
    ckpt = estimate("meta-llama/Llama-3.2-1B-Instruct", "qlora", seq_len=1024, grad_ckpt=True)
    assert ckpt.components["activations"] < base.components["activations"] / 4
    assert estimate("meta-llama/Llama-3.2-1B-Instruct", "qlora", seq_len=2048).total_bytes > ckpt.total_bytes
    lora = estimate("meta-llama/Llama-3.2-1B-Instruct", "lora")
    qlora = estimate("meta-llama/Llama-3.2-1B-Instruct", "qlora")
    full = estimate("meta-llama/Llama-3.2-1B-Instruct", "full")
    assert qlora.total_bytes < lora.total_bytes < full.total_bytes
    assert full.components["gradients"] == 2 * full.params
    assert full.components["optimizer"] == 4 * full.params  # torch AdamW: two bf16 states
    assert lora.trainable_params == 16 * 16 * sum(a + b for a, b in CATALOG["meta-llama/Llama-3.2-1B-Instruct"].linears().values())
    kv = estimate("meta-llama/Llama-3.1-8B-Instruct", "inference", "bf16", seq_len=8192).components["kv_cache"]
    assert kv == 2 * 32 * 8192 * 8 * 128 * 2  # 1 GiB: GQA caches 8 of 32 heads


# ------------------------------------------------------------------ published peaks


def _measured_rows():
    rows = {r["id"]: r for r in csv.DictReader(open(DATA / "vram_measured.csv"))}
    repro = {k: v for k, v in json.loads((DATA / "reproduction.json").read_text()).items() if not k.startswith("_")}
    return rows, repro


def test_every_published_row_is_classified():
    rows, repro = _measured_rows()
    assert set(rows) == set(repro)
    for rid, info in repro.items():
        assert info["status"] in ("reproduced", "not-reproducible"), rid
        assert info["status"] == "reproduced" or len(info["why"]) > 20, rid


@pytest.mark.parametrize("rid", [k for k, v in _measured_rows()[1].items() if v["status"] == "reproduced"])
def test_reproducible_published_peaks_within_15_percent(rid):
    rows, repro = _measured_rows()
    row, s = rows[rid], dict(repro[rid]["settings"])
    s["targets"] = tuple(s.get("targets", ALL_LINEAR))
    measured = float(row["measured_gb"]) * (1e9 if row["unit"] == "GB" else GIB)
    # litgpt rows set loss_chunk; the torchtune runs are not this toolkit's trainer: transformers' loss.
    est = estimate(s.pop("model"), s.pop("task"), s.pop("quant"), **s, device="cuda", loss="transformers")
    assert est.allocated_bytes == pytest.approx(measured, rel=0.15), (rid, est.allocated_bytes / 1e9)


# ------------------------------------------------------------------ pick and errors


@pytest.mark.parametrize("task", ["qlora", "inference"])
def test_pick_is_the_largest_model_that_fits_with_margin(task):
    prev = 0
    for gib in (1, 2, 4, 8, 12, 16, 24, 48):
        p = pick(task, gib * GIB, device="cuda")
        usable = int(gib * GIB * (1 - SAFETY_MARGIN))
        if not p.fits:
            assert all(not c.fits for c in p.candidates) and "nothing fits" in p.reason
            continue
        assert p.total_bytes <= usable and p.headroom_bytes == usable - p.total_bytes
        chosen = CATALOG[p.model].param_count()
        assert all(not c.fits for c in p.candidates if c.params > chosen)
        assert chosen >= prev  # more memory never picks a smaller model
        prev = chosen
        assert p.model in p.reason and p.quant in p.reason
    assert prev == CATALOG["meta-llama/Llama-3.1-8B-Instruct"].param_count()


def test_pick_on_cpu_budget_names_time_when_given_a_time_model():
    from toolkit.estimate.timeplan import Rates, time_fields
    from toolkit.finetune.plan import RunShape

    rates = Rates("cpu", 100e9, 20e9, "test")
    run = RunShape(steps=40, tokens_per_step=1024, eval_rounds=0, eval_tokens=0, report_prompt_tokens=0)

    def secs(m, e):
        return time_fields(m, e, rates, targets=ALL_LINEAR, run=run)["train_wall_s"]

    memory_only = pick("qlora", 20 * GIB, device="cpu")
    timed = pick("qlora", 20 * GIB, device="cpu", seconds_of=secs, time_budget_s=1800)
    assert memory_only.fits and "would take" not in memory_only.reason
    assert timed.fits and "would take" in timed.reason
    small = CATALOG[timed.model].param_count()
    assert small < CATALOG[memory_only.model].param_count()
    assert all(c.seconds <= 1800 for c in timed.candidates if c.fits)


def test_pick_skips_a_model_whose_context_window_is_too_short():
    from toolkit.estimate.planner import past_context

    p = pick("qlora", 8 * GIB, seq_len=16384, device="cuda")  # memory alone: SmolLM2-1.7B (8k context)
    assert p.fits and past_context(CATALOG[p.model], 16384) is None
    for c in p.candidates:
        assert c.in_context == (CATALOG[c.model].max_context >= 16384)
        assert not (c.fits and not c.in_context)
    # where every model's window is too short: nothing fits, and the reason says why
    none = pick("inference", 1024 * GIB, seq_len=200_000, device="cuda")
    assert not none.fits and "no model takes 200000 tokens" in none.reason
    assert past_context(CATALOG["embedded"], 8192) is None and past_context(CATALOG["embedded"], 8193) == 8192


def test_bad_estimate_inputs():
    with pytest.raises(UserError, match="--task"):
        estimate("embedded", "train")
    with pytest.raises(UserError, match="does not go with"):
        estimate("embedded", "lora", "q4_k_m")
    with pytest.raises(UserError, match="positive"):
        estimate("embedded", "qlora", seq_len=0)
    with pytest.raises(UserError, match="positive"):
        estimate("embedded", "qlora", batch=-2)
    with pytest.raises(UserError, match="LoRA target"):
        estimate("embedded", "lora", targets=("qkv",))
    with pytest.raises(UserError, match="budget"):
        pick("qlora", 0, device="cuda")


def test_training_peak_is_the_larger_phase_not_the_sum():
    # loss phase: kept activations + logits; layer phase (checkpointing): + one layer's set + temporaries
    kept = 100 * 4 * (8 * 2)
    acts, logits, phase = F.training_peak_activation_bytes(50, 4, 8, 100, True, logits_peak=10_000, act_bytes=2)
    assert (acts, logits, phase) == (kept, 10_000, "the loss backward")
    acts, logits, phase = F.training_peak_activation_bytes(500, 4, 8, 100, True, logits_peak=10, act_bytes=2,
                                                           backward_bytes=30)
    assert (acts, logits) == (kept + 100 * (2 * 8 * 2 + 30 + 500), 0) and "layer" in phase
    # without checkpointing every layer's set is kept through the loss
    acts, logits, _ = F.training_peak_activation_bytes(50, 4, 8, 100, False, logits_peak=10_000)
    assert (acts, logits) == (100 * 4 * 50, 10_000)


def test_eager_attention_keeps_scores_and_kbit_upcast_makes_fp32_rest():
    # peers' measurements with peft's prepare_model_for_kbit_training use transformers' loss
    sd = estimate("TinyLlama-1.1B-Chat-v1.0", "qlora", "nf4", 2048, 1, 32, True, device="cuda", loss="transformers")
    up = estimate("TinyLlama-1.1B-Chat-v1.0", "qlora", "nf4", 2048, 1, 32, True, device="cuda", kbit_upcast=True,
                  loss="transformers")
    m = CATALOG["TinyLlama/TinyLlama-1.1B-Chat-v1.0"]
    assert up.components["weights"] - sd.components["weights"] == 2 * (m.embedding_params() + m.lm_head_params()
                                                                         + m.small_params())
    assert up.components["logits"] == 2048 * m.vocab * 16  # fp32 logits: no 16-bit copy, 4 + 12 bytes
    saved, back = F.eager_attention_bytes(32, 2048, 2)
    assert (saved, back) == (32 * 2048 * 6, 32 * 2048 * 8)


def test_peft_4bit_layers_keep_16bit_inputs_only_under_cuda_autocast(tiny_llama_dir, monkeypatch):
    """The estimate's QLoRA-on-CUDA term (`planner._training_terms`, `uncast`) rests on PEFT's 4-bit
    LoRA layer skipping its cast to the fp32 adapter when `torch.is_autocast_enabled()` (CUDA's state)
    is True. Run on the CPU under CPU autocast, with that call answering CPU's state as CUDA's would:
    the adapters get the 16-bit input itself. Fails if PEFT changes the branch."""
    import torch

    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=quant, device_map="cpu",
                                                 dtype=torch.bfloat16)
    from toolkit.finetune.base_model import keep_4bit_weights_trainable

    keep_4bit_weights_trainable(model)  # bitsandbytes' training path, not its CPU inference kernel
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0)).train()

    def adapter_input_dtypes():
        seen = set()
        hooks = [m.register_forward_pre_hook(lambda mod, args: seen.add(args[0].dtype))
                 for name, m in model.named_modules() if name.endswith("lora_A.default")]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(input_ids=torch.randint(0, 100, (1, 16)))
        for h in hooks:
            h.remove()
        return seen

    assert adapter_input_dtypes() == {torch.float32}  # outside CUDA autocast: cast to the adapter's dtype
    cpu_state = torch.is_autocast_enabled
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda *a: cpu_state(*a) if a else cpu_state("cpu"))
    assert adapter_input_dtypes() == {torch.bfloat16}


def test_fp32_compute_holds_qloras_unquantized_weights_and_activations_in_fp32():
    """QLoRA on a CPU without native bf16 or a GTX 10xx computes in fp32: the base loads its
    embeddings, norms and lm_head in fp32 (bnb_4bit_compute_dtype and dtype float32) and every
    activation is fp32, the same bytes as prepare_model_for_kbit_training's upcast."""
    m = CATALOG["meta-llama/Llama-3.2-1B-Instruct"]
    b16 = estimate(m, "qlora", "nf4-dq", 1024, 2, 16, True, device="cuda", compute="bf16")
    f32 = estimate(m, "qlora", "nf4-dq", 1024, 2, 16, True, device="cuda", compute="fp32")
    up = estimate(m, "qlora", "nf4-dq", 1024, 2, 16, True, device="cuda", kbit_upcast=True)
    assert f32.components["weights"] - b16.components["weights"] == 2 * (m.embedding_params() + m.lm_head_params()
                                                                           + m.small_params())
    # prepare_model_for_kbit_training upcasts, but bnb still dequantizes into the bf16 it loaded in
    assert {k: v for k, v in f32.components.items() if k != "dequant_buffer"} == \
        {k: v for k, v in up.components.items() if k != "dequant_buffer"}
    assert up.components["dequant_buffer"] == b16.components["dequant_buffer"]
    assert f32.components["activations"] > b16.components["activations"]
    assert "fp32 compute" in " ".join(f32.notes) and "fp32 compute" not in " ".join(b16.notes)
    assert estimate(m, "qlora", "nf4-dq", 1024, 2, 16, True, device="cuda").components == b16.components
    with pytest.raises(UserError, match="compute dtype"):
        estimate(m, "qlora", compute="int8")


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_dequant_buffer_is_one_weight_in_the_dtype_bitsandbytes_dequantizes_to(compute, tmp_path):
    """A 4-bit base dequantizes each weight into its quant_state's dtype, the dtype the toolkit loads it
    in (the compute dtype): the plan's buffer is the largest linear in that many bytes."""
    import torch
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM
    from bitsandbytes.functional import dequantize_4bit
    from toolkit.core import loading
    from toolkit.estimate.catalog import from_hf_folder

    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=384, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)  # bf16 on disk, as Meta ships
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_compute_dtype=getattr(torch, compute))
    model = loading.load_causal_lm(str(tmp_path), compute, "cpu", quantization=q)
    four_bit = [p for p in model.parameters() if hasattr(p, "quant_state")]
    largest = max(four_bit, key=lambda w: w.quant_state.shape.numel())
    real = dequantize_4bit(largest.data, largest.quant_state)
    plan = estimate(from_hf_folder(tmp_path), "qlora", "nf4", 64, 1, 8, True, device="cpu",
                    compute={"float32": "fp32", "bfloat16": "bf16"}[compute])
    assert plan.components["dequant_buffer"] == real.numel() * real.element_size()


def test_compute_dtype_is_the_dense_tasks_default_quant_and_the_picks():
    assert estimate("embedded", "lora", device="cpu", compute="fp32").quant == "fp32"
    assert estimate("embedded", "full", device="cuda", compute="fp16").quant == "fp16"
    assert estimate("embedded", "inference", device="cuda", compute="fp32").quant == "fp32"
    assert estimate("embedded", "lora", device="cpu").quant == "bf16"  # no compute given: as before
    assert estimate("embedded", "inference", device="cpu").quant == "fp32"
    p = pick("lora", 11 * GIB, 512, 1, 16, "cuda", compute="fp32")
    assert {c.quant for c in p.candidates} == {"fp32"}
    p = pick("inference", 11 * GIB, 512, 1, device="cuda", compute="fp16")
    assert {c.quant for c in p.candidates} == {"fp16", "q8_0", "q4_k_m"}


def test_cpu_head_keeps_its_logits_buffers_through_the_layers_backward(monkeypatch):
    """The materialized CPU LM head hands its logits buffers (fp32, and in bf16 the matmul's bf16 one)
    to the next step, so they are allocated while the decoder layers run their backward:
    `formulas.cpu_lean_retained_bytes` is what `cpu_lm_head._SPARE` holds after a step, and the
    estimate's peak on a CPU is that phase. The streamed head (a frozen weight not pre-packed: in fp32, or
    past the materialized head's limit) keeps none: the plan follows the run's packing (`packed_weights`)."""
    torch = pytest.importorskip("torch")
    from toolkit.finetune import cpu_lm_head

    n, v, h = 53, 311, 16
    for dtype, act in ((torch.float32, 4), (torch.bfloat16, 2)):
        monkeypatch.setattr(cpu_lm_head, "_SPARE", {})
        fn = cpu_lm_head.materialized_function()
        hidden = torch.randn(n, h, requires_grad=True)
        weight, targets = torch.randn(v, h), torch.randint(0, v, (n,))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            lp = fn.apply(hidden, weight, None, targets, 1.0, 128, None, 1.0, ("log_probs",))[0]
        (-lp.sum()).backward()
        kept = sum(b.untyped_storage().nbytes() for b in cpu_lm_head._SPARE.values())
        assert kept == F.cpu_lean_retained_bytes(n, v, act), dtype
    assert F.cpu_lean_retained_bytes(200_000, 128256, 2) == 0  # past the head's limit TRL's tiles run

    e = estimate("embedded", "qlora", "nf4-dq", 512, 2, 16, True, device="cpu", compute="bf16")
    m = CATALOG["embedded"]
    assert e.components["logits"] == F.cpu_lean_retained_bytes(1024, m.vocab, 2)
    assert "peak during a decoder layer's backward" in e.notes
    for packed, logits in ((True, F.cpu_lean_retained_bytes(1024, m.vocab, 4)),
                           (False, F.cpu_streamed_logits_bytes(1024, m.vocab, m.hidden, 4))):
        fp32 = estimate("embedded", "qlora", "nf4-dq", 512, 2, 16, False, device="cpu", compute="fp32",
                        packed_weights=packed)
        assert fp32.components["logits"] == logits
    # bf16 past the materialized head's limit (Llama-3.2-1B, 2,048 positions) streams too
    big = CATALOG["meta-llama/Llama-3.2-1B-Instruct"]
    past = estimate(big, "lora", "bf16", 1024, 2, 16, False, device="cpu", compute="bf16")
    assert past.components["logits"] == F.cpu_streamed_logits_bytes(2048, big.vocab, big.hidden, 2)
    # full fine-tuning trains the head: the materialized one
    full = estimate("embedded", "full", "fp32", 512, 2, None, False, device="cpu", compute="fp32")
    assert full.components["logits"] == F.cpu_lean_retained_bytes(1024, m.vocab, 4)


def test_the_plans_streamed_head_is_the_trainers():
    """The planner's mirror of the trainer's head choice (`cpu_lm_head.streams`, with `uses_weight_packs` for
    which heads a run packs) and of the streamed head's blocks (`cpu_lm_head_streamed.vocab_block`)."""
    from toolkit.estimate import planner
    from toolkit.finetune import cpu_lm_head, cpu_lm_head_streamed

    for act, dtype in ((4, "float32"), (2, "bfloat16")):
        for task in ("lora", "qlora", "full"):
            for packed in (False, True):
                for logits in (F.CPU_LEAN_HEAD_MAX_BYTES, F.CPU_LEAN_HEAD_MAX_BYTES + 1):
                    want = cpu_lm_head.streams(dtype, task == "full", packed and cpu_lm_head.uses_weight_packs(dtype),
                                               logits <= cpu_lm_head.MAX_LOGITS_BYTES)
                    assert planner._cpu_head_streams(act, logits, packed, task) == want, (dtype, task, packed, logits)
    assert (F.CPU_STREAMED_BLOCK_BYTES, F.CPU_STREAMED_BLOCK_ALIGN) == (cpu_lm_head_streamed.VOCAB_BLOCK_BYTES,
                                                                      cpu_lm_head_streamed.BLOCK_ALIGN)
    for n, v, h in ((0, 49152, 576), (460, 49152, 576), (974, 128256, 2048), (10, 300, 64), (100_000, 49152, 576)):
        assert F.cpu_streamed_block_rows(n, v, h) == cpu_lm_head_streamed.vocab_block(n, v, h)


@pytest.mark.parametrize("n,h,v,dtype", [(460, 576, 49152, "float32"), (974, 2048, 32768, "float32"),
                                         (300, 256, 20000, "bfloat16"), (1200, 128, 4096, "bfloat16")])
def test_streamed_head_spike_is_what_the_head_allocates(n, h, v, dtype):
    """`formulas.cpu_streamed_logits_bytes` against the growth of a real process's high-water mark over
    one forward and backward of the streamed head (glibc's mmap threshold at 64 KiB: every buffer is its
    own mapping, returned when freed), in shapes where its forward and where its backward is the peak."""
    import subprocess
    import sys

    code = f"""
import torch
from toolkit.finetune import cpu_lm_head
def hwm(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
torch.manual_seed(0)
hidden = torch.randn({n}, {h}, dtype=torch.{dtype}, requires_grad=True)
weight, targets = torch.randn({v}, {h}, dtype=torch.{dtype}) * 0.02, torch.randint(0, {v}, ({n},))
def step():
    out = cpu_lm_head.streamed_function().apply(hidden, weight, None, targets, 1.0, 128, None, 1.0,
                                                ("log_probs", "entropy", "is_top1"))
    (-out[0].sum()).backward()
    hidden.grad = None
step()
open("/proc/self/clear_refs", "w").write("5")
before = hwm("VmRSS:")
step()
print(hwm("VmHWM:") - before)
"""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    measured = int(out.stdout.split()[-1])
    planned = F.cpu_streamed_logits_bytes(n, v, h, 4 if dtype == "float32" else 2)
    assert planned == pytest.approx(measured, rel=0.06)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("dtype,quant", [("float32", "fp32"), ("bfloat16", "bf16")])
def test_cpu_packs_are_what_the_trainer_packs(tmp_path, tied, dtype, quant):
    """The plan's `packed_weights` against `packed_linear.pack_bytes` of a real model, skipping the
    LM head where the trainer does (`cpu_lm_head.uses_weight_packs`)."""
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from toolkit.core import packed_linear
    from toolkit.finetune.cpu_lm_head import uses_weight_packs

    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = LlamaForCausalLM(cfg).to(getattr(torch, dtype)).requires_grad_(False)
    model.save_pretrained(tmp_path)
    head = model.get_output_embeddings()
    packs = packed_linear.pack_bytes(model, getattr(torch, dtype), backward=True,
                                     skip=() if uses_weight_packs(dtype) else (head,))
    est = estimate(lookup(str(tmp_path)), "lora", quant, 64, 1, 8, device="cpu", compute=quant, packed_weights=True)
    assert est.components["packed_weights"] == packs > 0
    assert "packed_weights" not in estimate(lookup(str(tmp_path)), "lora", quant, 64, 1, 8, device="cpu",
                                            compute=quant).components


def test_qlora_packs_only_an_fp32_head_and_cuda_none():
    facts = CATALOG["meta-llama/Llama-3.2-1B-Instruct"]
    fp32 = estimate(facts, "qlora", "nf4-dq", device="cpu", compute="fp32", packed_weights=True)
    assert fp32.components["packed_weights"] == 2 * 4 * facts.vocab * facts.hidden  # the tied head, once
    assert "packed_weights" not in estimate(facts, "qlora", "nf4-dq", device="cpu", compute="bf16",
                                            packed_weights=True).components
    assert "packed_weights" not in estimate(facts, "lora", device="cuda", packed_weights=True).components
