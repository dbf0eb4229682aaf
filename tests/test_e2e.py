"""End to end: a few QLoRA fine-tune steps on the embedded model with the finance recipe ->
`toolkit export --quant q8_0` (verified) -> llama.cpp answers a finance question and stops."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_finetune_export_q8_0_and_llamacpp_answers(tmp_path, embedded_dir, monkeypatch, capsys):
    from toolkit.finetune.trainer import finetune
    from toolkit.export.verify import chat_turn, gguf_metadata, open_gguf

    monkeypatch.chdir(ROOT)
    # A few short steps and a small held-out file keep this test to about a minute; the held-out
    # file (an absolute path in the run's recipe) is what the export verifies on.
    heldout = tmp_path / "heldout.jsonl"
    lines = (ROOT / "recipes" / "finance" / "heldout.jsonl").read_text().splitlines()
    heldout.write_text("\n".join(lines[:6]) + "\n")
    run = finetune(
        ROOT / "recipes" / "finance",
        ["model.base_model=embedded", "training.max_steps=2", "training.batch_size=1", "data.max_seq_len=256",
         f"data.eval={heldout}", "eval.report=false", "eval.eval_steps=0", "training.save_steps=0"],
        runs_dir=tmp_path / "runs",
    )
    assert (run / "adapter" / "adapter_config.json").is_file()
    info = json.loads((run / "run.json").read_text())
    assert info["base_model"] == "embedded" and info["steps"] == 2

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
