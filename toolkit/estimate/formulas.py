"""Pure memory formulas: every function takes plain numbers and returns bytes.

Each docstring says where its term comes from. Element counts use the shapes in
`toolkit.estimate.catalog.ModelFacts`; nothing here imports torch, numpy or the catalog.
"""

from __future__ import annotations

import math

from toolkit.core.units import MIB

# ---------------------------------------------------------------- weights

DENSE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}


def dense_bytes(n_params: int, fmt: str) -> int:
    """fp32 / fp16 / bf16 storage: 4 / 2 / 2 bytes per parameter."""
    return n_params * DENSE_BYTES[fmt]


def bnb_int8_bytes(in_features: int, out_features: int) -> int:
    """bitsandbytes LLM.int8 `Int8Params`: one int8 per weight (CB) plus one fp32 absmax per
    output row (SCB) — bitsandbytes/nn/modules.py, Int8Params."""
    return in_features * out_features + 4 * out_features


def bnb_4bit_bytes(n: int, double_quant: bool, blocksize: int = 64) -> int:
    """bitsandbytes NF4/FP4 `Params4bit` (bitsandbytes/functional.py quantize_4bit): two 4-bit
    codes per byte, one absmax per `blocksize` (64) weights stored as fp32, or with double
    quantization (QLoRA paper, Dettmers et al. 2023, section 3) as uint8 with one fp32 scale per
    256 absmax values. Per-tensor constants (code table, offset) are a few hundred bytes, ignored."""
    blocks = math.ceil(n / blocksize)
    if double_quant:
        absmax = blocks + 4 * math.ceil(blocks / 256)
    else:
        absmax = 4 * blocks
    return math.ceil(n / 2) + absmax


# ggml block layouts: type -> (weights per block, bytes per block). ggml/src/ggml-common.h;
# tests check this table against gguf-py's GGML_QUANT_SIZES.
GGML_TYPES = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2), "Q8_0": (32, 34), "Q4_0": (32, 18),
    "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q2_K": (256, 84), "Q3_K": (256, 110),
    "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210), "IQ4_NL": (32, 18),
}

# llama.cpp file types (llama_ftype) -> the ggml type most tensors get (src/llama-quant.cpp).
GGUF_BASE_TYPE = {
    "f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1",
    "q5_0": "Q5_0", "q5_1": "Q5_1", "q6_k": "Q6_K", "q5_k_m": "Q5_K", "q5_k_s": "Q5_K",
    "q4_k_m": "Q4_K", "q4_k_s": "Q4_K", "q3_k_m": "Q3_K", "q2_k": "Q2_K",
}
# When a row length is not a multiple of 256, llama.cpp swaps a k-quant for this type.
_KQUANT_FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def ggml_bytes(n: int, ggml_type: str) -> int:
    """Bytes of `n` weights stored as `ggml_type` (whole blocks)."""
    block, size = GGML_TYPES[ggml_type]
    return math.ceil(n / block) * size


def _use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama-quant.cpp use_more_bits(): first and last eighth, and every third layer between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def gguf_tensor_type(quant: str, role: str, row: int, i_layer: int = 0, n_layers: int = 1) -> str:
    """ggml type llama.cpp's quantizer gives a 2-D tensor (llama_tensor_get_type, simplified to
    the ftypes offered here). `role`: "output" (lm_head, or the tied embedding), "token_embd",
    "attn_v", "ffn_down" or "other"; `row` = row length (ne[0], the input features)."""
    base = GGUF_BASE_TYPE[quant]
    if base in ("F32", "F16", "BF16"):
        return base
    t = base
    if role == "output":
        # output.weight gets Q6_K unless the row does not split into 256-blocks (then Q8_0)
        t = "Q8_0" if row % 256 else ("Q6_K" if base != "Q8_0" else "Q8_0")
        return t
    if quant in ("q4_k_m", "q5_k_m") and role in ("attn_v", "ffn_down") and _use_more_bits(i_layer, n_layers):
        t = "Q6_K"
    elif quant == "q3_k_m" and role in ("attn_v",) and i_layer < 2:
        t = "Q5_K"
    if GGML_TYPES[t][0] == 256 and row % 256:
        t = _KQUANT_FALLBACK[t]
    return t


