"""The CUDA path's first contact, on a CPU: Unsloth imported before TRL/transformers/PEFT, any failure
to get the base falls back with the reason, run.json names the weights actually read and export
loads those, and `make install` does not hide a failed `cuda` extra.

Unsloth itself cannot run here (it raises at import without a GPU): where its import is what is
tested, a stand-in `unsloth` package records what was imported before it.

Also which base a recipe gets (fallback announced, `auto` via the estimator, a base that doesn't
fit) and LoRA gradients unchanged by an eval pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.core.errors import UserError
from tests.finetune.conftest import make_recipe

ROOT = Path(__file__).resolve().parents[2]

RECORDER = """\
import json, os, sys
with open(os.environ["UNSLOTH_IMPORT_RECORD"], "w") as fh:
    json.dump(sorted(m for m in ("trl", "transformers", "peft") if m in sys.modules), fh)
raise SystemExit(7)  # stop: what matters is what was imported before this point
"""


def fake_unsloth(tmp_path) -> Path:
    pkg = tmp_path / "fake" / "unsloth"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(RECORDER)
    return pkg.parent


def test_unsloth_is_imported_before_trl_transformers_and_peft(tmp_path, tiny_llama_dir):
    """`toolkit finetune` on a CUDA device with Unsloth installed: the CLI, recipe, data and
    device code run, and Unsloth's import comes before any library it patches."""
    rec = make_recipe(tmp_path, tiny_llama_dir)
    record = tmp_path / "imported-before-unsloth.json"
    env = dict(os.environ, PYTHONPATH=f"{fake_unsloth(tmp_path)}{os.pathsep}{ROOT}", TOOLKIT_DEVICE="cuda",
               UNSLOTH_IMPORT_RECORD=str(record), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "toolkit", "finetune", str(rec), "--runs-dir", str(tmp_path / "runs"),
                           "--set", "method.compute_dtype=bfloat16"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert record.is_file(), proc.stderr[-2000:]
    assert json.loads(record.read_text()) == [], "imported before unsloth"
    assert proc.returncode == 7


def test_prepare_engine_skips_unsloth_imported_too_late(tmp_path, tiny_llama_dir, monkeypatch):
    import trl  # noqa: F401  (already imported here: Unsloth's patches could not apply)

    from toolkit.finetune import recipe
    from toolkit.finetune.base_model import prepare_engine, unsloth_usable

    monkeypatch.syspath_prepend(str(fake_unsloth(tmp_path)))
    rec = recipe.load(make_recipe(tmp_path, tiny_llama_dir), gpu=True)
    seen = []
    assert prepare_engine(rec, "cpu", seen.append) is False and not seen  # not on a CPU
    rec.method.unsloth = False
    assert prepare_engine(rec, "cuda", seen.append) is False and not seen  # not when the recipe says no
    rec.method.unsloth = True
    assert unsloth_usable(rec, "cuda")
    assert prepare_engine(rec, "cuda", seen.append) is False  # the stand-in was not imported (it would exit)
    assert len(seen) == 1 and "trl" in seen[0] and "imported before it" in seen[0]
    assert rec.method.unsloth is False and not unsloth_usable(rec, "cuda")  # the run records the engine it uses


def _hub_errors():
    import httpx
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    resp = lambda code: httpx.Response(code, request=httpx.Request("GET", "https://huggingface.co/x"))  # noqa: E731
    return [
        RuntimeError("Unsloth: meta-llama/Llama-3.2-1B-Instruct is gated or not reachable"),
        GatedRepoError("Access to model meta-llama/Llama-3.2-1B-Instruct is restricted", response=resp(403)),
        RepositoryNotFoundError("Repository Not Found for url", response=resp(404)),
        EntryNotFoundError("model.safetensors not found"),
        ValueError("no file named model.safetensors found in directory"),
        OSError("We couldn't connect to 'https://huggingface.co'"),
    ]


@pytest.mark.parametrize("error", _hub_errors(), ids=lambda e: type(e).__name__)
def test_any_failure_to_load_the_base_falls_back_with_the_reason(tmp_path, tiny_llama_dir, monkeypatch, error):
    from toolkit.finetune import base_model, recipe

    real = base_model.load_for_training
    wanted = "meta-llama/Llama-3.2-1B-Instruct"

    def load(source, *a, **kw):  # failure injection for the requested base only; the fallback loads for real
        if source == wanted:
            raise error
        return real(source, *a, **kw)

    monkeypatch.setattr(base_model, "load_for_training", load)
    rec = recipe.load(make_recipe(tmp_path, wanted), [f"model.fallback_model={tiny_llama_dir}", "method.name=lora"],
                      gpu=False)
    seen = []
    choice, rec2, model, tok, notes = base_model.load_with_fallback(
        base_model.BaseChoice(wanted, wanted, wanted), rec, "cpu", "float32", seen.append)
    assert choice.spec == str(tiny_llama_dir) and choice.requested == wanted
    assert type(error).__name__ in choice.fallback_reason and str(error).split()[0] in choice.fallback_reason
    assert len(seen) == 1 and seen[0].startswith(f"FALLBACK: base model {wanted} unavailable (loading failed")
    assert type(model).__name__ == "PeftModelForCausalLM" and rec2 is rec


def test_a_broken_base_folder_falls_back_and_a_broken_fallback_is_one_line(tmp_path, tiny_llama_dir):
    """No injection: a base folder whose weights are missing makes transformers raise, for real."""
    from toolkit.finetune import base_model, recipe

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_llama_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            (broken / f.name).write_bytes(f.read_bytes())
    rec = recipe.load(make_recipe(tmp_path, broken), [f"model.fallback_model={tiny_llama_dir}", "method.name=lora"],
                      gpu=False)
    choice = base_model.resolve_base(rec, print)
    assert choice.source == str(broken)
    choice, _, model, _, _ = base_model.load_with_fallback(choice, rec, "cpu", "float32", lambda s: None)
    assert choice.spec == str(tiny_llama_dir) and choice.fallback_reason.startswith("loading failed: OSError")
    rec.model.fallback_model = str(broken)
    first = base_model.BaseChoice(str(tiny_llama_dir), str(broken), "x", fallback_reason="earlier")
    with pytest.raises(UserError, match=r"^model.fallback_model .*: loading failed"):
        base_model.load_with_fallback(first, rec, "cpu", "float32", lambda s: None)


def test_loaded_weights_names_what_was_read_and_export_loads_it(tmp_path, tiny_llama_dir):
    """A hub repo read from the HF cache (as Unsloth's swapped-in `unsloth/...-bnb-4bit` repo is) is
    recorded as its snapshot folder, repo id and commit; the run's base for export is that folder,
    or the repo when the folder isn't on this machine, never the gated id the recipe named."""
    from transformers import AutoModelForCausalLM

    from toolkit.core.models import run_base_source
    from toolkit.export.pipeline import _base_folder, resolve_source
    from toolkit.finetune.base_model import loaded_weights

    repo, commit = "unsloth/llama-3.2-1b-instruct-bnb-4bit", "0123456789abcdef0123456789abcdef01234567"
    cache = tmp_path / "hub"
    snap = cache / ("models--" + repo.replace("/", "--")) / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in tiny_llama_dir.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(commit)
    model = AutoModelForCausalLM.from_pretrained(repo, cache_dir=cache, local_files_only=True)
    got = loaded_weights(model, "meta-llama/Llama-3.2-1B-Instruct", cache_dir=str(cache))
    assert got == {"base_weights": str(snap), "base_weights_repo": repo, "base_revision": commit}
    assert loaded_weights(model, "x", cache_dir=str(tmp_path / "empty"))["base_weights"] == repo
    local = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    assert loaded_weights(local, str(tiny_llama_dir))["base_weights"] == str(Path(tiny_llama_dir).resolve())

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text("{}")
    info = {"base_model": "meta-llama/Llama-3.2-1B-Instruct", "base_source": "meta-llama/Llama-3.2-1B-Instruct", **got}
    (run / "run.json").write_text(json.dumps(info))
    assert run_base_source(run) == str(snap)
    assert _base_folder(resolve_source(str(run))) == snap
    info["base_weights"] = "/elsewhere/snapshot"  # run folder copied from another machine
    (run / "run.json").write_text(json.dumps(info))
    assert run_base_source(run) == repo
    del info["base_weights"], info["base_weights_repo"]  # a run recorded before base_weights existed
    (run / "run.json").write_text(json.dumps(info))
    assert run_base_source(run) == "meta-llama/Llama-3.2-1B-Instruct"


def _make_install_commands(**env) -> str:
    """The install recipe `make` would run on a machine with an NVIDIA GPU (printed, not run)."""
    vars_ = [f"{k}={v}" for k, v in env.items()]
    proc = subprocess.run(["make", "-n", "-B", "HAS_NVIDIA=1", *vars_, ".venv/.installed"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_install_on_cuda_adds_unsloth_only_when_asked_and_then_fails_loudly():
    # Default: the pinned stack only (the released Unsloth's caps exclude our transformers/trl/datasets pins).
    default = _make_install_commands()
    assert '".[test,cuda]"' not in default and '-e ".[test]"' in default
    cuda = _make_install_commands(UNSLOTH=1)
    line = next(x for x in cuda.splitlines() if "pip install" in x and ".[test" in x)
    assert '".[test,cuda]"' in line and '".[test]"' not in line and "exit 1" in line


def test_unsloth_pin_conflict_note_matches_the_pins():
    """The Makefile says why Unsloth is opt-in; if the pins move back under Unsloth's caps, this fails
    and the default should be revisited."""
    from packaging.version import Version

    pins = {}
    for dep in __import__("tomllib").loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        if "==" in dep:
            name, ver = dep.split("==")
            pins[name.split("[")[0]] = Version(ver)
    assert "transformers<=5.17, trl<=1.15 and datasets<5" in (ROOT / "Makefile").read_text()
    assert pins["transformers"] > Version("5.17") or pins["trl"] > Version("1.15") or pins["datasets"] >= Version("5")


# --- choosing the base (fallback, auto, fit) and training it ---


@pytest.mark.usefixtures("one_torch_thread")
def test_fallback_is_announced_and_missing_fallback_is_an_error(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    from toolkit.finetune import recipe
    from toolkit.finetune.base_model import resolve_base

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rec = recipe.load(make_recipe(tmp_path, "meta-llama/Llama-3.2-1B-Instruct"),
                      [f"model.fallback_model={tiny_llama_dir}"], gpu=False)
    seen = []
    choice = resolve_base(rec, seen.append)
    assert choice.spec == str(tiny_llama_dir) and choice.requested == "meta-llama/Llama-3.2-1B-Instruct"
    assert len(seen) == 1 and seen[0].startswith("FALLBACK:") and "HF_HUB_OFFLINE" in seen[0]
    rec.model.fallback_model = ""
    with pytest.raises(UserError, match="no model.fallback_model"):
        resolve_base(rec, seen.append)


@pytest.mark.usefixtures("one_torch_thread")
def test_auto_base_uses_the_estimator(tmp_path, tiny_llama_dir):
    from toolkit.estimate.pick import pick as estimator_pick
    from toolkit.estimate.planner import ALL_LINEAR
    from toolkit.estimate.timeplan import DEFAULT_TIME_BUDGET_S, rates_here, time_fields
    from toolkit.finetune import recipe
    from toolkit.finetune.plan import plan_inputs, run_shape
    from toolkit.core.hardware import detect
    from toolkit.finetune.base_model import resolve_base

    rec = recipe.load(make_recipe(tmp_path, "auto"), [f"model.fallback_model={tiny_llama_dir}"], gpu=False)
    seen = []
    choice = resolve_base(rec, seen.append)
    # The recipe's own settings (make_recipe): QLoRA nf4 + double quant, seq 256, batch 2, r 8, dropout
    # 0.05, no gradient checkpointing, all linear layers, AdamW; its run's steps and tokens, within the
    # CPU's default time budget at this machine's rates.
    rates, run = rates_here("float32"), run_shape(rec)
    targets = ALL_LINEAR
    p = plan_inputs(rec, "cpu", "float32")  # computing in fp32 (resolve_base's default), the head's packs if any
    pick = estimator_pick("qlora", detect().available_bytes, seq_len=256, batch=2, lora_r=8, device="cpu",
                         quants=("nf4-dq",), grad_ckpt=False, lora_dropout=0.05, targets=targets,
                         seconds_of=lambda m, e: time_fields(m, e, rates, targets=targets, run=run,
                                                             lora_dropout=0.05)["train_wall_s"],
                         time_budget_s=DEFAULT_TIME_BUDGET_S["cpu"], compute="fp32", packed_weights=p.packed_weights)
    assert (p.task, p.quant, p.seq_len, p.batch, p.lora_r, p.grad_ckpt, p.lora_dropout, p.targets, p.compute) == \
        ("qlora", "nf4-dq", 256, 2, 8, False, 0.05, targets, "fp32")
    assert seen[0].startswith(f"base_model auto: estimator picked {pick.model}")
    assert choice.spec in (pick.model, str(tiny_llama_dir))


@pytest.mark.usefixtures("one_torch_thread")
def test_base_that_does_not_fit_falls_back(tmp_path, tiny_llama_dir, monkeypatch):
    from toolkit.core import hardware
    from toolkit.finetune import recipe
    from toolkit.finetune.base_model import resolve_base

    tiny_machine = hardware.Hardware("cpu", "test box", 2 * 2**30, 1 * 2**30, "test")
    monkeypatch.setattr(hardware, "detect", lambda use_torch=False: tiny_machine)
    rec = recipe.load(make_recipe(tmp_path, "meta-llama/Llama-3.1-8B-Instruct"),
                      [f"model.fallback_model={tiny_llama_dir}"], gpu=False)
    seen = []
    choice = resolve_base(rec, seen.append)
    assert choice.spec == str(tiny_llama_dir) and "doesn't fit" in choice.fallback_reason
    assert seen[0].startswith("FALLBACK:")


@pytest.mark.usefixtures("one_torch_thread")
def test_lora_gradients_are_the_same_after_an_eval_pass(tmp_path, tiny_llama_dir):
    """bitsandbytes repacks 4-bit weights for a backward-less CPU kernel on the first eval-mode
    forward; the trainer evaluates before training, so that must not change any gradient."""
    import torch

    from toolkit.finetune import recipe
    from toolkit.finetune.base_model import load_for_training

    rec = recipe.load(make_recipe(tmp_path, tiny_llama_dir), gpu=False)

    def lora_grads(eval_first: bool) -> dict:
        torch.manual_seed(0)
        model, tok, _ = load_for_training(str(tiny_llama_dir), rec, "cpu", "bfloat16")
        ids = torch.tensor([tok("Compound interest grows on past interest.")["input_ids"]])
        if eval_first:
            model.eval()
            with torch.no_grad():
                model(input_ids=ids)
        model.train()
        gen = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero; non-zero B lets gradients reach lower layers' A
                torch.nn.init.normal_(p, std=0.02, generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    straight, after_eval = lora_grads(False), lora_grads(True)
    first_layer_a = [n for n in straight if ".layers.0." in n and "lora_A" in n]
    assert first_layer_a and all(straight[n].abs().sum() > 0 for n in first_layer_a)
    for name, grad in straight.items():
        torch.testing.assert_close(after_eval[name], grad, msg=f"gradient of {name} changed after an eval pass")
