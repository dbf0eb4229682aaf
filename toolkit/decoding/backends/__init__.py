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
