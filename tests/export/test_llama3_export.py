"""Export pieces on Meta's real Llama-3.2 tokenizer + template: the Ollama Modelfile renders what
HF's template renders (system block included, one BOS) and stops where llama.cpp does, the
converted GGUF tokenizes like HF, verify tokenizes templated text with one BOS, and the chat-turn
check knows the template's tokens without a ChatML list."""

from __future__ import annotations

import copy

import pytest

from tests.export.ollama_template import ollama_prompt
from tests.export.test_modelfile import CONVERSATIONS, eog_texts_by_llama_cpp, modelfile_stops, verified_eog

BOS = "<|begin_of_text|>"


@pytest.fixture(scope="module")
def llama_tok(llama32_tokenizer_dir):
    from toolkit.core.loading import load_tokenizer

    return load_tokenizer(str(llama32_tokenizer_dir))


@pytest.fixture(scope="module")
def llama32_gguf(tiny_llama32_dir, tmp_path_factory):
    """The tiny Llama-3.2 through the official converter, as an export converts it."""
    from toolkit.export.convert import hf_to_gguf

    return hf_to_gguf(tiny_llama32_dir, tmp_path_factory.mktemp("llama32-gguf") / "tiny-f16.gguf")


@pytest.fixture(scope="module")
def gguf_vocab(llama32_gguf):
    from llama_cpp import Llama

    llm = Llama(model_path=str(llama32_gguf), vocab_only=True, verbose=False)
    yield llm
    llm.close()


def test_turn_format_replays_the_llama3_template(llama_tok):
    from toolkit.export.modelfile import render, turn_format

    fmt = turn_format(llama_tok)
    assert fmt is not None and fmt.default_system == ""
    assert fmt.system_prefix.startswith(BOS + "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge")
    for msgs in CONVERSATIONS:
        for gen in (False, True):
            want = llama_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert render(fmt, msgs, gen) == want


def test_llama3_modelfile_renders_hf_text_system_block_included(llama_tok):
    from toolkit.core.chat_tokens import end_of_turn_token
    from toolkit.export.modelfile import modelfile_text, ollama_adds_bos

    assert ollama_adds_bos(llama_tok) == BOS
    text = modelfile_text("m-f16.gguf", llama_tok, end_of_turn_token(llama_tok))
    template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert not template.startswith(BOS) and BOS not in template  # Ollama adds it: one BOS, not two
    assert template.startswith("<|start_header_id|>system<|end_header_id|>")  # even without a system prompt
    assert 'PARAMETER stop "<|eot_id|>"' in text and 'PARAMETER stop "<|start_header_id|>"' in text
    assert "SYSTEM" not in text  # Meta's default system prompt is empty
    for msgs in CONVERSATIONS:
        want = llama_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ollama_prompt(text, msgs, bos=BOS) == want


def test_modelfile_from_metas_own_template_renders_hf_text(llama_tok):
    """The main recipe's base (Llama-3.2-1B-Instruct) ships Meta's template, tool branches and all."""
    from tests.core.test_chat_templates import metas_template
    from toolkit.export.modelfile import modelfile_text

    tok = copy.deepcopy(llama_tok)
    tok.chat_template = metas_template()
    text = modelfile_text("m-f16.gguf", tok, "<|eot_id|>")
    for msgs in CONVERSATIONS:
        want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ollama_prompt(text, msgs, bos=BOS) == want


def test_modelfile_stops_wherever_llama_cpp_ends_generation(llama32_gguf, gguf_vocab, llama_tok):
    """Ollama's Go engine stops only on the GGUF's EOS id (<|eot_id|>): the Modelfile's stops, read
    from the GGUF as the export reads them, are the end-of-turn token, the new-turn opener and every
    token llama.cpp (and Meta's generation_config) end generation on, none of them twice."""
    from toolkit.export.modelfile import modelfile_text

    eog = eog_texts_by_llama_cpp(gguf_vocab)
    assert eog == {"<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"}
    text = modelfile_text("m-f16.gguf", llama_tok, "<|eot_id|>", eog=verified_eog(llama32_gguf))
    stops = modelfile_stops(text)
    assert stops[:2] == ["<|eot_id|>", "<|start_header_id|>"] and len(stops) == len(set(stops))
    assert set(stops) == {"<|eot_id|>", "<|start_header_id|>"} | eog


def test_llama_cpp_backend_ends_where_llama_cpp_does(llama32_gguf, llama_tok):
    """The toolkit's llama.cpp backend (generate --gguf, chat, the UI) stops on every end-of-generation
    token, not only the GGUF's single EOS id: Meta's Llama-3.2 ends on <|end_of_text|> and <|eom_id|> too."""
    from toolkit.decoding.backends.llamacpp import LlamaCppBackend

    with LlamaCppBackend(str(llama32_gguf), n_ctx=64) as backend:
        ends = {llama_tok.convert_ids_to_tokens(i) for i in backend.eos_ids}
    assert ends == {"<|eot_id|>", "<|eom_id|>", "<|end_of_text|>"}


