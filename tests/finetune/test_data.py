"""Examples → tokens: assistant-only labels and a trained EOS, overlong handling, weighted mixing, held-out meta."""

from __future__ import annotations

import pytest

from toolkit.finetune import data
from toolkit.core.errors import UserError
from tests.finetune.conftest import CHAT, SHAREGPT, jsonl, trained_text


def test_multi_turn_trains_every_assistant_turn_only(tmp_path, tok):
    rec = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                        {"role": "assistant", "content": "Goodbye."}]}
    (ex,) = data.read_examples(jsonl(tmp_path / "d.jsonl", [rec]))
    ids, labels = data.tokenize_example(tok, ex)
    text = trained_text(tok, ids, labels)
    assert "Hello.<|im_end|>" in text and "Goodbye.<|im_end|>" in text
    assert "Hi" not in text and "Bye" not in text and "Be brief" not in text
    full_ids, full_labels = data.tokenize_example(tok, ex, completion_only=False)
    assert full_labels == full_ids


def test_raw_text_trains_all_tokens_plus_eos(tmp_path, tok):
    p = tmp_path / "t.txt"
    p.write_text("First document.\n\nSecond document here.\n")
    ex = data.read_examples(p)
    assert [e.text for e in ex] == ["First document.", "Second document here."]
    ids, labels = data.tokenize_example(tok, ex[0])
    assert labels == ids and ids[-1] == tok.eos_token_id
    ex2 = data.read_examples(jsonl(tmp_path / "t.jsonl", [{"text": "hello world"}]))
    assert ex2[0].text == "hello world"


def test_overlong_truncated_or_dropped_and_counted(tmp_path, tok):
    long = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "word " * 200}]}
    ex = data.read_examples(jsonl(tmp_path / "d.jsonl", [CHAT, long]))
    t = data.tokenize_split(tok, ex, max_seq_len=64, overlong="truncate")
    assert t.n_truncated == 1 and t.n_dropped == 0 and max(map(len, t.input_ids)) == 64
    d = data.tokenize_split(tok, ex, max_seq_len=64, overlong="drop")
    assert d.n_dropped == 1 and len(d.input_ids) == 1
    # A prompt that alone fills max_seq_len leaves nothing to learn: dropped, and all dropped = empty split.
    prompt_only = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    ex2 = data.read_examples(jsonl(tmp_path / "p.jsonl", [prompt_only]))
    with pytest.raises(UserError, match="train split is empty"):
        data.tokenize_split(tok, ex2, max_seq_len=64)


def test_dataset_columns(tmp_path, tok):
    ex = data.read_examples(jsonl(tmp_path / "d.jsonl", [CHAT, CHAT]))
    ds = data.to_dataset(data.tokenize_split(tok, ex, 128))
    assert ds.column_names == ["input_ids", "labels"] and len(ds) == 2


# --- mixing weighted sources ---


def _reference_mix_count(n: int, w: float) -> int:
    return n * int(w) + round((w - int(w)) * n)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (2.0, 0.5), (0.25, 3.0), (1.5, 1.0)])
def test_mix_resamples_by_weight_seeded(weights):
    a = [data.Example(None, f"a{i}", f"a:{i}") for i in range(20)]
    b = [data.Example(None, f"b{i}", f"b:{i}") for i in range(8)]
    out = data.mix([(a, weights[0]), (b, weights[1])], seed=42)
    assert sum(e.text.startswith("a") for e in out) == _reference_mix_count(20, weights[0])
    assert sum(e.text.startswith("b") for e in out) == _reference_mix_count(8, weights[1])
    assert [e.text for e in out] == [e.text for e in data.mix([(a, weights[0]), (b, weights[1])], seed=42)]
    assert data.mix([(a, 1.0)], seed=1) == a  # weight 1: the source exactly as it is
    halves = {tuple(e.text for e in data.mix([(a, 0.5)], seed=s)) for s in range(5)}
    assert len(halves) > 1  # the seed decides which half


