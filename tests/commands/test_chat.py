"""`toolkit chat --ui`: a bad --port / --host, a port in use or a bad --n-ctx is one line with exit 2,
said before the model or Gradio is touched (serve's checks, reused)."""

from __future__ import annotations

import socket

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
