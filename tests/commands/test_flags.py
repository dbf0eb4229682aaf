"""Every list-valued flag of every command accumulates when repeated (never argparse's `store`, keep-the-last)."""

from __future__ import annotations

import argparse

from toolkit.cli import build_parser


def _subparsers(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from ((f"{name} {n}", s) for n, s in _subparsers(sub))


def test_list_valued_flags_accumulate():
    parser = build_parser()
    seen = []
    for name, sub in _subparsers(parser):
        for a in sub._actions:
            if not a.option_strings:
                continue
            takes_many = a.nargs in ("+", "*") or isinstance(a.default, list)
            if takes_many or isinstance(a, (argparse._AppendAction, argparse._ExtendAction)):
                seen.append(f"{name} {a.option_strings[-1]}")
                assert isinstance(a, (argparse._AppendAction, argparse._ExtendAction)), (name, a.option_strings)
    assert {"finetune --set", "export --quant", "recipe new --data", "generate --stop"} <= set(seen)


def test_repeated_flags_keep_every_value():
    p = build_parser()
    assert p.parse_args(["export", "runs/x", "--quant", "q8_0", "--quant", "f16"]).quant == ["q8_0", "f16"]
    assert p.parse_args(["finetune", "r", "--set", "a.b=1", "--set", "c.d=2"]).overrides == ["a.b=1", "c.d=2"]
    assert p.parse_args(["recipe", "new", "n", "--data", "a", "--data", "b"]).data == ["a", "b"]
    assert p.parse_args(["generate", "-p", "x", "--stop", "A", "--stop", "B"]).stop == ["A", "B"]


def test_a_closed_pipe_ends_the_command_quietly():
    """`toolkit estimate --list-gpus | head -1`: the reader goes away; the command stops with the
    shell's SIGPIPE code and no traceback, as a Unix tool does."""
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.Popen([sys.executable, "-m", "toolkit", "estimate", "--list-gpus"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2])
    proc.stdout.close()  # before the command writes a byte
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141, err
    assert "Traceback" not in err and "BrokenPipe" not in err, err


def test_argparse_errors_are_one_line_naming_the_flag(capsys):
    """A wrong type or choice is one `error:` line naming the command and the flag, exit 2, not
    argparse's dozen lines of usage first."""
    import pytest

    from toolkit.cli import main

    for argv, words in ((["generate", "-p", "x", "--temperature", "abc"], "toolkit generate: argument --temperature"),
                        (["generate", "-p", "x", "--strategy", "foo"], "invalid choice: 'foo'"),
                        (["recipe", "new"], "toolkit recipe new: the following arguments are required")):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
