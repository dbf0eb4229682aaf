"""Ollama `Modelfile` for an exported GGUF: FROM, TEMPLATE (Go template), SYSTEM, PARAMETER stop.

Ollama does not run Jinja, so the HF chat template has to be restated in Go-template syntax.
Rather than keeping a hand-written table of known formats, we probe the tokenizer's own
template with sentinel messages and read off each role's prefix and suffix, the default
system prompt and the generation prompt (`TurnFormat`). `render()` replays a TurnFormat in
Python exactly as the Go template does, and `turn_format()` only returns a format whose replay
equals `apply_chat_template` on several conversations, so the Modelfile says the same thing
as the template or is not claimed at all. The stops are read from the exported GGUF, not from a
list of token names: the tokens llama.cpp ends generation on there (`stop_tokens`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from toolkit.core.chat_tokens import special_tokens

_S, _U, _A, _U2, _A2 = "SYSTEM_7f3a", "USER_7f3a", "ASSISTANT_7f3a", "USER2_7f3a", "ASSISTANT2_7f3a"


@dataclass(frozen=True)
class TurnFormat:
    """A chat format made of per-role prefix + content + suffix blocks."""

    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation_prompt: str
    default_system: str | None  # inserted when the conversation has no system message


def render(fmt: TurnFormat, messages: list[dict], add_generation_prompt: bool = True) -> str:
    """What the Modelfile's Go template produces for `messages` (first system message, or the
    default system prompt, then user/assistant turns, then the generation prompt)."""
    system = next((m["content"] for m in messages if m["role"] == "system"), fmt.default_system)
    out = [] if system is None else [fmt.system_prefix, system, fmt.system_suffix]
    for m in messages:
        if m["role"] == "user":
            out += [fmt.user_prefix, m["content"], fmt.user_suffix]
        elif m["role"] == "assistant":
            out += [fmt.assistant_prefix, m["content"], fmt.assistant_suffix]
    if add_generation_prompt:
        out.append(fmt.generation_prompt)
    return "".join(out)


def _between(text: str, start: str, end: str | None) -> str:
    i = text.index(start) + len(start)
    return text[i:] if end is None else text[i:text.index(end, i)]


def _strip_prefix(text: str, prefix: str) -> str:
    if not text.startswith(prefix):
        raise ValueError("template is not a prefix/suffix format")
    return text[len(prefix):]


def turn_format(tokenizer) -> TurnFormat | None:
    """The TurnFormat equivalent to the tokenizer's chat template, or None when the template
    is not expressible as per-role blocks (then no TEMPLATE is claimed)."""
    if not getattr(tokenizer, "chat_template", None):
        return None

    def apply(msgs, gen=False):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    sysm, user, asst = ({"role": "system", "content": _S}, {"role": "user", "content": _U},
                        {"role": "assistant", "content": _A})
    try:
        r_user = apply([user])
        generation = _strip_prefix(apply([user], gen=True), r_user)
        user_suffix = _between(r_user, _U, None)
        r_ua = apply([user, asst])
        mid = _between(r_ua, _U, _A)
        assistant_prefix = _strip_prefix(mid, user_suffix)
        assistant_suffix = _between(r_ua, _A, None)
        r_uau = apply([user, asst, {"role": "user", "content": _U2}])
        user_prefix = _strip_prefix(_between(r_uau, _A, _U2), assistant_suffix)
        head = r_user[: r_user.index(_U)]
        if not head.endswith(user_prefix):
            return None
        default_block = head[: len(head) - len(user_prefix)]
        r_su = apply([sysm, user])
        system_prefix = r_su[: r_su.index(_S)]
        mid_su = _between(r_su, _S, _U)
        if not mid_su.endswith(user_prefix):
            return None
        system_suffix = mid_su[: len(mid_su) - len(user_prefix)]
        default_system = None
        if default_block:
            if not (default_block.startswith(system_prefix) and default_block.endswith(system_suffix)):
                return None
            default_system = default_block[len(system_prefix): len(default_block) - len(system_suffix)]
    except Exception:  # noqa: BLE001 - a probe's ValueError, or the template rejecting a probe (raise_exception)
        return None
    fmt = TurnFormat(system_prefix, system_suffix, user_prefix, user_suffix, assistant_prefix,
                     assistant_suffix, generation, default_system)
    probes = [
        [user], [sysm, user], [user, asst], [sysm, user, asst, {"role": "user", "content": _U2}],
        [user, asst, {"role": "user", "content": _U2}, {"role": "assistant", "content": _A2}],
    ]
    for msgs in probes:
        for gen in (False, True):
            if render(fmt, msgs, gen) != apply(msgs, gen):
                return None
    return fmt


def _go_literal(text: str) -> str:
    """Text placed verbatim in a Go template inside a Modelfile triple-quoted string."""
    if '"""' in text or "{{" in text:
        raise ValueError(f"cannot place {text!r} in a Modelfile TEMPLATE")
    return text


