"""Training data: records (JSONL, JSON, CSV, Parquet, Arrow, `hf:` datasets; see
`toolkit.finetune.sources`) or .txt files → chat messages (`toolkit.finetune.formats`) → token ids
with loss labels. Several training sources mix by weight (`read_splits`, `mix`).

Conversations are rendered with the model's own chat template. Labels are -100 everywhere
except assistant turns (content and the end-of-turn/EOS token, so the model learns to stop);
raw text trains every token plus EOS. Masks come from character offsets of the rendered
template, so they do not depend on pad/EOS ids: padding can never mask the trained EOS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toolkit.core.errors import UserError
from toolkit.finetune.formats import Example, to_example


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


def read_examples(path: str | Path, fmt: str = "auto", system_prompt: str = "", field: str = "data",
                  hub_timeout: float = 3.0) -> list[Example]:
    """Read a data file (JSONL, JSON array, CSV/TSV, Parquet, Arrow; .txt = raw text) or an
    `hf:org/name[:split]` dataset; a bad record raises UserError naming file and line (or row)."""
    import re

    from toolkit.finetune.sources import is_hub_id, read_records, read_text

    if not is_hub_id(str(path)) and Path(path).suffix == ".txt":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"data file not found: {path}")
        docs = [d.strip() for d in re.split(r"\n\s*\n", read_text(path)) if d.strip()]  # spaces look blank too
        examples = [Example(None, d, f"{path}:doc{i + 1}") for i, d in enumerate(docs)]
    else:
        examples = [to_example(record, fmt, where, system_prompt)
                    for where, record in read_records(path, field, hub_timeout)]
    if not examples:
        raise UserError(f"{path}: no examples (empty split)")
    return examples


def _meta_scalar(value) -> bool:
    return (isinstance(value, str) and bool(value.strip())) or \
        (isinstance(value, (int, float)) and not isinstance(value, bool))


def check_report_meta(examples: list[Example]) -> None:
    """Held-out `meta` is what the report judges answers by (toolkit.finetune.report): `keys` (all
    must appear) and `wrong` (none may) are lists whose entries are a string or number, or a list
    of alternatives; `kind` / `topic` name the question's group. The report runs after training,
    so a malformed one is refused here, naming the record and the field, before any model loads."""
    for ex in examples:
        meta = ex.extra.get("meta")
        if meta is None:
            continue
        if not isinstance(meta, dict):
            raise UserError(f"{ex.source}: `meta` must be an object (keys, wrong, kind), got "
                            f"{type(meta).__name__} {meta!r}")
        for name in ("keys", "wrong"):
            entries = meta.get(name)
            if entries is None:
                continue
            if not isinstance(entries, list):
                raise UserError(f"{ex.source}: meta.{name} must be a list of strings or numbers (an entry may "
                                f"be a list of alternatives), got {type(entries).__name__} {entries!r}")
            for i, entry in enumerate(entries):
                alts = entry if isinstance(entry, list) else [entry]
                if not alts or not all(_meta_scalar(a) for a in alts):
                    raise UserError(f"{ex.source}: meta.{name}[{i}] must be a non-empty string or a number, "
                                    f"or a non-empty list of them; got {entry!r}")
        for name in ("kind", "topic"):
            if meta.get(name) is not None and not isinstance(meta[name], str):
                raise UserError(f"{ex.source}: meta.{name} must be a string, got "
                                f"{type(meta[name]).__name__} {meta[name]!r}")


def source_path(rec, spec: str) -> str | Path:
    """A recipe's data entry as `read_examples` takes it: `hf:` ids as they are, paths against the recipe folder."""
    from toolkit.finetune.sources import is_hub_id

    return spec if is_hub_id(spec) else rec.data_path(spec)