def gguf_weights_bytes(linears: dict[str, tuple[int, int]], n_layers: int, vocab: int, hidden: int,
                       tied: bool, small_params: int, quant: str) -> int:
    """Model buffer of a GGUF made by llama.cpp's quantizer from an HF model: 2-D tensors per
    `gguf_tensor_type`, 1-D tensors (norms, biases) as F32 (llama.cpp never quantizes them)."""
    role = {"v_proj": "attn_v", "down_proj": "ffn_down"}
    total = 4 * small_params
    for i in range(n_layers):
        for name, (fin, fout) in linears.items():
            total += ggml_bytes(fin * fout, gguf_tensor_type(quant, role.get(name, "other"), fin, i, n_layers))
    embd_role = "output" if tied else "token_embd"
    total += ggml_bytes(vocab * hidden, gguf_tensor_type(quant, embd_role, hidden))
    if not tied:
        total += ggml_bytes(vocab * hidden, gguf_tensor_type(quant, "output", hidden))
    return total


# ---------------------------------------------------------------- KV cache and llama.cpp buffers


def kv_cache_bytes(layers: int, kv_heads: int, head_dim: int, tokens: int, batch: int, dtype_bytes: float) -> int:
    """K and V for every layer and cached token: 2 x layers x batch x tokens x kv_heads x head_dim
    x dtype. GQA-aware: only the KV heads are cached (Ainslie et al. 2023)."""
    return int(2 * layers * batch * tokens * kv_heads * head_dim * dtype_bytes)


def llamacpp_compute_bytes(n_ctx: int, n_ubatch: int, n_vocab: int, n_embd: int, n_head: int, n_embd_kv: int) -> int:
    """CPU compute buffer llama.cpp reserves (flash attention off), f32 throughout.

    ggml-alloc reuses memory, so the buffer is the larger of two stages of the worst-case graph
    (n_ubatch tokens, every token output):
    - output: logits (n_vocab) plus the last hidden state and its norm (2 n_embd) per token;
    - attention: KQ scores (n_head x n_ctx) and the KQ mask (n_ctx) per token, plus Q, K, V,
      the residual, the norm and the attention output (5 n_embd + 2 n_embd_kv).
    Checked against llama.cpp's own report for n_ctx 256..16384 (tests/estimate/test_planner.py)."""
    output = n_ubatch * (n_vocab + 2 * n_embd)
    attention = n_ubatch * (n_ctx * (n_head + 1) + 5 * n_embd + 2 * n_embd_kv)
    return 4 * max(output, attention)


def llamacpp_output_bytes(n_vocab: int, n_seq: int = 1) -> int:
    """Logits buffer: one f32 row of n_vocab per sequence (llama_context output buffer)."""
    return 4 * n_vocab * n_seq


# ---------------------------------------------------------------- training


def lora_params(linears: dict[str, tuple[int, int]], targets: tuple[str, ...], rank: int, layers: int) -> int:
    """LoRA adds A (r x in) and B (out x r) to each targeted linear (Hu et al. 2021)."""
    return layers * sum(rank * (fin + fout) for name, (fin, fout) in linears.items() if name in targets)


