"""Which base model a fine-tune uses, and loading it for training (QLoRA / LoRA / full, Unsloth on CUDA).

`resolve_base` turns the recipe's `base_model` into something loadable: `auto` asks the
estimator's pick with the recipe's own settings (`toolkit.finetune.plan`), a named catalog base
must fit by the same estimate and memory rule, a hub id is checked against the local cache and the hub
(HF_HUB_OFFLINE, or no answer within `hub_timeout_s`, means offline), and when the base can't
be had the recipe's `fallback_model` is used, announced in one visible line, never silently.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

from toolkit.core import loading, models
from toolkit.core.chat_tokens import fix_chat_special_tokens, sync_special_ids
from toolkit.core.errors import UserError


class Unavailable(Exception):
    """The base model can't be had here (offline, gated, missing, doesn't fit)."""


@dataclass
class BaseChoice:
    spec: str  # as the recipe gave it after resolution: "embedded", an HF id, a folder...
    source: str  # what from_pretrained gets
    requested: str  # the recipe's base_model before auto/fallback
    fallback_reason: str = ""  # why the fallback was used ("" = it wasn't)
    pick: dict = field(default_factory=dict)  # the estimator's pick for `auto`


def hub_reachable(timeout: float) -> tuple[bool, str]:
    """(reachable, why not). HF_HUB_OFFLINE counts as unreachable without trying."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False, "HF_HUB_OFFLINE is set"
    import socket
    from urllib.parse import urlparse

    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True, ""
    except OSError as exc:
        return False, f"cannot reach {host} within {timeout:g}s ({exc.__class__.__name__})"


def available_source(spec: str, timeout: float) -> str:
    """from_pretrained source for `spec`, or raise Unavailable saying why it can't be had."""
    try:
        ref = models.resolve(spec)
    except UserError as exc:
        raise Unavailable(str(exc)) from None
    if ref.kind == "run":
        raise UserError(f"model.base_model {spec}: a run folder can't be a base (export or merge it first)")
    if ref.kind != "hub":
        return models.hf_source(ref)
    if loading.in_hf_cache(spec):
        return spec
    ok, why = hub_reachable(timeout)
    if not ok:
        raise Unavailable(f"offline ({why}) and not in the local HF cache")
    return spec


def _auto_pick(recipe, announce, device: str, dtype: str) -> tuple[str, dict]:
    """The estimator's pick for `recipe`: the largest catalog model that fits the free memory
    (the one rule, see toolkit.finetune.plan) and finishes within model.time_budget (default 30
    min on a CPU, none on a GPU)."""
    from toolkit.core.hardware import detect
    from toolkit.estimate.pick import pick
    from toolkit.estimate.timeplan import DEFAULT_TIME_BUDGET_S, parse_duration, rates_here, time_fields
    from toolkit.finetune.plan import plan_inputs, run_shape

    hw = detect()
    plan = plan_inputs(recipe, device, dtype)
    budget_s = (parse_duration(recipe.model.time_budget, "model.time_budget") if recipe.model.time_budget
                else DEFAULT_TIME_BUDGET_S[plan.device])
    rates, run = rates_here(dtype), run_shape(recipe)

    def seconds_of(m, e):
        return time_fields(m, e, rates, targets=plan.targets, run=run, lora_dropout=plan.lora_dropout)["train_wall_s"]

    p = pick(plan.task, hw.available_bytes, plan.seq_len, plan.batch, plan.lora_r, plan.device, quants=(plan.quant,),
             grad_ckpt=plan.grad_ckpt, targets=plan.targets, optimizer=plan.optimizer, lora_dropout=plan.lora_dropout,
             seconds_of=seconds_of, time_budget_s=budget_s, compute=plan.compute, packed_weights=plan.packed_weights,
             conversation_tokens=plan.conversation_tokens, allocator=plan.allocator)
    info = {k: getattr(p, k) for k in ("model", "quant", "fits", "headroom_bytes", "reason")}
    announce(f"base_model auto: estimator picked {p.model} for {hw.name} ({p.reason})")
    if not p.fits:
        raise Unavailable(f"the estimator's pick {p.model} does not fit {hw.name} in memory and time")
    return p.model, info


def check_fits(recipe, spec: str, device: str, dtype: str) -> None:
    """Raise Unavailable when the estimator knows `spec` and says the recipe's run doesn't fit
    this machine's free memory (the same estimate and the same rule as `base_model: auto`; time
    is not checked for a named base: the user chose it)."""
    from toolkit.core.hardware import detect
    from toolkit.core.units import gib
    from toolkit.estimate.catalog import CATALOG
    from toolkit.estimate.planner import estimate, usable_bytes
    from toolkit.finetune.plan import plan_inputs

    if spec not in CATALOG:
        return  # unknown model: nothing to estimate with, try loading it
    plan = plan_inputs(recipe, device, dtype)
    try:
        e = estimate(CATALOG[spec], **plan.as_kwargs())
    except UserError:
        # The recipe reader already refuses what the estimator would (LoRA targets included), so this
        # is a setting it cannot express: the fit is unknown, not failed; try loading it.
        return
    hw = detect()
    usable = usable_bytes(hw.available_bytes)
    if e.total_bytes > usable:
        raise Unavailable(f"doesn't fit: needs ~{gib(e.total_bytes, 1)}, {gib(usable, 1)} usable of "
                          f"{gib(hw.available_bytes, 1)} available on {hw.name}")


