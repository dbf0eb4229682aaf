"""`toolkit finetune RECIPE --dry-run`: everything a run would decide, without training or writing.

It goes through the same steps as `toolkit.finetune.trainer.finetune` up to loading the model:
the same recipe reader (so a bad recipe fails with the same message), the same data reader
(mixing included), the same base resolution (auto pick, offline and fallback handling), then
loads only the tokenizer to count tokens and show one training example with its loss mask,
and asks the planner for the memory estimate of that exact run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

UNDERLINE, RESET = "\x1b[4m", "\x1b[24m"


@dataclass
class SplitStats:
    name: str
    examples: int
    kept: int
    tokens: int
    trained_tokens: int
    min_len: int
    median_len: int
    max_len: int
    truncated: int
    dropped: int

    def line(self, max_seq_len: int) -> str:
        return (f"{self.name}: {self.examples} examples, {self.tokens} tokens ({self.trained_tokens} trained); "
                f"per example min {self.min_len} / median {self.median_len} / max {self.max_len}; "
                f"{self.truncated} truncated, {self.dropped} dropped at max_seq_len={max_seq_len}")


@dataclass
class DryRun:
    """What a run of the recipe would use. `lines(color)` is what the command prints."""

    resolved_yaml: str
    base: str  # the model that will be trained
    base_note: str  # "" or why the fallback is used
    announcements: list[str]
    device: str
    dtype: str
    dtype_reason: str
    stats: list[SplitStats]
    max_seq_len: int
    example_source: str
    example_ids: list[int] = field(repr=False, default_factory=list)
    example_labels: list[int] = field(repr=False, default_factory=list)
    example_pieces: list[tuple[str, bool]] = field(default_factory=list)  # (text, trained)
    estimate: dict | None = None  # the planner's Estimate.to_dict(), None when there is none
    no_estimate: str = ""  # why there is none ("" = the model isn't in the catalog)

    def lines(self, color: bool = False) -> list[str]:
        from toolkit.core.units import gib

        out = ["== resolved recipe", self.resolved_yaml.rstrip(), "", "== model"]
        out += self.announcements
        out.append(f"trains: {self.base} on {self.device} ({self.dtype})"
                   + (" (the fallback: the recipe's base can't be used, see above)" if self.base_note else ""))
        if self.dtype_reason:
            out.append(f"compute dtype: {self.dtype_reason}")
        out += ["", "== data"] + [s.line(self.max_seq_len) for s in self.stats]
        legend = "underlined" if color else "[[...]]"
        out += ["", f"== one training example ({self.example_source}); {legend} = trained tokens (loss), "
                    "the rest is context only",
                render_pieces(self.example_pieces, color), "", "== estimate (planner)"]
        e = self.estimate
        if e is None:
            why = self.no_estimate or "not in the estimator's catalog"
            out.append(f"{self.base}: {why}; no memory estimate")
        else:
            parts = ", ".join(f"{k} {gib(v)}" for k, v in e["components"].items())
            out.append(f"peak memory ~{gib(e['total_bytes'])} ({parts})")
            if e.get("budget_bytes") is not None:
                out.append(f"usable {gib(e['budget_bytes'])} (available memory minus the safety margin): "
                           f"{'fits' if e['fits'] else 'DOES NOT FIT'} "
                           f"(headroom {gib(e['headroom_bytes'])})")
            out += time_lines(e.get("time"))
        out += ["", "dry run: nothing written, nothing trained"]
        return out


def time_lines(t) -> list[str]:
    """`run_time`'s result as lines for people."""
    from toolkit.estimate.timeplan import fmt_duration

    if not isinstance(t, dict):
        return [f"time: {t or 'no estimate'}"]
    out = []
    if "train_wall_s" in t:
        out.append(f"time: {fmt_duration(t['train_wall_s'])} for {t['steps']} steps of {t['tokens_per_step']} tokens "
                   f"(~{t['train_tokens_per_s']:g} training tokens/s; start-up and model loading "
                   f"~{t['startup_s']:.0f} s, evals and report ~{t['evals_and_report_s']:.0f} s included)")
    out.append(f"rates: {t['source']}")
    return out


def render_pieces(pieces: list[tuple[str, bool]], color: bool) -> str:
    """Text with trained pieces marked: ANSI underline for a terminal, [[...]] otherwise."""
    if color:
        return "".join(f"{UNDERLINE}{t}{RESET}" if trained else t for t, trained in pieces)
    return "".join(f"[[{t}]]" if trained else t for t, trained in pieces)


