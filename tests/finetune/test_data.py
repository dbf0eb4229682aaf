"""Data formats → messages → tokens, with assistant-only labels and a trained EOS."""

from __future__ import annotations

import json

import pytest

from toolkit.finetune import data, formats
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
    assert formats.detect_format(record) == fmt
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
    ('{"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}',
     "messages[0] is an assistant message with no user message before it"),
    # A system message first doesn't make the answer's question appear.
    ('{"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "x"}, '
     '{"role": "user", "content": "y"}, {"role": "assistant", "content": "z"}]}',
     "messages[1] is an assistant message with no user message before it"),
    ('{"prompt": "x", "completion": ""}', "`completion` is empty"),
    ('{"prompt": "x", "completion": 3}', "`completion` must be a string"),
    ("[1, 2]", "expected a JSON object"),
    ('{"messages": [{"role": "user", "content": "x", "name": "bob"}, {"role": "assistant", "content": "y"}]}',
     "messages[0] has key(s) name; a message has only role and content"),
    ('{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]}',
     'messages[0].content[0]: only text parts {"type": "text", "text": ...} can be trained'),
    ('{"messages": [{"role": "tool", "content": "x"}]}', "messages[0].role 'tool' is not one of system, user"),
    ('{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}, '
     '{"role": "assistant", "content": "y"}], "system": "t"}', "both a `system` key and a system message"),
    ('{"instruction": "x", "output": "y", "history": [["a", "b"]]}', "alpaca `history` is not read"),
    ('{"prompt": [{"role": "system", "content": "s"}], "completion": [{"role": "assistant", "content": "y"}]}',
     "`prompt` has no user message"),
    ('{"prompt": [{"role": "user", "content": "x"}], "completion": []}', "`completion` must be a non-empty list"),
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


# --- Bring your own data: ShareGPT, prompt/response pairs, tables, hf: ids, mixing -------------------------------

SHAREGPT = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is 2+2?"},
                              {"from": "gpt", "value": "It is 4."}]}
EXPECTED = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "It is 4."}]


@pytest.mark.parametrize("record", [
    SHAREGPT,
    {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "user", "value": "What is 2+2?"},
                       {"from": "assistant", "value": "It is 4."}]},
    {"messages": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "What is 2+2?"},
                  {"from": "gpt", "value": "It is 4."}]},
])
def test_sharegpt_becomes_messages_with_assistant_only_loss(tmp_path, tok, record):
    fmt, why = formats.explain_format(record)
    assert fmt == "sharegpt" and "from, value" in why
    (ex,) = data.read_examples(jsonl(tmp_path / "d.jsonl", [{**record, "id": 7}]))
    assert ex.messages == EXPECTED and ex.extra == {"id": 7}
    ids, labels = data.tokenize_example(tok, ex)
    assert trained_text(tok, ids, labels).strip() == "It is 4.<|im_end|>"


@pytest.mark.parametrize("record, why", [
    ({"prompt": "What is 2+2?", "response": "It is 4."}, "`prompt` and `response`"),
    ({"question": "What is 2+2?", "answer": "It is 4."}, "`question` and `answer`"),
    ({"instruction": "What is 2+2?", "input": "", "output": "It is 4."}, "`instruction` and `output` (+ `input`)"),
])
def test_prompt_pairs_map_to_prompt_completion(tmp_path, record, why):
    fmt, got_why = formats.explain_format(record)
    assert got_why == f"keys {why}" and fmt in ("prompt_completion", "alpaca")
    (ex,) = data.read_examples(jsonl(tmp_path / "d.jsonl", [record]))
    assert ex.messages == EXPECTED[1:]


@pytest.mark.parametrize("bad, needle", [
    ('{"conversations": [{"from": "narrator", "value": "x"}]}', "conversations[0].from 'narrator' is not one of"),
    ('{"conversations": [{"from": "human", "value": "x"}]}', "no gpt/assistant turn"),
    ('{"conversations": [{"from": "human"}, {"from": "gpt", "value": "y"}]}', "conversations[0]: `value` is empty"),
    ('{"conversations": []}', "`conversations` must be a non-empty list"),
    ('{"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}',
     "conversations[0] is a gpt/assistant turn with no human/user turn before it"),
    ('{"messages": [{"from": "system", "value": "s"}, {"from": "gpt", "value": "x"}]}',
     "messages[1] is a gpt/assistant turn with no human/user turn before it"),
    ('{"question": "x"}', "keys: question"),
])
def test_bad_sharegpt_line_reports_file_and_line(tmp_path, bad, needle):
    p = jsonl(tmp_path / "d.jsonl", [SHAREGPT, bad])
    with pytest.raises(UserError) as exc:
        data.read_examples(p)
    assert f"{p}:2:" in str(exc.value) and needle in str(exc.value)


U, A = ({"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."})


