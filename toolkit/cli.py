"""The `toolkit` command line.

Each subcommand lives in `toolkit/commands/<name>.py`, which exposes `add_arguments(parser)`
and `run(args) -> int`, and whose module docstring is its help. Those modules import nothing
heavy at module level, so `toolkit --help` and `toolkit estimate --help` stay instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from toolkit.core import upstream_noise
from toolkit.core.errors import UserError

# Order is the order `toolkit --help` lists them in.
COMMANDS = ("estimate", "recipe", "finetune", "generate", "chat", "export", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toolkit",
        description="Local LLM toolkit: estimate memory, fine-tune with QLoRA, decode and chat, export to GGUF.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    upstream_noise.install()
    # Only a process started from the shell may restart itself (`allocator.relaunch` re-runs its argv).
    args.process_entry = argv is None
    try:
        return int(args._module.run(args) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
