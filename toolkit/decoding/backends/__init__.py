"""Model backends for `toolkit.decoding`: next-token logits with a KV cache.

`load(spec)` picks one from the model spec: a `.gguf` file runs through llama.cpp
(`llamacpp.LlamaCppBackend`), everything else (embedded, HF id or folder, run folder with a LoRA
adapter) through transformers (`hf.HFBackend`). Both expose the interface described in
`toolkit.decoding.search`, plus `chat_ids(messages)` (the model's chat template) and `encode`.
A prefill keeps the KV of the prompt's prefix that the previous call left in row 0
(`reusable_prefix`); `reset()` drops it.
"""

from __future__ import annotations


GGUF_N_CTX = 2048  # a GGUF's window when none is asked for: its own may be 128k, a 16 GiB KV cache


def check_n_ctx(n_ctx: int | None) -> None:
    """The --n-ctx rule of generate, chat and serve: None = the default, 0 = the model's own window
    (its config's max_position_embeddings, a GGUF's context_length: llama.cpp's meaning of 0)."""
    from toolkit.core.errors import UserError

    if n_ctx is not None and (isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 0):
        raise UserError(f"--n-ctx {n_ctx}: must be a whole number >= 0 (0 = the model's own context window)")


def reusable_prefix(cached: list[int], ids: list[int]) -> int:
    """How many leading tokens of the prompt `ids` a backend can keep in its KV cache from `cached`
    (the tokens whose KV it holds): their common prefix, short of the last prompt token, whose
    logits the prefill must compute. A chat's next turn repeats the conversation so far, so only
    the new part is run, as llama.cpp's server and Ollama do; where a reply re-tokenizes
    differently, reuse stops at the first differing token."""
    n = 0
    for a, b in zip(cached, ids[:-1]):
        if a != b:
            break
        n += 1
    return n


def reusable_row(cached: list[int], beams: list[list[int]] | None, ids: list[int]) -> tuple[int, int]:
    """(row, tokens to keep) for a prefill of `ids`: the cache row sharing the longest prefix with it
    (`reusable_prefix`). One row holds `cached`; after a beam search (`beams` not None) row i holds
    `cached` (the search's prompt, which all rows share) then `beams[i]`."""
    keeps = [reusable_prefix(cached + b, ids) for b in beams] if beams is not None else [reusable_prefix(cached, ids)]
    keep = max(keeps)
    return keeps.index(keep), keep


class HeldRows:
    """What a backend's KV cache holds, for the next prefill to keep (`reusable_row`): the tokens of
    its one row (`cached`), or after `fork` the prompt all rows share (`cached`) and each row's own
    tokens past it (`beams`). Each change to the cache first `take`s the record, leaving it empty
    (nothing known) while the library calls run, so a stop between two of them keeps nothing; the
    backend sets it again once the change is done. Both backends keep theirs this one way."""

    def __init__(self):
        self.cached: list[int] = []
        self.beams: list[list[int]] | None = None

    def take(self) -> tuple[list[int], list[list[int]] | None]:
        held = self.cached, self.beams
        self.cached, self.beams = [], None
        return held

    def row_to_keep(self, ids: list[int]) -> tuple[int, int]:
        """`reusable_row` for a prefill of `ids` from what is held."""
        return reusable_row(self.cached, self.beams, ids)

    def prefilled(self, ids: list[int]) -> None:
        self.cached, self.beams = list(ids), None

    def stepped(self, held, tokens: list[int], one_row: bool) -> None:
        """After a step of `tokens` (one a row) from `held`; `one_row`: the cache has one row."""
        cached, beams = held
        if beams is not None:
            self.cached, self.beams = cached, [b + [t] for b, t in zip(beams, tokens)]
        elif one_row and cached:
            cached.append(tokens[0])  # taken: no one else holds the list
            self.cached = cached

    def forked(self, held, n: int, one_row: bool = True) -> None:
        """After the cache's one row (`one_row`) was copied into `n`; otherwise nothing is known."""
        prompt, beams = held
        if prompt and beams is None and one_row:
            self.cached, self.beams = prompt, [[] for _ in range(n)]

    def reordered(self, held, rows: list[int]) -> None:
        """After the rows were rearranged: row i now holds what row `rows[i]` held."""
        prompt, beams = held
        if beams is not None:
            self.cached, self.beams = prompt, [beams[r] for r in rows]  # shared lists: `stepped` builds new ones


def gguf_chat_formatter(llm):
    """llama-cpp-python's formatter for the chat template embedded in the GGUF `llm` holds, with its
    BOS / EOS texts, as its own `chat_template.default` builds it (the backend's prompts and
    `toolkit serve`'s handler render alike). UserError when the GGUF has no template."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        from toolkit.core.errors import UserError

        raise UserError("this GGUF has no chat template embedded (tokenizer.chat_template); use --raw")
    text = lambda i: llm._model.token_get_text(i) if i is not None and i >= 0 else ""  # noqa: E731
    eos = llm.token_eos()
    return Jinja2ChatFormatter(template, eos_token=text(eos), bos_token=text(llm.token_bos()), stop_token_ids=[eos])


def end_of_generation_tokens(llm) -> dict[int, str]:
    """Every token llama.cpp ends generation on in the GGUF `llm` holds (`llama_vocab_is_eog`, as
    its create_completion checks), id -> the text it puts in the output, in id order. EOS and
    end-of-turn, plus what llama.cpp's vocabulary loader adds by name (Llama-3's <|end_of_text|>
    and <|eom_id|>, which the GGUF's single eos id leaves out; fill-in-the-middle tokens). The one
    source for the llama.cpp backend's stop ids and an export's Modelfile stops. Works on a
    `vocab_only` Llama; ~13 ms for a 49k vocabulary."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm._model.model)
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    return {i: _token_piece(vocab, i) for i in range(n) if llama_cpp.llama_vocab_is_eog(vocab, i)}


def _token_piece(vocab, token: int) -> str:
    """The text `token` adds to the output, special tokens written out: what a stop string has to
    match. The vocabulary's own text (`token_get_text`) differs for an ordinary token (byte-level
    BPE spells a space 'Ġ'). Bytes that are not UTF-8 on their own (a byte-fallback token) stay as
    lone surrogates, so no caller mistakes a U+FFFD for the token; llama-cpp-python's
    `token_to_piece` is not used because it returns its 32-byte buffer, NULs and all."""
    import ctypes

    import llama_cpp

    size = 64
    for _ in range(2):
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, True)
        if n >= 0:
            return buf.raw[:n].decode("utf-8", errors="surrogateescape")
        size = -n  # too small: llama.cpp says how many bytes the piece needs
    raise RuntimeError(f"llama.cpp gave no text for token {token}")


def load(spec: str, n_ctx: int | None = None):
    """Open a backend for model `spec`; close it with `.close()` (or use it as a context manager)."""
    from toolkit.core.models import resolve

    check_n_ctx(n_ctx)
    ref = resolve(spec)
    if ref.kind == "gguf":
        from toolkit.decoding.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(str(ref.path), n_ctx=GGUF_N_CTX if n_ctx is None else n_ctx)
    from toolkit.decoding.backends.hf import HFBackend

    return HFBackend.from_spec(spec, n_ctx=n_ctx)
