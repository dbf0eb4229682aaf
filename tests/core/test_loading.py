"""toolkit.core.loading: what goes wrong while loading is one line naming the source or file (a damaged
adapter before its base is read, a hub id offline, a folder transformers refuses), and a model quantized on a
CPU keeps no view of its checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit.core.errors import UserError


def _tiny_run(tmp_path, base_dir):
    """A run folder with a real LoRA adapter on `base_dir` (as toolkit.finetune.trainer writes it)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    run = tmp_path / "run"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=2, target_modules=["q_proj"]))
    model.save_pretrained(run / "adapter")
    (run / "run.json").write_text(json.dumps({"base_model": str(base_dir), "base_source": str(base_dir)}))
    return run


def _refuse_loading(monkeypatch):
    """Any base load fails the test: a damaged adapter is caught before the base is read."""
    from toolkit.core import loading

    def refuse(*a, **k):
        raise AssertionError("the base was loaded")

    monkeypatch.setattr(loading, "load_causal_lm", refuse)


@pytest.mark.parametrize("damage, file, needle", [
    (lambda a: (a / "adapter_config.json").write_text("{broken"), "adapter_config.json", "not valid JSON"),
    (lambda a: (a / "adapter_config.json").write_text("[1]"), "adapter_config.json", "expected a JSON object"),
    (lambda a: (a / "adapter_model.safetensors").write_bytes(b""), "adapter_model.safetensors",
     "not a readable safetensors file"),
    (lambda a: (a / "adapter_model.safetensors").write_bytes((a / "adapter_model.safetensors").read_bytes()[:-64]),
     "adapter_model.safetensors", "not a readable safetensors file"),
    (lambda a: (a / "adapter_model.safetensors").unlink(), "adapter_model.safetensors", "missing"),
], ids=["config-not-json", "config-not-object", "weights-empty", "weights-cut-short", "weights-missing"])
def test_damaged_adapter_is_one_line_naming_the_file(tmp_path, tiny_llama_dir, monkeypatch, damage, file, needle):
    from toolkit.core.loading import load_model

    run = _tiny_run(tmp_path, tiny_llama_dir)
    load_model(str(run))  # whole, it loads
    damage(run / "adapter")
    _refuse_loading(monkeypatch)
    with pytest.raises(UserError) as exc:
        load_model(str(run))
    msg = str(exc.value)
    assert msg.startswith(f"{run / 'adapter' / file}: ") and needle in msg and "\n" not in msg, msg


def test_unknown_hub_id_offline_is_one_line(monkeypatch):
    """The words finetune uses for a base it can't have, not transformers' OSError."""
    from huggingface_hub import constants

    from toolkit.core.loading import load_model

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError) as exc:
        load_model("nosuch-org/nosuch-model")
    assert str(exc.value) == "nosuch-org/nosuch-model: offline (HF_HUB_OFFLINE is set) and not in the local HF cache"


def test_a_folder_transformers_refuses_is_one_line(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    from toolkit.core.loading import load_model

    with pytest.raises(UserError) as exc:
        load_model(str(folder))
    assert str(exc.value).startswith(f"{folder}: ") and "\n" not in str(exc.value)


def test_adapter_config_peft_does_not_know_is_one_line(tmp_path, tiny_llama_dir):
    from toolkit.core.loading import load_model

    run = _tiny_run(tmp_path, tiny_llama_dir)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"peft_type": "NOSUCH"}))
    with pytest.raises(UserError) as exc:
        load_model(str(run))
    assert str(exc.value) == f"{run / 'adapter'}: PEFT cannot load this adapter (KeyError: 'NOSUCH')"


def _mapped_files(maps: str = "/proc/self/maps") -> dict[str, list[tuple[int, int]]]:
    """path -> the address ranges this process has it mapped at (Linux)."""
    out: dict[str, list[tuple[int, int]]] = {}
    with open(maps) as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                out.setdefault(parts[5].strip(), []).append((lo, hi))
    return out


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads Linux's /proc/self/maps")
def test_a_model_quantized_on_a_cpu_keeps_no_view_of_its_checkpoint(tmp_path, tiny_llama32_dir):
    """The tensors a 4-bit load leaves unconverted (embeddings, norms) had stayed views of the mapped
    checkpoint, holding the whole file's read pages resident (the 1B's QLoRA run: +1.8 GiB)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from toolkit.core.loading import load_causal_lm

    bf16 = tmp_path / "bf16"  # a checkpoint in the compute dtype: nothing converted, so views are possible
    AutoModelForCausalLM.from_pretrained(tiny_llama32_dir, dtype=torch.bfloat16).save_pretrained(bf16)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    model = load_causal_lm(str(bf16), "bfloat16", "cpu", quantization=quant)
    ranges = [r for path, rs in _mapped_files().items() if path.startswith(str(bf16)) for r in rs]
    views = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
             if any(lo <= t.data_ptr() < hi for lo, hi in ranges)]
    assert views == []
    # The copies hold the loader's values: the same logits as transformers' own load of the same checkpoint.
    ids = torch.tensor([[1, 5, 9, 200, 17]])
    plain = AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.bfloat16, quantization_config=quant,
                                                 device_map={"": "cpu"})
    with torch.no_grad():
        assert torch.equal(model(ids).logits, plain(ids).logits)
