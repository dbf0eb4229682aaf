"""`make bench`: run every benchmarks/bench_*.py and write benchmarks/results.json + RESULTS.md.

Each bench module exposes `run() -> dict` with keys `title` (str), `rows` (list of dicts, one
per measurement) and optionally `notes` (str). Ratios are measured within one run; absolute
times on a shared 2-core machine are noisy.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def _table(rows: list[dict]) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(rows[0])
    for r in rows[1:]:
        cols += [c for c in r if c not in cols]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("names", nargs="*", help="bench names (e.g. estimate train); default all")
    args = ap.parse_args(argv)
    names = args.names or sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))
    results_path = HERE / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name in names:
        print(f"== bench {name}", flush=True)
        t0 = time.time()
        res = importlib.import_module(f"benchmarks.bench_{name}").run()
        res["wall_s"] = round(time.time() - t0, 1)
        res["when"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        res["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
        results[name] = res
        print(_table(res["rows"]), flush=True)
    tmp = results_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, results_path)
    md = ["# Benchmark results", "", "Written by `make bench` (benchmarks/run.py); quoted in the README.", ""]
    for name, res in sorted(results.items()):
        md += [f"## {res.get('title', name)}", "", f"_{res['when']} · {res['machine']} · {res['wall_s']} s_", ""]
        md.append(_table(res["rows"]))
        if res.get("notes"):
            md += [res["notes"], ""]
    tmp = (HERE / "RESULTS.md").with_suffix(".tmp")
    tmp.write_text("\n".join(md))
    os.replace(tmp, HERE / "RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