@pytest.mark.parametrize("record", [
    # TRL's conversational prompt-completion.
    {"prompt": [{"role": "system", "content": "Be brief."}, U], "completion": [A]},
    # Role names as other tools and datasets spell them; Unsloth's standardized ShareGPT is role/content.
    {"conversations": [{"from": "System", "value": "Be brief."}, {"from": "Human", "value": "What is 2+2?"},
                       {"from": "bot", "value": "It is 4."}]},
    {"conversations": [{"role": "system", "content": "Be brief."}, U, {"role": "model", "content": "It is 4."}]},
    # OpenAI-style content parts.
    {"messages": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                  {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]},
                  A]},
    # A `system` column beside the turns (LLaMA-Factory's sharegpt and alpaca, Axolotl's alpaca_w_system).
    {"conversations": [{"from": "human", "value": "What is 2+2?"}, {"from": "gpt", "value": "It is 4."}],
     "system": "Be brief."},
    {"instruction": "What is 2+2?", "output": "It is 4.", "system": "Be brief."},
])
def test_what_other_tools_accept_reads_as_the_same_conversation(tmp_path, tok, record):
    (ex,) = data.read_examples(jsonl(tmp_path / "d.jsonl", [record]), system_prompt="Not this one.")
    assert ex.messages == EXPECTED and ex.extra == {}
    ids, labels = data.tokenize_example(tok, ex)
    assert trained_text(tok, ids, labels).strip() == "It is 4.<|im_end|>"


def test_conversational_prompt_completion_trains_the_completion_only(tmp_path, tok):
    """As TRL does: an assistant turn inside `prompt` is context, and `completion` must answer."""
    earlier = {"role": "assistant", "content": "Earlier answer."}
    record = {"prompt": [U, earlier, {"role": "user", "content": "And 3+3?"}],
              "completion": [{"role": "assistant", "content": "Six."}]}
    (ex,) = data.read_examples(jsonl(tmp_path / "d.jsonl", [record]))
    assert [m["content"] for m in ex.messages] == ["What is 2+2?", "Earlier answer.", "And 3+3?", "Six."]
    ids, labels = data.tokenize_example(tok, ex)
    assert trained_text(tok, ids, labels).strip() == "Six.<|im_end|>"
    # The same turns as `messages` train both answers.
    (both,) = data.read_examples(jsonl(tmp_path / "m.jsonl", [{"messages": ex.messages}]))
    assert "Earlier answer." in trained_text(tok, *data.tokenize_example(tok, both))
    with pytest.raises(UserError, match=r"d2.jsonl:1: `completion` has no assistant message to learn from"):
        data.read_examples(jsonl(tmp_path / "d2.jsonl", [{"prompt": [U, earlier], "completion": [U]}]))