TRICKY = ["Hello world", "  leading spaces", "   three", "trailing   ", "    ", "\tTab\tand\nnewline\n\n\n",
          "a\r\nb\rc", "1234567", "12345678901 3.14159 1,000,000 $1,157.63 2026-11-22", "I'm can't you've we'll THEY'RE",
          "héllo wörld café naïve — “quotes” …", "日本語のテキスト 中文 한국어", "emoji 🤖🚀👍🏽 ❤️", "\u00a0nbsp\u200bzw",
          "ﬁ ligature Ａ fullwidth", "def f(x):\n    return x**2  # sq\n\nif __name__ == '__main__':\n\tprint(f(3))",
          "x = {'a': [1, 2, 3]}; y=a!=b&&c||d"]


def test_gguf_tokenizes_like_hf(gguf_vocab, llama_tok):
    from toolkit.export.verify import gguf_text_ids, text_ids

    meta = gguf_vocab.metadata
    assert (meta["tokenizer.ggml.pre"], meta["tokenizer.ggml.add_bos_token"]) == ("llama-bpe", "true")
    assert (gguf_vocab.token_bos(), gguf_vocab.token_eos(), gguf_vocab._model.token_eot()) == (128000, 128009, 128009)
    for text in TRICKY:
        ids = text_ids(llama_tok, text)
        assert gguf_text_ids(gguf_vocab, text) == ids, text
        assert gguf_vocab.detokenize(ids[1:]).decode("utf-8") == llama_tok.decode(ids[1:]) == text
    for msgs in CONVERSATIONS:
        templated = llama_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert gguf_text_ids(gguf_vocab, templated) == text_ids(llama_tok, templated)


def test_chatml_modelfile_still_renders_hf_text(embedded_tok):
    from toolkit.export.modelfile import modelfile_text, ollama_adds_bos

    assert ollama_adds_bos(embedded_tok) is None
    text = modelfile_text("m.gguf", embedded_tok, "<|im_end|>")
    for msgs in CONVERSATIONS:
        want = embedded_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ollama_prompt(text, msgs, bos=None) == want


def test_ollama_template_reader_follows_ollamas_rules():
    modelfile = ('TEMPLATE """{{ if .System }}[S]{{ .System }}{{ end }}{{ range .Messages }}'
                 '{{ if eq .Role "user" }}[U]{{ .Content }}{{ else if eq .Role "assistant" }}[A]{{ .Content }}'
                 '{{ end }}{{ end }}[G]"""\n\nSYSTEM """dflt"""\n')
    assert ollama_prompt(modelfile, [{"role": "user", "content": "u"}], bos=None) == "[S]dflt[U]u[G]"
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]
    assert ollama_prompt(modelfile, msgs, bos="<b>") == "<b>[S]s[U]u[A]a[G]"
    with pytest.raises(ValueError):
        ollama_prompt('TEMPLATE """{{- .System }}"""', [], bos=None)


def test_text_ids_one_bos_for_templated_text(llama_tok):
    from toolkit.export.verify import text_ids

    templated = llama_tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)
    ids = text_ids(llama_tok, templated)
    assert ids[0] == 128000 and ids.count(128000) == 1
    assert text_ids(llama_tok, "Hello world") == [128000, 9906, 1917]  # plain text still gets its BOS


def test_chat_failures_catch_leaked_template_tokens(llama_tok):
    from toolkit.export.verify import GGUF_CHAT_FORMAT, ChatTurn, chat_failures

    def turn(reply):
        return ChatTurn("q", reply, "stop", 5, GGUF_CHAT_FORMAT)

    assert chat_failures(turn("A bond is a loan."), llama_tok) == []
    (leak,) = chat_failures(turn("A loan.<|start_header_id|>user<|end_header_id|>"), llama_tok)
    assert "<|start_header_id|>" in leak and "<|end_header_id|>" in leak
    assert chat_failures(turn("A loan.<|eot_id|>"), llama_tok)


def test_tokens_past_the_embedding_rows_are_left_out_of_the_gguf(tmp_path):
    """Meta's Llama-3.2 Vision tokenizer (the one at hand) adds `<|image|>` at 128256, past the text
    models' 128256 embedding rows: llama.cpp's converter refused such a folder with an assertion,
    after an export's merge and save. The export now drops the tokens the model has no row for."""
    from llama_cpp import Llama

    from toolkit.core.reference_models import tiny_llama32_dir
    from toolkit.export.convert import drop_tokens_past, hf_to_gguf

    folder = tiny_llama32_dir(tmp_path / "m", vocab_size=128256)
    with pytest.raises(RuntimeError, match="convert_hf_to_gguf failed"):
        hf_to_gguf(folder, tmp_path / "before.gguf")
    assert drop_tokens_past(folder, 128256) == ["<|image|>"]
    assert drop_tokens_past(folder, 128256) == []
    gguf = hf_to_gguf(folder, tmp_path / "after.gguf")
    llm = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    try:
        assert llm.n_vocab() == 128256
        assert llm.tokenize(b"<|eot_id|>", add_bos=False, special=True) == [128009]
    finally:
        llm.close()