def mask_pieces(tok, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """Consecutive runs of trained / untrained tokens, decoded: [(text, trained), ...]."""
    pieces: list[tuple[str, bool]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or (labels[i] != -100) != (labels[start] != -100):
            pieces.append((tok.decode(ids[start:i]), labels[start] != -100))
            start = i
    return pieces


def _stats(name: str, n_examples: int, split) -> SplitStats:
    from toolkit.finetune.scaffold import length_stats

    lo, med, hi = length_stats([len(x) for x in split.input_ids])
    return SplitStats(name, n_examples, len(split.input_ids), split.n_tokens, split.n_trained, lo, med, hi,
                      split.n_truncated, split.n_dropped)


def dry_run(recipe_spec, overrides: Sequence[str] = (), gpu: bool | None = None) -> DryRun:
    """Resolve the recipe, read its data, resolve the base and estimate the run; load no model."""
    from toolkit.core import hardware
    from toolkit.core.chat_tokens import fix_chat_special_tokens
    from toolkit.core.loading import load_tokenizer
    from toolkit.finetune import data as data_mod
    from toolkit.finetune import recipe as recipe_mod
    from toolkit.finetune.base_model import context_warning, resolve_base
    from toolkit.finetune.fused_lora import dropout_note

    # The same order as finetune(): recipe, data, device; any UserError surfaces before a model.
    rec = recipe_mod.load(recipe_spec, overrides, gpu=gpu)
    train_ex, eval_ex = data_mod.read_splits(rec)
    said: list[str] = [leak] if (leak := data_mod.held_out_leak(train_ex, eval_ex)) else []
    dev = hardware.device()
    dtype, dtype_reason = hardware.dtype_choice(dev, "train", rec.method.compute_dtype, "method.compute_dtype")
    choice = resolve_base(rec, announce=said.append, device=dev, dtype=dtype)
    if choice.fallback_reason:
        rec = recipe_mod.for_fallback(rec, overrides)
    from toolkit.finetune.plan import resolve_method

    rec, why = resolve_method(rec, choice.spec, dev, dtype, hardware.detect().available_bytes)
    if why:
        said.append(why)
    if (warning := context_warning(choice, rec.data.max_seq_len)):
        said.append(warning)
    if (note := dropout_note(rec.lora.dropout, dev)):
        said.append(note)
    tok = load_tokenizer(choice.source)
    fix_chat_special_tokens(tok)
    d = rec.data
    train = data_mod.tokenize_split(tok, train_ex, d.max_seq_len, d.overlong, d.completion_only_loss, "train")
    stats = [_stats("train", len(train_ex), train)]
    if eval_ex:
        held = data_mod.tokenize_split(tok, eval_ex, d.max_seq_len, d.overlong, d.completion_only_loss, "eval")
        stats.append(_stats("held-out", len(eval_ex), held))
    ids, labels = train.input_ids[0], train.labels[0]
    est, no_estimate = run_estimate(rec, choice.spec, dev, dtype, train.n_trained / max(1, train.n_tokens),
                                 [len(x) for x in train.input_ids])
    return DryRun(recipe_mod.dump(rec), choice.spec, choice.fallback_reason, said, dev, dtype, dtype_reason, stats,
                  d.max_seq_len, _relative(train.examples[0].source), ids, labels, mask_pieces(tok, ids, labels),
                  est, no_estimate)


def _relative(source: str) -> str:
    """`file:line` under the current directory, shortened to a relative path."""
    import os

    here = os.getcwd() + os.sep
    return source[len(here):] if source.startswith(here) else source


def run_estimate(rec, spec: str, dev: str, dtype: str, labelled_fraction: float,
                 train_lengths: list[int]) -> tuple[dict | None, str]:
    """(the planner's estimate of this run with its time, "") or (None, why there is none; "" = not in
    the catalog)."""
    from toolkit.estimate.catalog import CATALOG

    e, why = planned_memory(rec, spec, dev, dtype, train_lengths)
    if e is None:
        return None, why
    out = e.to_dict()
    out["time"] = run_time(rec, CATALOG[spec], e, dtype, labelled_fraction, train_lengths)
    return out, ""


def planned_memory(rec, spec: str, dev: str, dtype: str, train_lengths: Sequence[int] | None = None):
    """(the planner's `Estimate` of this run's memory, "") or (None, why there is none; "" = not in the
    catalog). `train_lengths`: the training examples' token counts, as the dry run and the trainer
    tokenized them (`plan.plan_inputs`)."""
    from toolkit.core.errors import UserError
    from toolkit.core.hardware import detect
    from toolkit.estimate.catalog import CATALOG
    from toolkit.estimate.planner import estimate, usable_bytes
    from toolkit.finetune.plan import plan_inputs

    if spec not in CATALOG:
        return None, ""
    try:
        return estimate(CATALOG[spec], **plan_inputs(rec, dev, dtype, train_lengths).as_kwargs(),
                        budget_bytes=usable_bytes(detect().available_bytes)), ""
    except UserError as exc:
        # The model is in the catalog: what the estimator refused, not "not in the catalog".
        return None, f"the estimator refused this run ({exc})"


def run_time(rec, facts, est, dtype: str, labelled_fraction: float, train_lengths: Sequence[int]) -> dict:
    """The time model's fields for this run (`toolkit.estimate.timeplan`). `train_lengths`: the
    training examples' token counts (see `plan.run_shape`)."""
    from toolkit.estimate.timeplan import rates_here, time_fields
    from toolkit.finetune.plan import plan_inputs, run_shape

    return time_fields(facts, est, rates_here(dtype), targets=plan_inputs(rec, est.device, dtype).targets,
                       labelled_fraction=labelled_fraction, run=run_shape(rec, train_lengths),
                       lora_dropout=rec.lora.dropout)
