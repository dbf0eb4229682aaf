"""`toolkit serve`: a real server process on a free port, queried with the official openai client."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from toolkit.cli import main

QUESTION = [{"role": "user", "content": "In one sentence, what is a bond?"}]


def test_chat_completion(server, embedded_f16_gguf):
    client, model_ids = server
    assert model_ids == [Path(embedded_f16_gguf).stem]
    resp = client.chat.completions.create(model=model_ids[0], messages=QUESTION, max_tokens=120, temperature=0)
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    text = choice.message.content
    assert text.strip() and "<|im_" not in text
    assert choice.finish_reason == "stop"  # ended at <|im_end|>, not at max_tokens
    assert 0 < resp.usage.completion_tokens < 120


def test_streamed_chat_completion(server):
    client, model_ids = server
    stream = client.chat.completions.create(model=model_ids[0], messages=QUESTION, max_tokens=120,
                                            temperature=0, stream=True)
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert sum(1 for p in pieces if p) > 3  # it really streamed, token by token
    assert "".join(pieces).strip() and finish == "stop"
    # Same greedy answer as the non-streamed request.
    full = client.chat.completions.create(model=model_ids[0], messages=QUESTION, max_tokens=120, temperature=0)
    assert "".join(pieces) == full.choices[0].message.content


def test_serve_missing_file(tmp_path, capsys):
    assert main(["serve", str(tmp_path / "none.gguf")]) == 2
    assert capsys.readouterr().err.strip() == f"error: GGUF file not found: {tmp_path / 'none.gguf'}"


def test_serve_port_in_use(embedded_f16_gguf, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", str(embedded_f16_gguf), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot listen on 127.0.0.1:{port}" in err[0]



def test_port_in_use_is_found_on_windows(monkeypatch):
    """On Windows SO_REUSEADDR lets a socket bind a port that another one listens on, so a check
    made with it passes, and the server fails only after the model has loaded."""
    from toolkit.commands.serve import check_port_free
    from toolkit.core.errors import UserError

    class WindowsSocket(socket.socket):
        reuse = False

        def setsockopt(self, level, option, value):
            if (level, option) == (socket.SOL_SOCKET, socket.SO_REUSEADDR):
                self.reuse = bool(value)
            super().setsockopt(level, option, value)

        def bind(self, address):
            if not self.reuse:  # with it, Windows binds whatever else listens there
                super().bind(address)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with monkeypatch.context() as m:  # os.name undone before pytest makes a Path of its own
            m.setattr(socket, "socket", WindowsSocket)
            m.setattr(os, "name", "nt")
            try:
                check_port_free("127.0.0.1", port)
                error = ""
            except UserError as exc:
                error = str(exc)
    assert f"cannot listen on 127.0.0.1:{port}" in error

@pytest.mark.parametrize("flags, line", [
    (["--threads", "-2"], "error: --threads -2: must be >= 1 (leave it out for one per physical core)"),
    (["--threads", "0"], "error: --threads 0: must be >= 1 (leave it out for one per physical core)"),
    (["--n-ctx", "-5"], "error: --n-ctx -5: must be a whole number >= 0 (0 = the model's own context window)"),
    (["--port", "99999"], "error: --port 99999: must be 1-65535"),
])
def test_serve_bad_numbers_name_the_flag(tmp_path, capsys, monkeypatch, flags, line):
    """Refused before the GGUF is read or a server starts (ModelSettings said it as a pydantic traceback)."""
    from toolkit.export import verify

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(verify, "gguf_metadata", lambda p: pytest.fail("the GGUF was read"))
    assert main(["serve", str(gguf), *flags]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [line]


def test_serves_the_trained_system_prompt_where_a_request_has_none(embedded_f16_gguf, tmp_path, monkeypatch):
    """An exported GGUF whose export.json records the system prompt it was fine-tuned with: requests
    without a system message get it, rendered by the GGUF's own template; a request's own wins."""
    import json

    import uvicorn
    from llama_cpp import Llama
    from llama_cpp.server import app as server_app

    from toolkit.commands import serve
    from toolkit.decoding.backends.llamacpp import LlamaCppBackend

    gguf = tmp_path / "m-f16.gguf"
    gguf.symlink_to(embedded_f16_gguf)
    (tmp_path / "export.json").write_text(json.dumps({"files": {"f16": gguf.name}, "system_prompt": "Answer in French."}))
    seen = {}
    monkeypatch.setattr(server_app, "create_app", lambda **kw: seen.update(kw))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **kw: None)
    from toolkit.commands.serve_usage import METHODS

    # `serve` wraps these for its process (serve_usage.install); put them back for the tests after this one.
    for name in METHODS:
        monkeypatch.setattr(Llama, name, getattr(Llama, name))
    monkeypatch.setattr(Llama, "_toolkit_usage_installed", False, raising=False)
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    free = port.getsockname()[1]
    port.close()
    assert main(["serve", str(gguf), "--port", str(free), "--n-ctx", "512"]) == 0
    (settings,) = seen["model_settings"]
    assert settings.chat_format == serve.TRAINED_SYSTEM_FORMAT

    own = [{"role": "system", "content": "Be brief."}] + QUESTION
    with LlamaCppBackend(str(embedded_f16_gguf), n_ctx=512) as ours:
        expected = [len(ours.chat_ids([{"role": "system", "content": "Answer in French."}] + QUESTION)),
                    len(ours.chat_ids(own))]
    llm = Llama(str(embedded_f16_gguf), chat_format=settings.chat_format, n_ctx=512, verbose=False)
    try:
        got = [llm.create_chat_completion(messages=m, max_tokens=1)["usage"]["prompt_tokens"] for m in (QUESTION, own)]
    finally:
        llm.close()
    assert got == expected


@pytest.mark.parametrize("body,param,words", [
    (b"{not json", None, "not valid JSON"),
    (b"", None, "must be a JSON object"),
    (b'{"model": "m"}', "messages", "non-empty list"),
    (b'{"messages": []}', "messages", "non-empty list"),
    (b'{"messages": "hi"}', "messages", "non-empty list"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": 5}', "top_p", "less than or equal to 1"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}', "max_tokens", "integer"),
    (b'{"messages": [{"role": "wizard", "content": "hi"}]}', "messages.0", ""),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": 2}', "n", "only 1 choice"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}',
     "messages[0].content", "only text parts"),
])
def test_a_request_that_cannot_succeed_is_a_400_naming_the_field(body, param, words):
    from toolkit.commands.serve_requests import CHAT, BadRequest, checked_request

    with pytest.raises(BadRequest) as exc:
        checked_request(CHAT, body, "m")
    assert (exc.value.param or "").startswith(param or "") and words in str(exc.value) and "\n" not in str(exc.value)


def test_text_parts_are_joined_and_the_model_alias_filled_in():
    import json

    from toolkit.commands.serve_requests import CHAT, COMPLETIONS, BadRequest, checked_request

    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hi"}]}]}
    got = checked_request(CHAT, json.dumps(parts).encode(), "smol")
    assert got["messages"] == [{"role": "user", "content": "Say\nhi"}] and got["model"] == "smol"
    assert checked_request(COMPLETIONS, b'{"prompt": ["Hi"], "model": "x"}', "smol")["prompt"] == "Hi"
    for bad in (b"{}", b'{"prompt": ""}', b'{"prompt": ["a", "b"]}'):
        with pytest.raises(BadRequest, match="prompt"):
            checked_request(COMPLETIONS, bad, "smol")


def test_bad_requests_are_400_and_a_stream_is_not_cut_by_another_request(server):
    """Through the real server: a malformed request is the client's BadRequestError (no retries of
    what can't succeed), content parts are served, and a stream runs to its finish_reason while
    another client asks for /v1/models and for a completion (they wait their turn)."""
    import threading

    import openai

    client, _ = server
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model="m", messages=QUESTION, top_p=5)
    assert exc.value.status_code == 400 and "top_p" in str(exc.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=[])
    parts = client.chat.completions.create(model="m", max_tokens=8, temperature=0,
                                           messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}])
    assert parts.choices[0].message.content

    finishes, others = [], []
    stream = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=48, temperature=0,
                                            extra_body={"min_tokens": 48}, stream=True)

    def meanwhile():
        time.sleep(0.3)
        others.append(client.models.list().data[0].id)
        others.append(client.chat.completions.create(model="m", messages=QUESTION, max_tokens=4).choices[0].finish_reason)

    import json
    import urllib.error
    import urllib.request

    base = str(client.base_url).rstrip("/").removesuffix("/v1")
    with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
        assert r.status == 200 and json.load(r) == {"status": "ok"}
    with pytest.raises(urllib.error.HTTPError) as embed:
        urllib.request.urlopen(urllib.request.Request(f"{base}/v1/embeddings", data=b'{"input": "x"}', method="POST",
                                                      headers={"Content-Type": "application/json"}), timeout=10)
    assert embed.value.code == 501

    t = threading.Thread(target=meanwhile)
    t.start()
    for chunk in stream:
        finishes += [c.finish_reason for c in chunk.choices if c.finish_reason]
    t.join(timeout=120)
    assert finishes == ["length"] and len(others) == 2


def test_max_completion_tokens_is_the_limit_upstream_reads(server):
    """OpenAI's newer name for a chat's limit: llama-cpp-python ignored it (no limit but the window)."""
    import openai

    client, (model,) = server
    resp = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_completion_tokens=5)
    assert resp.choices[0].finish_reason == "length" and resp.usage.completion_tokens == 5
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=model, messages=QUESTION, max_completion_tokens=5, max_tokens=6)
    assert "max_completion_tokens" in str(exc.value)


@pytest.mark.parametrize("value", [0, -3, "ten", True, 2.5])
def test_max_completion_tokens_must_be_a_positive_integer(value):
    import json

    from toolkit.commands.serve_requests import CHAT, BadRequest, checked_request

    body = json.dumps({"messages": QUESTION, "max_completion_tokens": value}).encode()
    with pytest.raises(BadRequest) as exc:
        checked_request(CHAT, body, "m")
    assert exc.value.param == "max_completion_tokens"
    ok = checked_request(CHAT, json.dumps({"messages": QUESTION, "max_completion_tokens": 9}).encode(), "m")
    assert ok["max_tokens"] == 9 and "max_completion_tokens" not in ok


def test_a_developer_message_is_a_system_message(server):
    """OpenAI's newer name for the instructions' role is served as the chat template's system role: the
    same prompt, so the same greedy answer and prompt tokens, where upstream's schema answered 400."""
    client, (model,) = server
    answers = [client.chat.completions.create(model=model, temperature=0, max_tokens=24, messages=[
        {"role": role, "content": "Answer in one short sentence."}, *QUESTION]) for role in ("system", "developer")]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    assert answers[0].usage.prompt_tokens == answers[1].usage.prompt_tokens


def test_structured_outputs_follow_the_json_schema(server):
    """OpenAI's `response_format: json_schema` (structured outputs): the reply is JSON of that schema,
    through llama.cpp's grammar, where upstream's schema answered 400."""
    import json

    import openai

    client, (model,) = server
    schema = {"type": "object", "properties": {"direction": {"type": "string", "enum": ["up", "down"]},
                                                "sure": {"type": "boolean"}},
              "required": ["direction", "sure"], "additionalProperties": False}
    resp = client.chat.completions.create(
        model=model, temperature=0, max_tokens=40,
        messages=[{"role": "user", "content": "When interest rates rise, do bond prices go up or down? Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}})
    answer = json.loads(resp.choices[0].message.content)
    assert set(answer) == {"direction", "sure"} and answer["direction"] in ("up", "down")
    assert isinstance(answer["sure"], bool)
    with pytest.raises(openai.BadRequestError) as exc:
        client.chat.completions.create(model=model, messages=QUESTION,
                                       response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert "response_format.json_schema.schema" in str(exc.value)
