"""The Gradio chat app, launched for real: gradio_client gets replies (8 at once through the
queue), bad settings come back as a message, and headless Chromium types a message and sees the
streamed answer. The embedded model runs through llama.cpp (its f16 GGUF) to keep this fast."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest

from toolkit.decoding.config import DecodingConfig
from toolkit.decoding.fields import FIELDS

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CHROMIUM = "/usr/bin/chromium"
# The /chat inputs after message and model: system prompt, preset, then one value per decoding
# field in table order (the defaults, short answers).
CONTROLS = ["", None, *(f.to_ui(getattr(DecodingConfig(max_new_tokens=24), f.name)) for f in FIELDS)]


def _at(name: str) -> int:
    """Index of a decoding field's value in CONTROLS."""
    return 2 + [f.name for f in FIELDS].index(name)


@pytest.fixture(scope="module")
def gguf_spec(embedded_f16_gguf):
    return str(embedded_f16_gguf)


@pytest.fixture(scope="module")
def app_url(gguf_spec, tmp_path_factory, free_port):
    from ui.chat import launch

    port = free_port()
    app = launch(gguf_spec, host="127.0.0.1", port=port, n_ctx=1024, block=False,
                 root=tmp_path_factory.mktemp("empty-project"))
    yield f"http://127.0.0.1:{port}/"
    app.close()
    app._toolkit_slot.close()


def _reply_text(result) -> tuple[str, str]:
    """(answer, stats line) from the /chat endpoint's final value."""
    msgs = result if isinstance(result, list) else [{"content": result, "metadata": {}}]
    answer = "".join(m["content"] for m in msgs if not (m.get("metadata") or {}).get("title"))
    stats = [m["metadata"]["title"] for m in msgs if (m.get("metadata") or {}).get("title")]
    return answer, stats[-1] if stats else ""


@pytest.mark.slow
def test_client_gets_real_reply(app_url, gguf_spec):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    result = client.predict("What is the capital of France?", gguf_spec, *CONTROLS, api_name="/chat")
    answer, stats = _reply_text(result)
    assert "Paris" in answer
    assert "tok/s" in stats and "llama.cpp" in stats


@pytest.mark.slow
def test_eight_concurrent_requests_all_answered(app_url, gguf_spec):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    questions = [f"What is {i} plus {i}?" for i in range(1, 9)]
    controls = list(CONTROLS)
    controls[_at("max_new_tokens")] = 12
    jobs = [client.submit(q, gguf_spec, *controls, api_name="/chat") for q in questions]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda j: j.result(timeout=240), jobs))
    answers = [_reply_text(r)[0] for r in results]
    assert len(answers) == 8 and all(a.strip() for a in answers)


@pytest.mark.slow
def test_bad_settings_are_a_message_not_a_crash(app_url, gguf_spec):
    """An error is a note in place of the reply, not a raised gr.Error: that one left the browser's
    chat textbox disabled for good (test_browser_types_and_sees_streamed_answer)."""
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    controls = list(CONTROLS)
    controls[_at("max_new_tokens")] = 0
    for message, spec, values, error in [
        ("Hello", gguf_spec, controls, "error: Bad setting: max_new_tokens must be an integer >= 1"),
        ("Hello", "no/such/model/x", CONTROLS, "error: model not found"),
        ("word " * 1200, gguf_spec, CONTROLS, "error: the message is too long: "),
    ]:
        answer, note = _reply_text(client.predict(message, spec, *values, api_name="/chat"))
        assert answer == "" and note.startswith(error), note
    answer, _ = _reply_text(client.predict("Say hello.", gguf_spec, *CONTROLS, api_name="/chat"))
    assert answer.strip()  # still serving


def test_config_from_controls_is_generic_over_the_table():
    from toolkit.core.errors import UserError
    from ui.chat import config_from_controls, controls_from_config

    values = {f.name: v for f, v in zip(FIELDS, CONTROLS[2:])}
    assert config_from_controls(*values.values()) == DecodingConfig(max_new_tokens=24)
    cfg = config_from_controls(*{**values, "seed": -1, "stop": "END\n\nUser:", "length_penalty": 0.5}.values())
    assert cfg.seed is None and cfg.stop == ("END", "User:") and cfg.length_penalty == 0.5
    assert config_from_controls(*{**values, "seed": 42.0}.values()).seed == 42
    with pytest.raises(UserError, match="top_k must be a whole number"):
        config_from_controls(*{**values, "top_k": 2.5}.values())
    custom = DecodingConfig(strategy="sample", top_k=40, seed=5, stop=("A", "B"))
    assert config_from_controls(*controls_from_config(custom)) == custom


