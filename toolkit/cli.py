"""The `toolkit` command line.

Each subcommand lives in `toolkit/commands/<name>.py`, which exposes `add_arguments(parser)`
and `run(args) -> int`, and whose module docstring is its help. Those modules import nothing
heavy at module level, so `toolkit --help` and `toolkit estimate --help` stay instant.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from toolkit.core import upstream_noise
from toolkit.core.errors import UserError

# Order is the order `toolkit --help` lists them in.
COMMANDS = ("estimate", "recipe", "finetune", "generate", "chat", "export", "serve")


class _OneLineErrors(argparse.ArgumentParser):
    """argparse's usage errors in one line, as every other bad input here: argparse prints the
    whole usage block (a dozen lines for `generate`) before the one that matters."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(
        prog="toolkit",
        description="Local LLM toolkit: estimate memory, fine-tune with QLoRA, decode and chat, export to GGUF.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_OneLineErrors)
    for name in COMMANDS:
        module = importlib.import_module(f"toolkit.commands.{name}")
        doc = (module.__doc__ or "").strip()
        summary = doc.splitlines()[0] if doc else name
        p = sub.add_parser(
            name, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _utf8_when_redirected() -> None:
    """A redirected stdout in UTF-8, as Python 3.15 makes it by default: in the locale's encoding
    (Windows: cp1252, cp932; a C locale: ASCII) printing "—" or a model's text raises UnicodeEncodeError."""
    out = sys.stdout
    if out is not None and hasattr(out, "reconfigure") and not out.closed and not out.isatty():
        out.reconfigure(encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    # A Ctrl-C while the command line loads (its subcommands' imports, parsing: ~0.1 s) stops as one
    # during the command does, not with a traceback and death by SIGINT (exit -2 to a caller).
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    if argv is None:  # the process's own streams, not a caller's
        _utf8_when_redirected()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    upstream_noise.install()
    # Only a process started from the shell may restart itself (`allocator.relaunch` re-runs its argv).
    args.process_entry = argv is None
    try:
        code = int(args._module.run(args) or 0)
        if argv is None:
            sys.stdout.flush()  # here, where a closed pipe is caught, not at the interpreter's exit
        return code
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        if argv is not None:
            raise
        # The reader went away (`toolkit estimate | head`): stop quietly, as a Unix tool does, and keep
        # the interpreter's final flush of stdout from raising again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, a shell's code for it


if __name__ == "__main__":
    sys.exit(main())