def layer_activation_bytes(hidden: int, q_dim: int, kv_dim: int, inter: int, method: str,
                           targets: tuple[str, ...], linears: dict[str, tuple[int, int]], rank: int = 0,
                           lora_dropout: float = 0.0, act_bytes: int = 2, adapter_bytes: int = 4,
                           mask_bytes: int = 1) -> int:
    """Bytes per token that autograd keeps for one decoder layer (eager PyTorch, SDPA/flash
    attention, transformers' Llama/Qwen2 modules, PEFT LoRA).

    Counted from what each op saves for its backward; torch saves only what a needed gradient
    uses (a frozen linear keeps its weight, not its input; bitsandbytes' 4-bit matmul keeps only
    the quantized weight, bitsandbytes/autograd/_functions.py MatMul4Bit):
    - always: both RMSNorm inputs, upcast to fp32 (2 x 4h bytes), q after RoPE (q_dim), k and v
      (2 kv_dim), the attention output (q_dim; flash attention keeps it plus a per-head
      logsumexp, not the scores), gate, SiLU(gate) and up of the SwiGLU MLP (3i).
      Korthikanti et al. 2022 (arXiv:2205.05198) count the same tensors for a GPT block.
    - full fine-tuning: the input of every trained linear — attention input (h, shared by
      q/k/v), MLP input (h, shared by gate/up), down input (i); o_proj's input is the attention
      output, already kept — and each RMSNorm's normalized input for its weight gradient (2h).
    - LoRA (PEFT): each adapter casts its input to the adapter dtype (fp32 by default,
      autocast_adapter_dtype) and keeps that copy (in_features x adapter_bytes; shared across
      adapters only when no cast and no dropout happen), with dropout also the mask
      (in_features x mask_bytes: 1 for CUDA's bool mask, the input dtype on CPU), and the
      rank-r output of A (r x adapter_bytes).
    tests/estimate/test_planner.py checks these counts against the tensors that transformers + PEFT
    actually save (torch.autograd.graph.saved_tensors_hooks) on a small Llama.
    """
    total = 8 * hidden + act_bytes * (2 * q_dim + 2 * kv_dim + 3 * inter)
    if method == "full":
        return total + act_bytes * (hidden + hidden + inter + 2 * hidden)
    shared = lora_dropout == 0.0 and adapter_bytes == act_bytes
    trained = [n for n in linears if n in targets]
    if shared:
        groups = {"attn": {"q_proj", "k_proj", "v_proj"}, "o": {"o_proj"}, "mlp": {"gate_proj", "up_proj"},
                  "down": {"down_proj"}}
        for members in groups.values():
            hit = [n for n in trained if n in members]
            if hit and hit[0] != "o_proj":  # o_proj's input is the attention output, already kept
                total += act_bytes * linears[hit[0]][0]
    else:
        for n in trained:
            total += linears[n][0] * (adapter_bytes + (mask_bytes if lora_dropout > 0 else 0))
    return total + len(trained) * rank * adapter_bytes


def cpu_fused_layer_activation_bytes(hidden: int, q_dim: int, kv_dim: int, inter: int, targets: tuple[str, ...],
                                     linears: dict[str, tuple[int, int]], rank: int, lora_dropout: float = 0.0,
                                     act_bytes: int = 2, scores_per_token: float = 0.0) -> int:
    """Bytes per token that one decoder layer keeps on this toolkit's CPU LoRA / QLoRA path, where
    the trainer swaps in its own layers (`toolkit.finetune`: fused_lora, lora_groups, fused_norm,
    fused_rope, and the packed attention of `toolkit.core.segment_attention`), counted from what each
    saves for its backward:
    - each RMSNorm its input in the compute dtype and an fp32 1/rms per token (2 x (h + 4 bytes));
    - the attention kernel its padded Q, K, V and output (2 q_dim + 2 kv_dim; a row taken whole, no
      padding counted) and the bmm kernel's probabilities (`scores_per_token`, entries a token over
      the layer's heads: see `toolkit.core.segment_attention.kept_scores_per_token`; 0 for SDPA);
    - the SwiGLU its gate, SiLU(gate) and up (3i);
    - the adapters no fp32 copy of their input (PEFT's layers keep one, `layer_activation_bytes`):
      each trained input once, shared by its siblings (q/k/v and gate/up read one tensor; o's input
      is the attention's output, down's the SwiGLU's, each kept only where that layer is trained),
      and each adapter's r-wide middle; with a dropout, each adapter its dropped copy of the input and
      its bool mask (in x (act + 1)) instead.
    tests/estimate/test_planner.py checks this against the tensors the fused path saves
    (torch.autograd.graph.saved_tensors_hooks) on a small Llama, in bf16 and fp32, with and without
    a dropout."""
    total = 2 * (act_bytes * hidden + 4) + act_bytes * (2 * q_dim + 2 * kv_dim + 3 * inter)
    total += round(act_bytes * scores_per_token)
    trained = [n for n in linears if n in targets]
    if lora_dropout > 0:
        total += sum(linears[n][0] * (act_bytes + 1) for n in trained)
    else:
        inputs = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o", "gate_proj": "mlp",
                  "up_proj": "mlp", "down_proj": "down"}
        kept = {}
        for n in trained:
            kept[inputs.get(n, n)] = linears[n][0]
        total += act_bytes * sum(kept.values())
    return total + len(trained) * rank * act_bytes


