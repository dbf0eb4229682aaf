"""Compare mode: readable model names, the default pair, interleaved streams, and the app for
real (gradio_client: both replies arrive with the same settings; headless Chromium: the tab
streams both answers, screenshot). Both sides run the embedded model through llama.cpp."""

from __future__ import annotations

import json
import os
import re

import pytest

from toolkit.decoding.config import DecodingConfig
from toolkit.decoding.fields import FIELDS

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

CHROMIUM = "/usr/bin/chromium"


def _controls(**over) -> list:
    cfg = DecodingConfig(**{"max_new_tokens": 24, **over})
    return [f.to_ui(getattr(cfg, f.name)) for f in FIELDS]


def _run(root, name="finance-20261122-031438", base="embedded"):
    run = root / "runs" / name
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/x/y"}))
    (run / "run.json").write_text(json.dumps({"base_model": base, "method": "qlora",
                                              "base_source": "/root/.cache/toolkit/smollm2-135m-instruct-hf-v1"}))
    return run


def test_display_name_reads_like_a_name(tmp_path, tiny_llama_dir):
    from toolkit.core.models import embedded_gguf_path
    from ui.compare import display_name

    run = _run(tmp_path)
    (run / "gguf").mkdir()
    (run / "gguf" / f"{run.name}-q8_0.gguf").write_bytes(b"GGUF")
    hub_run = _run(tmp_path, "support-20260101-000000", base="meta-llama/Llama-3.2-1B-Instruct")
    names = {
        "embedded": "embedded (SmolLM2-135M-Instruct)",
        str(embedded_gguf_path()): "embedded (SmolLM2-135M-Instruct, Q4_1 GGUF)",
        str(run): "finance-20261122-031438 (run, LoRA on embedded)",
        str(hub_run): "support-20260101-000000 (run, LoRA on meta-llama/Llama-3.2-1B-Instruct)",
        str(run / "gguf" / f"{run.name}-q8_0.gguf"): "finance-20261122-031438-q8_0.gguf",
        str(tiny_llama_dir): f"{tiny_llama_dir.name} (HF folder)",
        "no/such/model/x": "no/such/model/x",  # unresolvable: shown as typed, not an error
    }
    for spec, want in names.items():
        assert display_name(spec) == want
    # An adapter folder without run.json: the adapter config names the base.
    (run / "run.json").unlink()
    assert display_name(str(run)) == "finance-20261122-031438 (run, LoRA on y)"


def test_picker_labels_have_no_cache_paths(tmp_path):
    from ui.chat import list_models

    _run(tmp_path)
    labels = [label for label, _ in list_models(tmp_path)]
    assert labels[0] == "embedded (SmolLM2-135M-Instruct)"
    assert "finance-20261122-031438 (run, LoRA on embedded)" in labels
    assert not any("/" in label.replace("meta-llama/", "") for label in labels)


def test_default_pair_is_base_and_newest_run(tmp_path):
    from ui.compare import default_pair

    old, new = _run(tmp_path, "finance-20261101-000000"), _run(tmp_path, "finance-20261122-031438")
    assert default_pair(["embedded", str(old), str(new), "x.gguf"], "embedded") == ("embedded", str(new))
    assert default_pair(["embedded", "/a.gguf"], "/a.gguf") == ("/a.gguf", "embedded")
    assert default_pair(["embedded"], "embedded") == ("embedded", "embedded")


def test_interleave_alternates_until_each_is_done():
    from ui.compare import interleave

    assert list(interleave(["abc", "x", ""])) == [(0, "a"), (1, "x"), (0, "b"), (0, "c")]
    assert list(interleave([])) == []


@pytest.fixture(scope="module")
def specs(embedded_f16_gguf):
    from toolkit.core.models import embedded_gguf_path

    return str(embedded_f16_gguf), str(embedded_gguf_path())


@pytest.fixture(scope="module")
def app_url(specs, tmp_path_factory, free_port):
    from ui.chat import close_models, launch

    port = free_port()
    app = launch(specs[0], host="127.0.0.1", port=port, n_ctx=1024, block=False,
                 root=tmp_path_factory.mktemp("empty-project"))
    yield f"http://127.0.0.1:{port}/"
    app.close()
    close_models(app)