def test_bom_crlf_and_missing_last_newline_read_as_plain_utf8(tmp_path):
    """Windows tools write a UTF-8 BOM and CRLF; neither may change what is read. Other encodings
    are refused naming the line."""
    bom = "\ufeff".encode()
    (tmp_path / "d.jsonl").write_bytes(bom + (json.dumps(CHAT) + "\r\n\r\n" + json.dumps(CHAT)).encode())
    (tmp_path / "d.json").write_bytes(bom + json.dumps([CHAT]).encode())
    (tmp_path / "d.csv").write_bytes(bom + b"question,answer\r\nWhat is 2+2?,It is 4.\r\n")
    (tmp_path / "d.txt").write_bytes(bom + b"First document.\r\n \r\nSecond\r\nline.\r\n")
    assert [e.messages for e in data.read_examples(tmp_path / "d.jsonl")] == [CHAT["messages"]] * 2
    assert [e.source for e in data.read_examples(tmp_path / "d.jsonl")] == [f"{tmp_path / 'd.jsonl'}:{i}" for i in (1, 3)]
    assert [e.messages for e in data.read_examples(tmp_path / "d.json")] == [CHAT["messages"]]
    assert [e.messages for e in data.read_examples(tmp_path / "d.csv")] == [EXPECTED[1:]]
    assert [e.text for e in data.read_examples(tmp_path / "d.txt")] == ["First document.", "Second\nline."]
    (tmp_path / "d.jsonl").write_bytes(json.dumps(CHAT).encode() + b'\n{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(UserError, match=rf"^{tmp_path / 'd.jsonl'}:2: not UTF-8 \(byte 0xe9\); save the file as UTF-8$"):
        data.read_examples(tmp_path / "d.jsonl")


def test_line_separators_inside_json_strings_stay_in_their_line(tmp_path):
    """JSON leaves U+2028/U+2029/U+0085 unescaped (ensure_ascii=False, as `recipe new` writes):
    they are inside a string, not line ends, and line numbers count only real lines."""
    odd = {"messages": [{"role": "user", "content": "a\u2028b\u2029c"}, {"role": "assistant", "content": "d\x85e"}]}
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(odd, ensure_ascii=False) + "\n{bad\n", encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{p}:2: invalid JSON"):
        data.read_examples(p)
    p.write_text(json.dumps(odd, ensure_ascii=False) + "\n", encoding="utf-8")
    assert data.read_examples(p)[0].messages == odd["messages"]
    c = tmp_path / "d.csv"
    c.write_text('question,answer\n"a\u2028b",c\nq,\n', encoding="utf-8")
    with pytest.raises(UserError, match=rf"^{c}:3: `answer` is empty"):
        data.read_examples(c)


def test_csv_columns_and_bad_row_line(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('instruction,input,output\nWhat is 2+2?,,It is 4.\n"Sum:","1\n2",3\n')
    a, b = data.read_examples(p)
    assert a.messages == EXPECTED[1:] and b.messages[0]["content"] == "Sum:\n\n1\n2"
    assert a.source == f"{p}:2" and b.source == f"{p}:4"  # the physical line a row ends on
    p.write_text("question,answer\nWhat is 2+2?,It is 4.\nWhy?,\n")
    with pytest.raises(UserError, match=rf"{p}:3: `answer` is empty"):
        data.read_examples(p)
    p.write_text("prompt,response\na,b,c\n")
    with pytest.raises(UserError, match=rf"{p}:2: 3 cells for 2 header columns"):
        data.read_examples(p)


def test_parquet_arrow_and_json_array(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist([SHAREGPT, {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt",
                                                                                                 "value": "A"}]}])
    pq.write_table(table, tmp_path / "d.parquet")
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    (tmp_path / "d.json").write_text(json.dumps(table.to_pylist(), indent=1))
    for name in ("d.parquet", "file.arrow", "stream.arrow", "d.json"):
        exs = data.read_examples(tmp_path / name)
        assert [e.messages for e in exs] == [EXPECTED, [{"role": "user", "content": "Q"},
                                                        {"role": "assistant", "content": "A"}]], name
    bad = pa.Table.from_pylist([{"prompt": "x", "completion": "y"}, {"prompt": "x", "completion": None}])
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=r"bad.parquet: row 2: `completion` is empty"):
        data.read_examples(tmp_path / "bad.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(UserError, match="junk.parquet: cannot read as a parquet table"):
        data.read_examples(tmp_path / "junk.parquet")


def test_hub_dataset_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as exc:
        data.read_examples("hf:someorg/chats:validation", field="data.train")
    assert str(exc.value) == "data.train: hf:someorg/chats can't be loaded offline (HF_HUB_OFFLINE is set)"
    with pytest.raises(UserError, match="not a dataset id"):
        data.read_examples("hf:", field="data.train")


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


@pytest.mark.parametrize("train, needle", [
    ("[{path: a.jsonl, wieght: 2}]", "data.train[0]: unknown key `wieght` (known: path, weight)"),
    ("[{path: a.jsonl, weight: 0}]", "data.train[0].weight must be > 0"),
    ("[{weight: 1}]", "data.train[0].path is required"),
    ("[a.jsonl]", "data.train[0]: expected a mapping with keys path, weight"),
    ("[]", "data.train is required"),
])
def test_bad_weighted_sources(tmp_path, train, needle):
    from toolkit.finetune import recipe

    (tmp_path / "recipe.yaml").write_text(f"data:\n  train: {train}\n")
    with pytest.raises(UserError) as exc:
        recipe.load(tmp_path)
    assert needle in str(exc.value) and str(tmp_path / "recipe.yaml") in str(exc.value)


def test_bad_source_in_a_mix_names_its_entry(tmp_path, monkeypatch):
    from toolkit.finetune import recipe

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    jsonl(tmp_path / "a.jsonl", [CHAT])
    (tmp_path / "recipe.yaml").write_text("data:\n  train:\n    - {path: a.jsonl}\n    - {path: 'hf:org/missing'}\n")
    with pytest.raises(UserError, match=r"^data.train\[1\]: hf:org/missing can't be loaded offline"):
        data.read_splits(recipe.load(tmp_path))


@pytest.mark.parametrize("system_prompt", ["", "You help."])
def test_answer_first_is_refused_whatever_the_system_prompt(tmp_path, system_prompt):
    """data.system_prompt puts a system message before an answer-first conversation: still refused,
    as a UserError naming the line, not the chat template's error once tokenizing."""
    answer_first = {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}
    p = jsonl(tmp_path / "d.jsonl", [CHAT, answer_first])
    with pytest.raises(UserError, match=rf"^{p}:2: messages\[0\] is an assistant message"):
        data.read_examples(p, system_prompt=system_prompt)


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


def test_a_json_array_named_jsonl_reads_as_the_array(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps([CHAT, CHAT], indent=2))
    assert [e.messages for e in data.read_examples(p)] == [CHAT["messages"]] * 2
    p.write_text('[{"messages": [}]\n')
    with pytest.raises(UserError, match=r"d.jsonl:1: invalid JSON"):
        data.read_examples(p)
