"""Packing never lets one conversation attend to another: the loss of a packed, padding-free batch
(TRL's own collator) equals the loss of the same conversations run one at a time, with
transformers' `sdpa` block mask and with our per-conversation attention alike."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model_and_examples(tiny_llama_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolkit.finetune import data

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    exs = data.read_examples(ROOT / "recipes" / "finance" / "train.jsonl")[:5]
    pairs = [data.tokenize_example(tok, ex) for ex in exs]
    assert len({len(ids) for ids, _ in pairs}) > 1  # conversations of different lengths
    return model, pairs


def _label_nll(logits, labels):
    """Per-position NLL of the next token where it is labelled (the causal-LM shift)."""
    import torch

    logp = torch.log_softmax(logits[0, :-1].double(), -1)
    tgt = torch.tensor(labels[1:])
    keep = tgt != -100
    return -logp[keep].gather(-1, tgt[keep, None]).squeeze(-1)


def _unpacked(model, pairs):
    import torch

    with torch.no_grad():
        return torch.cat([_label_nll(model(input_ids=torch.tensor([ids])).logits, labels) for ids, labels in pairs])


def _packed(model, pairs, strip_bounds=False, use_cache=False):
    import torch
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    batch = collate([{"input_ids": ids, "labels": labels} for ids, labels in pairs])
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    labels = batch.pop("labels")[0].tolist()
    if strip_bounds:  # the bug packing must never have: one long row, nothing says where conversations end
        for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "position_ids"):
            batch.pop(k, None)
    with torch.no_grad():
        return _label_nll(model(**batch, use_cache=use_cache).logits, labels)


@pytest.mark.parametrize("impl", ["sdpa", "toolkit_packed_sdpa"])
def test_packed_loss_equals_unpacked(model_and_examples, impl):
    import torch

    from toolkit.finetune import packed_attention

    model, pairs = model_and_examples
    packed_attention.register()
    model.set_attn_implementation(impl)
    try:
        ref, got = _unpacked(model, pairs), _packed(model, pairs)
        assert got.shape == ref.shape and got.numel() > 50
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got.sum(), ref.sum(), rtol=1e-6, atol=1e-4)
        # The comparison can fail: with conversations allowed to see each other the loss moves.
        leaked = _packed(model, pairs, strip_bounds=True)
        assert (leaked - ref).abs().max() > 1e-3
        if impl == packed_attention.NAME:
            # transformers only builds the packed block mask without a KV cache (TRL's compute_loss passes
            # use_cache=False; a plain eval-mode forward makes a cache and leaks across conversations).
            # Ours splits on the collator's bounds either way.
            torch.testing.assert_close(_packed(model, pairs, use_cache=True), ref, rtol=1e-5, atol=1e-5)
    finally:
        model.set_attn_implementation("sdpa")


def test_segment_bounds_from_collator_or_positions():
    import torch

    from toolkit.finetune.packed_attention import segment_bounds

    assert segment_bounds(torch.tensor([0, 3, 5], dtype=torch.int32)) == [0, 3, 5]
    assert segment_bounds(position_ids=torch.tensor([[0, 1, 2, 0, 1]])) == [0, 3, 5]
    assert segment_bounds(position_ids=torch.tensor([[0, 1, 2, 3]])) is None  # one conversation: not packed
    assert segment_bounds(torch.tensor([0, 4], dtype=torch.int32)) is None


def test_generation_unchanged(model_and_examples):
    """Outside packed training (a KV cache, a padding mask) it is transformers' sdpa, token for token."""
    import torch

    from toolkit.finetune import packed_attention

    model, pairs = model_and_examples
    ids = torch.tensor([pairs[0][0][:20], pairs[1][0][:20]])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row
    outs = {}
    for impl in ("sdpa", packed_attention.register()):
        model.set_attn_implementation(impl)
        outs[impl] = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    model.set_attn_implementation("sdpa")
    assert torch.equal(*outs.values())


def test_wanted_only_for_packed_cpu_training():
    from toolkit.finetune.packed_attention import wanted

    assert wanted("cpu", True, "transformers+peft+bitsandbytes")
    assert not wanted("cpu", False, "transformers+peft")
    assert not wanted("cuda", True, "transformers+peft")
    assert not wanted("cpu", True, "unsloth")


def test_fp32_variant_attends_in_fp32_and_returns_bf16():
    """NAME_FP32 on bf16 inputs, under bf16 autocast, is exactly attention_forward on the fp32 copies,
    cast back; and it differs from attending in bf16 (else the test could not tell the two apart)."""
    import torch

    from toolkit.finetune import packed_attention as P

    class Module:
        num_key_value_groups = 3

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 6, 40, 16, generator=g).bfloat16()
    k, v = (torch.randn(1, 2, 40, 16, generator=g).bfloat16() for _ in range(2))
    cu = torch.tensor([0, 13, 31, 40], dtype=torch.int32)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as in training: autocast must not undo the upcast
        got, _ = P.attention_forward_fp32(Module(), q, k, v, None, cu_seq_lens_q=cu)
    want, _ = P.attention_forward(Module(), q.float(), k.float(), v.float(), None, cu_seq_lens_q=cu)
    in_bf16, _ = P.attention_forward(Module(), q, k, v, None, cu_seq_lens_q=cu)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.bfloat16())
    assert not torch.equal(got, in_bf16)
    assert P.register("float32") == P.NAME_FP32 and P.register() == P.NAME


def test_bf16_packed_loss_with_fp32_attention_equals_unpacked(model_and_examples):
    """The recipe's bf16 CPU path (bf16 weights, NAME_FP32): the packed loss is the fp32 model's
    unpacked loss within bf16 rounding (measured max 0.003 per token on this fixture), and a packed
    row that leaks across conversations is far outside it (measured 0.11)."""
    import copy

    import torch

    from toolkit.finetune import packed_attention

    model, pairs = model_and_examples
    ref = _unpacked(model, pairs)
    bf16 = copy.deepcopy(model).bfloat16()
    bf16.set_attn_implementation(packed_attention.register("float32"))
    got = _packed(bf16, pairs)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-2)
    assert (_packed(bf16, pairs, strip_bounds=True) - ref).abs().max() > 5e-2