def context_warning(choice: BaseChoice, max_seq_len: int) -> str | None:
    """A warning when `data.max_seq_len` is past the base model's context window (the estimator's
    `past_context`, its facts from the catalog or the model's own config), else None. Positions
    past the window were never trained and RoPE is not rescaled here, so long rows train on
    positions the model can't read."""
    from toolkit.estimate.catalog import lookup
    from toolkit.estimate.planner import past_context

    for spec in (choice.spec, choice.source):
        try:
            window = past_context(lookup(spec), max_seq_len)
        except UserError:
            continue  # a hub id outside the catalog: nothing local to read its window from
        return None if window is None else (
            f"warning: data.max_seq_len={max_seq_len} is past {choice.spec}'s context window ({window} tokens): "
            f"positions past {window} were never trained; set data.max_seq_len to at most {window}")
    return None


def resolve_base(recipe, announce=print, device: str = "cpu", dtype: str = "float32") -> BaseChoice:
    """Resolve `model.base_model` (auto, offline and fallback handling) to a loadable source for
    a run on `device` in compute `dtype`."""
    requested = recipe.model.base_model
    spec, info = requested, {}
    try:
        if spec == "auto":
            spec, info = _auto_pick(recipe, announce, device, dtype)
        else:
            check_fits(recipe, spec, device, dtype)
        return BaseChoice(spec, available_source(spec, recipe.model.hub_timeout_s), requested, pick=info)
    except Unavailable as why:
        return fallback(recipe, spec, str(why), announce, info)


def fallback(recipe, spec: str, why: str, announce=print, info: dict | None = None) -> BaseChoice:
    fb = recipe.model.fallback_model
    if not fb or fb == spec:
        raise UserError(f"model.base_model {spec}: {why} (and no model.fallback_model to use instead)")
    announce(f"FALLBACK: base model {spec} unavailable ({why}); fine-tuning {fb} instead")
    try:
        source = available_source(fb, recipe.model.hub_timeout_s)
    except Unavailable as why2:
        raise UserError(f"model.fallback_model {fb}: {why2}") from None
    return BaseChoice(fb, source, recipe.model.base_model, fallback_reason=why, pick=info or {})


def unsloth_usable(recipe, device: str) -> bool:
    return recipe.method.unsloth and recipe.method.name in ("qlora", "lora") and device.startswith("cuda") \
        and importlib.util.find_spec("unsloth") is not None


# Libraries Unsloth patches at import time: imported before it, they keep their unpatched code.
UNSLOTH_PATCHES = ("trl", "transformers", "peft")


def prepare_engine(recipe, device: str, announce=print) -> bool:
    """Import Unsloth now when this run will use it (True), before anything imports TRL,
    transformers or PEFT. When one of them is already imported (a notebook, a test process),
    Unsloth's patches would apply only in part, so the run uses the transformers engine instead:
    announced, and `method.unsloth` set false in the recipe so the run records what it used."""
    import sys

    if not unsloth_usable(recipe, device):
        return False
    early = [m for m in UNSLOTH_PATCHES if m in sys.modules]
    if early and "unsloth" not in sys.modules:
        announce(f"note: not using Unsloth: {', '.join(early)} imported before it, so its patches would not "
                 "apply; start a fresh process (e.g. `toolkit finetune`) to train with Unsloth")
        recipe.method.unsloth = False
        return False
    import unsloth  # noqa: F401  (imported for its patches)

    return True


def _load_failures() -> tuple[type[BaseException], ...]:
    """What "the base can't be had" looks like when loading: hub errors (gated, not found, offline;
    all OSError but the remote EntryNotFoundError), a missing or unreadable file (OSError,
    ValueError from transformers), and RuntimeError, which Unsloth's loader raises for a gated or
    unreachable repo."""
    from huggingface_hub.errors import EntryNotFoundError

    return OSError, RuntimeError, ValueError, EntryNotFoundError