def ollama_adds_bos(tokenizer) -> str | None:
    """The BOS string when the tokenizer adds a BOS itself (so the GGUF's `add_bos_token` is set
    and Ollama prepends it to every prompt), else None."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos:
        return None
    ids = tokenizer("", add_special_tokens=True)["input_ids"]
    return bos if ids[:1] == [tokenizer.bos_token_id] else None


def go_template(fmt: TurnFormat, bos: str | None = None) -> str:
    """The Go template equivalent of `render(fmt, ...)`, minus the leading `bos` (the BOS string
    Ollama adds itself; keeping it would give the prompt two). No `{{-` trim markers: the literal
    prefixes and suffixes carry significant newlines that trimming would eat.

    A template that writes a system block in every conversation (Llama-3: BOS, then the system
    header with the knowledge-cutoff and date lines even when there is no system message) gets
    the block unconditionally; `{{ if .System }}` would drop it, header and all, whenever the
    conversation has no system prompt. Its "Today Date" line is the export day's: the Modelfile
    holds the template's text as rendered then."""
    g = _go_literal
    system_prefix = fmt.system_prefix
    parts = [fmt.system_prefix, fmt.user_prefix, fmt.assistant_prefix]
    if bos and any(p.startswith(bos) for p in parts):
        if fmt.default_system is None or not system_prefix.startswith(bos):
            raise ValueError("the template writes the BOS in a block that is not always first")
        system_prefix = system_prefix[len(bos):]
    system_block = f"{g(system_prefix)}{{{{ .System }}}}{g(fmt.system_suffix)}"
    if fmt.default_system is None:
        system_block = f"{{{{ if .System }}}}{system_block}{{{{ end }}}}"
    return (
        f"{system_block}"
        f"{{{{ range .Messages }}}}"
        f'{{{{ if eq .Role "user" }}}}{g(fmt.user_prefix)}{{{{ .Content }}}}{g(fmt.user_suffix)}'
        f'{{{{ else if eq .Role "assistant" }}}}{g(fmt.assistant_prefix)}{{{{ .Content }}}}{g(fmt.assistant_suffix)}'
        f"{{{{ end }}}}{{{{ end }}}}{g(fmt.generation_prompt)}"
    )


def _fits_stop_line(text: str) -> bool:
    """Whether `PARAMETER stop "<text>"` reads back as `text` in Ollama (parser/parser.go, ParseFile).
    Its parser has no escapes: the value is the line with one pair of outer quotes removed, so a
    backslash is taken literally and kept, but nothing can stand for a quote (and a leading '""'
    opens a triple-quoted string). It drops the runes Go's strconv.IsPrint rejects, which are
    Python's non-printables (control, format and non-ASCII space characters), so a stop holding
    one, or a newline or tab, would come back as another string; an empty stop would end every
    reply at once. Such a token is left out rather than written as a stop that never matches."""
    return bool(text) and '"' not in text and text.isprintable()


def _stop_candidates(tokenizer, end_of_turn: str, fmt: TurnFormat | None, eog: Iterable[str]) -> list[str]:
    stops = [end_of_turn]
    if fmt is not None:
        specials = set(special_tokens(tokenizer)) | set(getattr(tokenizer, "added_tokens_encoder", {}))
        for tok in sorted(specials, key=len, reverse=True):
            if tok and tok != end_of_turn and fmt.user_prefix.startswith(tok):
                stops.append(tok)
                break
    return list(dict.fromkeys(t for t in [*stops, *eog] if t))


def stop_tokens(tokenizer, end_of_turn: str, fmt: TurnFormat | None, eog: Iterable[str] = ()) -> list[str]:
    """Strings that end a reply, in this order, each once: the end-of-turn token, the special
    token that opens a new turn (a model that starts a new turn has run on), then `eog`, the
    texts of the tokens the exported GGUF's vocabulary ends generation on
    (`toolkit.decoding.backends.end_of_generation_tokens`, in id order). Ollama's Go engine stops
    only on the GGUF's tokenizer.ggml.eos_token_id, which the converter writes as the one
    end-of-turn id: without the others a Llama-3 model that emits <|end_of_text|> or <|eom_id|>
    would run on under Ollama where llama.cpp (and the toolkit's llama.cpp backend) stop.
    Strings a Modelfile cannot hold verbatim are left out (`_fits_stop_line`)."""
    return [t for t in _stop_candidates(tokenizer, end_of_turn, fmt, eog) if _fits_stop_line(t)]


def modelfile_text(gguf_name: str, tokenizer, end_of_turn: str, temperature: float | None = None,
                   system: str | None = None, eog: Iterable[str] = ()) -> str:
    """The Ollama Modelfile for `gguf_name` (a file beside it). `system`, the prompt the model was
    fine-tuned with, becomes its SYSTEM in place of the template's default. `eog`: the texts of
    that GGUF's end-of-generation tokens, which become stops (`stop_tokens`); the caller reads
    them from the GGUF, so that Ollama stops where llama.cpp does."""
    fmt = turn_format(tokenizer)
    lines = [f"FROM ./{gguf_name}", ""]
    try:
        template = go_template(fmt, ollama_adds_bos(tokenizer)) if fmt else None
        default = _go_literal(fmt.default_system) if fmt and fmt.default_system is not None else None
    except ValueError:  # template text that cannot sit inside a Modelfile string
        fmt = template = default = None
    if template is None:
        lines += ["# The chat template is not a simple per-role format; Ollama reads the one embedded in the GGUF.", ""]
    else:
        lines += [f'TEMPLATE """{template}"""', ""]
    if system and ('"""' in system or system.endswith('"')):  # would close the triple-quoted string early
        lines += ["# The fine-tune's system prompt cannot sit in a Modelfile string; give it with /set system.", ""]
        system = None
    if system or default:
        # Without a TEMPLATE too: Ollama hands SYSTEM to the GGUF's own template as the system message.
        lines += [f'SYSTEM """{system or default}"""', ""]
    eog = list(eog)
    unwritable = [t for t in _stop_candidates(tokenizer, end_of_turn, fmt, eog) if not _fits_stop_line(t)]
    if unwritable:  # repr(): a comment ends at the first newline
        lines.append(f"# Not stops here (a Modelfile string cannot hold them): {', '.join(map(repr, unwritable))}")
    for stop in stop_tokens(tokenizer, end_of_turn, fmt, eog):
        lines.append(f'PARAMETER stop "{stop}"')
    if temperature is not None:
        lines.append(f"PARAMETER temperature {temperature}")
    return "\n".join(lines) + "\n"
