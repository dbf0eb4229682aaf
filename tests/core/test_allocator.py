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


HUGE = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
TC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"
TC_ENV = {"LD_PRELOAD": TC, allocator.PRELOAD_WAS: "", **allocator.TCMALLOC_ENV}


@pytest.mark.parametrize("facts, value", [
    (LINUX, HUGE),
    (with_(thp="always"), HUGE),
    (with_(libc_version=(2, 35)), HUGE),
    # the user's own tunables are kept, ours appended
    (with_(tunables="glibc.malloc.trim_threshold=0"),
     {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0:glibc.malloc.hugetlb=1"}),
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
    # tcmalloc installed: preferred, whatever glibc's version or the kernel's huge pages
    (with_(tcmalloc=TC), TC_ENV),
    (with_(tcmalloc=TC, libc_version=(2, 31)), TC_ENV),
    (with_(tcmalloc=TC, thp="never"), TC_ENV),
    (with_(tcmalloc=TC, tunables="glibc.malloc.hugetlb=1"), TC_ENV),
    # the user's own preloads are kept after it, and put back in the restarted process
    (with_(tcmalloc=TC, preload="/opt/intel/libiomp5.so"),
     {**TC_ENV, "LD_PRELOAD": f"{TC}:/opt/intel/libiomp5.so", allocator.PRELOAD_WAS: "/opt/intel/libiomp5.so"}),
    (with_(tcmalloc=TC, glibc_only=True), HUGE),            # TOOLKIT_MALLOC=glibc
    (with_(tcmalloc=TC, loaded=TC), None),                   # already restarted: no loop
    (with_(tcmalloc=TC, preload="/somewhere/libtcmalloc.so"), None),  # the user's own tcmalloc
    (with_(tcmalloc=TC, cuda=True), None),
    (with_(tcmalloc=TC, opt_out=True), None),
    (with_(tcmalloc=TC, libc="", libc_version=()), None),   # built against glibc: not on musl
])
def test_decide(facts, value):
    got, why = decide(facts)
    assert got == value
    assert why


@pytest.mark.parametrize("facts, kind, hint", [
    (LINUX, "glibc", True),                                  # glibc's huge pages; tcmalloc would be taken
    (with_(tcmalloc=TC), "tcmalloc", False),
    (with_(loaded=TC), "tcmalloc", False),                   # the restarted process
    (with_(preload="/opt/libtcmalloc.so"), "tcmalloc", False),
    (with_(tcmalloc=TC, glibc_only=True), "glibc", False),   # TOOLKIT_MALLOC=glibc: the user's choice
    (with_(opt_out=True), "glibc", False),
    (with_(cuda=True), "glibc", False),
    (with_(system="Darwin", libc="", libc_version=()), "glibc", False),
    (with_(libc_version=(2, 31)), "glibc", True),            # neither: the tip still applies
])
def test_training_allocator_and_the_install_hint(facts, kind, hint):
    """The time model prices the allocator training runs under; the run's output names tcmalloc's
    package where it would be taken but is missing."""
    assert allocator.training_allocator(facts) == kind
    assert bool(allocator.install_hint(facts)) is hint
    if hint:
        assert "libtcmalloc-minimal4" in allocator.install_hint(facts)


def test_the_plan_and_the_time_model_name_one_allocator_per_device(monkeypatch):
    """`training_allocator_on`: this machine's training allocator on a CPU (what the memory plan and the
    time model both price), "glibc" for a CUDA run, whose host heap neither prices."""
    assert allocator.training_allocator_on("cpu") == allocator.training_allocator(allocator.detect())
    monkeypatch.setattr(allocator, "detect", lambda: pytest.fail("a CUDA run reads no allocator facts"))
    assert allocator.training_allocator_on("cuda:0") == allocator.training_allocator_on("cuda") == "glibc"


def test_find_tcmalloc_prefers_the_minimal_library_then_the_first_folder(tmp_path):
    first, second = tmp_path / "venv", tmp_path / "system"
    for d in (first, second):
        d.mkdir()
    assert allocator.find_tcmalloc([str(first), str(second)]) == ""
    (first / "libtcmalloc.so.4").write_bytes(b"")
    assert allocator.find_tcmalloc([str(first), str(second)]) == str(first / "libtcmalloc.so.4")
    (second / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert allocator.find_tcmalloc([str(first), str(second)]) == str(second / "libtcmalloc_minimal.so.4")
    (first / "libtcmalloc_minimal.so.4").write_bytes(b"")
    assert allocator.find_tcmalloc([str(first), str(second)]) == str(first / "libtcmalloc_minimal.so.4")


def test_library_dirs_hold_the_environment_and_debian_multiarch():
    import sysconfig

    dirs = allocator.library_dirs({"CONDA_PREFIX": "/opt/conda"})
    assert dirs[0] == os.path.join(sys.prefix, "lib") and "/opt/conda/lib" in dirs
    arch = sysconfig.get_config_var("MULTIARCH")
    if arch:
        assert f"/usr/lib/{arch}" in dirs
    assert len(dirs) == len(set(dirs))


def test_current_names_what_this_process_allocates_with(monkeypatch):
    monkeypatch.setattr(allocator, "loaded_tcmalloc", lambda: "")
    monkeypatch.delenv(allocator.ENV, raising=False)
    assert allocator.current() == "glibc"
    monkeypatch.setenv(allocator.ENV, f"glibc.malloc.trim_threshold=0:{allocator.HUGETLB}")
    assert allocator.current() == "glibc huge pages"
    monkeypatch.setattr(allocator, "loaded_tcmalloc", lambda: TC)
    assert allocator.current() == "tcmalloc"


def test_loaded_tcmalloc_reads_the_process_maps(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
                    "7f02-7f03 r-xp 00000000 08:01 43 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.9\n"
                    "7f04-7f05 rw-p 00000000 00:00 0 \n")
    assert allocator.loaded_tcmalloc(str(maps)) == "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.9"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 42 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert allocator.loaded_tcmalloc(str(maps)) == ""
    assert allocator.loaded_tcmalloc(str(tmp_path / "absent")) == ""


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
print(os.environ.get("GLIBC_TUNABLES", ""), os.environ.get("LD_PRELOAD", "-"), churn(), allocator.state(), sep="|")
"""
OURS = (allocator.ENV, allocator.OPT_OUT, allocator.PRELOAD, allocator.PRELOAD_WAS, *allocator.TCMALLOC_ENV)


def _clean_env(**extra) -> dict:
    return {**{k: v for k, v in os.environ.items() if k not in OURS}, **extra}


def _churn(*args, **extra):
    out = subprocess.run([sys.executable, "-c", CHURN, *args], capture_output=True, text=True, env=_clean_env(**extra),
                         cwd=ROOT, check=True).stdout.strip().splitlines()[-1]
    tunables, preload, faults, state = out.split("|")
    return tunables, preload, int(faults), state


@pytest.mark.parametrize("setting", ["", "glibc"])
def test_relaunch_on_this_machine(setting):
    """The restart really happens where `decide` says so, and the allocator it starts under then keeps
    big blocks: a 64 MiB block allocated and freed 10 times faults in a fraction of the pages. Under
    tcmalloc the restarted process has LD_PRELOAD back as it was (unset), so its children run as
    before. `TOOLKIT_MALLOC=glibc` takes glibc's huge pages where tcmalloc is installed."""
    extra = {allocator.OPT_OUT: setting} if setting else {}
    plain_tunables, plain_preload, plain_faults, plain_state = _churn(**extra)
    assert plain_tunables == "" and plain_preload == "-" and plain_state.startswith("system default (")
    tunables, preload, faults, state = _churn("relaunch", **extra)
    with mock.patch.dict(os.environ, _clean_env(**extra), clear=True):
        env, why = decide(allocator.detect())
    if env is None:
        assert tunables == "" and state == f"system default ({why})"
        return
    assert "not started by `toolkit finetune`" in plain_state
    assert faults < plain_faults / 4, (faults, plain_faults)
    if allocator.PRELOAD in env:
        assert not setting
        assert state == f"tcmalloc ({os.path.realpath(env[allocator.PRELOAD])}, TCMALLOC_RELEASE_RATE=0)"
        assert preload == "-" and tunables == ""
    else:
        assert tunables == env[allocator.ENV] and state == allocator.HUGETLB and preload == "-"


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


RELEASE = """
import ctypes
from toolkit.core import allocator
c = ctypes.CDLL(None)  # the process's malloc: tcmalloc's where it is preloaded
c.malloc.restype, c.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))
blocks = [c.malloc(32768) for _ in range(3000)]  # 96 MiB of blocks below glibc's mmap threshold
for b in blocks:
    ctypes.memset(b, 1, 32768)
keep = c.malloc(32768)  # above them: glibc's heap top stays, so only a trim hands them back
for b in blocks:
    c.free(b)
before = rss()
allocator.release_free_memory()
print(allocator.current(), before - rss())
"""


@pytest.mark.parametrize("kind", ["glibc", "tcmalloc"])
def test_release_free_memory_hands_freed_pages_back(kind):
    """What training freed leaves the resident set before the report: glibc's `malloc_trim` or tcmalloc's
    `ReleaseFreeMemory` (under the TCMALLOC_RELEASE_RATE=0 `toolkit finetune` restarts with, tcmalloc
    itself never would)."""
    extra = {}
    if kind == "tcmalloc":
        lib = allocator.find_tcmalloc(allocator.library_dirs())
        if not lib:
            pytest.skip("no tcmalloc on this machine")
        extra = {allocator.PRELOAD: lib, "TCMALLOC_RELEASE_RATE": "0"}
    out = subprocess.run([sys.executable, "-c", RELEASE], capture_output=True, text=True, env=_clean_env(**extra),
                         cwd=ROOT, check=True).stdout.split()
    assert out[0] == kind and int(out[1]) > 64 * 2**20, out
