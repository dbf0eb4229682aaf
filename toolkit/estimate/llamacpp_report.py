"""The buffer sizes llama.cpp itself reports when it loads a GGUF: ground truth for estimates.

With verbose=True llama.cpp prints, from C, lines such as
  load_tensors:   CPU_Mapped model buffer size =    92.10 MiB
  llama_kv_cache:        CPU KV buffer size =    11.25 MiB
  sched_reserve:        CPU compute buffer size =    98.25 MiB
to the process's stderr (fd 2), or through llama-cpp-python's log callback, which prints to
`sys.stderr`. Both are pointed at one temporary file while the model loads (fd 2 by dup2, since
redirecting sys.stderr alone cannot catch C writes).
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

_LINE = re.compile(r"\b(\w+)\s+(model|KV|compute|output) buffer size\s*=\s*([0-9.]+)\s*MiB")
_KEYS = {"model": "weights", "KV": "kv_cache", "compute": "compute_buffer", "output": "output_buffer"}


def parse_buffer_lines(text: str) -> dict[str, float]:
    """MiB per buffer kind ("weights", "kv_cache", "compute_buffer", "output_buffer"), summed
    over devices, from llama.cpp's log text. Only the first report of each kind per device
    counts (llama.cpp repeats the compute size when the context is freed)."""
    out: dict[str, float] = {}
    seen: set[tuple[str, str]] = set()
    for dev, kind, mib in _LINE.findall(text):
        if (dev, kind) in seen:
            continue
        seen.add((dev, kind))
        out[_KEYS[kind]] = out.get(_KEYS[kind], 0.0) + float(mib)
    return out


def measure(gguf_path: str, n_ctx: int, n_batch: int = 512) -> tuple[dict[str, float], str]:
    """Load `gguf_path` on CPU with llama-cpp-python at `n_ctx`, return (MiB per buffer, log)."""
    from llama_cpp import Llama

    from toolkit.core import signals

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        text_log = open(log.fileno(), "w", closefd=False)
        os.dup2(log.fileno(), 2)
        try:
            # verbose: every log line goes through a Python callback, where a Ctrl-C would be dropped.
            with signals.held(), contextlib.redirect_stderr(text_log):
                llm = Llama(str(gguf_path), n_ctx=n_ctx, n_batch=n_batch, n_gpu_layers=0, verbose=True)
                llm.close()
        finally:
            text_log.flush()
            os.dup2(saved, 2)
            os.close(saved)
        log.seek(0)
        text = log.read().decode("utf-8", errors="replace")
    return parse_buffer_lines(text), text
