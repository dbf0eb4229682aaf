"""The embedded model's backends (HF, and llama.cpp on its f16 GGUF), for the backend and KV-reuse tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def hf(embedded_dir):
    from toolkit.decoding.backends.hf import HFBackend

    backend = HFBackend.from_spec("embedded", device="cpu")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def gguf(embedded_f16_gguf):
    from toolkit.decoding.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend(str(embedded_f16_gguf), n_ctx=1024)
    yield backend
    backend.close()
