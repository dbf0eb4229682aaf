"""benchmarks/run.py: the section headers name the CPU; results are written whole."""

import json

import pytest

from benchmarks import run

ZEN4 = """processor	: 0
model name	: AMD EPYC
cpu family	: 25
model		: 17
stepping	: 1
flags		: fpu avx2 fma avx512f avx512_bf16

processor	: 1
model name	: AMD EPYC
cpu family	: 25
model		: 17
stepping	: 1
flags		: fpu avx2 fma avx512f avx512_bf16
"""
ARM = """processor	: 0
Features	: fp asimd bf16
CPU implementer	: 0x41
CPU part	: 0xd0c
"""


def test_machine_label_tells_cpus_of_one_name_apart():
    zen4 = run.machine_label(ZEN4)
    assert "AMD EPYC family 25 model 17 stepping 1 (avx512_bf16)" in zen4
    assert run.machine_label(ZEN4.replace(": 25", ": 26").replace(": 17", ": 2")) != zen4
    assert "implementer 0x41 part 0xd0c (neon)" in run.machine_label(ARM)
    # No /proc/cpuinfo (macOS, Windows): platform's processor name, no ISA level guessed.
    assert "(" not in run.machine_label("").split(", ")[1]


def test_write_renders_every_section_with_its_machine(tmp_path):
    results = {"a": {"title": "A", "rows": [{"x": 1}], "when": "2026-12-05 17:00 UTC",
                     "machine": run.machine_label(ZEN4), "wall_s": 1.0}}
    run.write(results, tmp_path / "results.json")
    assert json.loads((tmp_path / "results.json").read_text()) == results
    md = (tmp_path / "RESULTS.md").read_text()
    assert "## A" in md and "family 25 model 17" in md and "| 1 |" in md
    assert sorted(p.name for p in tmp_path.iterdir()) == ["RESULTS.md", "results.json"]


ZEN3 = ZEN4.replace(": 17", ": 1").replace(" avx512f avx512_bf16", "")


def test_a_bench_keeps_its_last_run_on_each_kind_of_cpu(tmp_path):
    """A run on an AVX2-only CPU is kept beside the last one on a native-bf16 CPU: the issue's targets
    differ between the two and neither machine can measure the other's."""
    zen4, zen3 = run.machine_label(ZEN4), run.machine_label(ZEN3)
    assert (run.machine_kind(zen4), run.machine_kind(zen3), run.machine_kind(run.machine_label(""))) == (
        "avx512_bf16", "avx2", "")
    assert run.key("train", zen3) == "train@avx2" and run.key("train", "") == "train"
    path = tmp_path / "results.json"
    # An entry written before the kind was part of the key moves to its key on loading.
    old = {"train": {"title": "T", "rows": [{"x": 1}], "when": "2026-12-06 00:01 UTC", "machine": zen4, "wall_s": 1}}
    path.write_text(json.dumps(old))
    results = run.load(path)
    assert list(results) == ["train@avx512_bf16"]
    results[run.key("train", zen3)] = {**old["train"], "rows": [{"x": 2}], "when": "2026-12-06 06:00 UTC",
                                        "machine": zen3}
    run.write(results, path)
    again = run.load(path)
    assert sorted(again) == ["train@avx2", "train@avx512_bf16"]
    assert run.latest(again, "train")["rows"] == [{"x": 2}]
    assert run.latest(again, "train", "avx512_bf16")["rows"] == [{"x": 1}]
    with pytest.raises(KeyError, match="no run of bench 'train' on a CPU of ISA level amx"):
        run.latest(again, "train", "amx")
    md = (tmp_path / "RESULTS.md").read_text()
    assert "## T · avx2 CPU" in md and "## T · avx512_bf16 CPU" in md
