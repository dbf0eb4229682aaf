"""Generate a reply (or a raw continuation) from any model with any decoding settings.

  toolkit generate --prompt "What is QLoRA?"
  toolkit generate runs/latest --prompt "..." --preset balanced --seed 1
  toolkit generate --model exports/x/model-q8_0.gguf --prompt "..." --strategy beam --num-beams 4 --json

MODEL (first, or --model) is `embedded` (the default), an HF id or folder, a run folder (base + LoRA adapter), or a .gguf (run by
llama.cpp). The chat template is applied unless --raw, with the system prompt a fine-tuned model
was trained with (the recipe's data.system_prompt) unless --system is given (--system "": the chat
template's own default). Text streams to stdout as it is decoded; --json prints one object
instead (text, tokens, new_tokens, tokens_per_s, ...).
"""

from __future__ import annotations

import argparse
import json
import sys

from toolkit.commands.model_argument import add_model_argument, model_of, restart_for_decoding
from toolkit.core.errors import UserError
from toolkit.decoding.flags import add_decoding_arguments, config_from_args


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--prompt", "-p", required=True, help="the user message (or raw text with --raw); - reads stdin")
    parser.add_argument("--system", help="system prompt (chat template only; default: the one a fine-tuned model "
                                          "was trained with; \"\": the template's own)")
    parser.add_argument("--raw", action="store_true", help="no chat template: continue the prompt text")
    parser.add_argument("--n-ctx", type=int, default=None,
                        help="context window in tokens (default: the model's own, 2048 for a GGUF; 0 = the model's "
                             "own for a GGUF too)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_decoding_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # validate before loading anything
    args.model = model_of(args)
    restart_for_decoding(args)  # before stdin is read: the restarted process reads it
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UserError("--prompt is empty")
    if args.raw and args.system:
        raise UserError("--system needs the chat template; drop --raw")
    from toolkit.commands.chat import system_prompt_for
    from toolkit.decoding.backends import load
    from toolkit.decoding.conversation import build_prompt
    from toolkit.decoding.search import stream

    backend = load(args.model, n_ctx=args.n_ctx)
    try:
        if args.raw:
            ids = backend.encode(prompt)
        else:
            system = system_prompt_for(args.model, args.system)
            ids = build_prompt(backend, [{"role": "user", "content": prompt}], system, cfg.max_new_tokens).ids
        s = stream(backend, ids, cfg)
        for piece in s:
            if not args.json:
                sys.stdout.write(piece)
                sys.stdout.flush()
        g = s.result
        if args.json:
            print(json.dumps({
                "model": args.model, "backend": backend.name, "text": g.text, "tokens": g.tokens,
                "new_tokens": g.new_tokens, "prompt_tokens": g.prompt_tokens, "finish_reason": g.finish_reason,
                "seconds": round(g.seconds, 4), "tokens_per_s": round(g.tokens_per_s, 2),
                "config": cfg.to_dict(),
            }))
        else:
            sys.stdout.write("\n")
            print(f"[{g.new_tokens} tokens, {g.tokens_per_s:.1f} tok/s, {g.finish_reason}, {backend.name}]",
                  file=sys.stderr)
    finally:
        backend.close()
    return 0
