"""Training on a tiny random Llama (real ChatML tokenizer): run folder, Ctrl-C in the last step,
two-process accelerate run, the weights kept when saving or the report fails, fallback profile,
LoRA+, and CLI bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.core.errors import UserError
from tests.finetune.conftest import adapter_tensors, make_recipe, sigint_at_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_finetune_writes_complete_run_folder(tmp_path, tiny_llama_dir, capsys):
    from toolkit.core.loading import load_model
    from toolkit.finetune.trainer import finetune

    runs = tmp_path / "runs"
    run = finetune(make_recipe(tmp_path, tiny_llama_dir), runs_dir=runs, gpu=False)
    out, err = capsys.readouterr()
    assert out == "" and "run saved:" in err  # progress on stderr; stdout is for results
    assert run.parent == runs and run.name.startswith("tiny-") and not run.name.endswith(".incomplete")
    assert (runs / "latest").resolve() == run.resolve()
    assert [p.name for p in runs.iterdir() if p.name != "latest"] == [run.name]  # nothing else left behind
    for f in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer_config.json",
              "recipe.yaml", "metrics.jsonl", "loss.png", "report.json", "report.md", "run.json"):
        assert (run / f).is_file(), f
    assert not (run / "checkpoints").exists() and not (run / "INCOMPLETE").exists()
    assert list((run / "tb").glob("events.out.tfevents.*"))
    tok_cfg = json.loads((run / "adapter" / "tokenizer_config.json").read_text())
    chat_template = tok_cfg.get("chat_template") or (run / "adapter" / "chat_template.jinja").read_text()
    assert "<|im_start|>" in chat_template
    info = json.loads((run / "run.json").read_text())
    assert info["recipe"] == "tiny" and info["method"] == "qlora" and info["steps"] == 4
    assert info["base_model"] == str(tiny_llama_dir) and Path(info["base_source"]).is_dir()
    assert info["train_examples"] == 16 and info["tokens_per_s"] > 0
    # A base outside the estimator's catalog: measured, nothing planned (the catalog's case: tests/test_e2e.py).
    mem = info["memory"]
    assert mem["planned_peak_bytes"] is None and 0 < mem["training_peak_bytes"] <= mem["run_peak_bytes"]
    assert any(x.startswith("memory: training peaked at ") and "plan" not in x for x in err.splitlines())
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in rows) >= 4
    # eval every 2 of 4 steps, and the report measures steps 0 (base) and 4 (fine-tuned) on all held-out
    assert [r["step"] for r in rows if "eval_loss" in r] == [2]
    rep = json.loads((run / "report.json").read_text())
    for side in ("base", "finetuned"):
        assert rep[side]["answer_loss"] > 0 and rep[side]["general_ppl"] > 1
    assert len(rep["samples"]) == 2 and "answer-token loss" in (run / "report.md").read_text()
    # The report's passes said as they ended, and its result in one line before the run's folder.
    from toolkit.finetune.report import summary

    lines = err.splitlines()
    said = [i for i, x in enumerate(lines) if x.startswith("report: ")]
    sides = [lines[i].split(":")[1].strip() for i in said]
    assert sides[-3:-1] == ["base", "fine-tuned"]  # after the paired answers' line where they ran paired
    assert lines[said[-1]] == f"report: {summary(rep)} (report.md)" and lines[said[-1] + 1].startswith("run saved:")
    assert "keys" in rep["samples"][0]
    # The lead's loader takes the run folder as is (base + adapter).
    model, tok = load_model(str(run))
    assert type(model).__name__ == "PeftModelForCausalLM" and tok.eos_token == "<|im_end|>"


def test_a_failure_saving_the_run_names_where_the_weights_are(tmp_path, tiny_llama_dir, monkeypatch):
    """A full disk while run.json is written: one line naming the folder that holds the adapter."""
    from toolkit.finetune import run_folder
    from toolkit.finetune.trainer import finetune

    def full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run_folder, "write_json", full)
    rec = make_recipe(tmp_path, tiny_llama_dir, extra="")
    with pytest.raises(UserError, match=r"saving the run failed after training .*No space left.*trained weights are in"):
        finetune(rec, ["training.max_steps=2", "eval.report=false", "data.eval="], runs_dir=tmp_path / "runs", gpu=False)
    (stage,) = list((tmp_path / "runs").iterdir())
    assert (stage / "adapter" / "adapter_config.json").is_file()


def test_ctrl_c_in_the_last_step_finishes_the_run(tmp_path, tiny_llama_dir):
    """Nothing is left to train, and a resume from the last checkpoint would train past max_steps."""
    from toolkit.finetune.trainer import finetune

    rec = make_recipe(tmp_path, tiny_llama_dir, extra="")
    runs = tmp_path / "runs"
    run = finetune(rec, ["training.max_steps=3", "eval.report=false", "data.eval="], runs_dir=runs, gpu=False,
                   callbacks=[sigint_at_step(3)])
    assert not run.name.endswith(".incomplete") and json.loads((run / "run.json").read_text())["steps"] == 3
    assert (runs / "latest").resolve() == run.resolve()


def _env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOOLKIT_DEVICE="cpu", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return env


@pytest.mark.slow
def test_two_process_accelerate_run_saves_once(tmp_path, tiny_llama_dir):
    rec = make_recipe(tmp_path, tiny_llama_dir)
    runs = tmp_path / "runs"
    # accelerate's torchrun launcher (--multi_gpu) spawns the ranks; on CPU (TOOLKIT_DEVICE=cpu) they join a gloo group.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "toolkit",
           "finetune", str(rec), "--runs-dir", str(runs), "--set", "training.max_steps=4",
           "--set", "eval.report=false", "--set", "eval.eval_steps=2"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs_made = [p for p in runs.iterdir() if p.name != "latest"]
    assert len(runs_made) == 1 and not runs_made[0].name.endswith(".incomplete")
    info = json.loads((runs_made[0] / "run.json").read_text())
    assert info["world_size"] == 2 and info["steps"] == 4
    assert proc.stderr.count("run saved:") == 1
    # Each process saw its own half of every batch: tokens seen are gathered over both ranks.
    assert info["tokens_seen"] > 0 and (runs_made[0] / "adapter" / "adapter_model.safetensors").is_file()


def test_cli_missing_recipe_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "toolkit", "finetune", "missing-recipe"], cwd=tmp_path,
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: recipe not found: missing-recipe (expected a folder with "
                                                "recipe.yaml, or a .yaml file)"]


@pytest.mark.slow
def test_cli_bad_input_exits_2_with_one_line_and_leaves_nothing(tmp_path, tiny_llama_dir, capsys, monkeypatch):
    from toolkit.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rec = make_recipe(tmp_path, tiny_llama_dir)
    runs = tmp_path / "runs"
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("training: [\n")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("training:\n  epoch: 1\n")
    (rec / "broken.jsonl").write_text((rec / "train.jsonl").read_text() + "{oops\n")
    (rec / "empty.jsonl").write_text("")
    cases = [
        ([str(bad_yaml)], "bad YAML"),
        ([str(unknown)], "unknown key `training.epoch`"),
        ([str(rec), "--set", "data.train=broken.jsonl"], "broken.jsonl:17: invalid JSON"),
        ([str(rec), "--set", "data.train=empty.jsonl"], "empty split"),
        ([str(rec), "--set", "training.max_steps=-5"], "training.max_steps"),
        ([str(rec), "--runs-dir", str(rec / "train.jsonl" / "runs")], "not writable"),
        ([str(rec), "--set", "data.max_seq_len=16", "--set", "data.overlong=drop"], "split is empty"),
    ]
    for args, needle in cases:
        argv = ["finetune", *args] if "--runs-dir" in args else ["finetune", *args, "--runs-dir", str(runs)]
        capsys.readouterr()
        assert main(argv) == 2, args
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and needle in err[0], (args, err)
        assert not runs.exists() or not any(runs.iterdir()), args


# --- after training: the weights are never lost ---


@pytest.mark.slow
def test_report_failure_keeps_the_trained_run_and_exits_nonzero(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    from toolkit.cli import main
    from toolkit.core import allocator
    from toolkit.core.loading import load_model
    from toolkit.finetune import report

    order = []

    def broken_evaluate(*a, **kw):  # failure injection: the report phase fails after training
        order.append("report")
        raise RuntimeError("CUDA out of memory while evaluating")

    monkeypatch.setattr(report, "evaluate", broken_evaluate)
    # training's freed pages go back to the OS before the report (allocator.release_free_memory)
    monkeypatch.setattr(allocator, "release_free_memory", lambda: order.append("release"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runs = tmp_path / "runs"
    rec = make_recipe(tmp_path, tiny_llama_dir)
    code = main(["finetune", str(rec), "--runs-dir", str(runs), "--set", "training.max_steps=2"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(err) == 1 and "CUDA out of memory while evaluating" in err[0]
    assert order == ["release", "report"]
    (run,) = [p for p in runs.iterdir() if p.name != "latest"]
    assert not run.name.endswith(".incomplete") and not (run / "INCOMPLETE").exists()
    assert (runs / "latest").resolve() == run.resolve() and str(run) in err[0]
    info = json.loads((run / "run.json").read_text())
    assert info["report_error"] == "RuntimeError: CUDA out of memory while evaluating" and info["steps"] == 2
    assert "broken_evaluate" in (run / "report_error.txt").read_text()
    assert (run / "adapter" / "adapter_model.safetensors").is_file() and not (run / "report.json").exists()
    model, tok = load_model(str(run))  # what `toolkit export` / `toolkit chat` do with it
    assert type(model).__name__ == "PeftModelForCausalLM"


@pytest.mark.slow
def test_interrupt_after_training_keeps_the_weights(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    """Ctrl-C during the report, with no checkpoint saved (save_steps 0): the adapter stays, and the
    message says where."""
    from toolkit.finetune import report
    from toolkit.finetune.trainer import finetune

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "plot_losses", interrupted)
    runs = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        finetune(make_recipe(tmp_path, tiny_llama_dir), ["training.max_steps=1", "eval.report=false"], runs_dir=runs,
                 gpu=False)
    (stage,) = list(runs.iterdir())
    assert stage.name.endswith(".incomplete") and not list(stage.glob("checkpoints/checkpoint-*"))
    assert (stage / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((stage / "run.json").read_text())["steps"] == 1
    assert f"the trained weights are saved in {stage}" in capsys.readouterr().err


@pytest.mark.slow
def test_fallback_trains_with_the_fallback_profile(tmp_path, tiny_llama_dir, monkeypatch):
    """The GPU recipe (gpu=True: no cpu profile) falls back to the small model: the run uses the
    recipe's `fallback:` settings, then the --set overrides, and records them."""
    from toolkit.finetune.trainer import finetune

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rec = make_recipe(tmp_path, "meta-llama/Llama-3.2-1B-Instruct",
                      extra="fallback:\n  method:\n    name: lora\n  lora:\n    r: 4\n  training:\n    max_steps: 3\n")
    run = finetune(rec, [f"model.fallback_model={tiny_llama_dir}", "eval.report=false", "training.max_steps=2"],
                   runs_dir=tmp_path / "runs", gpu=True)
    info = json.loads((run / "run.json").read_text())
    assert info["profile"] == "fallback" and info["base_model"] == str(tiny_llama_dir) and info["fallback_reason"]
    assert info["method"] == "lora" and info["steps"] == 2  # the profile, then --set
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 4
    assert (run / "recipe.yaml").read_text().startswith("# resolved recipe 'tiny' (profile: fallback)")
    assert info["base_weights"] == str(Path(tiny_llama_dir).resolve()) and info["packing"].startswith("padding-free")
    # packed CPU training records the attention kernel the capability decision picked, and why
    from toolkit.core.hardware import attention_choice
    from toolkit.finetune.packed_attention import name

    choice = attention_choice("cpu", info["compute_dtype"])
    assert [info["packed_attention"], info["packed_attention_reason"]] == [
        name(choice.kernel, choice.fallback, choice.max_padding), choice.reason]


