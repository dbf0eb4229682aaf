"""The one model-spec resolver: every command reads a spec by these rules (no weights loaded)."""

from __future__ import annotations

import json

import pytest

from toolkit.core.errors import UserError
from toolkit.core.models import resolve


def _run(tmp_path, *, run_json=True, adapter=True):
    run = tmp_path / "finance-20261122-031438"
    run.mkdir()
    if run_json:
        (run / "run.json").write_text(json.dumps({"base_model": "embedded", "base_source": "/elsewhere"}))
    if adapter:
        (run / "adapter").mkdir()
        (run / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x/y"}))
    return run


def test_kinds(tmp_path):
    assert resolve("embedded").kind == "embedded"
    assert resolve("meta-llama/Llama-3.2-1B-Instruct").kind == "hub"
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert (resolve(str(hf)).kind, resolve(str(hf)).path) == ("hf_dir", hf.resolve())
    assert (resolve(str(hf / "config.json")).kind, resolve(str(hf / "config.json")).path) == ("hf_dir", hf.resolve())
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF....")
    assert resolve(str(gguf)).kind == "gguf"
    magic = tmp_path / "model.bin"  # no .gguf suffix: the magic decides
    magic.write_bytes(b"GGUF....")
    assert resolve(str(magic)).kind == "gguf"


def test_run_folders_and_their_base(tmp_path):
    run = _run(tmp_path)
    ref = resolve(str(run))
    assert (ref.kind, ref.path, ref.base, ref.adapter_dir) == ("run", run.resolve(), "embedded", run.resolve() / "adapter")
    # An adapter folder alone (no run.json) is a run too; its base comes from the adapter config.
    (run / "run.json").unlink()
    assert resolve(str(run)).base == "x/y"


def test_run_without_adapter_is_named(tmp_path):
    ref = resolve(str(_run(tmp_path, adapter=False)))
    with pytest.raises(UserError, match="run folder has no adapter"):
        ref.adapter_dir


@pytest.mark.parametrize("spec, needle", [
    ("", "empty"),
    ("./missing", "model not found: ./missing (no such file or folder)"),
    ("runs/x/y", "no such file or folder"),
    ("runs/finance-1", "no such file or folder"),  # our own folders are never hub ids
    ("missing.gguf", "no such file or folder"),
    ("Llama", "model not found: Llama (expected"),
])
def test_bad_specs_are_one_line(spec, needle):
    with pytest.raises(UserError) as exc:
        resolve(spec)
    assert needle in str(exc.value) and "\n" not in str(exc.value)


def test_folder_and_file_that_are_not_models(tmp_path):
    with pytest.raises(UserError, match="no config.json"):
        resolve(str(tmp_path))
    other = tmp_path / "notes.txt"
    other.write_text("hello")
    with pytest.raises(UserError, match="not a GGUF file"):
        resolve(str(other))


def test_every_capability_reads_specs_the_same_way(tmp_path):
    """The estimator, the decoding backends and export all go through `resolve`: the same spec
    gets the same answer (here: the same one-line error) from each."""
    from toolkit.decoding.backends import load
    from toolkit.estimate.catalog import lookup

    missing = str(tmp_path / "nowhere" / "model")
    messages = set()
    for call in (resolve, lookup, load):
        with pytest.raises(UserError) as exc:
            call(missing)
        messages.add(str(exc.value))
    assert messages == {f"model not found: {missing} (no such file or folder)"}


@pytest.mark.parametrize("cache", ["file", "file/sub"])
def test_toolkit_cache_that_is_a_file_is_named(tmp_path, monkeypatch, cache):
    """The embedded model's folder can't be cached: said before the ~30 s conversion, naming TOOLKIT_CACHE."""
    from toolkit.core import models

    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / cache))
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained",
                        lambda *a, **k: pytest.fail("converted before the cache folder was checked"))
    with pytest.raises(UserError) as exc:
        models.embedded_hf_dir()
    msg = str(exc.value)
    assert f"TOOLKIT_CACHE is {tmp_path / cache}" in msg and str(tmp_path / cache) in msg and "\n" not in msg
    with pytest.raises(UserError, match="TOOLKIT_CACHE"):  # any other folder saved there
        models.save_folder_atomically(tmp_path / cache / "x", lambda tmp: None)


def test_run_whose_adapter_config_is_no_object_still_resolves(tmp_path):
    run = _run(tmp_path, run_json=False)
    (run / "adapter" / "adapter_config.json").write_text("[1]")
    assert resolve(str(run)).base is None  # loading it names the file (test_loading.py), resolving never fails on it


# ---------------------------------------------------------------- the system prompt a model was trained with


def test_default_system_prompt_of_a_run_folder(tmp_path):
    """A run serves by default with its resolved recipe's data.system_prompt; one without (no recipe,
    no key, a recipe the reader refuses) has none, and neither has anything but a run or export."""
    from toolkit.core.models import default_system_prompt

    run = _run(tmp_path)
    assert default_system_prompt(str(run)) == ""  # no recipe.yaml (an adapter copied by hand)
    (run / "recipe.yaml").write_text("model:\n  base_model: embedded\ndata:\n  train: d/train.jsonl\n")
    assert default_system_prompt(str(run)) == ""
    (run / "recipe.yaml").write_text("model:\n  base_model: embedded\ndata:\n  train: d/train.jsonl\n"
                                     "  system_prompt: 'You are FinBot: answer in one sentence.'\n")
    assert default_system_prompt(str(run)) == "You are FinBot: answer in one sentence."
    (run / "recipe.yaml").write_text("data:\n  system_prompt: x\n  nosuch_key: 1\n")
    assert default_system_prompt(str(run)) == ""
    assert default_system_prompt("embedded") == "" and default_system_prompt("org/name") == ""


def test_default_system_prompt_of_an_exported_gguf(tmp_path):
    """export.json beside a GGUF records it, for that export's own files only."""
    from toolkit.core.models import default_system_prompt

    out = tmp_path / "gguf"
    out.mkdir()
    for name in ("m-q8_0.gguf", "other.gguf"):
        (out / name).write_bytes(b"GGUF....")
    assert default_system_prompt(str(out / "m-q8_0.gguf")) == ""  # no export.json
    (out / "export.json").write_text(json.dumps({"files": {"q8_0": "m-q8_0.gguf"}, "system_prompt": "Be FinBot."}))
    assert default_system_prompt(str(out / "m-q8_0.gguf")) == "Be FinBot."
    assert default_system_prompt(str(out / "other.gguf")) == ""  # copied in, not exported here
    (out / "export.json").write_text("{broken")
    assert default_system_prompt(str(out / "m-q8_0.gguf")) == ""