def training_activation_bytes(per_layer_bytes: int, layers: int, hidden: int, tokens: int,
                              grad_ckpt: bool, act_bytes: int = 2) -> int:
    """Activations kept between forward and backward for `tokens` = batch x seq_len.

    Without checkpointing every layer keeps `per_layer_bytes` per token. With (per-layer)
    gradient checkpointing each layer keeps only its input (hidden), and the backward recomputes
    one layer at a time, so one layer's full set is live on top (Chen et al. 2016)."""
    if grad_ckpt:
        return int(tokens * (layers * hidden * act_bytes + per_layer_bytes))
    return int(tokens * layers * per_layer_bytes)


def eager_attention_bytes(heads: int, seq_len: int, act_bytes: int = 2) -> tuple[int, int]:
    """(saved, backward extra) bytes per token of one layer's eager attention score matrices.

    transformers' eager_attention_forward (models/llama/modeling_llama.py) computes
    softmax(q k^T + mask, dtype=float32).to(q.dtype) and multiplies by v: softmax keeps its fp32
    output for the backward and the matmul keeps the probabilities in the stream dtype,
    heads x seq_len entries per token each. The backward of those two ops holds the fp32 incoming
    gradient and the fp32 gradient it produces on top of the saved output (SoftmaxBackward =
    y * (g - sum(y g))). When the stream is already fp32 the cast is a no-op, yet fitcheck's
    eager QLoRA rows (fp32 stream, three models, seq 1024-4096, batch 1-8) show the same two
    tensors' worth live under checkpoint recompute, so both are counted whatever the dtype.
    SDPA / flash kernels keep only a per-head logsumexp: (0, 0)."""
    per = heads * seq_len
    return per * (4 + act_bytes), per * 8


def training_peak_activation_bytes(per_layer_bytes: int, layers: int, hidden: int, tokens: int, grad_ckpt: bool,
                                   logits_peak: int, act_bytes: int = 2, backward_bytes: int = 0,
                                   mask_bytes: int = 0, retained_bytes: int = 0) -> tuple[int, int, str]:
    """(activations, logits, phase) at the peak of a training step: the larger of two moments.

    - the loss backward: everything the forward kept (every layer's set, or with per-layer
      checkpointing only each layer's input) plus the logits spike (`logits_peak`);
    - a layer's backward: the logits are gone, except what the LM head keeps for the next step
      (`retained_bytes`, `cpu_lean_retained_bytes`); what the forward kept, plus (with
      checkpointing) one recomputed layer's set, the layer's backward temporaries per token
      (`backward_bytes`: eager attention's, an MLP-width gradient in flight) and the gradient of
      the residual stream (2 x hidden per token).
    Adding the two, as a plain sum of terms does, counts memory that is never live at once
    (Korthikanti et al. 2022 and PyTorch's caching allocator frees a saved tensor right after the
    backward node that used it). `mask_bytes` is the causal mask eager attention builds once per
    forward (tokens x seq_len entries) and keeps until the step ends."""
    kept = tokens * layers * (hidden * act_bytes if grad_ckpt else per_layer_bytes) + mask_bytes
    loss_phase = kept + logits_peak
    layer_phase = kept + tokens * (2 * hidden * act_bytes + backward_bytes
                                   + (per_layer_bytes if grad_ckpt else 0))
    if loss_phase >= layer_phase + retained_bytes:
        return kept, logits_peak, "the loss backward"
    return layer_phase, retained_bytes, "a decoder layer's backward"


