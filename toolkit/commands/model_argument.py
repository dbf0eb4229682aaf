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
