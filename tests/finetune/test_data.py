"""Data formats → messages → tokens, with assistant-only labels and a trained EOS."""

from __future__ import annotations

import json

import pytest

from toolkit.finetune import data
from toolkit.core.errors import UserError


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


@pytest.mark.parametrize("record, fmt", [
    (CHAT, "messages"),
    ({"instruction": "Add the numbers.", "input": "2 and 2", "output": "It is 4."}, "alpaca"),
    ({"prompt": "What is 2+2?", "completion": "It is 4."}, "prompt_completion"),
])
def test_formats_become_conversations_with_assistant_only_loss(tmp_path, tok, record, fmt):
    ex = data.read_examples(jsonl(tmp_path / "d.jsonl", [record]))
    assert data.detect_format(record) == fmt
    assert ex[0].messages[-1] == {"role": "assistant", "content": "It is 4."}
    ids, labels = data.tokenize_example(tok, ex[0])
    # Exactly the answer and its end-of-turn token are trained: the model learns to stop.
    assert trained_text(tok, ids, labels).strip() == "It is 4.<|im_end|>"
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id in [lab for lab in labels if lab != -100]
    assert tok.pad_token_id != tok.eos_token_id
    # The rendering is the model's own chat template.
    assert tok.decode(ids) == tok.apply_chat_template(ex[0].messages, tokenize=False)


def test_alpaca_input_joined_into_prompt(tmp_path):
    ex = data.read_examples(jsonl(tmp_path / "d.jsonl", [{"instruction": "Sum:", "input": "1 2", "output": "3"}]))
    assert ex[0].messages[0] == {"role": "user", "content": "Sum:\n\n1 2"}


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


def test_system_prompt_added_when_missing(tmp_path):
    (ex,) = data.read_examples(jsonl(tmp_path / "d.jsonl", [CHAT]), system_prompt="You help.")
    assert ex.messages[0] == {"role": "system", "content": "You help."}


def test_extra_keys_kept(tmp_path):
    (ex,) = data.read_examples(jsonl(tmp_path / "d.jsonl", [{**CHAT, "meta": {"keys": ["4"]}}]))
    assert ex.extra == {"meta": {"keys": ["4"]}}


@pytest.mark.parametrize("bad, needle", [
    ("{not json", "invalid JSON"),
    ('{"foo": 1}', "unknown record format"),
    ('{"messages": []}', "`messages` must be a non-empty list"),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "role 'robot'"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "no assistant message"),
    ('{"prompt": "x", "completion": ""}', "`completion` is empty"),
    ('{"prompt": "x", "completion": 3}', "`completion` must be a string"),
    ("[1, 2]", "expected a JSON object"),
])
def test_bad_line_reports_file_and_line(tmp_path, bad, needle):
    p = jsonl(tmp_path / "d.jsonl", [CHAT, "", bad])
    with pytest.raises(UserError) as exc:
        data.read_examples(p)
    assert f"{p}:3:" in str(exc.value) and needle in str(exc.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        data.read_examples(tmp_path / "none.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="empty split"):
        data.read_examples(tmp_path / "e.jsonl")


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
