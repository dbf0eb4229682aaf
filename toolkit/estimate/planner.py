"""Memory estimates for inference and fine-tuning.

`estimate()` adds up the terms of `toolkit.estimate.formulas` for one model, task and setting;
`toolkit.estimate.pick` runs it over the catalog for a budget. Nothing here imports torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from toolkit.estimate import formulas as F
from toolkit.estimate.catalog import ModelFacts, lookup
from toolkit.core.errors import UserError

TASKS = ("inference", "lora", "qlora", "full")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BNB_QUANTS = ("int8", "nf4", "nf4-dq")
DENSE_QUANTS = ("fp32", "bf16", "fp16")
GGUF_QUANTS = ("f16", "q8_0", "q6_k", "q5_k_m", "q5_0", "q5_1", "q4_k_m", "q4_0", "q4_1")
QUANTS_FOR_TASK = {
    "inference": DENSE_QUANTS + BNB_QUANTS + GGUF_QUANTS,
    "lora": DENSE_QUANTS,
    "qlora": ("nf4-dq", "nf4", "int8"),
    "full": DENSE_QUANTS,
}
# Defaults without --quant: the compute dtype the toolkit would choose on the device
# (`compute`: toolkit.estimate.timeplan.device_dtype, the one decision), else bf16 on CUDA and, on
# a CPU, fp32 for inference (the toolkit decodes in fp32 there) and bf16 for lora/full.
DEFAULT_QUANT = {"inference": "bf16", "lora": "bf16", "qlora": "nf4-dq", "full": "bf16"}


def default_quants(device: str, compute: str | None = None, table: dict | None = None) -> dict:
    """DEFAULT_QUANT (or `table`, e.g. `pick.PICK_QUANTS`) with its 16-bit entries in the `compute` dtype;
    without one, fp32 for CPU inference."""
    table = table or DEFAULT_QUANT
    if compute is None:
        return {**table, "inference": _swap(table["inference"], "fp32")} if device == "cpu" else dict(table)
    return {task: _swap(q, compute) for task, q in table.items()}


def _swap(quants, compute: str):
    if isinstance(quants, tuple):
        return tuple(compute if q == "bf16" else q for q in quants)
    return compute if quants == "bf16" else quants


# Share of the budget kept free by `pick`: the caching allocator's fragmentation (reserved minus
# allocated is typically 5-10% in PyTorch training) and the spread of our estimates against
# measured peaks (within 15%, docs/estimate.md) are not covered by the estimate itself.
SAFETY_MARGIN = 0.10
OPTIMIZERS = tuple(F.OPTIMIZER_STATE_BYTES)
LOSSES = ("trl", "transformers")


@dataclass
class Estimate:
    """One estimate. `components` maps a name to bytes; their sum is `total_bytes`."""

    model: str
    task: str
    quant: str
    backend: str  # "transformers" or "llama.cpp"
    device: str  # "cuda" or "cpu": decides the framework overhead
    seq_len: int
    batch: int
    lora_r: int | None
    grad_ckpt: bool | None
    params: int
    trainable_params: int
    components: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    budget_bytes: int | None = None

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def allocated_bytes(self) -> int:
        """Total without the framework overhead (and a CPU training process's runtime heap, which
        holds no tensors): what torch.cuda.max_memory_allocated (or llama.cpp's buffer report, or
        the tensors' own peak) can be compared with."""
        return self.total_bytes - self.components.get("framework", 0) - self.components.get("runtime", 0)

    @property
    def fits(self) -> bool | None:
        return None if self.budget_bytes is None else self.total_bytes <= self.budget_bytes

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(total_bytes=self.total_bytes, allocated_bytes=self.allocated_bytes)
        if self.budget_bytes is not None:
            d.update(fits=self.fits, headroom_bytes=self.budget_bytes - self.total_bytes)
        return d


def _positive(name: str, value) -> int:
    try:
        v = int(value)
    except (TypeError, ValueError):
        raise UserError(f"{name} must be a positive integer, got {value!r}") from None
    if v <= 0 or str(value).strip() not in (str(v), f"+{v}"):
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return v


def weights_bytes(m: ModelFacts, quant: str) -> int:
    """Weights of `m` stored as `quant`. bitsandbytes quantizes only the decoder linears:
    embeddings, lm_head and norms stay 16-bit (transformers keeps the output embedding out of
    bnb conversion, integrations/bitsandbytes.py get_keys_to_not_convert)."""
    if quant in DENSE_QUANTS:
        return F.dense_bytes(m.param_count(), quant)
    rest16 = 2 * (m.embedding_params() + m.lm_head_params() + m.small_params())
    if quant == "int8":
        return rest16 + m.layers * sum(F.bnb_int8_bytes(a, b) for a, b in m.linears().values())
    if quant in ("nf4", "nf4-dq"):
        return rest16 + m.layers * sum(F.bnb_4bit_bytes(a * b, quant == "nf4-dq") for a, b in m.linears().values())
    if quant in GGUF_QUANTS or quant in F.GGUF_BASE_TYPE:
        if m.gguf is not None and _gguf_matches(m, quant):
            return m.gguf.tensor_bytes
        return F.gguf_weights_bytes(m.linears(), m.layers, m.vocab, m.hidden, m.tied, m.small_params(), quant)
    raise UserError(f"unknown quant {quant!r}")


def _gguf_matches(m: ModelFacts, quant: str) -> bool:
    return m.gguf is not None and m.gguf.file_type.lower().replace("mostly_", "") == quant


def estimate(model: str | ModelFacts, task: str = "qlora", quant: str | None = None, seq_len: int = 512,
             batch: int = 1, lora_r: int = 16, grad_ckpt: bool = True, targets: tuple[str, ...] = ALL_LINEAR,
             optimizer: str = "adamw", lora_dropout: float = 0.0, device: str = "cuda",
             budget_bytes: int | None = None, bnb_legacy: bool = False, *, kbit_upcast: bool = False,
             attn_impl: str = "sdpa", loss: str = "trl", loss_chunk: int = 0, compute: str | None = None,
             packed_weights: bool = False, conversation_tokens: float | None = 0,
             allocator: str = "glibc") -> Estimate:
    """Estimate peak memory of `task` ("inference" | "lora" | "qlora" | "full") for `model`.

    quant: fp32/bf16/fp16, int8/nf4/nf4-dq (bitsandbytes), or a GGUF type (inference with
    llama.cpp); None = the task's default (inference bf16, fp32 on CPU; lora bf16; qlora
    nf4-dq; full bf16).
    A GGUF file as `model` defaults to its own type and uses its exact tensor sizes.
    seq_len is the context (inference) or the padded/packed sequence length (training); targets
    are the LoRA target modules (PEFT names); device "cuda" or "cpu" picks the overhead.
    bnb_legacy models the older bitsandbytes that kept each 4-bit linear's input (for comparing
    with measurements taken with it). kbit_upcast: peft's prepare_model_for_kbit_training ran
    (QLoRA): it casts every non-quantized weight (embeddings, norms, lm_head) to fp32, so the
    residual stream and the logits are fp32 too (bnb's Linear4bit returns its input's dtype);
    this toolkit's trainer does not call it. attn_impl: "sdpa" (default; flash / memory-efficient
    kernels keep no score matrix) or "eager" (keeps heads x seq x seq scores per layer).
    loss: how training computes the LM head + loss. "trl" (default): this toolkit's trainer, TRL's
    SFTTrainer with its fused, tiled LM head (on CPU the toolkit's own head where its fp32 logits fit);
    "transformers": the model's own loss, fp32 logits for every token (what `model(**batch).loss`
    and most published measurements use). loss_chunk: tokens per chunk of litgpt's chunked LM head
    + loss; when set it replaces `loss`.
    compute: the dtype the toolkit computes in on the device (fp32/bf16/fp16, as
    `toolkit.core.capability.choose_dtype` decides: fp32 on a CPU without native bf16 or a GTX 10xx).
    It is the default quant of the dense tasks; a QLoRA base computing in fp32 holds its
    non-quantized weights (embeddings, norms, lm_head) and its activations in fp32. None: bf16 on
    CUDA; on a CPU fp32 for inference, bf16 for training.
    packed_weights: a CPU training run pre-packs its frozen weights for oneDNN (this machine's
    calibration decides: `toolkit.finetune.plan.cpu_packs`), two copies of each (`packed_weights_bytes`).
    conversation_tokens: the mean tokens of a conversation in a packed row (0: rows not packed; None:
    packed, lengths unknown, as for an hf: dataset not downloaded yet: priced at the longest the kernel
    takes, the most it can keep). A CPU LoRA / QLoRA run of this toolkit's trainer takes its own fused
    layers, which keep less than PEFT's (`formulas.cpu_fused_layer_activation_bytes`), and its packed
    attention keeps each conversation's probabilities (`segment_attention.kept_scores_per_token`).
    allocator: the C allocator a CPU training process runs under ("tcmalloc" | "glibc", as
    `toolkit.core.allocator.training_allocator` says): what its heap holds beyond the tensors
    (`formulas.CPU_TRAINING_RUNTIME_BYTES`). The default is the one that holds more.
    """
    m = model if isinstance(model, ModelFacts) else lookup(model)
    if task not in TASKS:
        raise UserError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    seq_len, batch = _positive("--seq-len", seq_len), _positive("--batch", batch)
    if task in ("lora", "qlora"):
        lora_r = _positive("--lora-r", lora_r)
    if allocator not in F.CPU_TRAINING_RUNTIME_BYTES:
        raise UserError(f"allocator must be one of {', '.join(F.CPU_TRAINING_RUNTIME_BYTES)}, got {allocator!r}")
    if compute is not None and compute not in DENSE_QUANTS:
        raise UserError(f"compute dtype must be one of {', '.join(DENSE_QUANTS)}, got {compute!r}")
    if quant is None:
        defaults = default_quants(device, compute)
        quant = m.gguf.file_type.lower().replace("mostly_", "") if (m.gguf and task == "inference") else defaults[task]
    quant = quant.lower()
    gguf_file_quant = m.gguf is not None and _gguf_matches(m, quant)
    if quant not in QUANTS_FOR_TASK[task] and not (task == "inference" and gguf_file_quant):
        raise UserError(f"--quant {quant} does not go with --task {task} (use one of: {', '.join(QUANTS_FOR_TASK[task])})")
    if optimizer not in OPTIMIZERS:
        raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    bad = [t for t in targets if t not in ALL_LINEAR]
    if bad:
        raise UserError(f"unknown LoRA target(s) {', '.join(bad)} (known: {', '.join(ALL_LINEAR)})")
    if device not in ("cuda", "cpu"):
        raise UserError(f"device must be cuda or cpu, got {device!r}")
    if attn_impl not in ("sdpa", "eager"):
        raise UserError(f"attention must be sdpa or eager, got {attn_impl!r}")
    if loss not in LOSSES:
        raise UserError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    # A 4-bit base computing in fp32 holds what is not quantized in fp32, as
    # prepare_model_for_kbit_training leaves it: the same bytes.
    upcast = (kbit_upcast or compute == "fp32") and task == "qlora"

    is_gguf = quant in GGUF_QUANTS or gguf_file_quant
    est = Estimate(m.name, task, quant, "llama.cpp" if is_gguf else "transformers", device, seq_len, batch,
                   lora_r if task in ("lora", "qlora") else None, grad_ckpt if task != "inference" else None,
                   m.counted_params or m.param_count(), 0, budget_bytes=budget_bytes)
    c = est.components
    c["weights"] = weights_bytes(m, quant)
    if upcast:  # the 16-bit rest (embeddings, lm_head, norms) becomes fp32
        c["weights"] += 2 * (m.embedding_params() + m.lm_head_params() + m.small_params())
    tokens = seq_len * batch
    if task == "inference":
        _inference_terms(est, m, quant, is_gguf, tokens)
    else:
        legacy = F.bnb_legacy_input_bytes(m.hidden, m.intermediate, m.layers, tokens) \
            if (bnb_legacy and quant in ("nf4", "nf4-dq") and not grad_ckpt) else 0
        act = 4 if (quant == "fp32" or upcast) else 2
        _training_terms(est, m, quant, tokens, lora_r, grad_ckpt, targets, optimizer, lora_dropout,
                        act=act, dequant_bytes=4 if compute == "fp32" else 2, packed_weights=packed_weights,
                        attn_impl=attn_impl, loss=loss, loss_chunk=loss_chunk,
                        extra_kept=legacy, conversation_tokens=conversation_tokens)
        if packed_weights and device == "cpu" and task in ("lora", "qlora"):
            dense = m.layers * sum(a * b for a, b in m.linears().values()) if task == "lora" else 0
            if (packs := F.packed_weights_bytes(dense, m.vocab * m.hidden if act == 4 else 0, act)):
                c["packed_weights"] = packs
        if legacy:
            est.notes.append("older bitsandbytes: 4-bit layers keep their inputs")
        if upcast:
            est.notes.append("prepare_model_for_kbit_training: embeddings, norms and lm_head in fp32" if kbit_upcast
                             else "fp32 compute: embeddings, norms, lm_head and activations in fp32")
    overhead = "llama.cpp" if (is_gguf and device == "cpu") else device
    c["framework"] = F.FRAMEWORK_OVERHEAD[overhead]
    if device == "cpu" and task != "inference":
        c["runtime"] = F.CPU_TRAINING_RUNTIME_BYTES[allocator]
    return est


def _inference_terms(est: Estimate, m: ModelFacts, quant: str, is_gguf: bool, tokens: int) -> None:
    c = est.components
    if is_gguf:
        # llama.cpp: f16 KV cache of n_ctx cells, compute buffer for n_ubatch = min(512, n_ctx)
        c["kv_cache"] = F.kv_cache_bytes(m.layers, m.kv_heads, m.head_dim, tokens, 1, 2)
        c["compute_buffer"] = F.llamacpp_compute_bytes(tokens, min(512, tokens), m.vocab, m.hidden, m.heads, m.kv_dim)
        c["output_buffer"] = F.llamacpp_output_bytes(m.vocab, est.batch)
        est.notes.append("llama.cpp defaults: n_batch = n_ubatch = 512, f16 KV cache, flash attention off")
        return
    act = 4 if quant == "fp32" else 2
    c["kv_cache"] = F.kv_cache_bytes(m.layers, m.kv_heads, m.head_dim, est.seq_len, est.batch, act)
    # Prefill, one layer at a time under no_grad: the SwiGLU MLP's gate, up and product (3i) and
    # the residual + normed hidden (2h) per token are the largest live set; generate() computes
    # fp32 logits for the last position only.
    c["activations"] = tokens * (3 * m.intermediate + 2 * m.hidden) * act + est.batch * m.vocab * 4
    if quant in ("nf4", "nf4-dq", "int8"):
        c["dequant_buffer"] = 2 * max(a * b for a, b in m.linears().values())


def _training_terms(est, m, quant, tokens, lora_r, grad_ckpt, targets, optimizer, lora_dropout, *, act,
                    dequant_bytes=2, packed_weights=False, attn_impl="sdpa", loss="trl", loss_chunk=0, extra_kept=0,
                    conversation_tokens=0) -> None:
    c = est.components
    task = est.task
    if task == "full":
        pbytes = F.DENSE_BYTES[quant]
        est.trainable_params = m.param_count()
        c["gradients"] = est.trainable_params * pbytes
        c["optimizer"] = F.optimizer_bytes(est.trainable_params, optimizer, pbytes)
    else:
        # PEFT keeps adapter weights in fp32 (autocast_adapter_dtype=True) whatever the base dtype
        est.trainable_params = F.lora_params(m.linears(), targets, lora_r, m.layers)
        c["lora_adapter"] = 4 * est.trainable_params
        c["gradients"] = 4 * est.trainable_params
        c["optimizer"] = F.optimizer_bytes(est.trainable_params, optimizer, 4)
    # PEFT's 4-bit LoRA layer casts its input to the fp32 adapter's dtype only outside CUDA autocast
    # (`torch.is_autocast_enabled()`, peft/tuners/lora/bnb.py), and the trainer computes under bf16/fp16
    # autocast: on CUDA the 4-bit layers keep their 16-bit inputs, shared between q/k/v and gate/up.
    # litgpt (loss_chunk) has LoRA layers of its own.
    uncast = task == "qlora" and est.device == "cuda" and act == 2 and not loss_chunk
    # CUDA's fused dropout keeps a bool mask; CPU dropout multiplies by a mask of the input dtype
    if est.device == "cpu" and task != "full" and attn_impl == "sdpa" and loss == "trl" and not loss_chunk:
        # this toolkit's trainer on a CPU: its fused layers and packed attention (see `estimate`)
        from toolkit.core.segment_attention import BMM_MAX_SCORES_PER_QUERY_ELEMENT, kept_scores_per_token

        if conversation_tokens is None:
            conversation_tokens = min(est.seq_len, BMM_MAX_SCORES_PER_QUERY_ELEMENT * m.head_dim)
            est.notes.append(f"packed attention priced for conversations of {conversation_tokens} tokens, the most it keeps "
                             "(the data's lengths are not known here)")
        per_layer = F.cpu_fused_layer_activation_bytes(m.hidden, m.q_dim, m.kv_dim, m.intermediate, targets,
                                                       m.linears(), lora_r or 0, lora_dropout, act,
                                                       kept_scores_per_token(conversation_tokens, m.heads, m.head_dim))
    else:
        per_layer = F.layer_activation_bytes(m.hidden, m.q_dim, m.kv_dim, m.intermediate,
                                             "full" if task == "full" else "lora", targets, m.linears(), lora_r or 0,
                                             lora_dropout, act, adapter_bytes=act if uncast else 4,
                                             mask_bytes=1 if est.device == "cuda" else 4)
    backward = mask = 0
    if attn_impl == "eager":
        saved, backward = F.eager_attention_bytes(m.heads, est.seq_len, act)
        per_layer += saved
        mask = tokens * est.seq_len * act
    if uncast:
        # What that layer's backward holds beyond the saved set: one MLP-width gradient in flight
        # (benchmarks/cuda_autocast_peak.py: 14.6 KB a token over the saved set at i = 8192, i x 2 = 16.4).
        backward += m.intermediate * act
        est.notes.append("PEFT's 4-bit layers keep their 16-bit inputs under CUDA autocast")
    per_layer += extra_kept // max(1, tokens * m.layers)
    retained = 0
    if loss_chunk:
        logits = F.chunked_logits_bytes(tokens, m.vocab, loss_chunk, act)
    elif loss == "transformers":
        logits = F.logits_bytes(tokens, m.vocab, act)
    elif est.device == "cuda":
        logits = F.trl_fused_logits_bytes(tokens, m.vocab, m.hidden, act)
    elif _cpu_head_streams(act, tokens * m.vocab * 4, packed_weights, task):
        logits = F.cpu_streamed_logits_bytes(tokens, m.vocab, m.hidden, act)
    else:
        logits = F.cpu_lean_logits_bytes(tokens, m.vocab, m.hidden, act)
        retained = F.cpu_lean_retained_bytes(tokens, m.vocab, act)
    acts, logits, phase = F.training_peak_activation_bytes(per_layer, m.layers, m.hidden, tokens, grad_ckpt, logits,
                                                           act, backward, mask, retained)
    c["activations"] = acts
    c["logits"] = logits
    est.notes.append(f"peak during {phase}")
    if quant in ("nf4", "nf4-dq", "int8"):
        # bnb dequantizes one weight at a time to the dtype the base was loaded in, the compute dtype
        # (quant_state.dtype: float32 under fp32 compute), whatever prepare_model_for_kbit_training upcast
        c["dequant_buffer"] = dequant_bytes * max(a * b for a, b in m.linears().values())
    if task != "full" and tuple(targets) != ALL_LINEAR:
        est.notes.append(f"LoRA targets: {', '.join(targets)}")


def _cpu_head_streams(act: int, fp32_logits_bytes: int, packed_weights: bool, task: str) -> bool:
    """Whether the CPU trainer's LM head streams the vocabulary, as `cpu_lm_head.streams` decides at run
    time (tests/estimate/test_planner.py checks the two agree): a frozen head weight (not full
    fine-tuning) that the run does not pre-pack (`packed_weights`, the calibration's choice; only an fp32
    head is ever packed), in fp32 always, in bf16 past the materialized head's limit."""
    packed = packed_weights and act == 4
    return task != "full" and not packed and (act == 4 or fp32_logits_bytes > F.CPU_LEAN_HEAD_MAX_BYTES)


def past_context(m: ModelFacts, seq_len: int) -> int | None:
    """`m`'s context window when `seq_len` tokens are past it, else None (within it, or unknown).
    The one check behind `toolkit estimate`'s warning and `pick`'s skipping a model."""
    limit = m.max_context
    return limit if limit and seq_len > limit else None


def usable_bytes(budget_bytes: int) -> int:
    """The part of a memory budget a plan may use: the budget minus SAFETY_MARGIN."""
    return int(budget_bytes * (1 - SAFETY_MARGIN))
