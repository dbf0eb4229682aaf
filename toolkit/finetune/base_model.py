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

from toolkit.core import models
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


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    hit = try_to_load_from_cache(repo_id, "config.json")
    return isinstance(hit, str)


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
    if _in_hf_cache(spec):
        return spec
    ok, why = hub_reachable(timeout)
    if not ok:
        raise Unavailable(f"offline ({why}) and not in the local HF cache")
    return spec


def _auto_pick(recipe, announce, device: str, dtype: str) -> tuple[str, dict]:
    from toolkit.core.hardware import detect
    from toolkit.estimate.planner import pick
    from toolkit.finetune.plan import plan_inputs

    hw = detect()
    plan = plan_inputs(recipe, device, dtype)
    p = pick(plan.task, hw.available_bytes, plan.seq_len, plan.batch, plan.lora_r, plan.device, quants=(plan.quant,),
             grad_ckpt=plan.grad_ckpt, targets=plan.targets, optimizer=plan.optimizer, lora_dropout=plan.lora_dropout)
    info = {k: getattr(p, k) for k in ("model", "quant", "fits", "headroom_bytes", "reason")}
    announce(f"base_model auto: estimator picked {p.model} for {hw.name} ({p.reason})")
    if not p.fits:
        raise Unavailable(f"the estimator's pick {p.model} does not fit {hw.name}")
    return p.model, info


def check_fits(recipe, spec: str, device: str, dtype: str) -> None:
    """Raise Unavailable when the estimator knows `spec` and says the recipe's run doesn't fit
    this machine (the same estimate and the same usable memory as `base_model: auto`)."""
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
        return  # a setting the estimator cannot express (e.g. unusual LoRA targets): try loading it
    hw = detect()
    usable = usable_bytes(hw.available_bytes)
    if e.total_bytes > usable:
        raise Unavailable(f"doesn't fit: needs ~{gib(e.total_bytes, 1)}, {gib(usable, 1)} usable of "
                          f"{gib(hw.available_bytes, 1)} available on {hw.name}")


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
    model = models.load_causal_lm(source, load_dtype, device, quantization=quant)
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