def load_with_fallback(choice: BaseChoice, recipe, device: str, dtype: str, announce=print, before_load=None,
                       fallback_recipe=None):
    """(choice, recipe, model, tokenizer, notes): load `choice`; when that fails for want of the
    base, load the recipe's fallback_model instead, announced with the reason. `before_load()` runs
    before each attempt (the trainer re-seeds there so both attempts start from the same RNG
    state); `fallback_recipe()` gives the recipe the fallback model trains with (its profile)."""
    if before_load:
        before_load()
    try:
        recipe = _method_resolved(recipe, choice.spec, device, dtype, announce)
        return (choice, recipe, *load_for_training(choice.source, recipe, device, dtype))
    except _load_failures() as exc:
        reason = f"loading failed: {type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
        if choice.fallback_reason:  # already the fallback: nothing else to try
            raise UserError(f"model.fallback_model {choice.spec}: {reason}") from exc
        fb = fallback(recipe, choice.spec, reason, announce, choice.pick)
    if fallback_recipe:
        recipe = fallback_recipe()
    if before_load:
        before_load()
    recipe = _method_resolved(recipe, fb.spec, device, dtype, announce)
    return (fb, recipe, *load_for_training(fb.source, recipe, device, dtype))


def _method_resolved(recipe, spec: str, device: str, dtype: str, announce):
    """`method.name: auto` decided for the base actually being loaded (toolkit.finetune.plan)."""
    from toolkit.core.hardware import detect
    from toolkit.finetune.plan import resolve_method

    if recipe.method.name != "auto":
        return recipe
    recipe, why = resolve_method(recipe, spec, device, dtype, detect().available_bytes)
    announce(why)
    return recipe


def loaded_weights(model, source: str, cache_dir: str | None = None) -> dict:
    """Which weights were actually read, for run.json and export: `base_weights` is the local folder
    (the HF cache snapshot for a hub id) or, when no local folder is known, the repo id;
    `base_weights_repo` the hub repo id (Unsloth swaps in its pre-quantized `unsloth/...-bnb-4bit`
    repo for some bases), `base_revision` the snapshot's commit."""
    from pathlib import Path

    name = getattr(getattr(model, "config", None), "_name_or_path", "") or source
    base = getattr(model, "get_base_model", None)
    if base is not None:  # PEFT wrapper: the inner model's config names the loaded weights
        name = getattr(base().config, "_name_or_path", "") or name
    if Path(name).is_dir():
        return {"base_weights": str(Path(name).resolve()), "base_weights_repo": None, "base_revision": None}
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, "config.json", cache_dir=cache_dir)
    except (ValueError, OSError):  # not a repo id
        hit = None
    if isinstance(hit, str):
        snap = Path(hit).parent
        return {"base_weights": str(snap), "base_weights_repo": name, "base_revision": snap.name}
    return {"base_weights": name, "base_weights_repo": name, "base_revision": None}


def _lora_config(recipe):
    from peft import LoraConfig

    lo = recipe.lora
    targets = "all-linear" if lo.target_modules == ["all-linear"] else list(lo.target_modules)
    return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")


def keep_4bit_weights_trainable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 `Linear4bit` repacks its weight for a fast
    inference kernel on the first forward in eval mode and never packs it back. That kernel has
    no autograd formula, so after the trainer's first evaluation every frozen 4-bit layer would
    pass no gradient to its input ("gemv_4bit: an autograd kernel was not registered" warning)
    and all LoRA layers below the top one would train on wrong gradients. Eval then uses the
    same dequantize-and-matmul path as training.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def load_for_training(source: str, recipe, device: str, dtype: str):
    """(model ready to train, tokenizer, notes). PEFT-wrapped for qlora/lora."""
    from transformers import AutoTokenizer

    from toolkit.core.hardware import torch_dtype

    method = recipe.method.name
    if unsloth_usable(recipe, device):
        # Only imported here: unsloth raises at import time without a CUDA/ROCm/XPU device.
        from unsloth import FastLanguageModel

        model, tok = FastLanguageModel.from_pretrained(
            source, max_seq_length=recipe.data.max_seq_len, dtype=torch_dtype(dtype),
            load_in_4bit=method == "qlora")
        fix_chat_special_tokens(tok)
        targets = recipe.lora.target_modules
        if targets == ["all-linear"]:
            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = FastLanguageModel.get_peft_model(
            model, r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
            target_modules=targets, bias="none", random_state=recipe.training.seed,
            use_gradient_checkpointing="unsloth" if recipe.training.gradient_checkpointing else False)
        return model, tok, {"engine": "unsloth"}

    tok = AutoTokenizer.from_pretrained(source)
    fix_chat_special_tokens(tok)
    quant = None
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=recipe.method.quant_type,
            bnb_4bit_use_double_quant=recipe.method.double_quant, bnb_4bit_compute_dtype=torch_dtype(dtype))
    # Full fine-tuning keeps fp32 master weights; autocast supplies the low-precision compute.
    load_dtype = "float32" if method == "full" else dtype
    model = loading.load_causal_lm(source, load_dtype, device, quantization=quant)
    if quant is not None:
        keep_4bit_weights_trainable(model)
    sync_special_ids(model, tok)
    if recipe.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if method in ("qlora", "lora"):
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(recipe))
    return model, tok, {"engine": "transformers+peft" + ("+bitsandbytes" if quant else "")}
