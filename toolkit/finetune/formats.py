"""Data formats: one parsed record (a line, a row) → an `Example` in chat-message form.

Formats, auto-detected from each record's keys:
  messages           {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
  sharegpt           {"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}
  alpaca             {"instruction": ..., "input": ... (optional), "output": ...}
  prompt_completion  {"prompt": ..., "completion": ...} (strings, or TRL's lists of messages), also
                     prompt/response and question/answer
  text               {"text": ...}  (or a .txt file: blank-line separated documents)
Turns are {role, content} or {from, value}; roles as in ROLES; content a string or text parts. A
`system` key (LLaMA-Factory, Axolotl) is the system message. Extra keys (e.g. `meta` with the
answer's key numbers) are kept alongside for the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from toolkit.core.errors import UserError

# Role names as datasets spell them (ShareGPT's human/gpt, bot, Gemini's model), matched lowercased.
ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
         "bot": "assistant", "model": "assistant"}


@dataclass
class Example:
    """One record in message form, with where it came from (for error messages) and its extras."""

    messages: list[dict] | None  # None for raw text
    text: str | None  # raw text (format `text`)
    source: str  # "file:line"
    extra: dict = field(default_factory=dict)
    # Only assistant turns from the last `trained_turns` messages are trained (0 = all): TRL's
    # conversational prompt/completion trains the completion, not assistant turns in the prompt.
    trained_turns: int = 0

    @property
    def prompt_key(self) -> str:
        """The first user turn (or the text): examples sharing it ask the same thing, so a split
        keeps them on one side."""
        import json

        if self.messages is None:
            return self.text or ""
        return next((m["content"] for m in self.messages if m["role"] == "user"), json.dumps(self.messages))


# (prompt key, answer key) pairs read as prompt_completion, in detection order.
PROMPT_PAIRS = (("prompt", "completion"), ("prompt", "response"), ("question", "answer"))


def _sharegpt_key(record: dict) -> str | None:
    """`conversations`, or `messages` whose turns use from/value (some datasets name it so)."""
    if isinstance(record.get("conversations"), list):
        return "conversations"
    msgs = record.get("messages")
    if isinstance(msgs, list) and msgs and isinstance(msgs[0], dict) and "from" in msgs[0]:
        return "messages"
    return None


def explain_format(record: object) -> tuple[str | None, str]:
    """(format, why): the format `record`'s keys say it is in, and the keys that decided it."""
    if not isinstance(record, dict):
        return None, f"a {type(record).__name__}, not an object"
    key = _sharegpt_key(record)
    if key:
        turns = record[key]
        style = "{role, content}" if turns and isinstance(turns[0], dict) and "role" in turns[0] else "{from, value}"
        return "sharegpt", f"`{key}` is a list of {style} turns"
    if "messages" in record:
        return "messages", "`messages` is a list of {role, content} turns"
    if "instruction" in record and "output" in record:
        return "alpaca", "keys `instruction` and `output`" + (" (+ `input`)" if "input" in record else "")
    for a, b in PROMPT_PAIRS:
        if a in record and b in record:
            return "prompt_completion", f"keys `{a}` and `{b}`"
    if "text" in record:
        return "text", "key `text` (raw text: every token trained)"
    return None, f"keys found: {', '.join(map(str, record)) or 'none'}"


def detect_format(record: dict) -> str | None:
    return explain_format(record)[0]


