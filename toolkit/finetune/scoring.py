"""What a model is measured by on held-out data: answer-token loss (chunked LM head, shared prefix
run once), perplexity of a text, batched greedy answers (on a CPU, rows leave the batch as they
end), and the fine-tuned side run with its adapter merged. `toolkit.finetune.report` turns these
into the base-vs-fine-tuned report."""

from __future__ import annotations

import contextlib
import math

from toolkit.core import sdpa_backends


def _autocast(model, dtype: str):
    import torch

    dev = next(model.parameters()).device.type
    if dtype in ("bfloat16", "float16"):
        return torch.autocast(device_type=dev, dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


def answer_loss(model, input_ids: list[list[int]], labels: list[list[int]], dtype: str = "float32",
                batch_size: int = 8, chunk: int = 1024) -> tuple[float, int]:
    """(mean NLL per trained token, number of trained tokens) over examples, by right-padded batches.

    The vocabulary projection runs on labelled positions only, `chunk` of them at a time: full fp32
    logits for a batch (8 x 512 x 128k for Llama-3) would take ~2 GB next to the optimizer state.
    A prefix every example shares and nothing in it is scored (a system prompt: 25 of the ~114
    tokens of a finance held-out conversation) is run once and its KV cache reused by every batch."""
    import copy

    import torch
    import torch.nn.functional as F

    dev = next(model.parameters()).device
    decoder, head, softcap, scale = _decoder_and_head(model)
    total, count = 0.0, 0
    model.eval()
    shared = shared_prefix(input_ids, labels)
    # Batches of similar lengths: little compute spent on padding (the sum doesn't depend on order).
    order = sorted(range(len(input_ids)), key=lambda k: len(input_ids[k]))
    with torch.no_grad(), _autocast(model, dtype), sdpa_backends.on_device_of(model):
        prefix = decoder(input_ids=torch.tensor([input_ids[0][:shared]], device=dev), use_cache=True
                         ).past_key_values if shared else None
        for i in range(0, len(order), batch_size):
            ids = [input_ids[k][shared:] for k in order[i:i + batch_size]]
            labs = [labels[k][shared:] for k in order[i:i + batch_size]]
            n = max(len(x) for x in ids)
            x = torch.tensor([a + [0] * (n - len(a)) for a in ids], device=dev)
            y = torch.tensor([b + [-100] * (n - len(b)) for b in labs], device=dev)
            att = torch.tensor([[1] * (shared + len(a)) + [0] * (n - len(a)) for a in ids], device=dev)
            kw = {}
            if prefix is not None:
                cache = copy.deepcopy(prefix)
                cache.batch_repeat_interleave(len(ids))
                kw = {"past_key_values": cache, "use_cache": True}
            hidden = decoder(input_ids=x, attention_mask=att, **kw).last_hidden_state
            keep = y[:, 1:] != -100  # position t predicts token t+1
            h, target = hidden[:, :-1][keep], y[:, 1:][keep]
            for j in range(0, len(target), chunk):
                logits = head(h[j:j + chunk]).float()
                if scale is not None:
                    logits = logits * scale
                if softcap:
                    logits = torch.tanh(logits / softcap) * softcap
                total += F.cross_entropy(logits, target[j:j + chunk], reduction="sum").item()
            count += len(target)
    return total / max(count, 1), count


SHARED_PREFIX_MIN = 8  # tokens: a shorter shared prefix is not worth a cache


def shared_prefix(input_ids: list[list[int]], labels: list[list[int]], minimum: int = SHARED_PREFIX_MIN) -> int:
    """Length of the prefix every example starts with, when no prediction is lost by running it apart:
    its tokens and the token after it are unlabelled, and every example goes on past it. 0 when
    shorter than `minimum` tokens (not worth a cache) or when there is one example."""
    if len(input_ids) < 2:
        return 0
    first, n = input_ids[0], min(len(x) for x in input_ids) - 1
    shared = 0
    while shared < n and all(x[shared] == first[shared] for x in input_ids):
        shared += 1
    # the suffix's first token is predicted inside the prefix: it must be unlabelled too
    for y in labels:
        first_labelled = next((t for t, v in enumerate(y) if t and v != -100), len(y))
        shared = min(shared, first_labelled - 1)
    return shared if shared >= minimum else 0


def _decoder_and_head(model):
    """(decoder, LM head, final-logit softcap, logit scale) of a causal LM, PEFT-wrapped or not.
    LoRA layers sit inside these modules, so `disable_adapter()` still gives the base."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    return (base.get_decoder(), base.get_output_embeddings(), getattr(cfg, "final_logit_softcapping", None),
            getattr(cfg, "logit_scale", None))


# Tokens of a text `text_perplexity` scores at most (the plan prices the report's pass at this).
TEXT_MAX_TOKENS = 1024


def text_perplexity(model, tok, text: str, dtype: str = "float32", max_len: int = TEXT_MAX_TOKENS) -> float:
    """exp of the token-weighted mean NLL over `text`'s first `max_len` tokens, each predicted from
    those before it (the first from the BOS, where the tokenizer adds one)."""
    # With the tokenizer's own special tokens: Llama-3 and Gemma always get their BOS (their chat
    # templates write it), and without it the perplexity measured is that of an input they never see.
    ids = tok(text)["input_ids"][:max_len]
    nll, _ = answer_loss(model, [ids], [ids], dtype, batch_size=1)
    return math.exp(nll)


# Prompts a batch of greedy answers: the report's decoding steps are (prompts / this) x max_new_tokens
# a side (toolkit.finetune.plan.run_shape prices them).
ANSWER_BATCH = 16


def greedy_answers(model, tok, prompts: list[list[dict]], max_new_tokens: int, dtype: str = "float32",
                   batch_size: int = ANSWER_BATCH, per_batch=None) -> list[str]:
    """Greedy replies to chat prompts, in the prompts' order (left-padded batches; stops at EOS).

    Prompts are batched by length so that short ones do not wait behind padding. `per_batch(idx)`,
    when given, is a context manager entered around the generation of the prompts at indices `idx`;
    on a CPU, where finished rows leave the batch (`greedy_rows`, unless `plain_greedy` says the
    model's generation_config changes greedy tokens), the value it gives, unless None, is told which
    rows go on: `.keep(indices)`."""
    import torch

    dev = next(model.parameters()).device
    texts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in prompts]
    lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    eos = tok.eos_token_id
    old_side = tok.padding_side
    tok.padding_side = "left"
    outs: list[str] = [""] * len(texts)
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            enc = tok([texts[j] for j in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(dev)
            with contextlib.ExitStack() as stack:
                for block in (torch.no_grad(), _autocast(model, dtype), sdpa_backends.on_device_of(model)):
                    stack.enter_context(block)
                rows = stack.enter_context(per_batch(idx)) if per_batch else None
                if dev.type == "cpu" and plain_greedy(model):
                    new = greedy_rows(model, enc["input_ids"], enc["attention_mask"], max_new_tokens,
                                      [] if eos is None else [eos] if isinstance(eos, int) else list(eos),
                                      getattr(rows, "keep", None))
                else:
                    gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                         top_p=None, top_k=None, pad_token_id=tok.pad_token_id, eos_token_id=eos)
                    new = gen[:, enc["input_ids"].shape[1]:]
            for j, row in zip(idx, new):
                outs[j] = tok.decode(row, skip_special_tokens=True).strip()
    finally:
        tok.padding_side = old_side
        model.train(was_training)
    return outs


# Settings of a model's generation_config under which `generate`'s greedy tokens are not plain argmax
# ones, each with its value that changes nothing (None changes nothing for any of them).
GREEDY_CHANGERS = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0,
                   "min_new_tokens": 0, "sequence_bias": None, "forced_bos_token_id": None,
                   "forced_eos_token_id": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                   "exponential_decay_length_penalty": None, "guidance_scale": 1.0, "watermarking_config": None}


def plain_greedy(model) -> bool:
    """Whether `model`'s generation_config leaves greedy decoding at the argmax (no repetition penalty,
    banned words, minimum length ...): then `greedy_rows` gives `generate`'s tokens; else the report
    decodes through `generate`, which applies them."""
    config = getattr(model, "generation_config", None)
    return all(getattr(config, k, None) in (None, neutral) for k, neutral in GREEDY_CHANGERS.items())


def greedy_rows(model, input_ids, attention_mask, max_new_tokens: int, eos: list[int], keep=None,
                drop: bool | None = None) -> list[list[int]]:
    """Each left-padded row's greedy continuation: its new tokens up to its first `eos` token
    (included) or `max_new_tokens`, the tokens transformers' `generate` gives without a logits
    processor (the same positions, mask and KV cache a row; tests/finetune/test_scoring.py).

    Unlike `generate`, a row that has ended leaves the batch, its KV cache with it: on a CPU a
    decoding step's matmuls cost per row, and the finance report's fine-tuned answers end at ~30
    of their 72 tokens while most base answers run to 72. Its paired answers, six alternating pairs
    on the 2-core Zen 3 (2026-12-07): 13.3-16.9 s against 15.7-17.1 s through `generate`, 0.90x on
    the median pair, the same answers. `keep(indices)`, when given, is told which rows go on.
    `drop` None: rows leave where the model's cache can drop them (`rows_can_leave`); else ended
    rows stay in the batch, as in `generate`, and only their tokens stop."""
    import torch

    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1)
    cache, mask, last = out.past_key_values, attention_mask, positions[:, -1]
    drop = rows_can_leave(cache) if drop is None else drop
    alive = torch.arange(len(input_ids), device=input_ids.device)
    ended = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
    stop = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
    token = out.logits[:, -1].argmax(-1)
    new: list[list[int]] = [[] for _ in range(len(input_ids))]
    for step in range(max_new_tokens):
        for row, t, over in zip(alive.tolist(), token.tolist(), ended.tolist()):
            if not over:
                new[row].append(t)
        ended = ended | torch.isin(token, stop)
        if step == max_new_tokens - 1 or bool(ended.all()):
            break
        if drop and bool(ended.any()):
            going = (~ended).nonzero().squeeze(1)
            cache.batch_select_indices(going)
            mask, last, token, alive, ended = mask[going], last[going], token[going], alive[going], ended[going]
            if keep is not None:
                keep(going)
        mask = torch.cat([mask, mask.new_ones(len(mask), 1)], 1)
        last = last + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=last[:, None], past_key_values=cache,
                    use_cache=True)
        token = out.logits[:, -1].argmax(-1)
    return new


def rows_can_leave(cache) -> bool:
    """Whether batch rows can be dropped from `cache` whole: a transformers DynamicCache of full or
    sliding-window attention layers. A linear-attention, hybrid or model-specific cache keeps state
    that `batch_select_indices` would not select."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    return type(cache) is DynamicCache and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer)
                                               for layer in cache.layers)


