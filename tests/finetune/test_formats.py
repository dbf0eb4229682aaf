"""Record formats (messages, ShareGPT, Alpaca, prompt/completion, TRL conversational) and roles → chat messages."""

from __future__ import annotations

import pytest

from toolkit.finetune import data, formats
from toolkit.core.errors import UserError
from tests.finetune.conftest import CHAT, EXPECTED, SHAREGPT, jsonl, trained_text


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


@pytest.mark.parametrize("system_prompt", ["", "You help."])
def test_answer_first_is_refused_whatever_the_system_prompt(tmp_path, system_prompt):
    """data.system_prompt puts a system message before an answer-first conversation: still refused,
    as a UserError naming the line, not the chat template's error once tokenizing."""
    answer_first = {"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]}
    p = jsonl(tmp_path / "d.jsonl", [CHAT, answer_first])
    with pytest.raises(UserError, match=rf"^{p}:2: messages\[0\] is an assistant message"):
        data.read_examples(p, system_prompt=system_prompt)


# --- ShareGPT, prompt/response pairs, other tools' spellings ---


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
