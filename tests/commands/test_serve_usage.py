"""`toolkit serve`'s closing usage chunk (`stream_options.include_usage`): its counts equal the ones
llama-cpp-python's server gives the same request unstreamed, through the real server and model."""

from __future__ import annotations

import pytest

QUESTION = [{"role": "user", "content": "In one sentence, what is a bond?"}]


def _streamed(create, **kwargs):
    chunks = list(create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" if hasattr(c.choices[0], "delta") else c.choices[0].text
                   for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return chunks, text, finishes


@pytest.mark.parametrize("extra,finish", [
    ({"max_tokens": 120}, "stop"),  # ends at <|im_end|>, which is not counted
    ({"max_tokens": 7}, "length"),
    ({"max_tokens": 120, "stop": [" a "]}, "stop"),  # a stop string: its token is counted
])
def test_streamed_chat_usage_equals_the_unstreamed_count(server, extra, finish):
    client, (model,) = server
    kwargs = {"model": model, "messages": QUESTION, "temperature": 0, **extra}
    chunks, text, finishes = _streamed(client.chat.completions.create, stream_options={"include_usage": True},
                                       **kwargs)
    whole = client.chat.completions.create(**kwargs)
    assert text == whole.choices[0].message.content and finishes == [finish] == [whole.choices[0].finish_reason]
    last = chunks[-1]
    assert last.choices == [] and last.id == chunks[0].id and last.object == "chat.completion.chunk"
    assert last.usage.model_dump() == whole.usage.model_dump()
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])
    if finish == "length":
        assert last.usage.completion_tokens == 7
    if "stop" in extra:  # it did stop at the string, short of the model's own end
        unstopped = client.chat.completions.create(**{**kwargs, "stop": None}).choices[0].message.content
        assert unstopped.startswith(text) and len(text) < len(unstopped)


def test_streamed_text_completion_usage_and_none_unasked(server):
    client, (model,) = server
    kwargs = {"model": model, "prompt": "The capital of France is", "temperature": 0, "max_tokens": 9}
    chunks, text, _ = _streamed(client.completions.create, stream_options={"include_usage": True}, **kwargs)
    whole = client.completions.create(**kwargs)
    assert text == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()

    # On the wire, as OpenAI sends it: "usage": null on every chunk before the count, then [DONE].
    import json
    import urllib.request

    request = urllib.request.Request(f"{str(client.base_url).rstrip('/')}/completions", method="POST",
                                     headers={"Content-Type": "application/json"},
                                     data=json.dumps({**kwargs, "stream": True,
                                                      "stream_options": {"include_usage": True}}).encode())
    with urllib.request.urlopen(request, timeout=120) as r:
        events = [line[len("data: "):] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    wire = [json.loads(e) for e in events[:-1]]
    assert all("usage" in c and c["usage"] is None and c["choices"] for c in wire[:-1])
    assert wire[-1]["choices"] == [] and wire[-1]["usage"] == whole.usage.model_dump(exclude_none=True)

    # Not asked (or asked not to): no usage chunk, every chunk has its choice, as before.
    for options in (None, {"include_usage": False}):
        extra = {} if options is None else {"stream_options": options}
        plain, plain_text, _ = _streamed(client.chat.completions.create, model=model, messages=QUESTION,
                                         temperature=0, max_tokens=7, **extra)
        assert all(c.choices and c.usage is None for c in plain) and plain_text


@pytest.mark.parametrize("body,param", [
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream_options": {"include_usage": true}}',
     "stream_options"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": true, "stream_options": true}', "stream_options"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": true, "stream_options": {"include_usage": "yes"}}',
     "stream_options.include_usage"),
    (b'{"prompt": "hi", "stream": false, "stream_options": {"include_usage": true}}', "stream_options"),
])
def test_stream_options_are_checked(body, param):
    from toolkit.commands.serve_requests import CHAT, COMPLETIONS, BadRequest, checked_request

    with pytest.raises(BadRequest) as exc:
        checked_request(COMPLETIONS if b"prompt" in body else CHAT, body, "m")
    assert exc.value.param == param and "\n" not in str(exc.value)


def test_usage_wanted_only_for_a_stream_that_asks():
    from toolkit.commands.serve_requests import usage_wanted

    assert usage_wanted({"stream": True, "stream_options": {"include_usage": True}})
    assert not usage_wanted({"stream": True, "stream_options": {"include_usage": False}})
    assert not usage_wanted({"stream": True}) and not usage_wanted({"stream": False})


def test_counts_leave_out_a_last_end_of_generation_token():
    from toolkit.commands.serve_usage import Generation, counts

    g = Generation(12)
    g.tokens = [5, 6, 2]
    assert counts(g, lambda t: t == 2) == {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14}
    assert counts(g, lambda t: False)["completion_tokens"] == 3
    g.tokens = [2, 5]  # only a last one is dropped
    assert counts(g, lambda t: t == 2)["completion_tokens"] == 2
    assert counts(Generation(3), lambda t: True)["completion_tokens"] == 0


def test_the_recording_generate_passes_sent_tokens_on_and_closes_upstream():
    """Upstream's `generate` takes tokens sent into it; the wrapper hands them on and closes it when closed."""
    from toolkit.commands.serve_usage import _LAST, _recording

    seen, closed = [], []

    def generate(self, tokens):
        try:
            token = 10
            while True:
                sent = yield token
                seen.append(sent)
                token += 1
        finally:
            closed.append(True)

    class Model:
        pass

    model = Model()
    gen = _recording(generate)(model, [1, 2, 3])
    assert next(gen) == 10 and gen.send([7]) == 11 and next(gen) == 12
    gen.close()
    assert seen == [[7], None] and closed == [True]
    record = getattr(model, _LAST)
    assert record.prompt_tokens == 3 and record.tokens == [10, 11, 12]


def test_the_wrapped_methods_exist_upstream():
    """Fails when llama-cpp-python renames what `serve_usage` wraps, or stops counting its non-streamed usage."""
    import inspect

    from llama_cpp import Llama

    from toolkit.commands.serve_usage import METHODS

    for name in METHODS:
        assert callable(getattr(Llama, name)), name
    assert list(inspect.signature(Llama.generate).parameters)[:2] == ["self", "tokens"]
    assert inspect.isgeneratorfunction(inspect.unwrap(Llama.generate))
