"""Reading data files: missing/empty, BOM, CRLF, encodings, CSV, Parquet/Arrow, JSON arrays, hf: ids."""

from __future__ import annotations

import json

import pytest

from toolkit.finetune import data
from toolkit.core.errors import UserError
from tests.finetune.conftest import CHAT, EXPECTED, SHAREGPT


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        data.read_examples(tmp_path / "none.jsonl")
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match="empty split"):
        data.read_examples(tmp_path / "e.jsonl")


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


def test_a_json_array_named_jsonl_reads_as_the_array(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps([CHAT, CHAT], indent=2))
    assert [e.messages for e in data.read_examples(p)] == [CHAT["messages"]] * 2
    p.write_text('[{"messages": [}]\n')
    with pytest.raises(UserError, match=r"d.jsonl:1: invalid JSON"):
        data.read_examples(p)


def test_hub_dataset_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as exc:
        data.read_examples("hf:someorg/chats:validation", field="data.train")
    assert str(exc.value) == "data.train: hf:someorg/chats can't be loaded offline (HF_HUB_OFFLINE is set)"
    with pytest.raises(UserError, match="not a dataset id"):
        data.read_examples("hf:", field="data.train")
