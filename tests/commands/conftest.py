"""Fixtures shared by the command tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_estimate(capsys, *argv):
    """`toolkit estimate ARGV` in this process: (exit code, stdout, stderr)."""
    from toolkit.cli import main

    code = main(["estimate", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def server(embedded_f16_gguf, free_port):
    """A real `toolkit serve` process of the embedded f16 GGUF on a free port, and an openai client for it
    with the served model ids; shared by the serve tests."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "toolkit", "serve", str(embedded_f16_gguf), "--port", str(port), "--n-ctx", "1024"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    deadline = time.time() + 90
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"toolkit serve exited {proc.returncode}: {proc.stdout.read()}")
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                if time.time() > deadline:
                    pytest.fail("toolkit serve did not answer within 90 s")
                time.sleep(0.5)
        yield client, [m.id for m in models.data]
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
