"""`toolkit export` where the platform differs from Linux in a UTF-8 locale: Windows (no SIGHUP,
the ANSI code page), a C locale."""

from __future__ import annotations

import signal

import pytest

from tests.ascii_locale import run_toolkit
from tests.export.test_pipeline import _lora_run


def test_termination_handlers_where_there_is_no_sighup(monkeypatch):
    """Windows has no SIGHUP: every export there would fail before it starts."""
    from toolkit.commands.export import _exit_on_termination

    monkeypatch.delattr(signal, "SIGHUP")
    before = signal.getsignal(signal.SIGTERM)
    with _exit_on_termination():
        handler = signal.getsignal(signal.SIGTERM)
        with pytest.raises(SystemExit) as stop:
            handler(signal.SIGTERM, None)
    assert stop.value.code == 128 + signal.SIGTERM and signal.getsignal(signal.SIGTERM) is before


@pytest.mark.slow
def test_export_writes_utf8_whatever_the_locale(tmp_path, embedded_dir):
    """The README's "—", a system prompt past ASCII in the Modelfile, the converter's progress
    bars: none of them may go through the locale's encoding (Windows: cp1252; here ASCII)."""
    run = _lora_run(tmp_path, embedded_dir)
    prompt = "Tu es FinBot — réponds en une phrase."
    recipe = run / "recipe.yaml"
    text = recipe.read_text(encoding="utf-8")
    recipe.write_text(text.replace(text.split("system_prompt: ")[1], f"'{prompt}'\n"), encoding="utf-8")
    proc = run_toolkit("export", str(run), "--quant", "q8_0", timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
    assert proc.stdout.decode("utf-8").startswith("wrote finance-20260101-000000-q8_0.gguf\n")
    out = run / "gguf"
    assert f'SYSTEM """{prompt}"""' in (out / "Modelfile").read_text(encoding="utf-8")
    assert "— GGUF export" in (out / "README.md").read_text(encoding="utf-8")