def mix(sources: list[tuple[list[Example], float]], seed: int) -> list[Example]:
    """Resample each source by its weight: every example `int(weight)` times, plus a seeded
    draw without replacement of `frac(weight)` of them (rounded); sources are concatenated in order.

    Weight 1 keeps a source exactly as it is, 2 repeats it, 0.5 keeps a random half.
    """
    import random

    rng = random.Random(seed)
    out: list[Example] = []
    for examples, weight in sources:
        whole, frac = int(weight), weight - int(weight)
        for _ in range(whole):
            out.extend(examples)
        k = round(frac * len(examples))
        if k:
            picked = sorted(rng.sample(range(len(examples)), k))
            out.extend(examples[i] for i in picked)
    return out


def train_sources(rec) -> list[tuple[str, str | Path, float]]:
    """A recipe's training sources as (key for messages, file path or `hf:` id, weight): one for
    `data.train: FILE`, one per entry of a `{path, weight}` list."""
    t = rec.data.train
    if isinstance(t, str):
        return [("data.train", source_path(rec, t), 1.0)]
    return [(f"data.train[{i}]", source_path(rec, e.path), e.weight) for i, e in enumerate(t)]


def read_splits(rec) -> tuple[list[Example], list[Example]]:
    """(training examples mixed by weight, held-out examples) of a loaded recipe; what a run
    trains on. Bad data raises UserError here, before any model is loaded."""
    d = rec.data
    fmt, sysp, timeout = d.format, d.system_prompt, rec.model.hub_timeout_s
    sources = [(read_examples(spec, fmt, sysp, where, timeout), weight) for where, spec, weight in train_sources(rec)]
    train = mix(sources, rec.training.seed)
    if not train:
        raise UserError("data.train: the weights leave no training examples (raise a weight)")
    held = read_examples(source_path(rec, d.eval), fmt, sysp, "data.eval", timeout) if d.eval else []
    check_report_meta(held)
    return train, held


def held_out_leak(train: list[Example], held: list[Example]) -> str | None:
    """A warning when held-out examples ask what training examples ask (the same first user turn,
    or text): the report would measure recall of trained answers, not what the model learned."""
    seen: dict[str, str] = {}
    for ex in train:
        seen.setdefault(ex.prompt_key, ex.source)
    hits = [(h.source, seen[h.prompt_key]) for h in held if h.prompt_key in seen]
    if not hits:
        return None
    return (f"warning: {len(hits)} of {len(held)} held-out examples ask what a training example asks (the same "
            f"first user turn), e.g. {hits[0][0]} and {hits[0][1]}: the report would measure recall of trained "
            "answers; hold out other questions")


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: list[dict], trained_turns: int = 0) -> tuple[str, list[tuple[int, int]]]:
    """Rendered conversation and the character spans of each assistant turn (content + end-of-turn),
    of the last `trained_turns` messages only when that is > 0.

    A turn's span runs from the end of the prompt rendered with the generation prompt to the end
    of the conversation rendered through that turn; the template must render prefixes as prefixes.
    """
    full = render(tokenizer, messages)
    spans = []
    first = len(messages) - trained_turns if trained_turns else 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < first:
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
    text, spans = assistant_spans(tokenizer, ex.messages, ex.trained_turns)
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


def check_end_of_turn_trained(tokenizer, split: TokenizedSplit) -> None:
    """Refuse to train unless the end-of-turn token is a trained (loss-masked-in) token of the first
    example that was not truncated: a model never taught to emit it would never learn to stop (the
    GGUF that "never stops"). Raw-text examples end with the EOS, which is the end-of-turn token."""
    from toolkit.core.chat_tokens import end_of_turn_token

    eot = end_of_turn_token(tokenizer)
    eot_id = tokenizer.convert_tokens_to_ids(eot)
    for ids, labels, ex in zip(split.input_ids, split.labels, split.examples):
        if len(ids) < len(tokenize_example(tokenizer, ex)[0]):
            continue  # cut before its end by max_seq_len: the next example decides
        if any(t == eot_id and lab == eot_id for t, lab in zip(ids, labels)):
            return
        raise UserError(f"{ex.source}: the end-of-turn token {eot!r} is outside the loss mask, so the model "
                        "would never learn to stop; fix the chat template or the data's assistant turns")
    raise UserError(f"every training example is cut by data.max_seq_len before its end, so the end-of-turn "
                    f"token {eot!r} is never trained and the model would never learn to stop")