def bnb_legacy_input_bytes(hidden: int, inter: int, layers: int, tokens: int, act_bytes: int = 2) -> int:
    """Extra activations of QLoRA under older bitsandbytes, whose MatMul4Bit kept its input
    (`ctx.tensors = (A, B)`; bitsandbytes 0.50, which this toolkit runs, keeps `(None, B)`):
    per layer the attention input (h), the MLP input (h) and the down-projection input (i);
    o_proj's input is the attention output, kept anyway. Used only to compare with measurements
    taken with those versions (docs/estimate.md)."""
    return tokens * layers * (2 * hidden + inter) * act_bytes


def logits_bytes(tokens: int, vocab: int, act_bytes: int = 2) -> int:
    """Peak of the LM head + loss (the logits spike, tokens x vocab). transformers' causal-LM
    loss upcasts the logits to fp32 before cross-entropy (loss_utils.ForCausalLMLoss): live at
    the log-softmax backward are the logits as the head produced them (act_bytes; when they are
    already fp32 the upcast is a no-op), the saved fp32 log-softmax, its incoming gradient and the
    gradient it produces: (act_bytes + 4 + 4 + 4) bytes per vocab entry per token."""
    return tokens * vocab * (act_bytes + 12)


def chunked_logits_bytes(tokens: int, vocab: int, chunk: int, act_bytes: int = 2) -> int:
    """The same spike for litgpt's fine-tuning loss (litgpt/utils.py chunked_cross_entropy; the
    model returns the head output as a list of `chunk`-token pieces, lm_head_chunk_size 128):
    cross_entropy runs on each piece in the logits' own dtype (no fp32 upcast), so every piece's
    logits and its saved log-softmax output stay until the backward (2 x act_bytes per entry for
    all tokens), and the backward of one piece holds its incoming gradient and the one it
    produces (2 x act_bytes for `chunk` tokens)."""
    return tokens * vocab * 2 * act_bytes + min(chunk, tokens) * vocab * 2 * act_bytes


# TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`, which SFTTrainer installs since TRL
# 1.x): `ChunkedLogProbFunction` projects tiles of TOKEN_CHUNK_SIZE tokens (trl/kernels/chunked_logprob.py)
# x _CHUNKED_LOGPROB_CHUNK_SIZE vocabulary rows (trl/trainer/utils.py); tests/estimate check both upstream.
TRL_TOKEN_TILE = 4096
TRL_VOCAB_TILE = 32768
# This toolkit's CPU head (`toolkit.finetune.cpu_lm_head`) materializes fp32 logits up to this size,
# else TRL's tiles run (cpu_lm_head.MAX_LOGITS_BYTES, checked equal by the tests).
CPU_LEAN_HEAD_MAX_BYTES = 512 * 2**20


def trl_fused_logits_bytes(tokens: int, vocab: int, hidden: int, act_bytes: int = 2) -> int:
    """The logits spike of SFTTrainer's fused LM head + loss, which never materializes the
    [tokens, vocab] logits. Live in its backward: the hidden states it gathered and saved
    (act_bytes per entry), the fp32 gradient it accumulates for them and that gradient cast back
    (4 + act_bytes), and one tile buffer of min(tokens, 4096) x min(vocab, 32768) in the compute
    dtype that becomes the tile's logits gradient in place. On CUDA it scores only the labelled
    positions; `tokens` is all of them, an upper bound."""
    tile = min(tokens, TRL_TOKEN_TILE) * min(vocab, TRL_VOCAB_TILE) * act_bytes
    return tile + tokens * hidden * (2 * act_bytes + 4)