def test_recipe_with_weighted_sources_reads_mixed_examples(tmp_path):
    from toolkit.finetune import recipe

    jsonl(tmp_path / "a.jsonl", [CHAT] * 4)
    jsonl(tmp_path / "b.jsonl", [SHAREGPT] * 6)
    jsonl(tmp_path / "h.jsonl", [CHAT])
    (tmp_path / "recipe.yaml").write_text(
        "data:\n  train:\n    - {path: a.jsonl, weight: 2}\n    - {path: b.jsonl, weight: 0.5}\n  eval: h.jsonl\n")
    rec = recipe.load(tmp_path)
    assert rec.data.train == [recipe.TrainSource("a.jsonl", 2.0), recipe.TrainSource("b.jsonl", 0.5)]
    train, held = data.read_splits(rec)
    assert len(train) == 8 + 3 and len(held) == 1
    # The resolved recipe round-trips through YAML (what a run folder stores).
    (tmp_path / "resolved.yaml").write_text(recipe.dump(rec))
    assert recipe.load(tmp_path / "resolved.yaml").data.train == rec.data.train
    # The single-string form is unchanged.
    (tmp_path / "recipe.yaml").write_text("data:\n  train: a.jsonl\n")
    assert recipe.load(tmp_path).data.train == "a.jsonl"
    assert len(data.read_splits(recipe.load(tmp_path))[0]) == 4


def test_bad_source_in_a_mix_names_its_entry(tmp_path, monkeypatch):
    from toolkit.finetune import recipe

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    jsonl(tmp_path / "a.jsonl", [CHAT])
    (tmp_path / "recipe.yaml").write_text("data:\n  train:\n    - {path: a.jsonl}\n    - {path: 'hf:org/missing'}\n")
    with pytest.raises(UserError, match=r"^data.train\[1\]: hf:org/missing can't be loaded offline"):
        data.read_splits(recipe.load(tmp_path))


# --- held-out `meta` for the report ---


def _recipe_with_heldout(tmp_path, held: list):
    from toolkit.finetune import recipe

    jsonl(tmp_path / "train.jsonl", [CHAT])
    jsonl(tmp_path / "heldout.jsonl", held)
    (tmp_path / "recipe.yaml").write_text("data:\n  train: train.jsonl\n  eval: heldout.jsonl\n")
    return recipe.load(tmp_path, gpu=True)


@pytest.mark.parametrize("meta, needle", [
    ({"wrong": 5}, "meta.wrong must be a list of strings or numbers"),
    ({"keys": "4"}, "meta.keys must be a list of strings or numbers"),
    ({"keys": ["4", {"n": 4}]}, "meta.keys[1] must be a non-empty string or a number"),
    ({"keys": [[]]}, "meta.keys[0] must be a non-empty string or a number, or a non-empty list of them"),
    ({"wrong": [["5", True]]}, "meta.wrong[0] must be"),
    ({"wrong": [""]}, "meta.wrong[0] must be"),
    ({"kind": ["concept"]}, "meta.kind must be a string"),
    ("keys: 4", "`meta` must be an object"),
])
def test_bad_heldout_meta_is_refused_when_read(tmp_path, meta, needle):
    """The report judges answers by the held-out `meta`, after training: a malformed one must fail
    when the data is read, naming the file, line and field."""
    rec = _recipe_with_heldout(tmp_path, [{**CHAT, "meta": {"keys": ["4"]}}, {**CHAT, "meta": meta}])
    with pytest.raises(UserError) as exc:
        data.read_splits(rec)
    assert str(exc.value).startswith(f"{tmp_path / 'heldout.jsonl'}:2: {needle}")


def test_good_heldout_meta_reaches_the_report(tmp_path):
    from types import SimpleNamespace

    from toolkit.finetune.report import _questions

    held = [{**CHAT, "meta": {"keys": ["4", ["four", 4]], "wrong": [5, ["five"]], "kind": "calc"}},
            {**CHAT, "meta": {"keys": None, "wrong": None, "topic": None}}, {**CHAT, "meta": None}, CHAT]
    _, examples = data.read_splits(_recipe_with_heldout(tmp_path, held))
    qs = _questions(SimpleNamespace(examples=examples), 10)
    assert qs[0]["keys"] == ["4", ["four", "4"]] and len(qs) == 4  # the rest: numbers of the reference
    assert qs[0]["wrong"] == [5, ["five"]] and all(q["wrong"] == [] for q in qs[1:])
