"""`toolkit finetune` as a user runs it, in a process of its own: for the benchmarks that time it
end to end (`bench_train`) or need a fresh interpreter per engine (`gpu_check`: Unsloth has to be
imported before TRL/transformers)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(recipe: Path, runs_dir: Path, overrides=(), timeout_s: float | None = None, env=None) -> Path:
    """Run `toolkit finetune RECIPE --runs-dir RUNS_DIR [--set KEY=VALUE ...]` (in `env`, default this
    process's environment) and return the run folder. Its output goes to RUNS_DIR.log beside the runs;
    a non-zero exit, or a run past `timeout_s`, raises RuntimeError with the log's last lines."""
    cmd = [sys.executable, "-m", "toolkit", "finetune", str(recipe), "--runs-dir", str(runs_dir)]
    for item in overrides:
        cmd += ["--set", item]
    log = runs_dir.with_suffix(".log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        try:
            proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout_s, env=env)
        except subprocess.TimeoutExpired:
            tail = log.read_text().strip().splitlines()[-5:]
            raise RuntimeError(f"toolkit finetune {recipe} still running after {timeout_s:g} s: "
                               + " / ".join(tail)) from None
    if proc.returncode:
        tail = log.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"toolkit finetune {recipe} exited {proc.returncode}: " + " / ".join(tail))
    return (runs_dir / "latest").resolve()
