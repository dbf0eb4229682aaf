"""Which base model a fine-tune uses, and loading it for training (QLoRA / LoRA / full, Unsloth on CUDA).

`resolve_base` turns the recipe's `base_model` into something loadable: `auto` asks the
estimator (toolkit.estimate.pick), a hub id is checked against the local cache and the hub
(HF_HUB_OFFLINE, or no answer within `hub_timeout_s`, means offline), and when the base can't
be had the recipe's `fallback_model` is used, announced in one visible line, never silently.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field

from toolkit import models
from toolkit.errors import UserError


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


def _auto_pick(recipe, announce) -> tuple[str, dict]:
    try:
        from toolkit.estimate import pick
    except ImportError as exc:
        raise Unavailable(f"base_model auto needs toolkit.estimate ({exc})") from None
    from toolkit.hardware import detect

    hw = detect()
    p = pick("qlora" if recipe.method.name == "qlora" else recipe.method.name, hw.available_bytes,
             seq_len=recipe.data.max_seq_len, batch=recipe.training.batch_size, lora_r=recipe.lora.r)
    info = {k: getattr(p, k) for k in ("model", "quant", "fits", "headroom_bytes", "reason") if hasattr(p, k)}
    announce(f"base_model auto: estimator picked {p.model} for {hw.name} ({getattr(p, 'reason', '')})")
    if not getattr(p, "fits", True):
        raise Unavailable(f"the estimator's pick {p.model} does not fit {hw.name}")
    return p.model, info


def check_fits(recipe, spec: str) -> None:
    """Raise Unavailable when the estimator knows `spec` and says it doesn't fit this machine."""
    try:
        from toolkit.catalog import CATALOG
        from toolkit.estimate import estimate
    except ImportError:
        return
    if spec not in CATALOG:
        return  # unknown model: nothing to estimate with, try loading it
    from toolkit.hardware import detect

    hw = detect()
    m = recipe.method
    quant = ("nf4-dq" if m.double_quant else "nf4") if m.name == "qlora" else ("fp32" if hw.kind == "cpu" else "bf16")
    e = estimate(CATALOG[spec], m.name, quant, recipe.data.max_seq_len, recipe.training.batch_size, recipe.lora.r,
                 grad_ckpt=recipe.training.gradient_checkpointing, device=hw.kind)
    if e.total_bytes > hw.available_bytes:
        raise Unavailable(f"doesn't fit: needs ~{e.total_bytes / 2**30:.1f} GiB, "
                          f"{hw.available_bytes / 2**30:.1f} GiB available on {hw.name}")


def resolve_base(recipe, announce=print) -> BaseChoice:
    """Resolve `model.base_model` (auto, offline and fallback handling) to a loadable source."""
    requested = recipe.model.base_model
    spec, info = requested, {}
    try:
        if spec == "auto":
            spec, info = _auto_pick(recipe, announce)
        else:
            check_fits(recipe, spec)
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

    from toolkit.hardware import torch_dtype

    method = recipe.method.name
    if unsloth_usable(recipe, device):
        # Only imported here: unsloth raises at import time without a CUDA/ROCm/XPU device.
        from unsloth import FastLanguageModel

        model, tok = FastLanguageModel.from_pretrained(
            source, max_seq_length=recipe.data.max_seq_len, dtype=torch_dtype(dtype),
            load_in_4bit=method == "qlora")
        models.fix_chat_special_tokens(tok)
        targets = recipe.lora.target_modules
        if targets == ["all-linear"]:
            targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        model = FastLanguageModel.get_peft_model(
            model, r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
            target_modules=targets, bias="none", random_state=recipe.training.seed,
            use_gradient_checkpointing="unsloth" if recipe.training.gradient_checkpointing else False)
        return model, tok, {"engine": "unsloth"}

    tok = AutoTokenizer.from_pretrained(source)
    models.fix_chat_special_tokens(tok)
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
    models.sync_special_ids(model, tok)
    if recipe.training.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if method in ("qlora", "lora"):
        from peft import get_peft_model

        model = get_peft_model(model, _lora_config(recipe))
    return model, tok, {"engine": "transformers+peft" + ("+bitsandbytes" if quant else "")}
