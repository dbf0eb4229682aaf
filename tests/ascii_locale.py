"""Run Python code in a child whose locale encoding is ASCII: the C locale with UTF-8 mode off.

What a file opened without `encoding=` or a redirected stdout gets there is what it gets on Windows
in the ANSI code page (cp1252, cp932): an encoding without most of Unicode. Text that goes through
the locale there raises UnicodeEncodeError/UnicodeDecodeError here, so a test fails where Windows
would corrupt or crash. The child checks first that its locale really is ASCII; where the C locale
is not (some systems make it UTF-8), the test is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

NOT_ASCII = 97  # the child's exit status where the C locale's encoding is not ASCII
_CHECK = ("import locale, sys\n"
          "if locale.getpreferredencoding(False) not in ('ANSI_X3.4-1968', 'ascii', 'US-ASCII'):\n"
          f"    sys.exit({NOT_ASCII})\n")


def run_python(code: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -X utf8=0 -c code args` under LC_ALL=C; stdout and stderr as bytes."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("LC_") and k not in ("LANG", "LANGUAGE", "PYTHONIOENCODING", "PYTHONUTF8")}
    env.update(LC_ALL="C", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-X", "utf8=0", "-c", _CHECK + code, *args], cwd=ROOT, env=env,
                          capture_output=True, timeout=timeout)
    if proc.returncode == NOT_ASCII:
        pytest.skip("the C locale's encoding is not ASCII on this system")
    return proc


def run_toolkit(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The `toolkit` command line with `argv`, as `run_python` runs code."""
    return run_python("import sys\nfrom toolkit.cli import main\nsys.exit(main())", *argv, timeout=timeout)