def cpu_lean_logits_bytes(tokens: int, vocab: int, hidden: int, act_bytes: int = 2) -> int:
    """The same spike with this toolkit's CPU head (`toolkit.finetune.cpu_lm_head.LogProbs`): fp32
    logits, turned into probabilities and then into their own gradient in place, plus (16-bit compute)
    the 16-bit buffer its matmuls read and write; the hidden states' gradient besides. Past
    CPU_LEAN_HEAD_MAX_BYTES of fp32 logits TRL's tiles run instead (`trl_fused_logits_bytes`).
    With a frozen weight not pre-packed the head streams the vocabulary instead (`cpu_lm_head_streamed`:
    two ~8 MB blocks and N x H), in fp32 at any size and in bf16 past the limit: this stays the bound,
    since whether the weight is packed is the run's calibration's choice (past the limit TRL's tiles
    bound the streamed head too)."""
    if tokens * vocab * 4 > CPU_LEAN_HEAD_MAX_BYTES:
        return trl_fused_logits_bytes(tokens, vocab, hidden, act_bytes)
    return cpu_lean_retained_bytes(tokens, vocab, act_bytes) + tokens * hidden * act_bytes


# The streamed CPU head's vocabulary blocks (`cpu_lm_head_streamed.VOCAB_BLOCK_BYTES`, `BLOCK_ALIGN` and
# `vocab_block`: the tests check these against them).
CPU_STREAMED_BLOCK_BYTES = 16 * 2**20
CPU_STREAMED_BLOCK_ALIGN = 256


