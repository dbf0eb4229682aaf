"""`toolkit recipe new` through the CLI: what it prints, and one-line exit-2 errors that leave nothing behind."""

from __future__ import annotations

import json

import pytest

from toolkit.cli import main


def _run(capsys, *argv):
    code = main(["recipe", "new", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_new_prints_what_it_found(tmp_path, capsys, embedded_dir):
    src = tmp_path / "qa.csv"  # as Excel saves "CSV UTF-8": a BOM, CRLF line ends
    src.write_text("\ufeffquestion,answer\r\n" + "".join(f"What is {i} times 2?,It is {2 * i}.\r\n" for i in range(30)),
                   encoding="utf-8", newline="")
    code, out, err = _run(capsys, "qa", "--data", str(src), "--dir", str(tmp_path / "recipes"))
    assert code == 0, err
    assert "format: prompt_completion (keys `question` and `answer`)" in out
    assert "examples: 27 train, 3 held out" in out
    assert "tokens per example (embedded tokenizer" in out and "truncated at max_seq_len=256: 0 of 30" in out
    assert "planner estimate" in out and f"wrote {tmp_path / 'recipes' / 'qa' / 'recipe.yaml'}" in out
    # The written recipe is usable by the next step as it is.
    code = main(["finetune", str(tmp_path / "recipes" / "qa"), "--dry-run"])
    assert code == 0 and "[[It is" in capsys.readouterr().out


def _bad_cases(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"query": "x", "reply": "y"}) + "\n")
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": f"p{i}", "completion": "c"}) + "\n" for i in range(5)))
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(b"question,answer\nCaf\xe9?,Yes.\n")
    (tmp_path / "recipes" / "taken").mkdir(parents=True)
    return [
        (["e", "--data", str(empty)], f"--data {empty}: the file is empty"),
        (["b", "--data", str(blank)], f"--data {blank}: no records (empty)"),
        (["o", "--data", str(odd)], f"{odd}:1: unknown data format (keys found: query, reply)"),
        (["h", "--data", "hf:someorg/chats"], "--data: hf:someorg/chats can't be loaded offline (HF_HUB_OFFLINE is set)"),
        (["m", "--data", str(tmp_path / "missing.jsonl")], "missing.jsonl: file not found"),
        (["taken", "--data", str(good)], "recipe taken already exists"),
        (["bad/name", "--data", str(good)], "recipe name 'bad/name'"),
        (["ev", "--data", str(good), "--eval", str(empty)], f"--eval {empty}: the file is empty"),
        (["l", "--data", str(latin1)], f"{latin1}:2: not UTF-8 (byte 0xe9); save the file as UTF-8"),
    ]


def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for argv, needle in _bad_cases(tmp_path):
        code, out, err = _run(capsys, *argv, "--dir", str(tmp_path / "recipes"))
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (argv, err)
        assert sorted(p.name for p in (tmp_path / "recipes").iterdir()) == ["taken"], argv
        assert not any((tmp_path / "recipes" / "taken").iterdir())


def test_data_flag_accumulates(tmp_path, capsys, embedded_dir):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"a{i}", "completion": "c"}) + "\n" for i in range(10)))
    b.write_text("".join(json.dumps({"instruction": f"b{i}", "output": "o"}) + "\n" for i in range(10)))
    code, out, err = _run(capsys, "two", "--data", str(a), "--data", str(b), "--dir", str(tmp_path / "r"))
    assert code == 0, err
    assert "examples: 18 train, 2 held out" in out and "prompt_completion/alpaca" in out


@pytest.mark.parametrize("argv", [["recipe"], ["recipe", "new", "x"]])
def test_usage_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
