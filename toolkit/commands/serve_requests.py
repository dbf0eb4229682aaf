"""What `toolkit serve` checks in a request before llama-cpp-python's server sees it.

That server answers every malformed request with HTTP 500 (its route handler turns any exception
into an internal error, with a server path in the message), so an OpenAI client retries what can
never succeed; it answers a chat with no `messages` from an empty prompt, silently returns one
choice for `n: 2`, and fails on OpenAI's list-of-parts `content`. Here those become one-line 400
`invalid_request_error`s, as the OpenAI API, llama-server and Ollama answer them, and text parts
are joined into the string the GGUF's chat template expects. The request's schema is upstream's
(`llama_cpp.server.types`), not written again. It also answers `/health` (llama-server's liveness
route, for a container's health check) and `/v1/embeddings` with 501, where upstream fails with a 500.
A stream that asks for `stream_options.include_usage` ends with OpenAI's usage chunk (`serve_usage`), and
a chat's `max_completion_tokens` is the `max_tokens` upstream reads, a `developer` message a system one, and
a `json_schema` response format (structured outputs) the schema-constrained JSON upstream knows.
"""

from __future__ import annotations

import json

CHAT, COMPLETIONS, EMBEDDINGS, HEALTH = "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/health"


class BadRequest(ValueError):
    """A request that can't succeed: `param` names the field, as OpenAI's errors do."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def checked_request(path: str, body: bytes, model_alias: str) -> dict:
    """The JSON of `body`, a POST to `path`, as the server should get it, or BadRequest. A request
    without a `model` gets the served alias, which the response echoes (else it is the GGUF's local path)."""
    try:
        data = json.loads(body or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    if path == CHAT:
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("messages: a non-empty list of {role, content} messages is required", "messages")
        data["messages"] = [_text_content(m, i) for i, m in enumerate(messages)]
        _max_completion_tokens(data)
        _json_schema_format(data)
    else:
        prompt = data.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise BadRequest("prompt: a non-empty string is required (one prompt a request)", "prompt")
        data["prompt"] = prompt
    if data.get("n", 1) not in (1, None):
        raise BadRequest(f"n: only 1 choice a request is served, got {data['n']!r}", "n")
    _check_stream_options(data)
    data.setdefault("model", model_alias)
    _validate(path, data)
    return data


def _max_completion_tokens(data: dict) -> None:
    """OpenAI's `max_completion_tokens` (which its API now documents in place of the deprecated `max_tokens`)
    as the `max_tokens` llama-cpp-python reads: it ignores the new name, and a client that sends only it got
    no limit but the context window."""
    if data.get("max_completion_tokens") is None:
        data.pop("max_completion_tokens", None)
        return
    value = data.pop("max_completion_tokens")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise BadRequest(f"max_completion_tokens: must be a positive integer, got {value!r}", "max_completion_tokens")
    if data.get("max_tokens") not in (None, value):
        raise BadRequest(f"max_completion_tokens: {value} and max_tokens: {data['max_tokens']!r} disagree; send one",
                         "max_completion_tokens")
    data["max_tokens"] = value


def _json_schema_format(data: dict) -> None:
    """OpenAI's structured outputs, `response_format: {"type": "json_schema", "json_schema": {"name", "schema"}}`
    (what its SDK's `parse(response_format=Model)` sends), as the `{"type": "json_object", "schema"}` that
    llama-cpp-python turns into a grammar: the reply is JSON of that schema. Upstream refused the type."""
    fmt = data.get("response_format")
    if not (isinstance(fmt, dict) and fmt.get("type") == "json_schema"):
        return
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise BadRequest("response_format.json_schema.schema: a JSON schema object is required",
                         "response_format.json_schema.schema")
    data["response_format"] = {"type": "json_object", "schema": spec["schema"]}


def _check_stream_options(data: dict) -> None:
    """OpenAI's `stream_options` (`{"include_usage": bool}`), allowed only with `stream: true`, as its API rules."""
    options = data.get("stream_options")
    if options is None:
        return
    if not isinstance(options, dict):
        raise BadRequest("stream_options: must be an object such as {\"include_usage\": true}", "stream_options")
    if data.get("stream") is not True:
        raise BadRequest("stream_options: only allowed when stream is true", "stream_options")
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise BadRequest(f"stream_options.include_usage: must be true or false, got {usage!r}",
                         "stream_options.include_usage")


def usage_wanted(data: dict) -> bool:
    """Whether a checked request (`checked_request`) asks for the stream's closing usage chunk (`serve_usage`)."""
    return bool(data.get("stream") is True and (data.get("stream_options") or {}).get("include_usage"))


def _text_content(message, i: int):
    """`message` with list-of-parts content joined into one string (text parts only), and OpenAI's
    `developer` role (its newer name for instructions) as the `system` role chat templates know, as
    llama-server maps it; upstream's schema refused it."""
    if not isinstance(message, dict):
        raise BadRequest(f"messages[{i}]: must be an object with role and content", f"messages[{i}]")
    if message.get("role") == "developer":
        message = {**message, "role": "system"}
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise BadRequest(f"messages[{i}].content: only text parts are served, got {kind!r}",
                                 f"messages[{i}].content")
            texts.append(part["text"])
        message = {**message, "content": "\n".join(texts)}
    return message


def _validate(path: str, data: dict) -> None:
    import pydantic
    from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest

    model = CreateChatCompletionRequest if path == CHAT else CreateCompletionRequest
    try:
        model.model_validate(data)
    except pydantic.ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise BadRequest(f"{where}: {err['msg']}", where) from None


class RequestChecks:
    """ASGI middleware: POSTs to the chat and completion routes go through `checked_request`; a
    BadRequest is answered with 400 and never reaches the model. After the body, the route still
    hears the client's disconnect (a stream stops when its reader goes away)."""

    def __init__(self, app, model_alias: str):
        self.app, self.model_alias = app, model_alias

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path") == HEALTH:  # llama-server's liveness route
            await _json(send, 200, {"status": "ok"})
            return
        if scope["type"] == "http" and scope.get("path") == EMBEDDINGS:  # upstream lists it, then fails with a 500
            await _json(send, 501, {"error": {"message": "this server does not compute embeddings (a chat model "
                                              "served for chat and completions)", "type": "not_implemented",
                                              "param": None, "code": None}})
            return
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in (CHAT, COMPLETIONS):
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body, more = body + message.get("body", b""), message.get("more_body", False)
        try:
            data = checked_request(scope["path"], body, self.model_alias)
        except BadRequest as exc:
            await _error(send, str(exc), exc.param)
            return
        body, replayed = json.dumps(data).encode(), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        from toolkit.commands.serve_usage import WANTED

        token = WANTED.set(usage_wanted(data))  # the stream's tasks and worker threads inherit it
        try:
            await self.app({**scope, "headers": headers}, replay, send)
        finally:
            WANTED.reset(token)


async def _error(send, message: str, param: str | None) -> None:
    await _json(send, 400, {"error": {"message": message, "type": "invalid_request_error", "param": param,
                                      "code": None}})


async def _json(send, status: int, obj: dict) -> None:
    payload = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