@pytest.mark.slow
def test_client_gets_both_replies_with_the_same_settings(app_url, specs):
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    f16, q41 = specs
    # Sampling with a random seed: the same model on both sides must still say the same thing,
    # which only holds if both got the same prompt, settings and seed.
    ctl = _controls(strategy="sample", temperature=1.0, top_k=0, top_p=1.0, seed=None, max_new_tokens=16)
    a, b, sa, sb = client.predict("Name three fruits.", f16, f16, "", *ctl, api_name="/compare")
    assert a.strip() and a == b
    assert sa.split(" · ")[3:5] == sb.split(" · ")[3:5]  # strategy and the (shared) seed
    assert "sample" in sa and "seed " in sa

    a, b, sa, sb = client.predict("What is the capital of France?", f16, q41, "", *_controls(),
                                  api_name="/compare")
    assert "Paris" in a and b.strip() and a != b  # f16 knows; the Q4_1 file answers its own way
    for s in (sa, sb):
        assert "tok/s" in s and "greedy" in s and "llama.cpp" in s
        assert int(s.split()[1]) <= 24


@pytest.mark.slow
def test_compare_bad_settings_are_a_message(app_url, specs):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(app_url, verbose=False)
    with pytest.raises(AppError, match="max_new_tokens must be an integer >= 1"):
        bad = _controls()
        bad[[f.name for f in FIELDS].index("max_new_tokens")] = 0
        client.predict("Hi", specs[0], specs[1], "", *bad, api_name="/compare")
    with pytest.raises(AppError, match="model not found"):
        client.predict("Hi", specs[0], "no/such/model/x", "", *_controls(), api_name="/compare")


@pytest.mark.slow
def test_browser_compare_tab_streams_both(app_url, specs, tmp_path):
    if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"no Debian chromium at {CHROMIUM} (install with `make browser` / apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    shot = tmp_path / "compare.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--headless", "--no-sandbox", "--disable-gpu",
                                          "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.goto(app_url)
            page.get_by_role("tab", name="Compare").click()
            box = page.get_by_placeholder("Ask both models…")
            box.fill("What is the capital of France?")
            page.get_by_role("button", name="Compare", exact=True).click()
            left, right = page.get_by_label("Left reply"), page.get_by_label("Right reply")
            expect(left).to_have_value(re.compile("Paris"), timeout=60_000)
            expect(right).to_have_value(re.compile("Paris"), timeout=60_000)
            expect(page.get_by_text("tok/s").first).to_be_visible(timeout=60_000)
            expect(page.get_by_text("tok/s").nth(1)).to_be_visible(timeout=60_000)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("TOOLKIT_UPDATE_SCREENSHOTS"):  # refresh the README's picture
        import shutil
        from pathlib import Path

        shutil.copyfile(shot, Path(__file__).resolve().parents[2] / "docs" / "compare.png")
    print(f"screenshot: {shot}")


def test_each_side_runs_with_its_own_trained_prompt_unless_one_was_written(monkeypatch):
    """The sidebar's system box is shared: a prompt the user wrote goes to both models; the trained
    prompt it shows for the chat's model must not be sent to a model trained without it."""
    import ui.chat as C

    monkeypatch.setattr(C, "trained_system", {"run": "Be a tutor.", "base": ""}.get)
    assert C.system_for("run", "", "") == "Be a tutor."
    assert C.system_for("base", "Be a tutor.", "Be a tutor.") == ""  # the box shows the run's prompt
    assert C.system_for("run", "Be a tutor.", "Be a tutor.") == "Be a tutor."
    assert [C.system_for(s, "Mine.", "Be a tutor.") for s in ("run", "base")] == ["Mine.", "Mine."]
    assert C.follow_model("base", "Be a tutor.", "Be a tutor.") == ("", "")
    assert C.follow_model("run", "Mine.", "") == ("Mine.", "Be a tutor.")
