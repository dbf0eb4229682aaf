"""Generate a reply (or a raw continuation) from any model with any decoding settings.

  toolkit generate --model embedded --prompt "What is QLoRA?"
  toolkit generate --model runs/latest --prompt "..." --preset balanced --seed 1
  toolkit generate --model exports/x/model-q8_0.gguf --prompt "..." --strategy beam --num-beams 4 --json

MODEL is `embedded`, an HF id or folder, a run folder (base + LoRA adapter), or a .gguf (run by
llama.cpp). The chat template is applied unless --raw. Text streams to stdout as it is decoded;
--json prints one object instead (text, tokens, new_tokens, tokens_per_s, ...).
"""

from __future__ import annotations

import argparse
import json
import sys

from toolkit.errors import UserError

# flag -> DecodingConfig field; the flags default to None so a preset's values survive.
_FLAGS = {
    "strategy": dict(choices=["greedy", "sample", "beam"], help="token choice (default greedy)"),
    "temperature": dict(type=float, help="sampling temperature, 0 = greedy (default 1.0)"),
    "top_k": dict(type=int, help="keep the k most likely tokens, 0 = off"),
    "top_p": dict(type=float, help="nucleus: keep tokens up to this probability mass, 1 = off"),
    "min_p": dict(type=float, help="drop tokens below min_p x top probability, 0 = off"),
    "repetition_penalty": dict(type=float, help="penalise tokens already seen, 1 = off"),
    "num_beams": dict(type=int, help="beam width for --strategy beam (default 4)"),
    "length_penalty": dict(type=float, help="beam score = logprob / length**this (default 1.0)"),
    "max_new_tokens": dict(type=int, help="at most this many new tokens (default 256)"),
    "seed": dict(type=int, help="random seed for sampling"),
}


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    """The decoding flags shared by `generate` and `chat`."""
    from toolkit.decoding.config import PRESETS

    g = parser.add_argument_group("decoding")
    g.add_argument("--preset", choices=sorted(PRESETS), help="named settings; other flags override it")
    for name, kw in _FLAGS.items():
        g.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **kw)
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop string (repeatable)")


def config_from_args(args: argparse.Namespace):
    """DecodingConfig from a preset (if any) plus the flags given."""
    from toolkit.decoding.config import PRESETS, DecodingConfig

    data = dict(PRESETS[args.preset]) if args.preset else {}
    data.update({k: getattr(args, k) for k in _FLAGS if getattr(args, k) is not None})
    if args.stop:
        data["stop"] = tuple(args.stop)
    return DecodingConfig.from_dict(data)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", "-m", default="embedded", help="embedded | HF id | folder | run folder | .gguf")
    parser.add_argument("--prompt", "-p", required=True, help="the user message (or raw text with --raw); - reads stdin")
    parser.add_argument("--system", help="system prompt (chat template only)")
    parser.add_argument("--raw", action="store_true", help="no chat template: continue the prompt text")
    parser.add_argument("--n-ctx", type=int, default=None, help="context window (default: the model's; 2048 for GGUF)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    add_decoding_arguments(parser)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)  # validate before loading anything
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UserError("--prompt is empty")
    if args.raw and args.system:
        raise UserError("--system needs the chat template; drop --raw")
    from toolkit.backends import load
    from toolkit.decoding.conversation import build_prompt
    from toolkit.decoding.search import stream

    backend = load(args.model, n_ctx=args.n_ctx)
    try:
        if args.raw:
            ids = backend.encode(prompt)
        else:
            ids = build_prompt(backend, [{"role": "user", "content": prompt}], args.system, cfg.max_new_tokens).ids
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
