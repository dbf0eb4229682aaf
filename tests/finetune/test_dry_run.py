"""`toolkit finetune --dry-run`: what a run would use, with no model loaded, nothing written, and bad
recipes failing exactly as a real run does."""

from __future__ import annotations

import json
import os

import pytest

from toolkit.core.errors import UserError
from toolkit.finetune.dry_run import dry_run, mask_pieces, render_pieces

CHAT = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                     {"role": "assistant", "content": "It is 4."}, {"role": "user", "content": "And 3+3?"},
                     {"role": "assistant", "content": "Six."}]}


def make_recipe(folder, extra=""):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "train.jsonl").write_text(json.dumps(CHAT) + "\n" + json.dumps(
        {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}) + "\n")
    (folder / "heldout.jsonl").write_text(json.dumps({"prompt": "Q", "completion": "A"}) + "\n")
    (folder / "recipe.yaml").write_text(
        "model:\n  base_model: embedded\nmethod:\n  name: lora\n"
        "data:\n  train:\n    - {path: train.jsonl, weight: 2}\n  eval: heldout.jsonl\n  max_seq_len: 128\n" + extra)
    return folder


def _no_model_loads(monkeypatch):
    from toolkit.core import loading
    from toolkit.finetune import base_model

    def refuse(*a, **k):
        raise AssertionError("a dry run must not load a model")

    monkeypatch.setattr(loading, "load_causal_lm", refuse)
    monkeypatch.setattr(base_model, "load_for_training", refuse)


def _tree(path):
    return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns) for p in path.rglob("*"))


def test_dry_run_shows_everything_and_writes_nothing(tmp_path, embedded_dir, monkeypatch):
    from transformers import AutoTokenizer

    _no_model_loads(monkeypatch)
    monkeypatch.chdir(tmp_path)
    rec = make_recipe(tmp_path / "r")
    before = _tree(tmp_path)
    d = dry_run(rec, ["training.max_steps=3"])
    assert _tree(tmp_path) == before  # no runs/ folder, nothing touched
    assert d.base == "embedded" and not d.base_note
    assert "max_steps: 3" in d.resolved_yaml and "weight: 2.0" in d.resolved_yaml
    train, held = d.stats
    assert (train.examples, held.examples) == (4, 1)  # weight 2 doubles the two training conversations
    assert train.truncated == 0 and train.min_len <= train.median_len <= train.max_len <= 128
    # The rendered example: the decoded pieces make up the whole sequence, the marked ones are the labels.
    tok = AutoTokenizer.from_pretrained(embedded_dir)
    assert "".join(t for t, _ in d.example_pieces) == tok.decode(d.example_ids)
    trained = [t for t, lab in zip(d.example_ids, d.example_labels) if lab != -100]
    assert "".join(t for t, on in d.example_pieces if on) == tok.decode(trained)
    plain = render_pieces(d.example_pieces, color=False)
    assert "[[It is 4.<|im_end|>" in plain and "[[Six.<|im_end|>" in plain and "[[What" not in plain
    assert "\x1b" not in plain and "\x1b[4mSix." in render_pieces(d.example_pieces, color=True)
    text = "\n".join(d.lines())
    assert "trains: embedded on cpu" in text and "peak memory ~" in text and "fits" in text
    assert "[[...]] = trained tokens" in text and "nothing written" in text
    assert d.estimate["seq_len"] == 128 and d.estimate["task"] == "lora"
    # A mix is timed too: the tokenized examples, packed as the trainer packs them.
    assert d.estimate["time"]["steps"] == 3 and "time: ~" in text
    assert not any("lora.dropout" in line for line in d.announcements)
    dropout = dry_run(rec, ["lora.dropout=0.1"])
    assert any(line.startswith("note: lora.dropout 0.1 draws a random mask") for line in dropout.announcements)
    # and the time it costs the fused layers is priced
    assert dropout.estimate["time"]["train_tokens_per_s"] < d.estimate["time"]["train_tokens_per_s"]


def test_mask_pieces_groups_runs():
    class Tok:
        def decode(self, ids):
            return "".join(chr(ord("a") + i) for i in ids)

    assert mask_pieces(Tok(), [0, 1, 2, 3, 4], [-100, -100, 2, 3, -100]) == [("ab", False), ("cd", True),
                                                                              ("e", False)]
    assert mask_pieces(Tok(), [5], [5]) == [("f", True)]