def test_app_has_one_control_per_field(tmp_path):
    """Built without loading a model: the sidebar has every field's control, length penalty too."""
    from ui.chat import build_app

    app = build_app("embedded", root=tmp_path)
    labels = {getattr(b, "label", None) for b in app.blocks.values()}
    assert {f.control.label for f in FIELDS} <= labels
    assert "Length penalty (strategy beam)" in labels
    assert app._toolkit_slot.backend is None


def test_history_and_trimming(tiny_llama_dir):
    """Stats/trim notes never reach the prompt; the oldest turns go first when the window is full."""
    from toolkit.decoding.backends.hf import HFBackend
    from toolkit.decoding.conversation import build_prompt
    from toolkit.core.errors import UserError
    from toolkit.core.loading import load_model
    from ui.chat import history_to_messages, list_models

    history = [
        {"role": "user", "content": [{"type": "text", "text": "first question " * 20}]},
        {"role": "assistant", "content": "first answer " * 20, "metadata": None},
        {"role": "assistant", "content": "", "metadata": {"title": "stats: 20 tokens · 9.0 tok/s"}},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "second answer"},
        {"role": "user", "content": "third question"},
    ]
    turns = history_to_messages(history)
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant", "user"]
    assert turns[0]["content"].startswith("first question")
    backend = HFBackend(*load_model(str(tiny_llama_dir)), n_ctx=150)
    full = build_prompt(backend, turns, "Be brief.", max_new_tokens=10)
    assert full.dropped_turns == 0 and len(full.ids) <= 140
    short = HFBackend(backend.model, backend.tokenizer, n_ctx=100)
    trimmed = build_prompt(short, turns, "Be brief.", max_new_tokens=10)
    assert trimmed.dropped_turns == 2 and len(trimmed.ids) <= 90
    assert trimmed.messages[0] == {"role": "system", "content": "Be brief."}
    assert trimmed.messages[1]["content"] == "second question"
    with pytest.raises(UserError, match="too long"):
        build_prompt(HFBackend(backend.model, backend.tokenizer, n_ctx=40), turns, None, max_new_tokens=10)
    # max_new_tokens past the window keeps half of it for the prompt (it refused every message)
    assert len(build_prompt(short, turns[-1:], None, max_new_tokens=1000).ids) <= 50
    assert list_models(tiny_llama_dir)[0] == ("embedded (SmolLM2-135M-Instruct)", "embedded")


def test_unanswered_messages_are_not_sent_again():
    """A message that got an error note (or was stopped before a word) has no answer: like the
    terminal chat, the next turn's prompt leaves it out (it was sent again, and an over-long one
    then pushed every earlier turn out of the window)."""
    from ui.chat import history_to_messages

    history = [
        {"role": "user", "content": "Hi, I am Bob."},
        {"role": "assistant", "content": "Hello Bob!"},
        {"role": "user", "content": "word " * 2000},
        {"role": "assistant", "content": "", "metadata": {"title": "error: the message is too long: ..."}},
        {"role": "user", "content": "Hello?"},
        {"role": "user", "content": "What is my name?"},
        {"role": "assistant", "content": "Bob."},
        {"role": "user", "content": "stopped before a word"},
        {"role": "user", "content": "And now?"},
    ]
    assert history_to_messages(history) == [
        {"role": "user", "content": "Hi, I am Bob."}, {"role": "assistant", "content": "Hello Bob!"},
        {"role": "user", "content": "What is my name?"}, {"role": "assistant", "content": "Bob."},
        {"role": "user", "content": "And now?"},
    ]


def test_model_picker_lists_runs_and_ggufs(tmp_path):
    from ui.chat import list_models

    run = tmp_path / "runs" / "finance-20261121-050000"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    (run / "gguf").mkdir()
    (run / "gguf" / "model-q8_0.gguf").write_bytes(b"GGUF")
    (tmp_path / "runs" / "latest").symlink_to(run.name)
    (tmp_path / "exports" / "embedded").mkdir(parents=True)
    (tmp_path / "exports" / "embedded" / "model-f16.gguf").write_bytes(b"GGUF")
    specs = [spec for _, spec in list_models(tmp_path)]
    assert str(run) in specs
    assert str(run / "gguf" / "model-q8_0.gguf") in specs
    assert str(tmp_path / "exports" / "embedded" / "model-f16.gguf") in specs
    assert sum("latest" in s for s in specs) == 0  # the symlink is not listed twice


