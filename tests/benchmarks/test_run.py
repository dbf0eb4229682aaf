"""benchmarks/run.py: the section headers name the CPU; results are written whole."""

import json

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
