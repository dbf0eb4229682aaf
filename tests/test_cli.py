"""The command line's own handling of a stop: a Ctrl-C before the command runs ends as one during it does."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from toolkit import cli

ROOT = Path(__file__).resolve().parents[1]


def test_an_interrupt_while_the_command_line_loads_exits_130(monkeypatch, capsys):
    def loading():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", loading)
    assert cli.main(["estimate", "--help"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def _started_with_sigint(code: str, *args: str) -> subprocess.CompletedProcess:
    """`python -c code args`, with SIGINT at its default as from a terminal (a shell's background job,
    `make test &`, starts its children with SIGINT ignored)."""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)},
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_a_real_ctrl_c_while_the_subcommands_load():
    """A real SIGINT, sent while the parser imports the subcommands (where one sent ~0.05 s after
    `toolkit export` started used to end in a traceback and death by SIGINT, exit -2)."""
    code = ("import os, signal, sys\n"
            "import toolkit.cli as cli\n"
            "real = cli.build_parser\n"
            "def build_parser():\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    return real()\n"
            "cli.build_parser = build_parser\n"
            "sys.exit(cli.main())\n")
    proc = _started_with_sigint(code, "export", "/nonexistent-run")
    assert (proc.returncode, proc.stderr) == (130, "interrupted\n")


def test_python_m_toolkit_runs_the_command_line():
    proc = _started_with_sigint("import runpy; runpy.run_module('toolkit', run_name='__main__')", "estimate", "--help")
    assert proc.returncode == 0 and "usage: toolkit estimate" in proc.stdout
