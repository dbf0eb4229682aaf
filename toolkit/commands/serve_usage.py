"""Token counts at the end of a stream, as OpenAI's `stream_options: {"include_usage": true}` asks.

llama-cpp-python's server (0.3.x) counts usage only for a whole response: a stream carries no counts,
and the server drops `stream_options` unread. Clients that meter tokens ask for it (LangChain's
`stream_usage=True`, benchmark tools that would otherwise need the model's tokenizer). Here,
for `toolkit serve` only, three public `Llama` methods are wrapped (`install`):

- `generate` records the prompt's length and every token it hands to the completion loop. That loop
  counts the tokens it keeps, which are the same less a last end-of-generation token, which it drops
  (its non-streamed `usage` counts them so, and the server test checks the two agree).
- `create_chat_completion` / `create_completion`, where the request asked (`WANTED`, set by
  `serve_requests.RequestChecks` for the request) and `stream` is true, end the stream with one more
  chunk: `choices: []` and `usage`, and the chunks before it carry `"usage": null`, as OpenAI's API
  sends them.

Requests are served one at a time (`interrupt_requests=False`, the server's lock held for a whole
stream), so the last generation on a model is the stream's own.
"""

from __future__ import annotations

import contextvars
import functools

# Whether the request being served asked for usage; RequestChecks sets it for the request's context,
# which the server's worker threads inherit.
WANTED = contextvars.ContextVar("toolkit_stream_usage_wanted", default=False)

_LAST = "_toolkit_last_generation"  # set on a Llama by `generate`
METHODS = ("generate", "create_completion", "create_chat_completion")


class Generation:
    """One `generate` call: its prompt's token count and the tokens it handed out."""

    def __init__(self, prompt_tokens: int):
        self.prompt_tokens, self.tokens = prompt_tokens, []


def counts(generation: Generation, is_eog) -> dict:
    """OpenAI's `usage` for `generation`: the completion's tokens are those handed out, less a last one for
    which `is_eog(token)` holds (llama-cpp-python's loop stops there without keeping it)."""
    dropped = 1 if generation.tokens and is_eog(generation.tokens[-1]) else 0
    completion = len(generation.tokens) - dropped
    return {"prompt_tokens": generation.prompt_tokens, "completion_tokens": completion,
            "total_tokens": generation.prompt_tokens + completion}


def usage_chunk(last: dict, usage: dict) -> dict:
    """The stream's closing chunk, after `last` (its id, object, created and model): no choices, `usage`."""
    return {**{k: last[k] for k in ("id", "object", "created", "model") if k in last}, "choices": [], "usage": usage}


def install() -> None:
    """Wrap `llama_cpp.Llama`'s `generate`, `create_completion` and `create_chat_completion` (see the module).
    Idempotent; raises AttributeError where this llama-cpp-python lacks one of them."""
    from llama_cpp import Llama

    if getattr(Llama, "_toolkit_usage_installed", False):
        return
    generate, completion, chat = (getattr(Llama, name) for name in METHODS)
    Llama.generate = _recording(generate)
    Llama.create_completion = _ending_with_usage(completion)
    Llama.create_chat_completion = _ending_with_usage(chat)
    Llama._toolkit_usage_installed = True


def _recording(generate):
    @functools.wraps(generate)
    def wrapper(self, tokens, *args, **kwargs):
        record = Generation(len(tokens))
        setattr(self, _LAST, record)
        inner = generate(self, tokens, *args, **kwargs)
        try:
            sent = None  # upstream's generator takes sent tokens (`tokens_or_none = yield token`): passed on
            while True:
                try:
                    token = inner.send(sent)
                except StopIteration:
                    return
                record.tokens.append(token)
                sent = yield token
        finally:
            inner.close()

    return wrapper


def _ending_with_usage(method):
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not (kwargs.get("stream") and WANTED.get()):
            return method(self, *args, **kwargs)
        # A chat completion streams its text completion's chunks through a converter: only the
        # outermost call ends with the usage chunk.
        token = WANTED.set(False)
        try:
            chunks = method(self, *args, **kwargs)
        finally:
            WANTED.reset(token)
        return _then_usage(self, chunks)

    return wrapper


def _then_usage(llama, chunks):
    setattr(llama, _LAST, None)
    last = None
    for chunk in chunks:
        last = chunk
        yield {**chunk, "usage": None}  # as OpenAI's API marks the chunks before the count
    generation = getattr(llama, _LAST, None)
    if last is not None and generation is not None:
        yield usage_chunk(last, counts(generation, functools.partial(_is_eog, llama)))


def _is_eog(llama, token: int) -> bool:
    import llama_cpp

    return bool(llama_cpp.llama_vocab_is_eog(llama_cpp.llama_model_get_vocab(llama.model), token))
