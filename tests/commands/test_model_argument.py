"""`toolkit generate|chat [MODEL]`: the model as the first word or --model, one resolver (`model_of`)."""

from __future__ import annotations

import json

import pytest

from toolkit.cli import build_parser, main


@pytest.mark.parametrize("argv,model", [
    (["generate", "-p", "hi"], "embedded"),
    (["generate", "runs/x", "-p", "hi"], "runs/x"),
    (["generate", "-p", "hi", "runs/x"], "runs/x"),
    (["generate", "--model", "runs/x", "-p", "hi"], "runs/x"),
    (["generate", "runs/x", "-m", "runs/x", "-p", "hi"], "runs/x"),
    (["chat"], "embedded"),
    (["chat", "m.gguf", "--ui"], "m.gguf"),
    (["chat", "-m", "m.gguf"], "m.gguf"),
])
def test_the_model_is_the_first_word_or_the_flag(argv, model):
    from toolkit.commands.model_argument import model_of

    assert model_of(build_parser().parse_args(argv)) == model


@pytest.mark.parametrize("command", [["generate", "-p", "hi"], ["chat"]])
def test_two_different_models_are_one_line_and_exit_2(command, capsys):
    assert main([*command, "runs/a", "--model", "runs/b"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: two models given, MODEL 'runs/a' and --model 'runs/b': give one"


def test_generate_with_the_model_first_answers_as_with_the_flag(embedded_f16_gguf, capsys):
    answers = []
    for form in (["--model", str(embedded_f16_gguf)], [str(embedded_f16_gguf)]):
        assert main(["generate", *form, "-p", "What is the capital of France?", "--max-new-tokens", "6", "--json"]) == 0
        answers.append(json.loads(capsys.readouterr().out))
    assert answers[0]["tokens"] == answers[1]["tokens"] and answers[0]["model"] == answers[1]["model"]
    assert "Paris" in answers[1]["text"]


@pytest.mark.parametrize("command", [["generate", "-p", "hi"], ["chat"]])
@pytest.mark.parametrize("entry", [True, False])
def test_decoding_restarts_under_the_training_allocator_only_for_transformers_from_the_shell(
        command, entry, embedded_f16_gguf, tiny_llama_dir, monkeypatch):
    # tcmalloc read ~10% faster transformers decoding on the Zen 3 and no faster llama.cpp decoding;
    # `cli.main(argv)` from Python never restarts its caller.
    import argparse

    from toolkit.commands import chat, generate
    from toolkit.core import allocator
    from toolkit.decoding import backends

    class Stop(Exception):
        pass

    calls = []

    def load(spec, **kw):  # the command got as far as loading: stop there
        calls.append(("load", spec))
        raise Stop

    monkeypatch.setattr(allocator, "relaunch", lambda: calls.append("relaunch"))
    monkeypatch.setattr(backends, "load", load)
    module = {"generate": generate, "chat": chat}[command[0]]
    for spec, restarts in ((str(tiny_llama_dir), True), (str(embedded_f16_gguf), False)):
        calls.clear()
        parsed = build_parser().parse_args([*command, spec])
        with pytest.raises(Stop):
            module.run(argparse.Namespace(**{**vars(parsed), "process_entry": entry}))
        assert calls == (["relaunch"] if entry and restarts else []) + [("load", spec)]
