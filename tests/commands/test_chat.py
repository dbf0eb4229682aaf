"""`toolkit chat --ui`: a bad --port / --host, a port in use or a bad --n-ctx is one line with exit 2,
said before the model or Gradio is touched (serve's checks, reused). The terminal chat: turns piped
in through a small context window, the in-chat commands, Ctrl-D."""

from __future__ import annotations

import io
import json
import socket
import sys

import pytest

from toolkit.cli import main


@pytest.fixture
def nothing_loads(monkeypatch):
    from toolkit.core import models
    from toolkit.decoding import backends

    monkeypatch.setattr(models, "resolve", lambda spec: pytest.fail("the model was looked at"))
    monkeypatch.setattr(backends, "load", lambda *a, **k: pytest.fail("a model was loaded"))


def _line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("flags, line", [
    (["--port", "99999"], "error: --port 99999: must be 1-65535"),
    (["--port", "0"], "error: --port 0: must be 1-65535"),
    (["--host", "999.1.1.1"], "error: cannot listen on 999.1.1.1:7860: "),
    (["--n-ctx", "-1"], "error: --n-ctx -1: must be a whole number >= 0"),
])
def test_bad_ui_flags_are_one_line_before_anything_loads(nothing_loads, capsys, flags, line):
    assert main(["chat", "--ui", *flags]) == 2
    assert _line(capsys).startswith(line)


def test_ui_port_in_use(nothing_loads, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["chat", "--ui", "--port", str(port)]) == 2
    assert _line(capsys).startswith(f"error: cannot listen on 127.0.0.1:{port}: ")


def _chat(monkeypatch, capsys, lines: str, *flags: str) -> tuple[int, str, str]:
    """Run the terminal chat with `lines` piped in; (exit code, stdout, stderr)."""
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    rc = main(["chat", *flags])
    out, err = capsys.readouterr()
    return rc, out, err


def test_small_window_long_conversation(embedded_f16_gguf, monkeypatch, capsys):
    """--n-ctx 256 with the default 256 new tokens chats (every message was refused: no room left for
    the prompt); old turns go with a notice, the system prompt stays, nothing runs past the window,
    and a message longer than the window is one error line, the chat going on."""
    from toolkit.decoding import conversation, search

    sent, used = [], []
    build, stream = conversation.build_prompt, search.stream

    def spy_build(*a, **k):
        prompt = build(*a, **k)
        sent.append(prompt.messages)
        return prompt

    def spy_stream(backend, ids, cfg):
        s = stream(backend, ids, cfg)
        used.append((len(ids), s))
        return s

    monkeypatch.setattr(conversation, "build_prompt", spy_build)
    monkeypatch.setattr(search, "stream", spy_stream)
    colours = "Remember these colours: " + "red, green, blue, " * 12
    turns = ["Hi, I am Bob.", "word " * 400, colours, colours, "What is my name?"]
    rc, out, err = _chat(monkeypatch, capsys, "\n".join(turns) + "\n", "-m", str(embedded_f16_gguf),
                         "--n-ctx", "256", "--system", "Be brief.")
    assert rc == 0 and "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: the message is too long: ")
    assert "earlier message(s) dropped to fit the 256-token context window" in err
    assert len(used) == 4 and err.count(" tok/s, ") == 4
    assert all(n + s.result.new_tokens <= 256 for n, s in used)
    assert all(m[0] == {"role": "system", "content": "Be brief."} for m in sent)
    assert not any("word word" in msg["content"] for m in sent[2:] for msg in m)  # the failed turn is gone


class _NoModel:
    name = "none"

    def close(self):
        pass


def test_commands_help_and_ctrl_d_in_a_terminal(monkeypatch, capsys):
    """/help lists the commands, an unknown one says them too; Ctrl-D exits 0 and ends the
    'you> ' line, so the shell's prompt does not land after it."""
    import builtins

    from toolkit.decoding import backends

    monkeypatch.setattr(backends, "load", lambda *a, **k: _NoModel())
    monkeypatch.setattr("sys.stdin", type("Tty", (io.StringIO,), {"isatty": lambda self: True})())
    typed = iter(["/help", "/nope"])

    def fake_input(prompt=""):
        sys.stdout.write(prompt)
        try:
            return next(typed)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr(builtins, "input", fake_input)
    assert main(["chat"]) == 0
    out, err = capsys.readouterr()
    assert out == "you> you> you> \n"
    commands = "/quit, /reset, /system TEXT, /set key=value, /preset NAME, /retry, /help"
    assert f"commands: {commands}" in err.splitlines()
    assert f"error: unknown command /nope (commands: {commands})" in err.splitlines()


FINBOT = "You are FinBot, a terse finance tutor."


@pytest.fixture
def finbot_run(tmp_path, tiny_llama_dir):
    """A run folder as the trainer writes it (LoRA adapter, run.json, resolved recipe.yaml) on the
    tiny model, fine-tuned with data.system_prompt."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path / "runs" / "finbot-20260101-000000"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(run / "adapter")
    (run / "run.json").write_text(json.dumps({"base_model": str(tiny_llama_dir), "base_source": str(tiny_llama_dir)}))
    (run / "recipe.yaml").write_text(f"model:\n  base_model: embedded\ndata:\n  system_prompt: {FINBOT}\n")
    return run


def test_run_folder_chats_with_the_system_prompt_it_was_trained_with(finbot_run, monkeypatch, capsys):
    """chat and generate on a run default to its recipe's data.system_prompt (said once on stderr);
    --system replaces it, /system alone clears it (back to the template's own default)."""
    from toolkit.decoding import search

    prompts = []
    stream = search.stream

    def spy(backend, ids, cfg):
        prompts.append(backend.tokenizer.decode(ids))
        return stream(backend, ids, cfg)

    monkeypatch.setattr(search, "stream", spy)
    trained = f"<|im_start|>system\n{FINBOT}<|im_end|>\n<|im_start|>user\nHi<|im_end|>"
    announce = "system prompt: the one the run was trained with (recipe data.system_prompt)"
    flags = ["-m", str(finbot_run), "--max-new-tokens", "1"]

    rc, _, err = _chat(monkeypatch, capsys, "Hi\n/system\nHi\n", *flags)
    assert rc == 0 and err.splitlines().count(announce) == 1
    assert len(prompts) == 2 and trained in prompts[0]
    assert FINBOT not in prompts[1] and "(system prompt cleared)" in err

    rc, _, err = _chat(monkeypatch, capsys, "Hi\n", *flags, "--system", "Be brief.")
    assert rc == 0 and announce not in err
    assert FINBOT not in prompts[2] and "<|im_start|>system\nBe brief.<|im_end|>" in prompts[2]

    assert main(["generate", *flags, "-p", "Hi"]) == 0
    assert trained in prompts[3] and announce in capsys.readouterr().err.splitlines()


def test_set_temperature_in_a_greedy_chat_samples(embedded_f16_gguf, monkeypatch, capsys):
    """`/set temperature=0.7` (the README's example) in a chat started greedy switches it to sampling
    and says so; it had been silently ignored."""
    rc, out, err = _chat(monkeypatch, capsys, "/set temperature=0.7\n/set seed=5\n/quit\n", "--model",
                         str(embedded_f16_gguf))
    assert rc == 0 and "(temperature = 0.7, strategy = sample)" in err and "(seed = 5)" in err
