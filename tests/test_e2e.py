"""End to end: a few QLoRA fine-tune steps with the finance recipe -> merge -> GGUF -> llama.cpp.

ChatML: the embedded model through `toolkit export --quant q8_0` (verified), and llama.cpp answers
a finance question and stops. Llama-3.2: a tiny random model with Meta's real tokenizer and chat
template, checked piece by piece (random weights never end a turn on their own, so the full
export's chat-turn check cannot pass; everything else it checks is asserted here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _short_run(tmp_path, base: str, *extra: str) -> list[str]:
    """Recipe overrides for a few short finance steps on `base`. A small held-out file keeps the
    test short; it (an absolute path in the run's recipe) is what the export verifies on."""
    heldout = tmp_path / "heldout.jsonl"
    lines = (ROOT / "recipes" / "finance" / "heldout.jsonl").read_text().splitlines()
    heldout.write_text("\n".join(lines[:6]) + "\n")
    return [f"model.base_model={base}", "training.max_steps=2", "training.batch_size=1", "data.max_seq_len=256",
            f"data.eval={heldout}", "eval.report=false", "eval.eval_steps=0", "training.save_steps=0", *extra]


@pytest.mark.slow
def test_finetune_export_q8_0_and_llamacpp_answers(tmp_path, embedded_dir, monkeypatch, capsys):
    from toolkit.finetune.trainer import finetune
    from toolkit.export.verify import chat_turn, gguf_metadata, open_gguf

    monkeypatch.chdir(ROOT)
    run = finetune(ROOT / "recipes" / "finance", _short_run(tmp_path, "embedded"), runs_dir=tmp_path / "runs")
    heldout = tmp_path / "heldout.jsonl"
    assert (run / "adapter" / "adapter_config.json").is_file()
    info = json.loads((run / "run.json").read_text())
    assert info["base_model"] == "embedded" and info["steps"] == 2
    # The plan's peak for this run (the catalog knows the embedded model) beside the measured one.
    mem = info["memory"]
    assert mem["planned_peak_bytes"] > 0 and 0 < mem["training_peak_bytes"] <= mem["run_peak_bytes"]
    # ... the dry run's figure to the byte: both plan the examples as they tokenized them
    from toolkit.finetune.dry_run import dry_run

    planned = dry_run(ROOT / "recipes" / "finance", _short_run(tmp_path, "embedded"), gpu=False).estimate
    assert planned["total_bytes"] == mem["planned_peak_bytes"]

    assert main(["export", str(run), "--quant", "q8_0"]) == 0
    out = run / "gguf"
    gguf = out / f"{run.name}-q8_0.gguf"
    assert gguf.is_file() and (out / "Modelfile").is_file() and (out / "README.md").is_file()
    summary = json.loads((out / "export.json").read_text())
    (v,) = summary["verification"]
    assert v["failures"] == [] and f"held-out data {heldout}" in v["text_source"]
    assert summary["run"]["recipe"] == "finance" and summary["run"]["method"] == info["method"]
    assert gguf_metadata(gguf)["eos_token"] == "<|im_end|>"
    capsys.readouterr()

    llm = open_gguf(gguf)
    try:
        turn = chat_turn(llm, "What is the difference between a stock and a bond?", max_tokens=300)
    finally:
        llm.close()
    assert turn.chat_format == "chat_template.default"
    assert turn.finish_reason == "stop", turn  # reached <|im_end|> instead of running on
    assert turn.reply.strip() and "<|im_start|>" not in turn.reply
    assert any(w in turn.reply.lower() for w in ("stock", "bond", "invest", "compan")), turn.reply


LLAMA_CONVERSATIONS = [
    [{"role": "user", "content": "What is a bond?"}],
    [{"role": "system", "content": "You are a careful finance tutor."}, {"role": "user", "content": "What is APR?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Stock?"},
     {"role": "assistant", "content": "A share of a company."}, {"role": "user", "content": "And a bond?"}],
]


@pytest.mark.slow
def test_llama32_qlora_merge_gguf_llamacpp_and_modelfile(tmp_path, tiny_llama32_dir, monkeypatch):
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from tests.export.ollama_template import ollama_prompt
    from toolkit.core.chat_tokens import end_of_turn_token
    from toolkit.core.loading import load_model
    from toolkit.export import verify, verify_text
    from toolkit.export.convert import hf_to_gguf
    from toolkit.export.modelfile import modelfile_text
    from toolkit.finetune.trainer import finetune

    monkeypatch.chdir(ROOT)
    # fp32 compute: bf16 matmuls on a CPU without bf16 instructions make the 128k-vocab head crawl.
    overrides = _short_run(tmp_path, str(tiny_llama32_dir), "method.compute_dtype=float32")
    run = finetune(ROOT / "recipes" / "finance", overrides, runs_dir=tmp_path / "runs")
    info = json.loads((run / "run.json").read_text())
    assert info["base_model"] == str(tiny_llama32_dir) and info["steps"] == 2 and info["method"] == "qlora"

    model, tok = load_model(str(run), merge=True)
    assert end_of_turn_token(tok) == tok.eos_token == "<|eot_id|>" and tok.bos_token_id == 128000
    merged = tmp_path / "merged"
    model.save_pretrained(merged)
    tok.save_pretrained(merged)
    gguf = hf_to_gguf(merged, tmp_path / "tiny-llama32-f16.gguf", outtype="f16")

    meta = verify.gguf_metadata(gguf)
    assert (meta["eos_token_id"], meta["eos_token"], meta["bos_token_id"]) == (128009, "<|eot_id|>", 128000)
    assert verify.check_metadata(meta, tok) == []  # the embedded template is the tokenizer's
    llm = verify.open_gguf(gguf, n_ctx=1024, logits_all=True)  # what verify_gguf opens
    try:
        assert llm.metadata["tokenizer.ggml.pre"] == "llama-bpe"
        # The prompt llama.cpp's chat handler builds from the GGUF's template is apply_chat_template's,
        # and both tokenizers turn it into the same ids with exactly one BOS.
        fmt = Jinja2ChatFormatter(template=meta["chat_template"], eos_token="<|eot_id|>", bos_token="<|begin_of_text|>")
        for msgs in LLAMA_CONVERSATIONS:
            prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            assert fmt(messages=msgs).prompt == prompt
            ids = verify.text_ids(tok, prompt)
            assert ids.count(128000) == 1 and ids[0] == 128000
            assert verify.gguf_text_ids(llm, prompt) == ids

        # The export's round trip on the run's held-out text (what `verify_gguf` checks, minus its
        # chat turn, which random weights run to max_tokens): same ids, top-1 and perplexity for f16.
        text, _ = verify_text.heldout_text(run, tok)
        # Held-out conversations are rendered one after another, each with its BOS: none is added.
        ids = verify.text_ids(tok, text)
        assert text.startswith("<|begin_of_text|>") and ids.count(128000) == text.count("<|begin_of_text|>")
        llm.reset()
        rt = verify.gguf_round_trip(llm, text, ids, verify.hf_logits(model, ids), "f16")
        assert rt.same_ids and verify.round_trip_failures(rt) == [], rt

        # Generation ends at <|eot_id|>: forced by a logit bias, llama.cpp stops on it (finish "stop").
        llm.reset()
        out = llm.create_chat_completion(messages=LLAMA_CONVERSATIONS[1], max_tokens=16, temperature=0.0,
                                         logit_bias={128009: 100.0})
        assert out["choices"][0]["finish_reason"] == "stop" and out["usage"]["completion_tokens"] <= 1
        unbiased = llm.create_chat_completion(messages=LLAMA_CONVERSATIONS[1], max_tokens=16, temperature=0.0)
        assert unbiased["choices"][0]["finish_reason"] == "length"  # so the stop above is the bias's doing
    finally:
        llm.close()

    # Ollama: the Modelfile's template, expanded by Ollama's rules (it adds the BOS itself), is
    # the text HF's template renders, system block (date header, system prompt) included.
    modelfile = modelfile_text(gguf.name, tok, end_of_turn_token(tok))
    assert 'PARAMETER stop "<|eot_id|>"' in modelfile and "SYSTEM" not in modelfile
    for msgs in LLAMA_CONVERSATIONS:
        want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ollama_prompt(modelfile, msgs, bos="<|begin_of_text|>") == want
