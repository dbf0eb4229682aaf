"""Upstream messages that mislead this toolkit's users, filtered by their exact text.

Each entry was seen at the start of every `make finetune RECIPE=finance` on the Zen 5 EPYC
(AVX512-BF16), torch 2.13, and asks the user to act where nothing is wrong:

- bitsandbytes, on any CPU with AVX512-BF16, logs at import (`import peft` imports it) that it
  "Failed to load CPU gemm_4bit_forward from kernels-community" and asks for `pip install kernels`.
  That kernel would be downloaded from the Hugging Face Hub at run time, and serves 4-bit
  matrix-vector products; bitsandbytes falls back to its own CPU kernel. The toolkit's CPU runs
  train LoRA, or QLoRA through dequantized matmuls, and decode in fp32 or through llama.cpp.
- transformers, decoding with a BPE tokenizer whose config sets `clean_up_tokenization_spaces` (Meta's
  Llama-3.2 does), logs that it ignores the setting and asks the user to set it False "to suppress this
  warning": the setting is wrong for BPE and transformers already does the right thing (seen once per
  `toolkit generate` / chat / report on a Llama-3.2 run, 2026-12-07).
- transformers warns that `is_gradient_checkpointing` is deprecated: TRL reads it, not the toolkit
  (trl/models/utils.py); nothing a user can change.

Only these texts are dropped, and only from `install()` on: `toolkit.cli.main` calls it, so
`import toolkit` changes nothing. tests/core/test_upstream_noise.py fails when an upstream rewords one, so
a stale entry is found and removed.
"""

from __future__ import annotations

import logging

# logger name -> start of the message dropped from it
LOGGED = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community",
    "transformers.tokenization_utils_tokenizers": "Ignoring clean_up_tokenization_spaces=True for BPE tokenizer",
}
# (category, regex the warning's message must match from its start)
WARNED = (
    (FutureWarning, r"`is_gradient_checkpointing` is deprecated"),
)


class _Drop(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def install() -> None:
    """Drop the messages above for the rest of the process (idempotent)."""
    import warnings

    for name, prefix in LOGGED.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) and f.prefix == prefix for f in logger.filters):
            logger.addFilter(_Drop(prefix))
    for category, message in WARNED:
        warnings.filterwarnings("ignore", message=message, category=category)