@pytest.mark.slow
def test_browser_types_and_sees_streamed_answer(app_url, tmp_path):
    if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"no Debian chromium at {CHROMIUM} (install with `make browser` / apt-get install chromium)")
    if shutil.which("true") is None:
        pytest.skip("no shell utilities")
    from playwright.sync_api import expect, sync_playwright

    shot = tmp_path / "chat.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(app_url)
            box = page.locator("#chat-input textarea")
            box.fill("What is the capital of France?")
            box.press("Enter")
            bot = page.locator(".message.bot").first
            expect(bot).to_contain_text("Paris", timeout=60_000)
            expect(page.get_by_text("tok/s")).to_be_visible(timeout=60_000)
            # An error is shown in the chat and the textbox takes the next message (it stayed disabled).
            box.fill("word " * 1200)
            box.press("Enter")
            expect(page.get_by_text("error: the message is too long").first).to_be_visible(timeout=60_000)
            expect(box).to_be_enabled(timeout=10_000)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


def test_cli_values_past_a_sliders_range_widen_it(tmp_path):
    """Valid for the config, outside the slider's useful range: the slider starts there, and Gradio
    accepts its own value (it refused: 'Value 2.5 is greater than maximum value 2.')."""
    import gradio as gr

    from ui.chat import build_app

    cfg = DecodingConfig(temperature=2.5, top_k=500, repetition_penalty=3.0, length_penalty=-1.0, num_beams=16)
    app = build_app("embedded", root=tmp_path, initial=cfg)
    sliders = {b.label: b for b in app.blocks.values() if isinstance(b, gr.Slider)}
    by_field = {f.name: sliders[f.control.label] for f in FIELDS if f.control.kind == "slider"}
    for name in ("temperature", "top_k", "repetition_penalty", "length_penalty"):
        s, value = by_field[name], getattr(cfg, name)
        assert s.value == value and s.minimum <= value <= s.maximum
        assert s.preprocess(value) == value
    # in range: the table's range is kept
    assert (by_field["num_beams"].minimum, by_field["num_beams"].maximum) == (1, 16)
    assert (by_field["temperature"].minimum, by_field["top_k"].maximum) == (0, 500)


def test_system_box_starts_with_the_trained_prompt_and_follows_the_picker(tmp_path, monkeypatch, capsys, free_port):
    """A run fine-tuned with data.system_prompt opens with it in the system box (--system wins), and
    `toolkit chat --ui` says so; picking another model swaps it unless the user wrote their own."""
    import gradio as gr

    import ui.chat
    from toolkit.cli import main
    from ui.chat import build_app, follow_model

    run = tmp_path / "runs" / "finbot-20260101-000000"
    run.mkdir(parents=True)
    (run / "run.json").write_text('{"base_model": "embedded"}')
    (run / "recipe.yaml").write_text("data:\n  system_prompt: You are FinBot.\n")

    def box(app):
        return next(b for b in app.blocks.values() if isinstance(b, gr.Textbox) and b.label == "System prompt")

    assert box(build_app(str(run), root=tmp_path)).value == "You are FinBot."
    assert box(build_app(str(run), root=tmp_path, system="Mine.")).value == "Mine."
    assert box(build_app("embedded", root=tmp_path)).value == ""
    assert follow_model("embedded", "You are FinBot.", "You are FinBot.") == ("", "")
    assert follow_model(str(run), "", "") == ("You are FinBot.", "You are FinBot.")
    assert follow_model("embedded", "Mine.", "You are FinBot.") == ("Mine.", "")
    assert follow_model(str(tmp_path / "nosuch"), "", "") == ("", "")

    launched = {}
    monkeypatch.setattr(ui.chat, "launch", lambda model, **kw: launched.update(kw, model=model))
    assert main(["chat", "--ui", "-m", str(run), "--port", str(free_port())]) == 0
    assert launched["model"] == str(run) and launched["system"] == "You are FinBot."
    assert "system prompt: the one the run was trained with (recipe data.system_prompt)" in capsys.readouterr().err
    assert main(["chat", "--ui", "-m", str(run), "--port", str(free_port()), "--system", "Mine."]) == 0
    assert launched["system"] == "Mine."
