"""The model a decoding command runs: `toolkit generate|chat [MODEL]` or `--model MODEL`.

`toolkit export RUN` and `toolkit serve GGUF` take theirs as the first word, as `ollama run MODEL` and
`litgpt generate CHECKPOINT` do; `generate` and `chat` take it either way, so a user who types
`toolkit chat runs/latest` gets the chat, not argparse's "unrecognized arguments".
"""

from __future__ import annotations

HELP = "embedded | HF id | folder | run folder | .gguf"


def add_model_argument(parser) -> None:
    """MODEL (optional, first) and --model/-m, the same thing; `model_of` reads them."""
    parser.add_argument("model_word", nargs="?", metavar="MODEL", help=f"{HELP} (default: embedded); or --model")
    parser.add_argument("--model", "-m", default=None, help=HELP)


def model_of(args) -> str:
    """The model spec `args` name (MODEL or --model; both only if the same), else `embedded`."""
    from toolkit.core.errors import UserError

    word, flag = args.model_word, args.model
    if word is not None and flag is not None and word != flag:
        raise UserError(f"two models given, MODEL {word!r} and --model {flag!r}: give one")
    return word or flag or "embedded"


def restart_for_decoding(args) -> None:
    """From the shell only (`args.process_entry`): restart this process under the allocator CPU training
    runs under (`toolkit.core.allocator`: tcmalloc where installed) when `args.model` decodes through
    transformers, before anything is read from stdin or loaded. Measured on the Zen 3 (AVX2,
    2026-12-06), `toolkit generate` on the embedded model, alternating: 128 tokens, six pairs,
    13.6-23.7 tok/s (mean 19.8) under tcmalloc against 13.3-20.3 (17.7) under glibc's malloc; 64
    tokens, three pairs, 19.7-23.2 against 18.7-20.3. A GGUF decodes through llama.cpp, which read no
    faster under tcmalloc (80.9-86.4 against 87.4-98.8 tok/s): it keeps the process as started. A spec
    that does not resolve is left to the command's own error."""
    if not getattr(args, "process_entry", False):
        return
    from toolkit.core.errors import UserError
    from toolkit.core.models import resolve

    try:
        kind = resolve(args.model).kind
    except UserError:
        return
    if kind != "gguf":
        from toolkit.core import allocator

        allocator.relaunch()
