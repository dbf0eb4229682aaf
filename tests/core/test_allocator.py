"""The allocator decision over facts records, and the restart it makes on this machine."""

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

from toolkit.core import allocator
from toolkit.core.allocator import Facts, decide

ROOT = Path(__file__).resolve().parents[2]
LINUX = Facts(system="Linux", libc="glibc", libc_version=(2, 36), thp="madvise", tunables="", opt_out=False, cuda=False)


def with_(**kw) -> Facts:
    return Facts(**{**LINUX.__dict__, **kw})


@pytest.mark.parametrize("facts, value", [
    (LINUX, "glibc.malloc.hugetlb=1"),
    (with_(thp="always"), "glibc.malloc.hugetlb=1"),
    (with_(libc_version=(2, 35)), "glibc.malloc.hugetlb=1"),
    # the user's own tunables are kept, ours appended
    (with_(tunables="glibc.malloc.trim_threshold=0"), "glibc.malloc.trim_threshold=0:glibc.malloc.hugetlb=1"),
    (with_(tunables="glibc.malloc.hugetlb=0"), None),        # the user's choice stands
    (with_(tunables="glibc.malloc.hugetlb=1"), None),        # already restarted: no loop
    (with_(libc_version=(2, 31)), None),                     # Ubuntu 20.04: no such tunable
    (with_(thp="never"), None),
    (with_(thp=""), None),                                   # no THP in the kernel (WSL1, some containers)
    (with_(libc="", libc_version=()), None),                 # musl (Alpine)
    (with_(system="Darwin", libc="", libc_version=()), None),
    (with_(system="Windows", libc="", libc_version=()), None),
    (with_(cuda=True), None),                                # training goes to the GPU
    (with_(opt_out=True), None),
])
def test_decide(facts, value):
    got, why = decide(facts)
    assert got == value
    assert why


def test_why_names_the_reason():
    assert "2.31" in decide(with_(libc_version=(2, 31)))[1]
    assert "never" in decide(with_(thp="never"))[1]
    assert "TOOLKIT_MALLOC" in decide(with_(opt_out=True))[1]


@pytest.mark.parametrize("text, mode", [("always [madvise] never\n", "madvise"), ("[always] madvise never", "always"),
                                        ("always madvise [never]", "never"), ("", "")])
def test_thp_mode(text, mode):
    assert allocator.thp_mode(text) == mode


CHURN = """
import os, resource, sys
from toolkit.core import allocator
if sys.argv[1:] == ["relaunch"]:
    allocator.relaunch()
import torch
def churn():
    r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        t = torch.empty(64 * 2**20, dtype=torch.uint8); t.fill_(1); del t  # past glibc's largest mmap threshold
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0
churn()
print(os.environ.get("GLIBC_TUNABLES", ""), churn(), allocator.state(), sep="|")
"""


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in (allocator.ENV, allocator.OPT_OUT)}


def _churn(*args):
    out = subprocess.run([sys.executable, "-c", CHURN, *args], capture_output=True, text=True, env=_clean_env(), cwd=ROOT,
                         check=True).stdout.strip().splitlines()[-1]
    tunables, faults, state = out.split("|")
    return tunables, int(faults), state


def test_relaunch_on_this_machine():
    """The restart really happens where `decide` says so, and glibc then keeps big blocks in huge
    pages: a 64 MiB block allocated and freed 10 times faults in a fraction of the pages."""
    plain_tunables, plain_faults, plain_state = _churn()
    assert plain_tunables == "" and plain_state.startswith("system default (")
    tunables, faults, state = _churn("relaunch")
    with mock.patch.dict(os.environ, _clean_env(), clear=True):
        value, why = decide(allocator.detect())
    if value is None:
        assert tunables == "" and state == f"system default ({why})"
        return
    assert tunables == value and state == allocator.HUGETLB
    assert "not started by `toolkit finetune`" in plain_state
    assert faults < plain_faults / 4, (faults, plain_faults)


@pytest.mark.parametrize("entry", [True, False])
def test_finetune_restarts_only_from_the_command_line(monkeypatch, entry):
    """`toolkit finetune` started from the shell restarts before training; `cli.main(argv)` called
    from Python never restarts the caller's process."""
    import argparse

    from toolkit import cli
    from toolkit.commands import finetune as command
    from toolkit.finetune import trainer

    calls = []
    monkeypatch.setattr(allocator, "relaunch", lambda: calls.append("relaunch"))
    monkeypatch.setattr(trainer, "finetune", lambda *a, **k: calls.append("train") or "run")
    if entry:
        parsed = cli.build_parser().parse_args(["finetune", "recipes/finance"])
        command.run(argparse.Namespace(**{**vars(parsed), "process_entry": True}))
        assert calls == ["relaunch", "train"]
    else:
        assert cli.main(["finetune", "recipes/finance"]) == 0
        assert calls == ["train"]
