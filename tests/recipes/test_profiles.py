"""Every shipped recipe's profiles (GPU, `cpu:`, `fallback:`) are sized for their model and data:
several evaluations and at least one checkpoint per run, counted from the data the way the
trainer counts it; the fallback profile replaces the big model's settings on a GPU; and
`make gpu-check` plans its runs on any machine (`--dry-run`)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.core.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "recipes").glob("*/recipe.yaml"))


def profiles(path: Path) -> list[tuple[str, object]]:
    from toolkit.finetune import recipe

    gpu = recipe.load(path, gpu=True)
    out = [("gpu", gpu)]
    cpu = recipe.load(path, gpu=False)
    if cpu.profile == "cpu":
        out.append(("cpu", cpu))
    fb = recipe.for_fallback(gpu)
    if fb.profile == "fallback":
        out.append(("fallback", fb))
    return out


@pytest.fixture(scope="module")
def tokenizers():
    """Each model's own tokenizer, offline: token counts (and so packed rows) depend on it."""
    from transformers import AutoTokenizer

    from toolkit.core.models import embedded_hf_dir
    from toolkit.core.reference_models import load_llama32_tokenizer

    cache = {}

    def get(spec: str):
        if spec not in cache:
            if spec == "embedded":
                cache[spec] = AutoTokenizer.from_pretrained(embedded_hf_dir())
            elif spec.startswith("meta-llama/Llama-3.2"):
                cache[spec] = load_llama32_tokenizer()
            else:
                pytest.skip(f"no offline tokenizer for {spec}")
        return cache[spec]

    return get


def optimizer_steps(rec, tok) -> int:
    """Optimizer steps of a run of `rec`: its data tokenized by the toolkit, packed by TRL's own BFD
    packer into rows of max_seq_len, then transformers' rule (batches per epoch / grad_accum,
    rounded up, times epochs rounded up; or max_steps)."""
    from trl.data_utils import pack_dataset

    from toolkit.finetune import data as data_mod

    d, t = rec.data, rec.training
    train, _ = data_mod.read_splits(rec)
    split = data_mod.tokenize_split(tok, train, d.max_seq_len, d.overlong, d.completion_only_loss, "train")
    rows = len(split.input_ids)
    if d.packing:
        rows = len(pack_dataset(data_mod.to_dataset(split), d.max_seq_len, "bfd"))
    batches = math.ceil(rows / t.batch_size)
    per_epoch = max(math.ceil(batches / t.grad_accum), 1)
    return t.max_steps if t.max_steps > 0 else math.ceil(t.epochs * per_epoch)


CASES = [(p, name) for p in SHIPPED for name, _ in profiles(p)]


@pytest.mark.parametrize("path,profile", CASES, ids=[f"{p.parent.name}-{n}" for p, n in CASES])
def test_profile_evaluates_several_times_and_saves(path, profile, tokenizers):
    rec = dict(profiles(path))[profile]
    model = rec.model.fallback_model if profile == "fallback" else rec.model.base_model
    steps = optimizer_steps(rec, tokenizers(model))
    where = f"{path} ({profile} profile, {model}): {steps} optimizer steps"
    if rec.data.eval:
        from toolkit.finetune.plan import in_training_evals, report_ends

        # the report measures the base and the fine-tuned model; the trainer the steps between
        ends = report_ends(rec.eval)
        evals = len(in_training_evals(steps, rec.eval.eval_steps, ends)) + 2 * ends
        # A CPU run is time-boxed (the report's two measurements are its evaluation budget); a GPU run
        # should also show the held-out loss along the way.
        least = 2 if profile == "cpu" else 3
        assert evals >= least, f"{where}, eval_steps {rec.eval.eval_steps}: {evals} evaluations"
    assert rec.training.save_steps and steps // rec.training.save_steps >= 1, \
        f"{where}, save_steps {rec.training.save_steps}: no checkpoint"


def test_fallback_profile_replaces_the_big_models_settings_on_a_gpu_only():
    from toolkit.finetune import recipe

    path = ROOT / "recipes" / "finance"
    gpu = recipe.load(path, gpu=True)
    fb = recipe.for_fallback(gpu, ["training.max_steps=9"])
    assert fb.profile == "fallback" and gpu.profile == "" and fb is not gpu
    assert (fb.method.name, fb.training.learning_rate, fb.training.gradient_checkpointing) == ("lora", 5e-4, False)
    assert (gpu.method.name, gpu.training.learning_rate) == ("qlora", 2e-4)  # the original is untouched
    assert fb.training.max_steps == 9  # --set still comes last
    assert "(profile: fallback)" in recipe.dump(fb) and "fallback_profile" not in recipe.dump(fb)
    cpu = recipe.load(path, gpu=False)
    assert recipe.for_fallback(cpu) is cpu  # the cpu profile already targets the small model
    assert recipe.for_fallback(fb) is fb


def test_fallback_profile_is_validated_where_it_is_not_applied(tmp_path):
    from toolkit.finetune import recipe

    bad = tmp_path / "r.yaml"
    bad.write_text("model:\n  base_model: embedded\nfallback:\n  training:\n    learning_rat: 1.0e-3\n")
    with pytest.raises(UserError, match=r"r.yaml \(fallback profile\): unknown key `training.learning_rat`"):
        recipe.load(bad, gpu=False)


def test_gpu_check_dry_run_plans_every_measurement_without_a_gpu():
    out = ROOT / "benchmarks" / "gpu-results.json"
    before = out.stat().st_mtime_ns if out.exists() else None
    env = dict(os.environ, HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert "1,235,814,400 parameters (built on the meta device)" in lines[0]  # Llama-3.2-1B's count
    memory = [x for x in lines if x.startswith("would measure: ") and "max_memory_allocated" in x]
    assert [x.split(",")[0] for x in memory] == [f"would measure: {m} seq {s} batch {b}" for m in ("qlora", "lora")
                                                 for s, b in ((512, 1), (2048, 1), (512, 8))]
    assert any("20 steps of the finance recipe with transformers+peft: tokens/s" in x for x in lines)
    assert (out.stat().st_mtime_ns if out.exists() else None) == before  # a dry run writes nothing
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr


def test_on_a_cpu_the_finance_recipe_trains_the_embedded_model_even_where_its_llama_is_at_hand(
        tiny_llama32_dir, tmp_path, monkeypatch):
    """The `cpu:` profile is sized and tuned for the embedded model. A CPU whose HF cache holds the recipe's
    Llama-3.2-1B had trained that instead (12-28 min planned, against the profile's 10-min target)."""
    import shutil

    from huggingface_hub import constants

    from toolkit.finetune import base_model, recipe

    path = ROOT / "recipes" / "finance"
    gpu, cpu = recipe.load(path, gpu=True), recipe.load(path, gpu=False)
    repo = gpu.model.base_model
    assert repo.startswith("meta-llama/Llama-3.2")
    # The hub cache's own layout, holding the recipe's base (a tiny model of its family stands in for it).
    snapshot = tmp_path / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_llama32_dir, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert base_model.available_source(repo, 0.1) == repo  # the cache above is found

    said = []
    choice = base_model.resolve_base(cpu, announce=said.append, device="cpu")
    assert (choice.spec, choice.requested, choice.fallback_reason, said) == ("embedded", "embedded", "", [])
    # A user who wants the 1B on a CPU says so (whether it then fits is the memory rule's, tested apart).
    assert recipe.load(path, [f"model.base_model={repo}"], gpu=False).model.base_model == repo
