"""Range and choice checks of a fine-tune recipe: the values a recipe may hold, once typed.

`toolkit.finetune.recipe` reads the YAML onto its dataclasses and rejects unknown keys and wrong
types; what is left to check is meaning: a rate in (0, 1), a scheduler among those known, LoRA targets
the estimator can size, early stopping that has an eval set. Those rules live here, apart from the
reading, because they are a list of their own that grows one field at a time, and because `load()`
and `for_fallback()` run them on every variant of a recipe (the base, each profile, the `--set`
overrides) whichever one the machine ends up applying.

Standard library only (the estimator's names are imported when a check needs them), like recipe.py:
`toolkit finetune --help` stays instant.
"""

from __future__ import annotations

import typing

from toolkit.core.errors import UserError

if typing.TYPE_CHECKING:
    from toolkit.finetune.recipe import Recipe

METHODS = ("qlora", "lora", "full", "auto")  # auto: toolkit.finetune.plan.choose_method
FORMATS = ("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
DTYPES = ("auto", "bfloat16", "float16", "float32")


def check_ranges(recipe: Recipe, src: str) -> None:
    """Raise `UserError` (`<src>: <key> <what is wrong>`) on the first value out of its range or choices."""
    def bad(key, msg):
        raise UserError(f"{src}: {key} {msg}")

    def choice(key, value, options):
        if value not in options:
            bad(key, f"must be one of {', '.join(options)}; got {value!r}")

    m, lo, d, t, e = recipe.method, recipe.lora, recipe.data, recipe.training, recipe.eval
    if not recipe.model.base_model:
        bad("model.base_model", "is required")
    if recipe.model.hub_timeout_s <= 0:
        bad("model.hub_timeout_s", "must be > 0")
    if recipe.model.time_budget:
        from toolkit.estimate.timeplan import parse_duration

        try:
            parse_duration(recipe.model.time_budget, "model.time_budget")
        except UserError as exc:
            bad("model.time_budget", str(exc).split(": ", 1)[-1])
    choice("method.name", m.name, METHODS)
    choice("method.quant_type", m.quant_type, ("nf4", "fp4"))
    choice("method.compute_dtype", m.compute_dtype, DTYPES)
    if lo.r < 1:
        bad("lora.r", f"must be >= 1; got {lo.r}")
    if lo.alpha < 1:
        bad("lora.alpha", f"must be >= 1; got {lo.alpha}")
    if not 0.0 <= lo.dropout < 1.0:
        bad("lora.dropout", f"must be in [0, 1); got {lo.dropout}")
    if not lo.target_modules:
        bad("lora.target_modules", "must name at least one module (or all-linear)")
    _check_targets(lo.target_modules, bad)
    if not d.train:
        bad("data.train", "is required")
    if isinstance(d.train, list):
        for i, src_ in enumerate(d.train):
            if not src_.path:
                bad(f"data.train[{i}].path", "is required")
            if src_.weight <= 0:
                bad(f"data.train[{i}].weight", f"must be > 0; got {src_.weight}")
    choice("data.format", d.format, FORMATS)
    choice("data.overlong", d.overlong, ("truncate", "drop"))
    if d.max_seq_len < 16:
        bad("data.max_seq_len", f"must be >= 16; got {d.max_seq_len}")
    if t.epochs <= 0 and t.max_steps <= 0:
        bad("training.epochs", "must be > 0 (or set training.max_steps)")
    if t.max_steps == 0 or t.max_steps < -1:
        bad("training.max_steps", f"must be > 0, or -1 to use epochs; got {t.max_steps}")
    if not 0.0 < t.learning_rate < 1.0:
        bad("training.learning_rate", f"must be in (0, 1); got {t.learning_rate}")
    choice("training.lr_scheduler", t.lr_scheduler, SCHEDULERS)
    if not 0.0 <= t.warmup_ratio < 1.0:
        bad("training.warmup_ratio", f"must be in [0, 1); got {t.warmup_ratio}")
    for key in ("weight_decay", "max_grad_norm", "neftune_noise_alpha", "loraplus_lr_ratio"):
        if getattr(t, key) < 0:
            bad(f"training.{key}", "must be >= 0")
    if t.loraplus_lr_ratio and m.name == "full":
        bad("training.loraplus_lr_ratio",
            "applies to LoRA adapters; method.name is full (set training.loraplus_lr_ratio=0)")
    for key in ("batch_size", "grad_accum", "logging_steps"):
        if getattr(t, key) < 1:
            bad(f"training.{key}", f"must be >= 1; got {getattr(t, key)}")
    for key in ("save_steps",):
        if getattr(t, key) < 0:
            bad(f"training.{key}", "must be >= 0")
    if not 0 <= t.seed < 2**32:  # numpy's seed range; anything else fails only once training starts
        bad("training.seed", f"must be in [0, 2**32); got {t.seed}")
    for key in ("eval_steps", "eval_examples", "early_stopping_patience", "generation_samples", "side_by_side"):
        if getattr(e, key) < 0:
            bad(f"eval.{key}", "must be >= 0")
    if e.max_new_tokens < 1:
        bad("eval.max_new_tokens", "must be >= 1")
    if e.early_stopping_patience and not (e.eval_steps and d.eval):
        bad("eval.early_stopping_patience", "needs eval.eval_steps > 0 and a data.eval file")


def _check_targets(targets: list[str], bad) -> None:
    """LoRA targets are the estimator's names (toolkit.estimate.planner.ALL_LINEAR) or `all-linear`:
    the planner sizes every run from them, and PEFT would refuse an unknown name only once the model
    is loaded (and the loader would take that for an unavailable base and fall back)."""
    from toolkit.estimate.planner import ALL_LINEAR

    if "all-linear" in targets and len(targets) > 1:
        bad("lora.target_modules", f"all-linear stands alone (it already means {', '.join(ALL_LINEAR)}); "
            f"got {', '.join(targets)}")
    unknown = [t for t in targets if t != "all-linear" and t not in ALL_LINEAR]
    if unknown:
        bad("lora.target_modules", f"has unknown module {', '.join(map(repr, unknown))} "
            f"(known: all-linear, {', '.join(ALL_LINEAR)})")
