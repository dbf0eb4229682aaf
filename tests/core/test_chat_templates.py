"""Meta's Llama-3.x Instruct chat template (toolkit.core.chat_templates) against renderings written
out by hand from Meta's documented prompt format, on Meta's real Llama-3.2 tokenizer."""

from __future__ import annotations

import datetime

import pytest


@pytest.fixture(scope="module")
def raw_llama32_tok():
    """Meta's Llama-3.2 tokenizer as shipped: no chat template, `<|end_of_text|>` as EOS."""
    from transformers import AutoTokenizer

    from toolkit.core.reference_models import llama32_tokenizer_files

    return AutoTokenizer.from_pretrained(llama32_tokenizer_files())


@pytest.fixture(scope="module")
def llama32_tok(llama32_tokenizer_dir):
    from toolkit.core.loading import load_tokenizer

    return load_tokenizer(str(llama32_tokenizer_dir))


# Meta's documented single-turn example (llama.com, "Llama 3.2 ... prompt format").
META_EXAMPLE = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 23 July 2024\n\n"
    "You are a helpful assistant<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
    "What is the capital of France?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
)


def test_renders_metas_documented_example(llama32_tok):
    msgs = [{"role": "system", "content": "You are a helpful assistant"},
            {"role": "user", "content": "What is the capital of France?"}]
    got = llama32_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True,
                                          date_string="23 July 2024")
    assert got == META_EXAMPLE


def test_no_system_message_still_writes_the_date_header_and_contents_are_trimmed(llama32_tok):
    msgs = [{"role": "user", "content": "  Hi\n"}, {"role": "assistant", "content": "Hello! "},
            {"role": "user", "content": "Bye"}]
    got = llama32_tok.apply_chat_template(msgs, tokenize=False, date_string="26 Jul 2024")
    assert got == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
    )


def test_date_defaults_to_today_like_metas_template(llama32_tok):
    before = datetime.datetime.now().strftime("%d %b %Y")
    got = llama32_tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    after = datetime.datetime.now().strftime("%d %b %Y")
    assert f"\nToday Date: {before}\n\n" in got or f"\nToday Date: {after}\n\n" in got


MULTI_TURN = [
    [{"role": "user", "content": "u1"}, {"role": "assistant", "content": " a1\n"}, {"role": "user", "content": "u2"}],
    [{"role": "system", "content": " Be brief.\n"}, {"role": "user", "content": "u1"},
     {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}],
]


def metas_template() -> str:
    """Meta's own Llama-3.2 Instruct template, tool parts included (TRL ships a verbatim copy)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("trl")
    path = Path(spec.origin).parent / "chat_templates" / "llama3_2.jinja" if spec and spec.origin else None
    if path is None or not path.is_file():
        pytest.skip("TRL's copy of Meta's Llama-3.2 chat template is not installed")
    return path.read_text()


def test_renders_like_metas_own_template_multi_turn(llama32_tok):
    meta = metas_template()
    for msgs in MULTI_TURN:
        for gen in (False, True):
            for date in ({}, {"date_string": "23 July 2024"}):
                ours = llama32_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, **date)
                assert ours == llama32_tok.apply_chat_template(msgs, chat_template=meta, tokenize=False,
                                                               add_generation_prompt=gen, **date)


def test_llama_cpp_renders_the_training_prompt_date_included(llama32_tok):
    """llama-cpp-python's formatter (the GGUF chat handler, `toolkit serve`, the llama.cpp backend)
    gives the template `strftime_now` as transformers does: both write the day they render on, not
    the template's "26 Jul 2024" fallback, so HF and llama.cpp serve the same prompt, in the form
    training rendered (with its own day's date)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    for template in (llama32_tok.chat_template, metas_template()):
        fmt = Jinja2ChatFormatter(template, eos_token="<|eot_id|>", bos_token="<|begin_of_text|>")
        for msgs in MULTI_TURN:
            want = llama32_tok.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                                   add_generation_prompt=True)
            assert fmt(messages=msgs).prompt == want and "26 Jul 2024" not in want


def test_tokenized_template_has_exactly_one_bos(llama32_tok):
    text = llama32_tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True, date_string="26 Jul 2024")
    ids = llama32_tok(text, add_special_tokens=False)["input_ids"]
    assert ids[:5] == [128000, 128006, 9125, 128007, 271]  # BOS, <|start_header_id|>, "system", ...
    assert ids.count(128000) == 1 and ids.count(128009) == 2 and ids[-1] == 271


def test_ensure_chat_template_only_for_template_less_llama3(raw_llama32_tok, embedded_dir):
    import copy

    from transformers import AutoTokenizer

    from toolkit.core.chat_templates import LLAMA3_CHAT_TEMPLATE, ensure_chat_template

    tok = copy.deepcopy(raw_llama32_tok)
    assert tok.chat_template is None
    assert ensure_chat_template(tok) is True and tok.chat_template == LLAMA3_CHAT_TEMPLATE
    assert ensure_chat_template(tok) is False  # already has one
    own = copy.deepcopy(raw_llama32_tok)
    own.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert ensure_chat_template(own) is False and own.chat_template.startswith("{% for m")
    chatml = AutoTokenizer.from_pretrained(embedded_dir)
    template = chatml.chat_template
    chatml.chat_template = None
    assert ensure_chat_template(chatml) is False and chatml.chat_template is None  # not Llama-3: no guess
    assert "<|im_start|>" in template


def test_load_tokenizer_gives_llama3_its_template(tmp_path, raw_llama32_tok):
    from toolkit.core.loading import load_tokenizer

    raw_llama32_tok.save_pretrained(tmp_path)
    assert "<|start_header_id|>" in load_tokenizer(str(tmp_path)).chat_template


def test_full_llama32_1b_config_matches_the_catalog():
    from toolkit.core.reference_models import random_llama32
    from toolkit.estimate.catalog import lookup

    model = random_llama32(device="meta")
    cfg = model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.intermediate_size, cfg.vocab_size) == (2048, 16, 32, 8, 8192, 128256)
    assert cfg.tie_word_embeddings and cfg.rope_parameters["rope_type"] == "llama3"
    n = sum(p.numel() for p in model.parameters())
    assert n == lookup("meta-llama/Llama-3.2-1B-Instruct").published_params == 1_235_814_400
