"""Fixtures and helpers shared by the finetune tests: the tiny ChatML model loaded once, chat prompts,
one torch thread for training tests, a small QLoRA recipe on a slice of the finance data, and data
records with the embedded model's tokenizer."""

from __future__ import annotations

import json
import signal
from pathlib import Path

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


@pytest.fixture
def one_torch_thread(monkeypatch):
    """The test machine's cores are shared: one intra-op thread per process avoids spin-wait thrash
    (TOOLKIT_THREADS: finetune() would otherwise set the physical core count)."""
    import torch

    monkeypatch.setenv("TOOLKIT_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ROOT = Path(__file__).resolve().parents[2]
FINANCE = ROOT / "recipes" / "finance"


def make_recipe(tmp_path, base, *, n_train=16, n_eval=4, extra=""):
    """A small QLoRA recipe on `base` using a slice of the finance data."""
    d = tmp_path / "rec"
    d.mkdir(exist_ok=True)
    (d / "train.jsonl").write_text("".join((FINANCE / "train.jsonl").read_text().splitlines(True)[:n_train]))
    (d / "heldout.jsonl").write_text("".join((FINANCE / "heldout.jsonl").read_text().splitlines(True)[:n_eval]))
    (d / "recipe.yaml").write_text(f"""\
name: tiny
model:
  base_model: {base}
  fallback_model: ""
method:
  name: qlora
lora:
  r: 8
  alpha: 16
  dropout: 0.05
data:
  train: train.jsonl
  eval: heldout.jsonl
  max_seq_len: 256
training:
  max_steps: 4
  batch_size: 2
  learning_rate: 1.0e-3
  save_steps: 0
  logging_steps: 1
  seed: 3
eval:
  eval_steps: 2
  generation_samples: 2
  max_new_tokens: 4
  side_by_side: 2
{extra}""")
    return d


def adapter_tensors(run):
    from safetensors.torch import load_file

    return load_file(str(Path(run) / "adapter" / "adapter_model.safetensors"))


def sigint_at_step(step):
    """A callback delivering a real SIGINT to this process at `step` (what Ctrl-C does)."""
    from transformers import TrainerCallback

    class SigintAtStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                signal.raise_signal(signal.SIGINT)

    return SigintAtStep()


# --- data records and the embedded model's tokenizer ---


@pytest.fixture(scope="module")
def tok(embedded_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_dir)


def jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


CHAT = {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]}


def trained_text(tok, ids, labels):
    return tok.decode([t for t, lab in zip(ids, labels) if lab != -100])


SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is 2+2?"},
                              {"from": "gpt", "value": "It is 4."}]}
EXPECTED = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "It is 4."}]
