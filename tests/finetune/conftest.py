"""Fixtures shared by the finetune tests: the tiny ChatML model loaded once, and chat prompts."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny(tiny_llama_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    return model, tok


@pytest.fixture
def chat_prompts():
    qs = ["What is a bond?", "Explain compound interest to a child in two sentences please.", "Hi",
          "What does APR stand for on a credit card offer, and why should I care?", "Define inflation."]
    return [[{"role": "user", "content": q}] for q in qs]
