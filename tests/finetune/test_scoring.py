"""toolkit.finetune.scoring: the answer-token loss against the full-logits loss (chunked, shared
prefix), batched greedy answers against one-at-a-time generation, the merged adapter against the unmerged one,
a text's perplexity against transformers' own loss."""

from __future__ import annotations

import pytest


def test_answer_loss_in_chunks_equals_the_full_logits_loss(tiny_llama_dir):
    """Same loss as cross entropy over the full logits, with the vocabulary projection never seeing
    more than `chunk` positions at once; for the adapter and, with it disabled, for the base."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from toolkit.finetune.scoring import answer_loss

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    gen = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    ids = [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in (23, 9, 31, 17, 5)]
    labels = [[t if (i > 3 and i % 3) else -100 for i, t in enumerate(x)] for x in ids]

    def straightforward():
        total, count = 0.0, 0
        with torch.no_grad():
            for x, y in zip(ids, labels):
                logits = model(input_ids=torch.tensor([x])).logits.float()[0, :-1]
                target = torch.tensor(y[1:])
                total += F.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
                count += int((target != -100).sum())
        return total / count, count

    def loss_watching(module, record):
        """answer_loss (batches of 2, chunks of 7) with `record(input)` called on each call of `module`."""
        hook = module.register_forward_hook(lambda m, inp, out: record(inp[0]))
        try:
            return answer_loss(model, ids, labels, batch_size=2, chunk=7)
        finally:
            hook.remove()

    seen = []
    loss, n = loss_watching(model.get_base_model().get_output_embeddings(), lambda x: seen.append(x.shape))
    ref_loss, ref_n = straightforward()
    assert n == ref_n and loss == pytest.approx(ref_loss, rel=1e-5)
    assert seen and all(s[0] <= 7 and len(s) == 2 for s in seen) and sum(s[0] for s in seen) == n
    with model.disable_adapter():
        base_loss, _ = answer_loss(model, ids, labels, batch_size=3, chunk=4)
        ref_base, _ = straightforward()
    assert base_loss == pytest.approx(ref_base, rel=1e-5) and abs(base_loss - loss) > 1e-4

    # A shared system prompt runs once (its KV cache reused): same loss, fewer tokens through the decoder.
    from toolkit.finetune.scoring import shared_prefix

    system = torch.randint(0, vocab, (12,), generator=gen).tolist()
    ids = [system + x for x in ids]
    labels = [[-100] * 12 + y for y in labels]
    assert shared_prefix(ids, labels) == 12
    tokens = []
    loss, n = loss_watching(model.get_base_model().get_input_embeddings(), lambda x: tokens.append(x.numel()))
    ref_loss, ref_n = straightforward()
    assert n == ref_n and loss == pytest.approx(ref_loss, rel=1e-5)
    assert sum(tokens) < sum(len(x) for x in ids) - 3 * 12  # the prefix once, not once per example (padding aside)
    labels[2][5] = ids[2][5]  # a labelled token inside the prefix: nothing may be cut there
    assert shared_prefix(ids, labels) == 0


def test_batched_greedy_answers_keep_the_prompts_order(tiny, chat_prompts):
    import torch

    from toolkit.finetune.scoring import greedy_answers

    model, tok = tiny
    batched = greedy_answers(model, tok, chat_prompts, max_new_tokens=6, batch_size=3)
    for prompt, got in zip(chat_prompts, batched):  # reference: one prompt at a time, no padding
        ids = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        assert got == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert tok.padding_side != "left" or batched  # restored


def test_greedy_rows_equal_generate_as_rows_end_apart_and_leave_the_batch(tiny, chat_prompts):
    """Each left-padded row's tokens equal transformers' `generate` (greedy) up to and including its
    end token, for an end token that ends the rows at different steps; a row that has ended leaves
    the batch (the forwards' batch shrinks, `keep` hears the rows that go on); and with a repetition
    penalty in the model's generation_config the report decodes through `generate`, which applies it."""
    import copy

    import torch

    from toolkit.finetune import scoring

    model, tok = tiny
    model = copy.deepcopy(model).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # weights far from the tiny model's init, so that rows say different things
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    tok = copy.deepcopy(tok)
    tok.padding_side = "left"
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in chat_prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    n, width = 12, enc["input_ids"].shape[1]
    with torch.no_grad():
        free = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                              eos_token_id=None)[:, width:].tolist()
    # end tokens that end rows at different steps: row 0's third new token and row 2's seventh
    stops = [free[0][2], free[2][6]]
    ends = [min([row.index(t) for t in stops if t in row], default=n) for row in free]
    assert len({e for e in ends if e < n}) >= 2 and max(ends) == n  # rows end apart, one never

    with torch.no_grad():
        want = model.generate(**enc, max_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id,
                              eos_token_id=stops)[:, width:].tolist()
    sizes, kept = [], []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
    try:
        with torch.no_grad():
            got = scoring.greedy_rows(model, enc["input_ids"], enc["attention_mask"], n, stops, kept.append)
    finally:
        hook.remove()
    assert got == [ref[:end + 1] for ref, end in zip(want, ends)]
    # the prefill's rows, then after each new token the rows that have not ended
    assert sizes == [len(texts)] + [sum(e > step for e in ends) for step in range(n - 1)]
    alive, going = list(range(len(texts))), []
    for step in range(n - 1):
        if any(ends[r] == step for r in alive):
            going.append([i for i, r in enumerate(alive) if ends[r] != step])
            alive = [r for r in alive if ends[r] != step]
    assert [k.tolist() for k in kept] == going and len(going) >= 2
    # where a cache can't drop rows, ended rows stay in the batch and only their tokens stop
    sizes.clear()
    hook = model.get_input_embeddings().register_forward_hook(lambda m, inp, out: sizes.append(inp[0].shape[0]))
    try:
        with torch.no_grad():
            assert scoring.greedy_rows(model, enc["input_ids"], enc["attention_mask"], n, stops, drop=False) == got
    finally:
        hook.remove()
    assert sizes == [len(texts)] * n
    # which caches can drop rows: full and sliding-window attention, not a linear-attention layer's state
    from transformers import DynamicCache, Gemma2Config, Qwen3NextConfig

    assert scoring.rows_can_leave(DynamicCache(config=Gemma2Config(num_hidden_layers=2)))
    assert not scoring.rows_can_leave(DynamicCache(config=Qwen3NextConfig(num_hidden_layers=4)))

    # a generation_config that changes greedy tokens goes to `generate` (which applies it)
    model = tiny[0]  # its greedy answers repeat one token, which a repetition penalty changes
    assert scoring.plain_greedy(model)
    plain = scoring.greedy_answers(model, tok, chat_prompts, 8)
    penalized = copy.deepcopy(model)
    penalized.generation_config.repetition_penalty = 5.0
    assert not scoring.plain_greedy(penalized)
    answers = scoring.greedy_answers(penalized, tok, chat_prompts, 8)
    assert answers != plain
    for prompt, got in zip(chat_prompts, answers):
        ids = tok.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        with torch.no_grad():
            out = penalized.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
        assert got == tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_merged_adapter_gives_the_unmerged_answers_and_is_undone(tiny, chat_prompts):
    """The fine-tuned side runs merged (faster); its loss and greedy answers equal the unmerged model's."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from toolkit.finetune import scoring

    model, tok = tiny
    torch.manual_seed(0)
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    ids = [tok(tok.apply_chat_template(p + [{"role": "assistant", "content": "A bond is a loan."}],
                                       tokenize=False))["input_ids"][:40] for p in chat_prompts]
    unmerged = scoring.answer_loss(peft, ids, ids)
    answers = scoring.greedy_answers(peft, tok, chat_prompts, 6)
    with scoring.merged_adapter(peft):
        assert all(m.merged for m in peft.modules() if hasattr(m, "merged_adapters"))
        merged = scoring.answer_loss(peft, ids, ids)
        assert scoring.greedy_answers(peft, tok, chat_prompts, 6) == answers
    assert not any(m.merged for m in peft.modules() if hasattr(m, "merged_adapters"))
    assert merged[1] == unmerged[1] and abs(merged[0] - unmerged[0]) < 1e-4
    with peft.disable_adapter():
        base = scoring.answer_loss(peft, ids, ids)[0]
    assert abs(base - unmerged[0]) > 1e-3  # the adapter changes the model: the check above is not vacuous


def test_paired_greedy_answers_equal_the_two_sides_run_apart(tiny, chat_prompts):
    """Base and fine-tuned answers from one mixed-adapter generation equal those of a pass with the
    adapter disabled and one with it on; a merged model or a second adapter is not paired."""
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    from toolkit.finetune import scoring

    model, tok = tiny
    torch.manual_seed(0)
    peft = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with peft.disable_adapter():
        base = scoring.greedy_answers(peft, tok, chat_prompts, 8)
    tuned = scoring.greedy_answers(peft, tok, chat_prompts, 8)
    assert base != tuned  # the adapter changes the answers: the comparison below is not vacuous
    assert scoring.paired_greedy_answers(peft, tok, chat_prompts, 8, batch_size=2) == (base, tuned)
    with scoring.merged_adapter(peft):
        assert scoring.paired_greedy_answers(peft, tok, chat_prompts, 8) is None
    assert scoring.paired_greedy_answers(model, tok, chat_prompts, 8) is None  # no adapter at all
    peft.add_adapter("second", LoraConfig(r=2, target_modules="all-linear"))
    assert scoring.paired_greedy_answers(peft, tok, chat_prompts, 8) is None
    # A dropout is off while answering: that adapter pairs like any other.
    dropped = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, lora_dropout=0.1, target_modules="all-linear",
                                                              init_lora_weights=False))
    with dropped.disable_adapter():
        base = scoring.greedy_answers(dropped, tok, chat_prompts, 8)
    assert scoring.paired_greedy_answers(dropped, tok, chat_prompts, 8) == (
        base, scoring.greedy_answers(dropped, tok, chat_prompts, 8))
    dora = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, use_dora=True, target_modules="all-linear"))
    assert scoring.paired_greedy_answers(dora, tok, chat_prompts, 8) is None  # the fused path can't take it


def test_scoring_runs_attention_inside_the_devices_sdpa_choice(tiny, chat_prompts, monkeypatch):
    """The held-out loss and the greedy answers attend within `sdpa_backends`' choice for the model's
    device (on CUDA: no cuDNN kernel, which plans per shape). The CPU is made to answer CUDA's
    choice; the results are those of torch's own choice."""
    import torch

    from toolkit.core import sdpa_backends
    from toolkit.finetune import scoring

    model, tok = tiny
    ids = [tok(tok.apply_chat_template(p, tokenize=False))["input_ids"][:30] for p in chat_prompts]
    want_loss, want_answers = scoring.answer_loss(model, ids, ids), scoring.greedy_answers(model, tok, chat_prompts, 4)
    seen = []
    hook = model.model.layers[0].self_attn.register_forward_hook(
        lambda *a: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    monkeypatch.setattr(sdpa_backends, "for_device", lambda device, engine="": sdpa_backends.CUDA_SDPA_BACKENDS)
    try:
        loss, answers = scoring.answer_loss(model, ids, ids), scoring.greedy_answers(model, tok, chat_prompts, 4)
    finally:
        hook.remove()
    assert seen and not any(seen)
    assert loss[1] == want_loss[1] and loss[0] == pytest.approx(want_loss[0], rel=1e-5) and answers == want_answers


def test_text_perplexity_scores_the_text_after_the_tokenizers_bos(tiny_llama32_dir):
    """exp of transformers' own mean loss over the text as its tokenizer encodes it: Llama-3's begins
    with `<|begin_of_text|>`, which every conversation it sees begins with too."""
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.finetune.report import GENERAL_TEXT
    from toolkit.finetune.scoring import text_perplexity

    tok = AutoTokenizer.from_pretrained(tiny_llama32_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama32_dir)
    ids = torch.tensor([tok(GENERAL_TEXT)["input_ids"]])
    assert ids[0, 0] == tok.bos_token_id
    with torch.no_grad():
        want = math.exp(model(input_ids=ids, labels=ids).loss.item())
    assert text_perplexity(model, tok, GENERAL_TEXT) == pytest.approx(want, rel=1e-5)
