"""The export record (toolkit/export/report.py): export.json keeps the run's system prompt."""

from __future__ import annotations

import json

from tests.export.test_modelfile import TRAINED


def test_export_record_has_the_runs_system_prompt(tmp_path):
    """export.json records the recipe's data.system_prompt, and chat/generate on the exported GGUF
    read it back from there."""
    from toolkit.core.models import default_system_prompt, resolve
    from toolkit.export import report

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "run.json").write_text(json.dumps({"recipe": "finbot", "base_model": "embedded"}))
    (run / "recipe.yaml").write_text(f"data:\n  system_prompt: '{TRAINED}'\n")
    files = {"q8_0": "run-q8_0.gguf", "modelfile:q8_0": "Modelfile"}
    summary = report.summary(str(run), resolve(str(run)), "run", ["q8_0"], files, [], {}, {}, "float32")
    assert summary["system_prompt"] == TRAINED
    (run / "gguf").mkdir()
    (run / "gguf" / "run-q8_0.gguf").write_bytes(b"GGUF....")
    (run / "gguf" / "export.json").write_text(report.to_json(summary))
    assert json.loads((run / "gguf" / "export.json").read_text())["system_prompt"] == TRAINED
    assert default_system_prompt(str(run / "gguf" / "run-q8_0.gguf")) == TRAINED
    plain = report.summary("embedded", resolve("embedded"), "e", ["q8_0"], files, [], {}, {}, "float32")
    assert plain["system_prompt"] == ""
