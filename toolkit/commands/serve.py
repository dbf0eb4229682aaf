"""Serve a GGUF over an OpenAI-compatible HTTP API (llama-cpp-python's server) on 127.0.0.1.

Chat requests are formatted with the chat template embedded in the GGUF (never a guessed
format), so replies end at the model's end-of-turn token. Any OpenAI client works:

  toolkit serve runs/latest/gguf/finance-...-q4_k_m.gguf --port 8000
  python -c "import openai; c = openai.OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='x'); ..."

Endpoints: /v1/chat/completions (streaming too, with token usage at the end where a request sets
`stream_options: {"include_usage": true}`), /v1/completions, /v1/models, /health, /docs. Requests are
served one at a time, in turn; a malformed one gets HTTP 400 naming the field.
"""

from __future__ import annotations


def add_arguments(parser) -> None:
    parser.add_argument("gguf", metavar="GGUF", help="the .gguf file to serve (e.g. from `toolkit export`)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--n-ctx", type=int, default=4096,
                        help="context window in tokens (default 4096; 0 = the model's own)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per physical core)")
    parser.add_argument("--api-key", default=None, help="require this bearer token from clients")


def check_port_free(host: str, port: int) -> None:
    """UserError when `host:port` cannot be bound (a port outside 1-65535 or in use, a host that
    is not an address of this machine): checked before a model loads, not by the server after."""
    import os
    import socket

    from toolkit.core.errors import UserError

    if not 0 < port < 65536:
        raise UserError(f"--port {port}: must be 1-65535")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
            # POSIX: a port a stopped server left in TIME_WAIT is free, as uvicorn finds it. Windows:
            # the option would let this socket bind a port another one listens on.
            if os.name != "nt":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


TRAINED_SYSTEM_FORMAT = "toolkit-trained-system"


def with_system_prompt(system: str) -> str:
    """Register a llama-cpp-python chat handler that renders the GGUF's own chat template (as its
    `chat_template.default` does) with `system` first where a request has no system message: the
    model is served with the system prompt it was fine-tuned with, as `toolkit chat` does.
    Returns the chat format name to serve with."""
    from llama_cpp import llama_chat_format as F

    rendered = {}

    def handler(**kw):
        llama = kw["llama"]
        if "inner" not in rendered:
            from toolkit.decoding.backends import gguf_chat_formatter

            rendered["inner"] = gguf_chat_formatter(llama).to_chat_handler()
        if not any(m.get("role") == "system" for m in kw["messages"]):
            kw["messages"] = [{"role": "system", "content": system}, *kw["messages"]]
        return rendered["inner"](**kw)

    F.LlamaChatCompletionHandlerRegistry().register_chat_completion_handler(TRAINED_SYSTEM_FORMAT, handler,
                                                                            overwrite=True)
    return TRAINED_SYSTEM_FORMAT


def run(args) -> int:
    from toolkit.core.errors import UserError
    from toolkit.core.progress import say
    from toolkit.decoding.backends import check_n_ctx
    from toolkit.export.convert import gguf_file

    path = gguf_file(args.gguf)
    if path.suffix != ".gguf":
        raise UserError(f"{args.gguf}: not a .gguf file (export a run first: toolkit export RUN)")
    # ModelSettings would refuse these too, but as a pydantic traceback.
    check_n_ctx(args.n_ctx)
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads {args.threads}: must be >= 1 (leave it out for one per physical core)")
    check_port_free(args.host, args.port)

    from toolkit.core.hardware import llama_threads
    from toolkit.export.verify import GGUF_CHAT_FORMAT, gguf_metadata

    try:
        meta = gguf_metadata(path)
    except Exception as exc:  # gguf-py raises assorted errors on a truncated or foreign file
        raise UserError(f"{args.gguf}: not a readable GGUF ({exc})") from None
    chat_format = GGUF_CHAT_FORMAT if meta["chat_template"] else None
    if chat_format is None:
        say("warning: the GGUF has no chat template; llama-cpp-python will guess a chat format")
    else:
        from toolkit.core.models import default_system_prompt

        system = default_system_prompt(str(path))
        if system:
            chat_format = with_system_prompt(system)
            say("system prompt: the one the model was trained with (export.json system_prompt), "
                "for requests that send none")

    import uvicorn
    from llama_cpp.server.app import create_app
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    threads = args.threads or llama_threads()
    model = ModelSettings(
        model=str(path), model_alias=path.stem, n_ctx=args.n_ctx, n_threads=threads, n_threads_batch=threads,
        chat_format=chat_format, verbose=False,
    )
    # A second request (even GET /v1/models, which front-ends poll) would otherwise cut a running
    # stream short with no finish_reason: requests wait for the model instead, as llama-server's
    # single slot and Ollama queue them.
    server = ServerSettings(host=args.host, port=args.port, api_key=args.api_key, interrupt_requests=False)
    from toolkit.commands import serve_usage
    from toolkit.commands.serve_requests import RequestChecks

    serve_usage.install()
    app = RequestChecks(create_app(server_settings=server, model_settings=[model]), path.stem)
    print(f"serving {path.name} as model {path.stem!r} on http://{args.host}:{args.port}/v1 "
          f"(EOS {meta['eos_token']!r}, chat format {chat_format or 'guessed'}); Ctrl-C stops", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
