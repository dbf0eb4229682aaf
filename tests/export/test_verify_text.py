"""The held-out text an export verifies on (toolkit/export/verify_text.py), read from the run's recipe."""

from __future__ import annotations

import json


def test_heldout_text_from_run_recipe(tmp_path, embedded_tok):
    from toolkit.export.verify_text import heldout_text

    run = tmp_path / "run"
    recipe_dir = tmp_path / "recipes" / "r"
    (recipe_dir / "d").mkdir(parents=True)
    run.mkdir()
    assert heldout_text(run, embedded_tok) is None  # no recipe.yaml: the caller uses the fixed text
    (run / "recipe.yaml").write_text("data:\n  train: d/train.jsonl\n")
    assert heldout_text(run, embedded_tok) is None  # no data.eval: none either
    # Mixed formats, each read by toolkit.finetune.data (format auto is decided per line).
    rows = [{"instruction": "Define APR.", "input": "", "output": "The yearly cost of a loan."},
            {"prompt": "What is CAGR?", "completion": "Compound annual growth rate."},
            {"text": "Plain prose about saving."}]
    (recipe_dir / "d" / "valid.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (run / "recipe.yaml").write_text("data:\n  train: d/train.jsonl\n  eval: d/valid.jsonl\n")
    (run / "run.json").write_text(json.dumps({"recipe": "r", "recipe_dir": str(recipe_dir)}))
    text, source = heldout_text(run, embedded_tok)
    assert "3 examples" in source and str(recipe_dir / "d" / "valid.jsonl") in source
    assert text.count("<|im_start|>assistant\n") == 2 and "The yearly cost of a loan.<|im_end|>" in text
    assert text.endswith("Plain prose about saving.")
    text2, _ = heldout_text(run, embedded_tok, max_tokens=5)
    assert text2.count("<|im_start|>user") == 1  # stops once max_tokens is reached


def test_heldout_text_falls_back_when_unreadable(tmp_path, embedded_tok):
    from toolkit.export.verify_text import heldout_text

    run = tmp_path / "run"
    (run / "d").mkdir(parents=True)
    (run / "d" / "valid.jsonl").write_text(json.dumps({"text": "ok"}) + "\nnot json\n")
    (run / "recipe.yaml").write_text("data:\n  eval: d/valid.jsonl\n")
    assert heldout_text(run, embedded_tok) is None  # a bad line: the fixed text, not a crash
    (run / "recipe.yaml").write_text("data:\n  eval_file: d/valid.jsonl\n")
    assert heldout_text(run, embedded_tok) is None  # not a recipe the reader accepts