@pytest.mark.parametrize("extra, overrides, needle", [
    ("training:\n  epoch: 1\n", [], "unknown key `training.epoch`"),
    ("", ["data.max_seq_len=8"], "data.max_seq_len must be >= 16"),
    ("", ["data.eval=broken.jsonl"], "broken.jsonl:1: invalid JSON"),
    ("", ["data.train=hf:org/x"], "data.train: hf:org/x can't be loaded offline"),
    ("", ["lora.target_modules=foo"], "lora.target_modules has unknown module 'foo'"),
    ("", ["training.seed=-1"], "training.seed must be in [0, 2**32)"),
    ("", ["data.eval=badmeta.jsonl"], "badmeta.jsonl:1: meta.wrong must be a list"),
    ("", ["data.train=answer_first.jsonl"], "answer_first.jsonl:1: messages[0] is an assistant message"),
])
def test_bad_recipe_fails_like_a_real_run(tmp_path, monkeypatch, extra, overrides, needle):
    from toolkit.finetune.trainer import finetune

    _no_model_loads(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rec = make_recipe(tmp_path / "r", extra)
    (rec / "broken.jsonl").write_text("{oops\n")
    (rec / "badmeta.jsonl").write_text(json.dumps({**CHAT, "meta": {"wrong": 5}}) + "\n")
    (rec / "answer_first.jsonl").write_text(json.dumps({"messages": CHAT["messages"][2:]}) + "\n")
    with pytest.raises(UserError) as real:
        finetune(rec, overrides, runs_dir=tmp_path / "runs")
    with pytest.raises(UserError) as dry:
        dry_run(rec, overrides)
    assert str(dry.value) == str(real.value) and needle in str(dry.value)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_cli_dry_run_plain_text_when_not_a_tty(tmp_path, capsys, embedded_dir, monkeypatch):
    from toolkit.cli import main

    monkeypatch.chdir(tmp_path)
    rec = make_recipe(tmp_path / "r")
    assert main(["finetune", str(rec), "--dry-run", "--set", "lora.r=4"]) == 0
    out = capsys.readouterr().out
    assert "== resolved recipe" in out and "  r: 4" in out and "[[Hello.<|im_end|>" not in out.split("==")[0]
    assert "\x1b" not in out and not os.path.exists(tmp_path / "runs")
    assert main(["finetune", str(tmp_path / "nope"), "--dry-run"]) == 2
    assert capsys.readouterr().err.startswith("error: recipe not found")


def test_dry_run_says_why_the_estimator_gave_no_estimate():
    from toolkit.finetune.dry_run import DryRun

    d = DryRun("", "embedded", "", [], "cpu", "float32", "", [], 128, "x:1", no_estimate="the estimator refused this "
               "run (unknown LoRA target(s) foo)")
    assert "embedded: the estimator refused this run (unknown LoRA target(s) foo); no memory estimate" in d.lines()
    assert "embedded: not in the estimator's catalog; no memory estimate" in DryRun(
        "", "embedded", "", [], "cpu", "float32", "", [], 128, "x:1").lines()


def test_a_max_seq_len_past_the_models_window_is_warned(tmp_path, tiny_llama_dir, monkeypatch):
    """The base's window comes from its own config (tiny: 2048 positions); the same warning is
    what `finetune` announces before training."""
    from toolkit.finetune.base_model import BaseChoice, context_warning

    _no_model_loads(monkeypatch)
    monkeypatch.chdir(tmp_path)
    rec = make_recipe(tmp_path / "r")
    base = f"training.max_steps=1,model.base_model={tiny_llama_dir}".split(",")
    long = dry_run(rec, base + ["data.max_seq_len=4096"])
    warning = (f"warning: data.max_seq_len=4096 is past {tiny_llama_dir}'s context window (2048 tokens): "
               "positions past 2048 were never trained; set data.max_seq_len to at most 2048")
    assert warning in long.announcements and warning in long.lines()
    assert not [s for s in dry_run(rec, base + ["data.max_seq_len=2048"]).announcements if "context window" in s]
    # A catalog base: its window from the catalog, no config read.
    assert "(8192 tokens)" in context_warning(BaseChoice("embedded", "embedded", "embedded"), 8193)
    assert context_warning(BaseChoice("embedded", "embedded", "embedded"), 8192) is None
    assert context_warning(BaseChoice("org/not-cached", "org/not-cached", "org/not-cached"), 10**6) is None


def test_held_out_questions_asked_in_training_are_warned(tmp_path, embedded_dir, monkeypatch):
    """A held-out conversation asking what a training one asks measures recall: said before a run."""
    _no_model_loads(monkeypatch)
    monkeypatch.chdir(tmp_path)
    rec = make_recipe(tmp_path / "r")
    assert not [s for s in dry_run(rec).announcements if "held-out" in s]
    (rec / "heldout.jsonl").write_text(json.dumps({"prompt": "Q", "completion": "A"}) + "\n"
                                       + json.dumps({"prompt": "What is 2+2?", "completion": "Four."}) + "\n")
    (warning,) = [s for s in dry_run(rec).announcements if "held-out" in s]
    assert warning.startswith("warning: 1 of 2 held-out examples ask what a training example asks")
    assert f"{rec / 'heldout.jsonl'}:2 and {rec / 'train.jsonl'}:1" in warning
