"""Chat with a model, in the terminal or (--ui) in a Gradio web app.

  toolkit chat                                  terminal chat with the embedded model
  toolkit chat runs/latest --ui                 web chat on http://127.0.0.1:7860

MODEL (first, or --model) is `embedded` (the default), an HF id or folder, a run folder, or a .gguf.

A fine-tuned model (a run folder, or a GGUF it was exported to) chats with the system prompt it
was trained with (the recipe's data.system_prompt) unless --system is given (--system "": the chat
template's own default).

In the terminal, lines starting with / are commands: /reset (forget the conversation), /system TEXT
(/system alone clears it), /set key=value (a decoding setting: /set temperature=0.7, /set stop=A|B,
/set seed=none), /preset NAME, /retry (regenerate the last answer), /help, /quit (or Ctrl-D).
Long conversations are trimmed to the context window from the oldest turns, with a notice. The web
UI binds 127.0.0.1 unless --host is given.
"""

from __future__ import annotations

import argparse
import sys

from toolkit.commands.model_argument import add_model_argument, model_of, restart_for_decoding
from toolkit.core.errors import UserError
from toolkit.decoding.fields import field_named
from toolkit.decoding.flags import add_decoding_arguments, config_from_args

COMMANDS = "/quit, /reset, /system TEXT, /set key=value, /preset NAME, /retry, /help"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--system", help="system prompt (default: the one a fine-tuned model was trained with; "
                                          "\"\": the template's own)")
    parser.add_argument("--n-ctx", type=int, default=None,
                        help="context window in tokens (default: the model's own, 2048 for a GGUF; 0 = the model's "
                             "own for a GGUF too)")
    parser.add_argument("--ui", action="store_true", help="serve the Gradio web chat instead")
    parser.add_argument("--host", default="127.0.0.1", help="web UI address (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860, help="web UI port (default 7860)")
    add_decoding_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from toolkit.decoding.backends import check_n_ctx

    cfg = config_from_args(args)
    check_n_ctx(args.n_ctx)
    args.model = model_of(args)
    restart_for_decoding(args)
    if args.ui:
        from toolkit.commands.serve import check_port_free
        from toolkit.core.models import resolve

        # One-line errors now, not a Gradio traceback or a broken page once the server starts.
        check_port_free(args.host, args.port)
        resolve(args.model)
        system = system_prompt_for(args.model, args.system)
        from ui.chat import launch

        print(f"chat UI on http://{args.host}:{args.port}  (Ctrl-C to stop)", file=sys.stderr)
        launch(args.model, host=args.host, port=args.port, n_ctx=args.n_ctx, block=True, initial=cfg,
               system=system or "")
        return 0
    return _terminal(args, cfg)


def system_prompt_for(spec: str, given: str | None) -> str | None:
    """`given` (--system; "" leaves it to the chat template), else the system prompt `spec` was
    fine-tuned with, said once on stderr: a model answers as trained only with the prompt it was
    trained with."""
    if given is not None:
        return given
    from toolkit.core.models import default_system_prompt, resolve

    trained = default_system_prompt(spec)
    if trained:
        where = "recipe data.system_prompt" if resolve(spec).kind == "run" else "export.json system_prompt"
        print(f"system prompt: the one the run was trained with ({where})", file=sys.stderr)
    return trained or None


def _terminal(args: argparse.Namespace, cfg) -> int:
    from toolkit.decoding.backends import load
    from toolkit.decoding.config import implied_strategy, with_preset
    from toolkit.decoding.conversation import build_prompt
    from toolkit.decoding.search import stream

    backend = load(args.model, n_ctx=args.n_ctx)
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    print(f"chatting with {args.model} ({backend.name}); commands: {COMMANDS}", file=sys.stderr)
    system = system_prompt_for(args.model, args.system)
    try:
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
                if interactive:  # Ctrl-D: the shell's prompt goes on a line of its own
                    print()
                break
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                cmd, _, rest = line.partition(" ")
                try:
                    if cmd in ("/quit", "/exit"):
                        break
                    elif cmd == "/help":
                        print(f"commands: {COMMANDS}", file=sys.stderr)
                        continue
                    elif cmd == "/reset":
                        history.clear()
                        print("(conversation cleared)", file=sys.stderr)
                        continue
                    elif cmd == "/system":
                        system = rest or None
                        print(f"(system prompt {'set' if system else 'cleared'})", file=sys.stderr)
                        continue
                    elif cmd == "/set":
                        key, eq, value = rest.partition("=")
                        if not eq:
                            raise UserError("usage: /set key=value")
                        key = key.strip().replace("-", "_")
                        before = cfg.strategy
                        cfg = cfg.replace(**{key: field_named(key).from_text(value)})
                        cfg = cfg.replace(strategy=implied_strategy(cfg.strategy, [key]))
                        also = f", strategy = {cfg.strategy}" if key != "strategy" and cfg.strategy != before else ""
                        print(f"({key} = {getattr(cfg, key)}{also})", file=sys.stderr)
                        continue
                    elif cmd == "/preset":
                        cfg = with_preset(cfg, rest.strip())
                        print(f"(preset {rest.strip()})", file=sys.stderr)
                        continue
                    elif cmd == "/retry":
                        if not history or history[-1]["role"] != "assistant":
                            raise UserError("nothing to regenerate yet")
                        history.pop()
                    else:
                        raise UserError(f"unknown command {cmd} (commands: {COMMANDS})")
                except UserError as exc:
                    print(f"error: {exc}", file=sys.stderr)
                    continue
            else:
                history.append({"role": "user", "content": line})
            try:
                prompt = build_prompt(backend, history, system, cfg.max_new_tokens)
            except UserError as exc:
                history.pop()
                print(f"error: {exc}", file=sys.stderr)
                continue
            if prompt.dropped_turns:
                del history[: prompt.dropped_turns]
                print(f"(note: {prompt.dropped_turns} earlier message(s) dropped to fit the {backend.n_ctx}-token "
                      "context window)", file=sys.stderr)
            sys.stdout.write("assistant> " if interactive else "")
            s = stream(backend, prompt.ids, cfg)
            try:
                for piece in s:
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            except KeyboardInterrupt:  # Ctrl-C stops this answer, not the chat
                s.cancel()
                print("\n(stopped)", file=sys.stderr)
                history.pop()
                continue
            print()
            g = s.result
            history.append({"role": "assistant", "content": g.text})
            print(f"[{g.new_tokens} tokens, {g.tokens_per_s:.1f} tok/s, {g.finish_reason}]", file=sys.stderr)
    finally:
        backend.close()
    return 0
