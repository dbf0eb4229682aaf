"""Loading what `toolkit.core.models` resolves: a tokenizer, a causal LM (16/32-bit, or 4-bit through
bitsandbytes), or a run folder's base with its LoRA adapter on top. Whatever goes wrong (a hub id offline
and not cached, a folder transformers refuses, a damaged adapter) is one line naming the source or file."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from toolkit.core import models
from toolkit.core.chat_templates import ensure_chat_template
from toolkit.core.errors import UserError


def load_tokenizer(source: str):
    """The tokenizer at `source`; a Llama-3 one without a chat template gets Meta's."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source)
    ensure_chat_template(tok)
    return tok


def load_causal_lm(source: str, dtype: str = "float32", device: str = "cpu", quantization=None):
    """Load a causal LM from an HF folder or id, in `dtype` on `device`.

    `quantization` is a transformers quantization config (e.g. BitsAndBytesConfig) or None.
    """
    from transformers import AutoModelForCausalLM

    from toolkit.core.hardware import torch_dtype

    kwargs = {"dtype": torch_dtype(dtype)}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if quantization is None:
        model.to(device)
    elif device == "cpu":
        own_memory(model)
    return model


def own_memory(model) -> None:
    """Copy `model`'s floating-point tensors into the process's own memory, after a 4-bit load on a CPU:
    the tensors left unconverted (embeddings, norms) are views of the memory-mapped checkpoint, which keep
    the whole file mapped and the pages quantizing read resident (Llama-3.2-1B's bf16 file: 1.86 GB
    beside 0.96 GB of 4-bit weights; its QLoRA run peaked at 5.85 GiB, its plan 4.15; now 4.04, 2026-12-07)."""
    import itertools

    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point():  # the 4-bit weights are integer tensors, made by the quantizer
            t.data = t.data.clone()


def load_model(spec: str, device: str = "cpu", dtype: str = "float32", merge: bool = False):
    """Load (model, tokenizer) for inference or export from any model spec except a .gguf.

    A run folder loads its base (from run.json's `base_source`) in `dtype` and puts the LoRA
    adapter from `<run>/adapter` on top; `merge=True` folds it into the weights (what export and
    decoding want), otherwise it stays a PeftModel so the adapter is visible.
    """
    ref = models.resolve(spec)
    if ref.kind != "run":
        source = models.hf_source(ref)
        with _loading(spec, source):
            return load_causal_lm(source, dtype, device).eval(), load_tokenizer(source)
    from peft import PeftModel

    adapter = ref.adapter_dir
    check_adapter(adapter)  # before the base: a damaged adapter fails in a second, not after the load
    base_source = models.run_base_source(ref.path)
    with _loading(f"{spec}: base {base_source}", base_source):
        model = load_causal_lm(base_source, dtype, device)
    try:
        model = PeftModel.from_pretrained(model, adapter)
    except (ValueError, TypeError, KeyError) as exc:  # valid JSON and safetensors, but not an adapter PEFT knows
        why = f"{type(exc).__name__}: {_first_line(exc)}"
        raise UserError(f"{adapter}: PEFT cannot load this adapter ({why})") from None
    if merge:
        model = model.merge_and_unload()
    tok_dir = adapter if (adapter / "tokenizer_config.json").is_file() else base_source
    with _loading(f"{spec}: tokenizer {tok_dir}", str(tok_dir)):
        return model.eval(), load_tokenizer(str(tok_dir))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


@contextmanager
def _loading(name: str, source: str):
    """transformers' OSError (a hub id offline or unknown, a gated repo, a folder without weights)
    while loading from `source` as one line starting with `name`; a hub id offline and not cached
    in the words finetune uses for its base."""
    try:
        yield
    except OSError as exc:
        from huggingface_hub import constants

        why = _first_line(exc)
        if constants.HF_HUB_OFFLINE and not Path(source).exists() and not in_hf_cache(source):
            why = "offline (HF_HUB_OFFLINE is set) and not in the local HF cache"
        raise UserError(f"{name}: {why}") from None


def in_hf_cache(repo_id: str) -> bool:
    """Whether the local HF cache holds `repo_id` (its config.json); False for what is not a repo id."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a repo id
        return False


def check_adapter(adapter: Path) -> None:
    """A one-line error naming the file when a run's LoRA adapter can't be read: its config not a
    JSON object, its weights missing or not a whole safetensors file (headers checked, no weights read)."""
    models.json_object(adapter / "adapter_config.json")
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        if (adapter / "adapter_model.bin").is_file():
            return  # older PEFT's pickle: nothing to check without loading it
        raise UserError(f"{weights}: missing (the run folder's adapter has no weights; did training save?)")
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), "pt"):
            pass
    except (OSError, SafetensorError) as exc:
        raise UserError(f"{weights}: not a readable safetensors file ({_first_line(exc)})") from None
