"""Recipes: every shipped recipe loads; bad input names the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from toolkit.finetune import recipe
from toolkit.core.errors import UserError
from tests.finetune.conftest import make_recipe

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "recipes").glob("*/recipe.yaml"))


def test_there_are_shipped_recipes():
    assert any(p.parent.name == "finance" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.parent.name)
@pytest.mark.parametrize("gpu", [True, False], ids=["gpu", "cpu"])
def test_shipped_recipe_loads(path, gpu):
    r = recipe.load(path.parent, gpu=gpu)
    assert r.name == path.parent.name
    assert r.data_path(r.data.train).is_file()
    if r.data.eval:
        assert r.data_path(r.data.eval).is_file()


def test_finance_recipe_contract():
    gpu = recipe.load(ROOT / "recipes/finance", gpu=True)
    assert gpu.model.base_model == "meta-llama/Llama-3.2-1B-Instruct"
    assert gpu.model.fallback_model == "embedded"
    assert (gpu.method.name, gpu.method.quant_type, gpu.method.double_quant) == ("qlora", "nf4", True)
    assert gpu.profile == ""
    cpu = recipe.load(ROOT / "recipes/finance", gpu=False)
    # On a CPU, `auto`: plain LoRA where RAM is plentiful (toolkit.finetune.plan.choose_method).
    assert cpu.profile == "cpu" and cpu.method.name == "auto"
    assert cpu.training.max_steps > 0 and cpu.data.packing


def write(tmp_path, text, name="recipe.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_dump_roundtrip(tmp_path):
    r = recipe.load(ROOT / "recipes/finance", ["training.max_steps=7"], gpu=False)
    p = write(tmp_path, recipe.dump(r))
    r2 = recipe.load(p, gpu=True)
    assert r2.to_dict() == r.to_dict()


@pytest.mark.parametrize("text, needle", [
    ("model:\n  base_modle: x\n", "unknown key `model.base_modle`"),
    ("trainng:\n  epochs: 1\n", "unknown key `trainng`"),
    ("training:\n  batch_size: eight\n", "training.batch_size: expected an integer"),
    ("training:\n  batch_size: 0\n", "training.batch_size must be >= 1"),
    ("lora:\n  dropout: 1.5\n", "lora.dropout must be in [0, 1)"),
    ("lora:\n  target_modules: 3\n", "lora.target_modules: expected a list"),
    ("method:\n  name: prefix\n", "method.name must be one of qlora, lora, full"),
    ("data:\n  packing: maybe\n", "data.packing: expected true/false"),
    ("data:\n  max_seq_len: 4\n", "data.max_seq_len must be >= 16"),
    ("training:\n  learning_rate: 3\n", "training.learning_rate must be in (0, 1)"),
    ("eval:\n  early_stopping_patience: 2\n", "eval.early_stopping_patience needs"),
    ("cpu:\n  training:\n    max_stepz: 3\n", "unknown key `training.max_stepz`"),
    ("lora:\n  target_modules: [q_proj, foo]\n", "lora.target_modules has unknown module 'foo' (known: all-linear, "),
    ("lora:\n  target_modules: [all-linear, q_proj]\n", "lora.target_modules all-linear stands alone"),
    ("training:\n  seed: -1\n", "training.seed must be in [0, 2**32); got -1"),
    ("training:\n  seed: 4294967296\n", "training.seed must be in [0, 2**32)"),
    ("lora:\n  r: 16\n  r: 8\n", "recipe.yaml:3: duplicate key `lora.r` (first given on line 2)"),
    ("cpu:\n  training:\n    seed: 1\n    seed: 2\n", ":4: duplicate key `cpu.training.seed`"),
    ("data:\n  train: [{path: a.jsonl, path: b.jsonl}]\n", "duplicate key `data.train[0].path`"),
    ("- a\n- b\n", "must be a mapping"),
    ("model: 3\n", "`model` must be a mapping"),
])
def test_bad_recipe_names_key_and_file(tmp_path, text, needle):
    p = write(tmp_path, text)
    with pytest.raises(UserError) as exc:
        recipe.load(p, gpu=True)
    msg = str(exc.value)
    assert needle in msg
    assert str(p) in msg


def test_bad_yaml_reports_line(tmp_path):
    p = write(tmp_path, "model:\n  base_model: x\n training: [\n")
    with pytest.raises(UserError, match=r"recipe.yaml:\d+: bad YAML"):
        recipe.load(p)


def test_missing_and_empty_recipe(tmp_path):
    with pytest.raises(UserError, match="recipe not found"):
        recipe.load(tmp_path / "nope")
    with pytest.raises(UserError, match="empty recipe"):
        recipe.load(write(tmp_path, ""))


def test_cpu_profile_only_without_gpu(tmp_path):
    p = write(tmp_path, "training:\n  max_steps: 100\ncpu:\n  training:\n    max_steps: 5\n")
    assert recipe.load(p, gpu=True).training.max_steps == 100
    assert recipe.load(p, gpu=False).training.max_steps == 5


def test_overrides_coerce_types(tmp_path):
    p = write(tmp_path, "name: x\n")
    r = recipe.load(p, ["training.max_steps=20", "training.learning_rate=5e-4", "data.packing=false",
                        "lora.target_modules=q_proj,v_proj", "training.epochs=2", "model.base_model=embedded",
                        "name=renamed"], gpu=True)
    assert r.training.max_steps == 20 and r.training.learning_rate == 5e-4 and r.data.packing is False
    assert r.lora.target_modules == ["q_proj", "v_proj"] and r.training.epochs == 2.0 and r.name == "renamed"


@pytest.mark.parametrize("item, needle", [
    ("training.nope=1", "unknown key `training.nope`"),
    ("training.max_steps=abc", "training.max_steps: expected an integer"),
    ("max_steps", "expected section.key=value"),
    ("a.b.c=1", "expected section.key=value"),
    ("training.max_steps=0", "training.max_steps must be > 0"),
    ("lora.target_modules=foo", "lora.target_modules has unknown module 'foo'"),
    ("training.seed=-1", "training.seed must be in [0, 2**32); got -1"),
    ("data.train=[{path: a.jsonl, path: b.jsonl}]", "duplicate key `data.train[0].path`"),
])
def test_bad_overrides(tmp_path, item, needle):
    p = write(tmp_path, "name: x\n")
    with pytest.raises(UserError, match=None) as exc:
        recipe.load(p, [item], gpu=True)
    assert needle in str(exc.value)


def test_data_paths_resolve_against_recipe_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    p = write(tmp_path / "sub", "data:\n  train: d.jsonl\n")
    r = recipe.load(tmp_path / "sub", gpu=True)
    assert r.data_path(r.data.train) == (tmp_path / "sub" / "d.jsonl").resolve()


def test_seed_and_targets_at_their_limits_load(tmp_path):
    p = write(tmp_path, "training:\n  seed: 0\nlora:\n  target_modules: [all-linear]\n")
    assert recipe.load(p, gpu=True).training.seed == 0
    r = recipe.load(p, ["training.seed=4294967295", "lora.target_modules=q_proj,k_proj,v_proj,o_proj,gate_proj,"
                        "up_proj,down_proj"], gpu=True)
    assert r.training.seed == 2**32 - 1 and len(r.lora.target_modules) == 7


BASE_LR_SHADOWED = "training:\n  learning_rate: -2.0e-4\ncpu:\n  training:\n    learning_rate: 1.0e-4\n"
CPU_LR_BAD = "training:\n  learning_rate: 1.0e-4\ncpu:\n  training:\n    learning_rate: -2.0e-4\n"
FALLBACK_LR_BAD = "training:\n  learning_rate: 1.0e-4\nfallback:\n  training:\n    learning_rate: 2\n"
# Cross-field: each profile's values are checked with the base they are applied on.
CPU_PATIENCE_BAD = ("data:\n  eval: h.jsonl\neval:\n  eval_steps: 5\n  early_stopping_patience: 2\n"
                    "cpu:\n  eval:\n    eval_steps: 0\n")


@pytest.mark.parametrize("gpu", [True, False], ids=["gpu", "cpu"])
@pytest.mark.parametrize("text, where, needle", [
    (BASE_LR_SHADOWED, "", "training.learning_rate must be in (0, 1); got -0.0002"),
    (CPU_LR_BAD, " (cpu profile)", "training.learning_rate must be in (0, 1); got -0.0002"),
    (FALLBACK_LR_BAD, " (fallback profile)", "training.learning_rate must be in (0, 1); got 2.0"),
    (CPU_PATIENCE_BAD, " (cpu profile)", "eval.early_stopping_patience needs"),
], ids=["base-shadowed-by-cpu", "cpu", "fallback", "cpu-cross-field"])
def test_every_profile_is_range_checked_on_every_machine(tmp_path, gpu, text, where, needle):
    p = write(tmp_path, text)
    with pytest.raises(UserError) as exc:
        recipe.load(p, gpu=gpu)
    assert str(exc.value).startswith(f"{p}{where}: {needle}")


def test_fallback_profile_with_set_values_names_the_file(tmp_path):
    p = write(tmp_path, "method:\n  name: lora\nfallback:\n  method:\n    name: full\n")
    rec = recipe.load(p, ["training.loraplus_lr_ratio=4"], gpu=True)
    with pytest.raises(UserError) as exc:
        recipe.for_fallback(rec, ["training.loraplus_lr_ratio=4"])
    assert str(exc.value).startswith(f"{p} (fallback profile, with --set): training.loraplus_lr_ratio applies")


def test_recipe_is_read_as_utf8_whatever_the_locale(tmp_path):
    """`recipe new` writes UTF-8; read in the locale's encoding (Windows: cp1252) a system prompt
    in French would reach the model as "rÃ©ponds"."""
    from tests.ascii_locale import run_python

    prompt = "Tu es un conseiller financier — réponds en français."
    text = (ROOT / "recipes/finance/recipe.yaml").read_text(encoding="utf-8")
    text = text.replace("  format: messages\n", f"  format: messages\n  system_prompt: \"{prompt}\"\n")
    (tmp_path / "recipe.yaml").write_text(text, encoding="utf-8")
    proc = run_python("import sys\nfrom toolkit.finetune import recipe\n"
                      "print(ascii(recipe.load(sys.argv[1], gpu=True).data.system_prompt))", str(tmp_path))
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stdout.decode().strip() == ascii(prompt)


@pytest.mark.parametrize("train, needle", [
    ("[{path: a.jsonl, wieght: 2}]", "data.train[0]: unknown key `wieght` (known: path, weight)"),
    ("[{path: a.jsonl, weight: 0}]", "data.train[0].weight must be > 0"),
    ("[{weight: 1}]", "data.train[0].path is required"),
    ("[a.jsonl]", "data.train[0]: expected a mapping with keys path, weight"),
    ("[]", "data.train is required"),
])
def test_bad_weighted_sources(tmp_path, train, needle):
    from toolkit.finetune import recipe

    (tmp_path / "recipe.yaml").write_text(f"data:\n  train: {train}\n")
    with pytest.raises(UserError) as exc:
        recipe.load(tmp_path)
    assert needle in str(exc.value) and str(tmp_path / "recipe.yaml") in str(exc.value)


def test_loraplus_needs_lora_adapters(tmp_path):
    from toolkit.finetune import recipe

    d = make_recipe(tmp_path, "embedded")
    with pytest.raises(UserError, match="training.loraplus_lr_ratio"):
        recipe.load(d, ["method.name=full", "training.loraplus_lr_ratio=16"], gpu=False)
    with pytest.raises(UserError, match="training.loraplus_lr_ratio must be >= 0"):
        recipe.load(d, ["training.loraplus_lr_ratio=-1"], gpu=False)