def paired_greedy_answers(model, tok, prompts: list[list[dict]], max_new_tokens: int, dtype: str = "float32",
                          batch_size: int = ANSWER_BATCH) -> tuple[list[str], list[str]] | None:
    """(base answers, fine-tuned answers) from one generation on a CPU: each prompt runs twice in the
    same batch, its LoRA product masked on the base row (`fused_lora.adapter_rows`). A CPU decode of
    a small model costs per step more than per row: on the 2-core EPYC, fp32, the finance report's
    16 answers took 19.6 s paired against 12.1 + 13.4 s run apart. None where this does not
    apply (a GPU, an adapter that is merged, not plain LoRA or not the only one, a layer the fused
    path can't take): the caller then runs the two sides apart."""
    import torch

    from toolkit.finetune import fused_lora

    if len(getattr(model, "peft_config", None) or ()) != 1:
        return None
    both = [p for p in prompts for _ in (0, 1)]
    on = [0, 1] * len(prompts)
    # The fused path is the one judge of the rest: it swaps nothing on a GPU or without LoRA layers,
    # and a merged, DoRA or dropout layer raises NotFused at its first call.
    try:
        with fused_lora.fused_on_cpu(model, next(model.parameters()).device.type) as swapped:
            if not swapped:
                return None
            answers = greedy_answers(model, tok, both, max_new_tokens, dtype, 2 * batch_size,
                                     lambda idx: fused_lora.adapter_rows(model, torch.tensor([on[j] for j in idx])))
    except fused_lora.NotFused:
        return None
    return answers[0::2], answers[1::2]


@contextlib.contextmanager
def merged_adapter(model):
    """Within the block, a PEFT LoRA model runs with the adapter merged into unquantized base weights:
    the fine-tuned model's evaluation and generation then cost what the base's do (unmerged, every
    adapted linear layer adds two small matmuls, a scale and an add; on the finance report on the
    2-core AVX2 CPU, 16 greedy answers took 9.4 s unmerged and 8.6 s merged). Merging
    into 4-bit weights would round the update away, so a quantized base stays unmerged. `report.evaluate`
    measures the base before this, since unmerging leaves float rounding in its weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else None
    quantized = base is not None and (getattr(base, "hf_quantizer", None) is not None
                                      or getattr(base, "is_quantized", False))
    if base is None or quantized or not hasattr(model, "merge_adapter"):
        yield
        return
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()
