"""The Ollama Modelfile (toolkit/export/modelfile.py) vs the real chat template and the GGUF's stops."""

from __future__ import annotations

from pathlib import Path

import pytest


CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a bond?"}],
    [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c"}, {"role": "user", "content": "d"}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
     {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}],
]


def test_turn_format_replays_the_chat_template_exactly(embedded_tok):
    from toolkit.export.modelfile import render, turn_format

    fmt = turn_format(embedded_tok)
    assert fmt is not None
    assert fmt.default_system.startswith("You are a helpful AI assistant named SmolLM")
    for msgs in CONVERSATIONS:
        for gen in (False, True):
            want = embedded_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert render(fmt, msgs, gen) == want


def test_modelfile_text(embedded_tok):
    from toolkit.export.modelfile import modelfile_text

    text = modelfile_text("m-q8_0.gguf", embedded_tok, "<|im_end|>")
    assert text.startswith("FROM ./m-q8_0.gguf\n")
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert template.count("{{ if") == template.count("{{ end }}") - 1  # `range` closes with the last end
    assert "<|im_start|>user\n{{ .Content }}<|im_end|>\n" in template
    assert template.endswith("<|im_start|>assistant\n")
    assert '{{-' not in template  # trim markers would eat the template's newlines
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|im_start|>"' in text


def test_modelfile_without_expressible_template_claims_none(embedded_tok):
    import copy

    from toolkit.export.modelfile import modelfile_text, turn_format

    tok = copy.deepcopy(embedded_tok)
    # Content transformed by the template: no prefix/suffix format reproduces it.
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] | upper }}\n{% endfor %}"
    assert turn_format(tok) is None
    text = modelfile_text("m.gguf", tok, "<|im_end|>")
    assert "TEMPLATE" not in text and 'PARAMETER stop "<|im_end|>"' in text


TRAINED = "You are FinBot: answer finance questions in one sentence."


@pytest.mark.parametrize("tok_fixture, bos", [("embedded_tok", None), ("llama32_tokenizer_dir", "<|begin_of_text|>")],
                         ids=["chatml-with-default-system", "llama3-system-block-always"])
def test_modelfile_system_is_the_trained_prompt_and_renders_hf_text(request, tok_fixture, bos):
    """A fine-tune's system prompt is the Modelfile's SYSTEM: Ollama's prompt for a conversation
    without one equals HF's with that system message, and a request's own system message still wins."""
    from tests.export.ollama_template import modelfile_parts, ollama_prompt
    from toolkit.core.chat_tokens import end_of_turn_token
    from toolkit.core.loading import load_tokenizer
    from toolkit.export.modelfile import modelfile_text

    tok = request.getfixturevalue(tok_fixture)
    tok = load_tokenizer(str(tok)) if isinstance(tok, Path) else tok
    text = modelfile_text("m.gguf", tok, end_of_turn_token(tok), system=TRAINED)
    assert text.count("SYSTEM") == 1 and modelfile_parts(text)[1] == TRAINED
    for msgs in CONVERSATIONS:
        own = [{"role": "system", "content": TRAINED}] if msgs[0]["role"] != "system" else []
        want = tok.apply_chat_template(own + msgs, tokenize=False, add_generation_prompt=True)
        assert ollama_prompt(text, msgs, bos=bos) == want


def test_modelfile_keeps_the_template_default_when_the_prompt_cannot_be_written(embedded_tok):
    from toolkit.export.modelfile import modelfile_text

    text = modelfile_text("m.gguf", embedded_tok, "<|im_end|>", system='Say """hi"""')
    assert 'Say """hi' not in text and "cannot sit in a Modelfile string" in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM' in text


def eog_texts_by_llama_cpp(llm) -> set[str]:
    """What llama.cpp itself marks end-of-generation in `llm`'s vocabulary, asked directly."""
    import llama_cpp

    model = llm._model
    return {model.token_get_text(i) for i in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(model.vocab, i)}


def verified_eog(path) -> list[str]:
    """The end-of-generation texts the export's verification reads from the GGUF at `path` (opened as
    `verify_gguf` opens it) and hands the Modelfile."""
    from toolkit.decoding.backends import end_of_generation_tokens
    from toolkit.export.verify import open_gguf

    llm = open_gguf(path, n_ctx=256)
    try:
        return list(end_of_generation_tokens(llm).values())
    finally:
        llm.close()


def modelfile_stops(modelfile: str) -> list[str]:
    """The Modelfile's `PARAMETER stop` strings, in order."""
    return [line.split('"', 1)[1][:-1] for line in modelfile.splitlines() if line.startswith("PARAMETER stop ")]


def test_stop_tokens_are_the_given_end_of_generation_texts(embedded_tok):
    """The stops after the end-of-turn token and the new-turn opener are the GGUF's end-of-generation
    texts the caller passes, whatever they are called, in their order, each once; a name from
    no fixed list (</s>, <|my_end|>) included."""
    from toolkit.export.modelfile import stop_tokens, turn_format

    fmt = turn_format(embedded_tok)
    eog = ["</s>", "<|im_end|>", "<|my_end|>", "<|endoftext|>", "</s>"]
    assert stop_tokens(embedded_tok, "<|im_end|>", fmt, eog) == [
        "<|im_end|>", "<|im_start|>", "</s>", "<|my_end|>", "<|endoftext|>"]
    assert stop_tokens(embedded_tok, "<|im_end|>", None, ["<|my_end|>"]) == ["<|im_end|>", "<|my_end|>"]
    # Not from the tokenizer: a special token of the vocabulary that the GGUF does not end on is no stop.
    assert stop_tokens(embedded_tok, "<|im_end|>", fmt) == ["<|im_end|>", "<|im_start|>"]


def test_modelfile_leaves_out_stops_it_cannot_write(embedded_tok):
    """Ollama's Modelfile parser has no escapes and drops non-printable runes: a stop holding a
    quote, a newline, a tab or an invisible character would come back as another string."""
    from toolkit.export.modelfile import modelfile_text

    eog = ["<|my_end|>", 'say "end"', "line\nbreak", "a\tb", "zero\u200bwidth", "", "back\\slash"]
    text = modelfile_text("m.gguf", embedded_tok, "<|im_end|>", eog=eog)
    assert modelfile_stops(text) == ["<|im_end|>", "<|im_start|>", "<|my_end|>", "back\\slash"]
    (note,) = [line for line in text.splitlines() if line.startswith("# Not stops")]
    assert "'say \"end\"'" in note and "'line\\nbreak'" in note and "'zero\\u200bwidth'" in note


def test_modelfile_stops_are_the_ggufs_end_of_generation_tokens(embedded_tok, embedded_f16_gguf):
    """SmolLM2: what the export reads from its GGUF (`verify_gguf`'s `end_of_generation`) is what
    llama.cpp ends on."""
    from llama_cpp import Llama

    from toolkit.export.modelfile import modelfile_text

    llm = Llama(model_path=str(embedded_f16_gguf), vocab_only=True, verbose=False)
    try:
        eog = eog_texts_by_llama_cpp(llm)
    finally:
        llm.close()
    assert {"<|im_end|>", "<|endoftext|>"} <= eog
    stops = modelfile_stops(modelfile_text("m.gguf", embedded_tok, "<|im_end|>",
                                           eog=verified_eog(embedded_f16_gguf)))
    assert stops[:2] == ["<|im_end|>", "<|im_start|>"] and len(stops) == len(set(stops))
    assert set(stops) == {"<|im_end|>", "<|im_start|>"} | eog