@pytest.mark.slow
def test_loraplus_ratio_scales_the_b_matrices_step(tmp_path, tiny_llama_dir):
    """LoRA B starts at zero and Adam's first step moves each weight by the learning rate times the
    sign of its gradient: after one step |B| is lr × ratio under LoRA+, lr without."""
    import torch

    from toolkit.finetune.trainer import finetune

    lr, ratio = 1e-3, 16.0
    sets = ["training.max_steps=1", "training.warmup_ratio=0", "training.lr_scheduler=constant",
            "eval.eval_steps=0", "eval.report=false", f"training.learning_rate={lr}",
            f"training.loraplus_lr_ratio={ratio}"]
    run = finetune(make_recipe(tmp_path, tiny_llama_dir), overrides=sets, runs_dir=tmp_path / "runs", gpu=False)
    b = torch.cat([t.abs().flatten() for k, t in adapter_tensors(run).items() if "lora_B" in k])
    assert b.max().item() == pytest.approx(lr * ratio, rel=1e-3)
    assert json.loads((run / "run.json").read_text())["steps"] == 1


def test_the_run_peak_is_at_least_the_trainings():
    from toolkit.finetune.run_memory import add_run_peak

    memory = {"training_peak_bytes": 2691956736}
    add_run_peak(memory, {"peak_bytes": 2691698688})  # VmHWM read lower after the report (a test run)
    assert memory["run_peak_bytes"] == 2691956736
    add_run_peak(memory, {"peak_bytes": 3 * 2**30})
    assert memory["run_peak_bytes"] == 3 * 2**30
    empty = {"training_peak_bytes": None}  # a resumed run that only made its report
    add_run_peak(empty, {"peak_bytes": 5})
    assert empty["run_peak_bytes"] == 5