def _str_field(record: dict, key: str, where: str, required: bool = True) -> str:
    value = record.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise UserError(f"{where}: `{key}` must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise UserError(f"{where}: `{key}` is empty")
    return value


def _check_user_first(messages: list[dict], where: str, key: str, answer: str, question: str) -> None:
    """Refuse a conversation whose first turn after its system messages is the assistant's: that
    answer has no question (the loss mask has no prompt to start from, and chat templates that
    require alternating turns refuse it). Leading system messages don't count, or the same record
    would pass or fail depending on whether data.system_prompt adds one."""
    i = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    if i is not None and messages[i]["role"] == "assistant":
        raise UserError(f"{where}: {key}[{i}] is {answer} with no {question} before it; a conversation "
                        "starts with the user (after any system message)")


def _content(turn: dict, key: str, at: str) -> str:
    """A turn's text; content parts are joined as the chat templates that take parts join them."""
    parts = turn.get(key)
    for j, part in enumerate(parts if isinstance(parts, list) else []):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            raise UserError(f"{at}.{key}[{j}]: only text parts {{\"type\": \"text\", \"text\": ...}} can be "
                            f"trained, got {part!r:.60}")
    return _str_field({key: "".join(p["text"] for p in parts)} if isinstance(parts, list) else turn, key, at)


def _turns(record: dict, key: str, where: str) -> list[dict]:
    """`record[key]` as messages; ShareGPT's {from, value} turns may carry extra keys, as its dumps do."""
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise UserError(f"{where}: `{key}` must be a non-empty list")
    out = []
    for i, t in enumerate(turns):
        at = f"{where}: {key}[{i}]"
        rk, ck = ("from", "value") if isinstance(t, dict) and "from" in t else ("role", "content")
        if not isinstance(t, dict) or rk not in t:
            raise UserError(f'{at} must be {{"role": ..., "content": ...}} or {{"from": ..., "value": ...}}')
        if rk == "role" and set(t) - {"role", "content"}:
            raise UserError(f"{at} has key(s) {', '.join(sorted(map(str, set(t) - {'role', 'content'})))}; "
                            "a message has only role and content")
        role = ROLES.get(t[rk].lower()) if isinstance(t[rk], str) else None
        if role is None:
            raise UserError(f"{at}.{rk} {t[rk]!r} is not one of {', '.join(ROLES)}")
        out.append({"role": role, "content": _content(t, ck, at)})
    return out


def to_example(record: object, fmt: str, where: str, system_prompt: str = "") -> Example:
    """Convert one parsed record into an Example, or raise UserError naming `where` (file:line)."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        fmt = detect_format(record) or ""
        if not fmt:
            raise UserError(
                f"{where}: unknown record format (keys: {', '.join(map(str, record)) or 'none'}); expected messages, "
                "conversations (ShareGPT), instruction/output, prompt/completion (or prompt/response, "
                "question/answer) or text"
            )
    trained_turns = 0
    if fmt == "text":
        return Example(None, _str_field(record, "text", where), where,
                       {k: v for k, v in record.items() if k != "text"})
    nouns = ("a gpt/assistant turn", "human/user turn") if fmt == "sharegpt" else ("an assistant message", "user message")
    if fmt in ("sharegpt", "messages"):
        key = (_sharegpt_key(record) or "conversations") if fmt == "sharegpt" else "messages"
        out = _turns(record, key, where)
        _check_user_first(out, where, key, *nouns)
        used = {key}
    elif fmt == "alpaca":
        instr = _str_field(record, "instruction", where)
        extra_input = _str_field(record, "input", where, required=False)
        prompt = f"{instr}\n\n{extra_input}" if extra_input.strip() else instr
        if record.get("history"):  # LLaMA-Factory's earlier rounds: ignored, the answer would lose its context
            raise UserError(f"{where}: alpaca `history` is not read; write multi-turn conversations as `messages`")
        out = [{"role": "user", "content": prompt},
               {"role": "assistant", "content": _str_field(record, "output", where)}]
        used = {"instruction", "input", "output", "history"}
    elif fmt == "prompt_completion":
        a, b = next(((a, b) for a, b in PROMPT_PAIRS if a in record and b in record), PROMPT_PAIRS[0])
        if isinstance(record.get(a), list) and isinstance(record.get(b), list):  # TRL's conversational form
            out = _turns(record, a, where)
            _check_user_first(out, where, a, *nouns)
            if not any(m["role"] == "user" for m in out):
                raise UserError(f"{where}: `{a}` has no user message")
            completion = _turns(record, b, where)
            if not any(m["role"] == "assistant" for m in completion):
                raise UserError(f"{where}: `{b}` has no assistant message to learn from")
            out += completion
            trained_turns = len(completion)
        else:
            out = [{"role": "user", "content": _str_field(record, a, where)},
                   {"role": "assistant", "content": _str_field(record, b, where)}]
        used = {a, b}
    else:
        raise UserError(f"{where}: unknown format {fmt!r}")
    if not any(m["role"] == "assistant" for m in out):
        raise UserError(f"{where}: conversation has no {nouns[0].split(' ', 1)[1]} to learn from")
    if "system" in record:  # a column beside the turns; ignoring it would train without the system prompt
        system, used = _str_field(record, "system", where, required=False), used | {"system"}
        if system.strip():
            if out[0]["role"] == "system":
                raise UserError(f"{where}: both a `system` key and a system message; keep one")
            out.insert(0, {"role": "system", "content": system})
    if system_prompt and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system_prompt})
    return Example(out, None, where, {k: v for k, v in record.items() if k not in used}, trained_turns)
