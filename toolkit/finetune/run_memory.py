"""run.json `memory`: a run's peak memory as the planner put it and as the run measured it.

The plan's figure is the dry run's (`dry_run.planned_memory`, the planner for this run's exact
settings); the measure is `toolkit.core.peak_memory`'s, from the start of training to its end
(`training_peak_bytes`) and to the end of the report (`run_peak_bytes`, added by the trainer).
"""

from __future__ import annotations


def record(rec, spec: str, dev: str, dtype: str, trained: dict | None, train_lengths=None) -> dict:
    """run.json `memory`: the planner's peak for this run (the dry run's figure, for the same tokenized
    `train_lengths`; None for a model outside its catalog) and the training's measured peak
    (`toolkit.core.peak_memory`; None when no training ran, a resumed run that only makes its report)."""
    from toolkit.finetune.dry_run import planned_memory

    est, _ = planned_memory(rec, spec, dev, dtype, train_lengths)
    out = {"planned_peak_bytes": est.total_bytes if est else None}
    if trained is not None:
        out.update(training_peak_bytes=trained["peak_bytes"], measure=trained["measure"])
        if "reserved_bytes" in trained:
            out["training_reserved_bytes"] = trained["reserved_bytes"]
    return out


def line(memory: dict) -> str:
    """'memory: training peaked at 2.43 GiB (...); the plan said ~2.15 GiB', or "" with nothing measured."""
    from toolkit.core.units import gib

    if memory.get("training_peak_bytes") is None:
        return ""
    planned = memory.get("planned_peak_bytes")
    return (f"memory: training peaked at {gib(memory['training_peak_bytes'])} ({memory['measure']})"
            + (f"; the plan said ~{gib(planned)}" if planned else ""))


def add_run_peak(memory: dict, measured: dict) -> None:
    """Set `run_peak_bytes` from `measured` (`peak_memory.peak` after the report), at least the training's:
    Linux's VmHWM is the larger of a high-water mark the kernel updates only where it unmaps pages and the
    resident set now, so a later read can be lower than an earlier one (by 250 KB in a test run)."""
    memory["run_peak_bytes"] = max(measured["peak_bytes"], memory.get("training_peak_bytes") or 0)
