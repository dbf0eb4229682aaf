"""`make bench`: run every benchmarks/bench_*.py and write benchmarks/results.json + RESULTS.md.

Each bench module exposes `run() -> dict` with keys `title` (str), `rows` (list of dicts, one
per measurement) and optionally `notes` (str). Ratios are measured within one run; absolute
times on a shared 2-core machine are noisy.

A bench's last run is kept for each kind of CPU (its ISA level: `train@avx2`, `train@avx512_bf16`), so
a run on a CPU without native bf16 does not erase what a CPU with it measured: the issue's targets
differ between the two, and a machine of one kind cannot measure the other's.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def _table(rows: list[dict]) -> str:
    """Markdown tables, one per kind of row: consecutive rows with the same `measure` (or, without
    one, the same columns) share a table, so speed rows and accuracy rows don't share columns."""
    if not rows:
        return "(no rows)\n"
    kind = lambda r: r.get("measure", tuple(r))  # noqa: E731
    groups: list[list[dict]] = []
    for r in rows:
        if groups and kind(groups[-1][0]) == kind(r):
            groups[-1].append(r)
        else:
            groups.append([r])
    out = []
    for group in groups:
        cols = list(group[0])
        for r in group[1:]:
            cols += [c for c in r if c not in cols]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in group]
        out.append("\n".join(lines) + "\n")
    return "\n".join(out)


def machine_label(cpuinfo: str | None = None) -> str:
    """The section header's machine: the CPU's name and model numbers (VMs name different CPUs alike,
    "AMD EPYC" for a Zen 4 and a Zen 5, so sections run on different hosts are told apart by these),
    its ISA level, cores and Python."""
    from toolkit.core import capability

    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    if cpuinfo:
        cap = capability.cpu_record(cpuinfo)
        cpu = f"{cap.name} {cap.model_id} ({cap.isa})".replace("  ", " ")
    else:  # no /proc/cpuinfo (macOS, Windows): no ISA level guessed
        cpu = platform.processor() or "unknown CPU"
    return f"{platform.machine()}, {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def machine_kind(label: str) -> str:
    """The ISA level a `machine_label` names in brackets ("avx2", "avx512_bf16"), "" where it names none."""
    m = re.search(r"\(([a-z0-9_]+)\), \d+ cores", label)
    return m.group(1) if m else ""


def key(name: str, machine: str) -> str:
    """results.json's key of bench `name` run on `machine` (a `machine_label`)."""
    kind = machine_kind(machine)
    return f"{name}@{kind}" if kind else name


def load(results_path: Path) -> dict:
    """results.json, its entries keyed by `key` (entries written before the kind was part of the key
    are moved to theirs)."""
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    return {key(k.split("@")[0], v.get("machine", "")): v for k, v in results.items()}


def latest(results: dict, name: str, kind: str | None = None) -> dict:
    """The last run of bench `name` (on a CPU of ISA level `kind`, where one is named)."""
    runs = [v for k, v in results.items() if k.split("@")[0] == name
            and (kind is None or machine_kind(v.get("machine", "")) == kind)]
    if not runs:
        where = f" on a CPU of ISA level {kind}" if kind else ""
        raise KeyError(f"no run of bench {name!r}{where} in results.json")
    return max(runs, key=lambda v: v.get("when", ""))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("names", nargs="*", help="bench names (e.g. estimate train); default all")
    args = ap.parse_args(argv)
    if argv is None:
        # The training benches run under the allocator setting `toolkit finetune` runs under (the
        # naive baseline too, so the ratio credits ours only for its code).
        from toolkit.core import allocator

        allocator.relaunch()
    names = args.names or sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))
    results_path = HERE / "results.json"
    results = load(results_path)
    for name in names:
        print(f"== bench {name}", flush=True)
        t0 = time.time()
        res = importlib.import_module(f"benchmarks.bench_{name}").run()
        res["wall_s"] = round(time.time() - t0, 1)
        res["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        res["machine"] = machine_label()
        results[key(name, res["machine"])] = res
        print(_table(res["rows"]), flush=True)
    write(results, results_path)
    return 0


def write(results: dict, results_path: Path) -> None:
    """results.json and RESULTS.md from `results` (each written to a temp name, then renamed)."""
    tmp = results_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, results_path)
    md = ["# Benchmark results", "", "Written by `make bench` (benchmarks/run.py); quoted in the README.", ""]
    for name, res in sorted(results.items()):
        kind = machine_kind(res["machine"])
        md += [f"## {res.get('title', name)}" + (f" · {kind} CPU" if kind else ""), "",
               f"_{res['when']} · {res['machine']} · {res['wall_s']} s_", ""]
        md.append(_table(res["rows"]))
        if res.get("notes"):
            md += [res["notes"], ""]
    tmp = (results_path.parent / "RESULTS.md").with_suffix(".tmp")
    tmp.write_text("\n".join(md))
    os.replace(tmp, results_path.parent / "RESULTS.md")


if __name__ == "__main__":
    sys.exit(main())