def cpu_streamed_block_rows(tokens: int, vocab: int, hidden: int) -> int:
    """Vocabulary rows in one block of the streamed CPU head at `tokens` positions of width `hidden`."""
    rows = CPU_STREAMED_BLOCK_BYTES // (4 * (2 * max(1, tokens) + hidden))
    return min(vocab, max(CPU_STREAMED_BLOCK_ALIGN, rows // CPU_STREAMED_BLOCK_ALIGN * CPU_STREAMED_BLOCK_ALIGN))


def cpu_streamed_logits_bytes(tokens: int, vocab: int, hidden: int, act_bytes: int = 2) -> int:
    """The same spike with the CPU head that streams the vocabulary (`toolkit.finetune.cpu_lm_head_streamed`:
    a frozen weight not pre-packed, in fp32 always, in bf16 past CPU_LEAN_HEAD_MAX_BYTES), which keeps
    nothing vocabulary-sized and nothing for the next step. The larger of its two moments:
    - the forward: a block's fp32 logits, their exponentials and the entropy's product of the two (3 x N x
      block x 4 bytes; in bf16 also the bf16 product and exponentials, 2 x 2 more), and P @ W accumulated
      in fp32 (N x H x 4; in bf16 also the hidden states and that product's block in bf16, 2 x 2 more);
    - the backward: P @ W, W[targets], their difference and the gradient, N x H each in fp32 (in bf16
      also W[targets] and the gradient in bf16: 20 bytes a position).
    Measured as the growth of a process's high-water mark (glibc's mmap threshold at 64 KiB, every buffer
    its own mapping) within 6% (tests/estimate/test_planner.py). `tokens` is every position; the head
    runs on the labelled ones only, so this is an upper bound."""
    narrow = act_bytes < 4
    block = tokens * cpu_streamed_block_rows(tokens, vocab, hidden)
    forward = block * (16 if narrow else 12) + tokens * hidden * (8 if narrow else 4)
    return max(forward, tokens * hidden * (20 if narrow else 16))


def cpu_lean_retained_bytes(tokens: int, vocab: int, act_bytes: int = 2) -> int:
    """What the CPU head keeps after its backward for the next step (`cpu_lm_head._SPARE`: the fp32
    logits buffer and, in 16-bit compute, the 16-bit one; a fresh one page-faults every step), so
    it is still allocated while the decoder layers run their backward. 0 where TRL's tiles run."""
    if tokens * vocab * 4 > CPU_LEAN_HEAD_MAX_BYTES:
        return 0
    return tokens * vocab * (4 + (act_bytes if act_bytes < 4 else 0))


def packed_weights_bytes(dense_linear_params: int, head_params: int, act_bytes: int) -> int:
    """The oneDNN packs a CPU training run keeps of its frozen weights (`toolkit.core.packed_linear`, where
    the machine's calibration measured them faster): two copies of each packed weight in the compute
    dtype, one laid out for the forward and one for the input gradient. `dense_linear_params`: the
    decoder's frozen linears held in the compute dtype (LoRA's base; QLoRA's 4-bit layers are not
    packed); `head_params`: the LM head where the CPU head multiplies through its packs (fp32 only,
    `cpu_lm_head.uses_weight_packs`), a tied head's weight once."""
    return 2 * act_bytes * (dense_linear_params + head_params)


OPTIMIZER_STATE_BYTES = {
    # AdamW keeps exp_avg and exp_avg_sq like the parameter (torch.optim.AdamW: zeros_like(p)).
    "adamw": None,
    "paged-adamw": None,
    # bitsandbytes 8-bit AdamW: two uint8 states (+ a per-2048-block fp32 absmax, ~0.4%).
    "adamw-8bit": 2.0,
    "paged-adamw-8bit": 2.0,
}


def optimizer_bytes(trainable: int, optimizer: str, param_bytes: int) -> int:
    """Optimizer states for `trainable` parameters stored with `param_bytes` each."""
    per = OPTIMIZER_STATE_BYTES[optimizer]
    if per is None:
        per = 2 * param_bytes
    elif optimizer.endswith("8bit"):
        per = per * (1 + 4 / 2048)
    return int(trainable * per)


# Per-backend framework overhead, the one constant each: memory used before any tensor exists.
# cuda: the CUDA context + cuBLAS/cuDNN handles that nvidia-smi shows and
# torch.cuda.max_memory_allocated does not (PyTorch "CUDA semantics" notes; ~300-600 MiB on
# recent GPUs with lazy module loading) — 512 MiB.
# cpu/transformers: RSS of what the trainer imports, `import torch, transformers, peft` and `from trl
# import SFTTrainer`, measured here (Zen 5 EPYC, 2026-12-04), 484 MiB -> 485 (`import trl` alone
# loads its trainer lazily: 395 MiB, the constant before).
# cpu/llama.cpp: RSS of `import llama_cpp` measured here, 40 MiB.
FRAMEWORK_OVERHEAD = {"cuda": 512 * MIB, "cpu": 485 * MIB, "llama.cpp": 40 * MIB}
# What a CPU training process holds on its heap beyond the tensors counted above, by the C allocator it
# trains under (`toolkit.core.allocator.training_allocator`): the allocator's retained free blocks,
# oneDNN's caches of primitives (bounded at 256 entries each by `toolkit.core.primitive_caches`), the
# run's data and objects, less the import-time heap that the framework constant counts.
# - tcmalloc: tcmalloc's own counters (peak and step-end live bytes, heap size) against the process's
#   resident set in four runs of the embedded model on the Zen 4 EPYC, the finance recipe and README's
#   `recipe new` example, bf16 and fp32: 0.24-0.38 GiB beyond the tensors, of which ~0.1 GiB is the
#   framework constant's own heap (docs/estimate.md, 2026-12-07).
# - glibc (huge pages or its defaults): training peaks under glibc's malloc read 0.05-0.28 GiB above
#   tcmalloc's in seven runs (the finance recipe at rows of 256 / 512 / 1024 tokens, batch 2 and 4, bf16 and
#   fp32; the `recipe new` example), the most from rows of 512 tokens up. This is the most any of them needed
#   beyond its tensors, the finance recipe in bf16; the others' plans read 1-15% high (docs/estimate.md,
#   2026-12-07).
CPU_TRAINING_RUNTIME_BYTES = {"tcmalloc": 224 * MIB, "glibc": 592 * MIB}
