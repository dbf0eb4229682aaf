"""`toolkit recipe new` logic: held-out split, planner-chosen sizes, commented recipe.yaml that loads."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from toolkit.core.errors import UserError
from toolkit.finetune import recipe, scaffold
from toolkit.finetune.data import Example


def sharegpt_file(path, n=40, dup_every=0):
    lines = []
    for i in range(n):
        q = f"What is {i // 2 if dup_every and i % dup_every == 1 else i} plus one?"
        lines.append(json.dumps({"conversations": [{"from": "human", "value": q},
                                                   {"from": "gpt", "value": f"Answer number {i}."}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def chat(q, a="ok"):
    return Example([{"role": "user", "content": q}, {"role": "assistant", "content": a}], None, "t")


# --- field docs: one source, every field --------------------------------------------------------------------------

def test_every_recipe_field_has_exactly_one_doc():
    from toolkit.finetune import recipe_docs

    docs = recipe_docs.field_docs()
    expected = {f.name for f in dataclasses.fields(recipe.Recipe) if f.metadata.get("yaml", True)
                and f.name not in recipe_docs.sections()}
    for name, cls in recipe_docs.sections().items():
        expected |= {f"{name}.{f.name}" for f in dataclasses.fields(cls)}
    assert set(docs) == expected
    assert not [k for k, v in docs.items() if not v.strip()], "fields without a comment in recipe.py"
    # A field documented both by a comment in recipe.py and in the fallback table would drift: one place only.
    commented = set(recipe_docs._comments(recipe.Recipe))
    for name, cls in recipe_docs.sections().items():
        commented |= {f"{name}.{k}" for k in recipe_docs._comments(cls)}
    assert not commented & set(recipe_docs._UNCOMMENTED)
    assert set(recipe_docs._UNCOMMENTED) <= expected  # no stale entries
    assert set(recipe_docs.source_docs()) == {f.name for f in dataclasses.fields(recipe.TrainSource)}


# --- held-out split ----------------------------------------------------------------------------------------------

def test_split_is_seeded_by_conversation_and_keeps_same_prompts_together():
    exs = [chat(f"q{i % 30}", f"a{i}") for i in range(60)]  # every prompt twice
    train, held = scaffold.split_heldout(exs, seed=42)
    assert len(train) + len(held) == 60 and 6 <= len(held) <= 7
    held_q = {e.messages[0]["content"] for e in held}
    assert not held_q & {e.messages[0]["content"] for e in train}
    assert all(sum(e.messages[0]["content"] == q for e in held) == 2 for q in held_q)
    assert scaffold.split_heldout(exs, seed=42) == (train, held)
    assert scaffold.split_heldout(exs, seed=7)[1] != held
    # Order within each side is the source's order.
    assert [exs.index(e) for e in train] == sorted(exs.index(e) for e in train)


def test_split_needs_two_distinct_prompts():
    with pytest.raises(UserError, match="need at least 2"):
        scaffold.split_heldout([chat("same"), chat("same")], seed=1)
    train, held = scaffold.split_heldout([chat("a"), chat("b")], seed=1)
    assert len(train) == 1 and len(held) == 1


# --- sizes from the planner --------------------------------------------------------------------------------------

@pytest.fixture()
def plan():
    from toolkit.finetune.plan import plan_inputs

    return plan_inputs(recipe.Recipe(), "cpu", "float32")


def _est(plan, seq, batch, ckpt):
    from toolkit.estimate.catalog import CATALOG
    from toolkit.estimate.planner import estimate

    return estimate(CATALOG["embedded"], **{**plan.as_kwargs(), "seq_len": seq, "batch": batch,
                                            "grad_ckpt": ckpt}).total_bytes


def test_sizes_cover_95_percent_and_fit(plan):
    from toolkit.estimate.catalog import CATALOG

    facts = CATALOG["embedded"]
    lengths = [100] * 95 + [3000] * 5
    s = scaffold.choose_sizes(lengths, facts, plan, 100 * 2**30, "cpu")
    assert (s.max_seq_len, s.batch_size, s.grad_accum, s.gradient_checkpointing) == (256, 4, 2, False)
    assert s.estimate_bytes == _est(plan, 256, 4, False)
    assert scaffold.choose_sizes([100] * 94 + [300] * 6, facts, plan, 100 * 2**30, "cpu").max_seq_len == 512
    gpu = scaffold.choose_sizes(lengths, facts, plan, 100 * 2**30, "cuda")
    assert (gpu.batch_size, gpu.grad_accum) == (8, 1)
    # Longer than the model's context: capped there.
    assert scaffold.choose_sizes([10**5] * 3, facts, plan, 100 * 2**30, "cpu").max_seq_len == min(
        4096, facts.max_context)


def test_sizes_shrink_batch_then_checkpoint_then_length(plan):
    from toolkit.estimate.catalog import CATALOG

    facts = CATALOG["embedded"]
    lengths = [200] * 10
    b1, b2 = _est(plan, 256, 1, False), _est(plan, 256, 2, False)
    s = scaffold.choose_sizes(lengths, facts, plan, (b1 + b2) // 2, "cpu")
    assert (s.batch_size, s.grad_accum, s.gradient_checkpointing) == (1, 8, False)
    c2 = _est(plan, 256, 2, True)
    assert c2 < b1  # checkpointing saves more than halving the batch here
    s = scaffold.choose_sizes(lengths, facts, plan, (c2 + b1) // 2, "cpu")
    assert (s.batch_size, s.gradient_checkpointing) == (2, True)
    with pytest.raises(UserError, match="does not fit this machine even at batch 1"):
        scaffold.choose_sizes(lengths, facts, plan, 2**20, "cpu")
    s = scaffold.choose_sizes([1000] * 10, facts, plan, _est(plan, 512, 1, True) + 1, "cpu")
    assert s.max_seq_len == 512 and "do not fit" in s.reasons[0]


# --- the whole thing -----------------------------------------------------------------------------------------------

def test_new_recipe_writes_commented_recipe_that_loads(tmp_path, embedded_dir):
    src = sharegpt_file(tmp_path / "chats.jsonl", n=40, dup_every=4)
    found = scaffold.new_recipe("mine", [str(src)], recipes_dir=tmp_path / "recipes")
    folder = tmp_path / "recipes" / "mine"
    assert found.folder == folder and sorted(p.name for p in folder.iterdir()) == [
        "heldout.jsonl", "recipe.yaml", "train.jsonl"]
    assert sorted(p.name for p in (tmp_path / "recipes").iterdir()) == ["mine"]  # no temp folder left
    assert found.fmt == "sharegpt" and "conversations" in found.fmt_why
    assert found.n_train + found.n_heldout == 40 and found.n_heldout == 4
    rec = recipe.load(folder)
    assert (rec.name, rec.data.train, rec.data.eval, rec.data.format) == ("mine", "train.jsonl", "heldout.jsonl",
                                                                          "messages")
    assert rec.data.max_seq_len == found.sizes.max_seq_len and rec.training.batch_size == found.sizes.batch_size
    from toolkit.finetune.data import read_splits

    train, held = read_splits(rec)
    assert (len(train), len(held)) == (found.n_train, found.n_heldout)
    assert not {e.messages[0]["content"] for e in train} & {e.messages[0]["content"] for e in held}
    # Every key written has its help on the line above.
    lines = (folder / "recipe.yaml").read_text().splitlines()
    keys = [i for i, line in enumerate(lines) if re.match(r"^\s*\w+:", line)]
    assert len(keys) > 40
    for i in keys:
        if not lines[i].rstrip().endswith(":"):  # a section header has no comment of its own
            assert lines[i - 1].strip().startswith("# "), lines[i]
    # Stats: the chat-templated token counts of what was written.
    lo, med, hi = scaffold.length_stats(found.lengths)
    assert 0 < lo <= med <= hi < rec.data.max_seq_len and found.n_truncated == 0
    text = "\n".join(found.lines())
    assert f"min {lo}, median {med}, max {hi}" in text and "truncated at max_seq_len" in text
    # The sizes were planned on the training examples as tokenized (the files were not written yet), which
    # price the packed attention at their mean conversation, not at the most it could keep.
    from toolkit.core import hardware
    from toolkit.estimate.catalog import CATALOG
    from toolkit.estimate.planner import estimate
    from toolkit.finetune.plan import plan_inputs

    s = found.sizes
    plan = plan_inputs(rec, "cpu", hardware.dtype_choice("cpu", "train")[0], found.lengths[:found.n_train]).as_kwargs()
    plan.update(seq_len=s.max_seq_len, batch=s.batch_size, grad_ckpt=s.gradient_checkpointing)
    assert estimate(CATALOG["embedded"], **plan).total_bytes == s.estimate_bytes
    assert estimate(CATALOG["embedded"], **{**plan, "conversation_tokens": None}).total_bytes != s.estimate_bytes


def test_written_split_reads_back_as_the_source_read(tmp_path, embedded_dir):
    """train.jsonl / heldout.jsonl keep non-ASCII text as it is (ensure_ascii=False), U+2028 and
    U+0085 included: the run must read the very conversations `recipe new` read."""
    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Line\u2028sep {i}?", "completion": f"Yes\x85 {i}."}) + "\n"
                           for i in range(12)))
    found = scaffold.new_recipe("seps", [str(src)], recipes_dir=tmp_path / "r")
    assert found.fmt == "prompt_completion"
    from toolkit.finetune.data import read_splits

    train, held = read_splits(recipe.load(found.folder))
    src_msgs = [e.messages for e in scaffold.load_source(str(src), "--data")[0]]
    assert sorted(map(json.dumps, [e.messages for e in train + held])) == sorted(map(json.dumps, src_msgs))


def test_new_recipe_with_eval_references_the_sources(tmp_path, embedded_dir):
    (tmp_path / "data").mkdir()
    src = sharegpt_file(tmp_path / "data" / "chats.jsonl", n=12)
    ev = tmp_path / "data" / "ev.csv"
    ev.write_text("question,answer\nWhat is one?,One.\nWhat is two?,Two.\n")
    found = scaffold.new_recipe("withev", [str(src)], eval_spec=str(ev), recipes_dir=tmp_path / "r")
    assert sorted(p.name for p in found.folder.iterdir()) == ["recipe.yaml"]
    rec = recipe.load(found.folder)
    assert rec.data.train == "../../data/chats.jsonl" and rec.data.eval == "../../data/ev.csv"
    assert rec.data.format == "auto"  # train is ShareGPT, eval question/answer: detected per record
    from toolkit.finetune.data import read_splits

    train, held = read_splits(rec)
    assert (len(train), len(held)) == (12, 2)


def test_cpu_run_is_sized_to_the_time_budget(tmp_path, embedded_dir):
    """`recipe new` caps max_steps where the whole run would pass the CPU's time budget, timing it as the
    dry run of the written recipe does (the method `auto` takes, the packed rows of the tokenized data)."""
    from toolkit.core import hardware
    from toolkit.estimate.timeplan import DEFAULT_TIME_BUDGET_S
    from toolkit.finetune.dry_run import dry_run

    if hardware.device() != "cpu":
        pytest.skip("the default time budget applies to CPU runs")
    src = tmp_path / "big.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"Explain term {i}.", "completion": "A finance term. " * 40}) + "\n"
                           for i in range(400)))
    found = scaffold.new_recipe("big", [str(src)], recipes_dir=tmp_path / "r")
    rec = recipe.load(found.folder)
    assert rec.method.name == "auto" and rec.lora.dropout == 0.0  # the fast path where memory allows

    def wall(overrides=()):
        return dry_run(found.folder, overrides, gpu=False).estimate["time"]["train_wall_s"]

    budget = DEFAULT_TIME_BUDGET_S["cpu"]
    if wall(["training.max_steps=-1"]) <= budget:
        assert rec.training.max_steps == -1
    else:
        assert rec.training.max_steps >= 1 and wall() <= budget or rec.training.max_steps == 1
        assert any(line.startswith(f"max_steps {rec.training.max_steps}: all ") for line in found.lines())
    said = found.lines()
    assert any(line.startswith("time: ~") for line in said)
    assert any(line.startswith("method auto: lora") for line in said)  # 135M parameters: memory is plentiful
    # The schedule was made from the steps the dry run counts (a quarter of them between evals).
    assert rec.eval.eval_steps == max(1, dry_run(found.folder, gpu=False).estimate["time"]["steps"] // 4)


def test_data_on_another_drive_is_referenced_by_its_absolute_path(tmp_path, monkeypatch):
    """Windows has no relative path from C:\\recipes to D:\\data: os.path.relpath raises ValueError."""
    import os

    def other_drive(path, start=None):
        raise ValueError("path is on mount 'D:', start on mount 'C:'")

    monkeypatch.setattr(os.path, "relpath", other_drive)
    src = sharegpt_file(tmp_path / "chats.jsonl", n=2)
    folder = tmp_path / "recipes" / "mine"
    ref = scaffold._rel(str(src), folder)
    assert ref == str(src.resolve()) and recipe.Recipe(root=folder).data_path(ref) == src.resolve()
