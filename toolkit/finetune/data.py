"""Training data: JSONL (or .txt) files → chat messages → token ids with loss labels.

Formats, one JSON object per line (auto-detected from the first line's keys):
  messages           {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]}
  alpaca             {"instruction": ..., "input": ... (optional), "output": ...}
  prompt_completion  {"prompt": ..., "completion": ...}
  text               {"text": ...}  (or a .txt file: blank-line separated documents)
Extra keys (e.g. `meta` with the answer's key numbers) are kept alongside for the report.

Conversations are rendered with the model's own chat template. Labels are -100 everywhere
except assistant turns (content and the end-of-turn/EOS token, so the model learns to stop);
raw text trains every token plus EOS. Masks come from character offsets of the rendered
template, so they do not depend on pad/EOS ids: padding can never mask the trained EOS.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.core.errors import UserError

ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    """One record in message form, with where it came from (for error messages) and its extras."""

    messages: list[dict] | None  # None for raw text
    text: str | None  # raw text (format `text`)
    source: str  # "file:line"
    extra: dict = field(default_factory=dict)


@dataclass
class TokenizedSplit:
    """Token ids and labels of one split, with what happened to over-long examples."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    examples: list[Example]  # the kept examples, aligned with input_ids
    n_truncated: int = 0
    n_dropped: int = 0

    @property
    def n_tokens(self) -> int:
        return sum(len(x) for x in self.input_ids)

    @property
    def n_trained(self) -> int:
        return sum(sum(1 for t in lab if t != -100) for lab in self.labels)


def detect_format(record: dict) -> str | None:
    if "messages" in record:
        return "messages"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "text" in record:
        return "text"
    return None


def _str_field(record: dict, key: str, where: str, required: bool = True) -> str:
    value = record.get(key, "")
    if value is None:
        value = ""
    if not isinstance(value, str):
        raise UserError(f"{where}: `{key}` must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise UserError(f"{where}: `{key}` is empty")
    return value


def to_example(record: object, fmt: str, where: str, system_prompt: str = "") -> Example:
    """Convert one parsed record into an Example, or raise UserError naming `where` (file:line)."""
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "auto":
        fmt = detect_format(record) or ""
        if not fmt:
            raise UserError(
                f"{where}: unknown record format (keys: {', '.join(record) or 'none'}); expected messages, "
                "instruction/output, prompt/completion or text"
            )
    used: set[str]
    if fmt == "messages":
        msgs = record.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise UserError(f"{where}: `messages` must be a non-empty list")
        out = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or set(m) - {"role", "content"} or "role" not in m:
                raise UserError(f"{where}: messages[{i}] must be {{\"role\": ..., \"content\": ...}}")
            if m["role"] not in ROLES:
                raise UserError(f"{where}: messages[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}")
            out.append({"role": m["role"], "content": _str_field(m, "content", f"{where}: messages[{i}]")})
        if not any(m["role"] == "assistant" for m in out):
            raise UserError(f"{where}: conversation has no assistant message to learn from")
        used = {"messages"}
    elif fmt == "alpaca":
        instr = _str_field(record, "instruction", where)
        extra_input = _str_field(record, "input", where, required=False)
        prompt = f"{instr}\n\n{extra_input}" if extra_input.strip() else instr
        out = [{"role": "user", "content": prompt},
               {"role": "assistant", "content": _str_field(record, "output", where)}]
        used = {"instruction", "input", "output"}
    elif fmt == "prompt_completion":
        out = [{"role": "user", "content": _str_field(record, "prompt", where)},
               {"role": "assistant", "content": _str_field(record, "completion", where)}]
        used = {"prompt", "completion"}
    elif fmt == "text":
        return Example(None, _str_field(record, "text", where), where,
                       {k: v for k, v in record.items() if k != "text"})
    else:
        raise UserError(f"{where}: unknown format {fmt!r}")
    if system_prompt and out[0]["role"] != "system":
        out.insert(0, {"role": "system", "content": system_prompt})
    return Example(out, None, where, {k: v for k, v in record.items() if k not in used})


def read_examples(path: str | Path, fmt: str = "auto", system_prompt: str = "") -> list[Example]:
    """Read a JSONL (or .txt for raw text) file; a bad line raises UserError with file:line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {exc}") from None
    if path.suffix == ".txt":
        docs = [d.strip() for d in text.split("\n\n") if d.strip()]
        examples = [Example(None, d, f"{path}:doc{i + 1}") for i, d in enumerate(docs)]
    else:
        examples = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})") from None
            examples.append(to_example(record, fmt, where, system_prompt))
    if not examples:
        raise UserError(f"{path}: no examples (empty split)")
    return examples


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Rendered conversation and the character spans of each assistant turn (content + end-of-turn).

    A turn's span runs from the end of the prompt rendered with the generation prompt to the end
    of the conversation rendered through that turn; the template must render prefixes as prefixes.
    """
    full = render(tokenizer, messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(render(tokenizer, messages[:i], add_generation_prompt=True))
        end = len(render(tokenizer, messages[: i + 1]))
        prefix = render(tokenizer, messages[: i + 1])
        if not full.startswith(prefix) or start > end:
            raise UserError("the model's chat template does not render conversations prefix-consistently; "
                            "set data.completion_only_loss: false")
        spans.append((start, end))
    return full, spans


def tokenize_example(tokenizer, ex: Example, completion_only: bool = True) -> tuple[list[int], list[int]]:
    """Token ids and labels (-100 = no loss) of one example."""
    if ex.messages is None:
        ids = tokenizer(ex.text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return ids, list(ids)
    text, spans = assistant_spans(tokenizer, ex.messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if not completion_only:
        return ids, list(ids)
    labels = []
    for tid, (a, b) in zip(ids, enc["offset_mapping"]):
        inside = any(s <= a and b <= e and b > a for s, e in spans)
        labels.append(tid if inside else -100)
    return ids, labels


def tokenize_split(tokenizer, examples: list[Example], max_seq_len: int, overlong: str = "truncate",
                   completion_only: bool = True, name: str = "train") -> TokenizedSplit:
    """Tokenize a split; over-long examples are truncated (keep the start) or dropped, and counted.

    An example left with no trained token (e.g. the prompt alone fills max_seq_len) is dropped.
    """
    out = TokenizedSplit([], [], [])
    for ex in examples:
        ids, labels = tokenize_example(tokenizer, ex, completion_only)
        if len(ids) > max_seq_len:
            if overlong == "drop":
                out.n_dropped += 1
                continue
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            out.n_truncated += 1
        if all(t == -100 for t in labels[1:]):
            out.n_dropped += 1
            continue
        out.input_ids.append(ids)
        out.labels.append(labels)
        out.examples.append(ex)
    if not out.input_ids:
        raise UserError(
            f"{name} split is empty after tokenization ({len(examples)} examples, {out.n_dropped} dropped "
            f"as longer than data.max_seq_len={max_seq_len} or with nothing to learn)"
        )
    return out


def to_dataset(split: TokenizedSplit):
    """A `datasets.Dataset` with `input_ids` and `labels`: TRL treats it as already processed."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": split.input_ids, "labels": split.labels})
