"""Model backends for `toolkit.decoding`: next-token logits with a KV cache.

`load(spec)` picks one from the model spec: a `.gguf` file runs through llama.cpp
(`llamacpp.LlamaCppBackend`), everything else (embedded, HF id or folder, run folder with a LoRA
adapter) through transformers (`hf.HFBackend`). Both expose the interface described in
`toolkit.decoding.search`, plus `chat_ids(messages)` (the model's chat template) and `encode`.
"""

from __future__ import annotations


def load(spec: str, n_ctx: int | None = None):
    """Open a backend for model `spec`; close it with `.close()` (or use it as a context manager)."""
    from toolkit.core.models import resolve

    ref = resolve(spec)
    if ref.kind == "gguf":
        from toolkit.decoding.backends.llamacpp import LlamaCppBackend

        return LlamaCppBackend(str(ref.path), n_ctx=n_ctx or 2048)
    from toolkit.decoding.backends.hf import HFBackend

    return HFBackend.from_spec(spec, n_ctx=n_ctx)
