"""The end-of-turn token comes from the chat template for every family (ChatML, Llama-3, Gemma),
and training refuses to start when that token is not trained (toolkit.finetune.data)."""

from __future__ import annotations

import copy

import pytest

from toolkit.core.errors import UserError

# Gemma's template shape (google/gemma-2-2b-it): <start_of_turn>role ... <end_of_turn>, "model" for
# the assistant, no system role.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def chatml_tok(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


@pytest.fixture(scope="module")
def llama_tok():
    """Meta's tokenizer as shipped (EOS `<|end_of_text|>`) plus our template: the end-of-turn must
    come from the template, not from the EOS."""
    from transformers import AutoTokenizer

    from toolkit.core.chat_templates import ensure_chat_template
    from toolkit.core.reference_models import llama32_tokenizer_files

    tok = AutoTokenizer.from_pretrained(llama32_tokenizer_files())
    assert ensure_chat_template(tok)
    return tok


@pytest.fixture(scope="module")
def gemma_tok(chatml_tok):
    tok = copy.deepcopy(chatml_tok)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = GEMMA_TEMPLATE
    return tok


def test_end_of_turn_token_read_off_the_template(chatml_tok, llama_tok, gemma_tok):
    from toolkit.core.chat_tokens import end_of_turn_token

    assert end_of_turn_token(chatml_tok) == "<|im_end|>"
    assert llama_tok.eos_token == "<|end_of_text|>"
    assert end_of_turn_token(llama_tok) == "<|eot_id|>"
    assert end_of_turn_token(gemma_tok) == "<end_of_turn>"


def test_end_of_turn_falls_back_to_eos(chatml_tok):
    from toolkit.core.chat_tokens import end_of_turn_token

    tok = copy.deepcopy(chatml_tok)
    tok.chat_template = None
    assert end_of_turn_token(tok) == tok.eos_token
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} END{% endfor %}"  # plain-text turn end
    assert end_of_turn_token(tok) == tok.eos_token
    tok.chat_template = "{{ raise_exception('no') }}"
    assert end_of_turn_token(tok) == tok.eos_token


def test_fix_chat_special_tokens_on_llama32(llama_tok):
    from toolkit.core.chat_tokens import fix_chat_special_tokens

    tok = copy.deepcopy(llama_tok)
    tok.chat_template = None  # as shipped: the template is added first, then read
    fix_chat_special_tokens(tok)
    assert (tok.eos_token, tok.eos_token_id) == ("<|eot_id|>", 128009)
    assert (tok.pad_token, tok.pad_token_id) == ("<|finetune_right_pad_id|>", 128004)
    assert "<|start_header_id|>" in tok.chat_template


# ---------------------------------------------------------------- the pre-training check

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a bond?"},
            {"role": "assistant", "content": "A loan you make to an issuer."}]


def _split(tok, conversations, max_seq_len=256):
    from toolkit.finetune.data import Example, tokenize_split

    examples = [Example(messages=m, text=None, source=f"train.jsonl:{i}") for i, m in enumerate(conversations, 1)]
    return tokenize_split(tok, examples, max_seq_len, "truncate", True, "train")


@pytest.mark.parametrize("name", ["chatml_tok", "llama_tok", "gemma_tok"])
def test_end_of_turn_is_trained_for_each_family(request, name):
    from toolkit.core.chat_tokens import end_of_turn_token
    from toolkit.finetune.data import check_end_of_turn_trained

    tok = request.getfixturevalue(name)
    msgs = MESSAGES[1:] if name == "gemma_tok" else MESSAGES
    split = _split(tok, [msgs])
    eot_id = tok.convert_tokens_to_ids(end_of_turn_token(tok))
    assert eot_id in [lab for lab in split.labels[0] if lab != -100]
    check_end_of_turn_trained(tok, split)


def test_refuses_a_mask_that_drops_the_end_of_turn(llama_tok):
    from toolkit.finetune.data import check_end_of_turn_trained

    split = _split(llama_tok, [MESSAGES])
    split.labels[0] = [-100 if t == 128009 else lab for t, lab in zip(split.input_ids[0], split.labels[0])]
    with pytest.raises(UserError, match=r"train.jsonl:1: the end-of-turn token '<\|eot_id\|>' is outside the "
                                        r"loss mask, so the model would never learn to stop"):
        check_end_of_turn_trained(llama_tok, split)


def test_refuses_a_template_whose_assistant_turn_stops_before_the_end_of_turn(llama_tok):
    from toolkit.finetune.data import check_end_of_turn_trained

    # The assistant's <|eot_id|> is written only when another turn follows, so the rendered prompt
    # (generation prompt) -> reply span never holds it: a real way a custom template loses the stop.
    tok = copy.deepcopy(llama_tok)
    tok.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] }}{% if not loop.last or m['role'] != 'assistant' %}<|eot_id|>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    split = _split(tok, [MESSAGES])
    with pytest.raises(UserError, match="would never learn to stop"):
        check_end_of_turn_trained(tok, split)


def test_first_example_holding_the_end_of_turn_decides(llama_tok):
    from toolkit.finetune.data import check_end_of_turn_trained

    long_reply = MESSAGES[:2] + [{"role": "assistant", "content": "word " * 200}]
    split = _split(llama_tok, [long_reply, MESSAGES], max_seq_len=64)  # the first is cut before its end
    assert len(split.input_ids[0]) == 64 and split.labels[0][-1] != 128009
    check_end_of_turn_trained(llama_tok, split)
    only_cut = _split(llama_tok, [long_reply], max_seq_len=64)
    with pytest.raises(UserError, match="every training example is cut by data.max_seq_len"):
        check_end_of_turn_trained(llama_tok, only_cut)
