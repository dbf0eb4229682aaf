"""Catalog facts: exact parameter counts, and reading facts from HF folders and GGUF files."""

from __future__ import annotations

import json
import struct

import pytest

from toolkit.estimate import catalog
from toolkit.core.errors import UserError
from toolkit.estimate.gguf_header import read_header


@pytest.mark.parametrize("name", sorted(catalog.CATALOG))
def test_param_count_from_facts_equals_published(name):
    facts = catalog.CATALOG[name]
    assert facts.published_params, f"{name} has no published count"
    assert facts.param_count() == facts.published_params


def test_issue_models_are_all_in_the_catalog():
    wanted = ["Llama-3.2-1B", "Llama-3.2-1B-Instruct", "Llama-3.2-3B", "Llama-3.2-3B-Instruct", "Llama-3.1-8B",
              "Llama-3.1-8B-Instruct", "SmolLM2-135M-Instruct", "SmolLM2-360M-Instruct", "SmolLM2-1.7B-Instruct",
              "Qwen2.5-0.5B-Instruct", "Qwen2.5-1.5B-Instruct", "Qwen2.5-3B-Instruct", "Qwen2.5-7B-Instruct", "embedded"]
    for short in wanted:
        assert catalog.lookup(short).name.endswith(short)
    assert catalog.lookup("QWEN/qwen2.5-7b-instruct").name == "Qwen/Qwen2.5-7B-Instruct"


def _safetensors_param_count(path) -> int:
    """Independent count: element counts from the safetensors header (JSON), no torch."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    total = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        count = 1
        for d in info["shape"]:
            count *= d
        total += count
    return total


def test_hf_folder_facts_match_its_weights(embedded_dir, tiny_llama_dir):
    emb = catalog.lookup(str(embedded_dir))
    assert (emb.hidden, emb.layers, emb.heads, emb.kv_heads, emb.vocab, emb.tied) == (576, 30, 9, 3, 49152, True)
    assert emb.param_count() == catalog.CATALOG["embedded"].published_params
    assert emb.param_count() == _safetensors_param_count(embedded_dir / "model.safetensors")
    tiny = catalog.lookup(str(tiny_llama_dir / "config.json"))
    assert tiny.param_count() == _safetensors_param_count(tiny_llama_dir / "model.safetensors")


def test_qwen2_config_json_gets_qkv_bias(tmp_path):
    q = catalog.CATALOG["Qwen/Qwen2.5-0.5B-Instruct"]
    cfg = {"model_type": "qwen2", "hidden_size": q.hidden, "intermediate_size": q.intermediate,
           "num_hidden_layers": q.layers, "num_attention_heads": q.heads, "num_key_value_heads": q.kv_heads,
           "vocab_size": q.vocab, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    facts = catalog.lookup(str(tmp_path))
    assert facts.qkv_bias and facts.param_count() == 494_032_768


def test_embedded_gguf_facts_without_loading_weights():
    from toolkit.core.models import embedded_gguf_path

    facts = catalog.lookup(str(embedded_gguf_path()))
    ref = catalog.CATALOG["embedded"]
    for field in ("hidden", "intermediate", "layers", "heads", "kv_heads", "head_dim", "vocab", "tied", "qkv_bias"):
        assert getattr(facts, field) == getattr(ref, field), field
    assert facts.counted_params == ref.published_params == facts.param_count()
    assert facts.gguf.file_type == "MOSTLY_Q4_1"
    assert facts.gguf.type_counts == {"Q4_1": 210, "Q8_0": 1, "F32": 61}


def test_fast_header_reader_agrees_with_gguf_py():
    from gguf import GGUFReader

    from toolkit.core.models import embedded_gguf_path

    path = embedded_gguf_path()
    ref = GGUFReader(str(path))
    ours = read_header(path)
    assert [(t.name, t.tensor_type.name, int(t.n_elements), int(t.n_bytes)) for t in ref.tensors] == \
           [(t.name, t.type_name, t.n_elements, t.n_bytes) for t in ours.tensors]
    for key in ("llama.block_count", "llama.embedding_length", "llama.attention.head_count_kv", "general.file_type"):
        assert ours.metadata[key] == ref.fields[key].contents()
    assert ours.metadata["general.architecture"] == ref.fields["general.architecture"].contents()


def test_unknown_model_suggests_close_names():
    with pytest.raises(UserError, match="did you mean meta-llama/Llama-3.2-1B-Instruct"):
        catalog.lookup("llama-3.2-1b-instrct")


def test_folder_without_config_json(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        catalog.lookup(str(tmp_path))


def test_bad_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        catalog.lookup(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="not supported"):
        catalog.lookup(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    with pytest.raises(UserError, match="lacks"):
        catalog.lookup(str(tmp_path))


def test_non_gguf_and_truncated_gguf(tmp_path):
    from toolkit.core.models import embedded_gguf_path

    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(UserError, match="not a GGUF file"):
        catalog.lookup(str(fake))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(embedded_gguf_path().read_bytes()[:4096])
    with pytest.raises(UserError, match="truncated"):
        catalog.lookup(str(cut))
    with pytest.raises(UserError, match="no such file"):
        catalog.lookup(str(tmp_path / "missing.gguf"))


def test_run_folder_uses_its_base_model(tmp_path):
    run = tmp_path / "finance-20261121-050000"
    (run / "adapter").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"recipe": "finance", "base_model": "embedded", "method": "qlora"}))
    facts = catalog.lookup(str(run))
    assert facts.param_count() == catalog.CATALOG["embedded"].published_params and "base model embedded" in facts.source
    (run / "run.json").write_text(json.dumps({"recipe": "finance"}))
    with pytest.raises(UserError, match="no base_model"):
        catalog.lookup(str(run))
