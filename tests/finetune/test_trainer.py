"""Training on a tiny random Llama (real ChatML tokenizer): run folder, Ctrl-C + resume equivalence,
two-process accelerate run, fallback announcement, and CLI bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.core.errors import UserError


@pytest.fixture(autouse=True)
def one_torch_thread(monkeypatch):
    """The test machine's cores are shared: one intra-op thread per process avoids spin-wait thrash
    (TOOLKIT_THREADS: finetune() would otherwise set the physical core count)."""
    import torch

    monkeypatch.setenv("TOOLKIT_THREADS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

ROOT = Path(__file__).resolve().parents[2]
FINANCE = ROOT / "recipes" / "finance"


def make_recipe(tmp_path, base, *, n_train=16, n_eval=4, extra=""):
    """A small QLoRA recipe on `base` using a slice of the finance data."""
    d = tmp_path / "rec"
    d.mkdir(exist_ok=True)
    (d / "train.jsonl").write_text("".join((FINANCE / "train.jsonl").read_text().splitlines(True)[:n_train]))
    (d / "heldout.jsonl").write_text("".join((FINANCE / "heldout.jsonl").read_text().splitlines(True)[:n_eval]))
    (d / "recipe.yaml").write_text(f"""\
name: tiny
model:
  base_model: {base}
  fallback_model: ""
method:
  name: qlora
lora:
  r: 8
  alpha: 16
  dropout: 0.05
data:
  train: train.jsonl
  eval: heldout.jsonl
  max_seq_len: 256
training:
  max_steps: 4
  batch_size: 2
  learning_rate: 1.0e-3
  save_steps: 0
  logging_steps: 1
  seed: 3
eval:
  eval_steps: 2
  generation_samples: 2
  max_new_tokens: 4
  side_by_side: 2
{extra}""")
    return d


def adapter_tensors(run):
    from safetensors.torch import load_file

    return load_file(str(Path(run) / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_finetune_writes_complete_run_folder(tmp_path, tiny_llama_dir, capsys):
    from toolkit.core.models import load_model
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
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum("loss" in r for r in rows) >= 4
    # eval every 2 of 4 steps, and the report measures steps 0 (base) and 4 (fine-tuned) on all held-out
    assert [r["step"] for r in rows if "eval_loss" in r] == [2]
    rep = json.loads((run / "report.json").read_text())
    for side in ("base", "finetuned"):
        assert rep[side]["answer_loss"] > 0 and rep[side]["general_ppl"] > 1
    assert len(rep["samples"]) == 2 and "answer-token loss" in (run / "report.md").read_text()
    assert "keys" in rep["samples"][0]
    # The lead's loader takes the run folder as is (base + adapter).
    model, tok = load_model(str(run))
    assert type(model).__name__ == "PeftModelForCausalLM" and tok.eos_token == "<|im_end|>"


def sigint_at_step(step):
    """A callback delivering a real SIGINT to this process at `step` (what Ctrl-C does)."""
    from transformers import TrainerCallback

    class SigintAtStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == step:
                signal.raise_signal(signal.SIGINT)

    return SigintAtStep()


@pytest.mark.slow
def test_ctrl_c_checkpoint_then_resume_equals_straight_run(tmp_path, tiny_llama_dir):
    from toolkit.finetune.trainer import finetune

    rec = make_recipe(tmp_path, tiny_llama_dir, extra="")
    sets = ["training.max_steps=5", "eval.report=false", "data.eval="]
    straight = finetune(rec, sets, runs_dir=tmp_path / "a", gpu=False)

    runs = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        finetune(rec, sets, runs_dir=runs, gpu=False, callbacks=[sigint_at_step(2)])
    (stage,) = list(runs.iterdir())
    assert stage.name.endswith(".incomplete") and (stage / "INCOMPLETE").is_file()
    # The step in flight when Ctrl-C lands finishes first, then the checkpoint is written.
    assert [p.name for p in (stage / "checkpoints").glob("checkpoint-*")] == ["checkpoint-3"]
    assert not (runs / "latest").exists()

    resumed = finetune(rec, sets, runs_dir=runs, resume=True, gpu=False)
    assert resumed.name == stage.name.removesuffix(".incomplete") and not stage.exists()
    info = json.loads((resumed / "run.json").read_text())
    assert info["resumed_from"] == "checkpoint-3" and info["steps"] == 5
    a, b = adapter_tensors(straight), adapter_tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() < 1e-6, k
    loss = lambda run: [json.loads(x).get("loss") for x in (run / "metrics.jsonl").read_text().splitlines()]
    final_a = [x for x in loss(straight) if x is not None][-1]
    final_b = [x for x in loss(resumed) if x is not None][-1]
    assert final_a == pytest.approx(final_b, rel=1e-5)
    # run.json's mean loss covers every step, not only the resumed session's (logged to 4 digits)
    straight_info = json.loads((straight / "run.json").read_text())
    assert info["train_loss"] == pytest.approx(straight_info["train_loss"], abs=2e-4)

    with pytest.raises(UserError, match="no interrupted run"):
        finetune(rec, sets, runs_dir=runs, resume=True, gpu=False)


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


def test_auto_base_uses_the_estimator(tmp_path, tiny_llama_dir):
    from toolkit.estimate.pick import pick as estimator_pick
    from toolkit.estimate.planner import ALL_LINEAR
    from toolkit.estimate.timeplan import DEFAULT_TIME_BUDGET_S, rates_here, time_fields
    from toolkit.finetune import recipe
    from toolkit.finetune.plan import run_shape
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
    pick = estimator_pick("qlora", detect().available_bytes, seq_len=256, batch=2, lora_r=8, device="cpu",
                         quants=("nf4-dq",), grad_ckpt=False, lora_dropout=0.05, targets=targets,
                         seconds_of=lambda m, e: time_fields(m, e, rates, targets=targets, run=run)["train_wall_s"],
                         time_budget_s=DEFAULT_TIME_BUDGET_S["cpu"])
    assert seen[0].startswith(f"base_model auto: estimator picked {pick.model}")
    assert choice.spec in (pick.model, str(tiny_llama_dir))


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


# --- after training: the weights are never lost; evaluation in chunks; packing under each engine ---


@pytest.mark.slow
def test_report_failure_keeps_the_trained_run_and_exits_nonzero(tmp_path, tiny_llama_dir, monkeypatch, capsys):
    from toolkit.cli import main
    from toolkit.core.models import load_model
    from toolkit.finetune import report

    def broken_evaluate(*a, **kw):  # failure injection: the report phase fails after training
        raise RuntimeError("CUDA out of memory while evaluating")

    monkeypatch.setattr(report, "evaluate", broken_evaluate)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runs = tmp_path / "runs"
    rec = make_recipe(tmp_path, tiny_llama_dir)
    code = main(["finetune", str(rec), "--runs-dir", str(runs), "--set", "training.max_steps=2"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(err) == 1 and "CUDA out of memory while evaluating" in err[0]
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


def interrupt_report_once(monkeypatch):
    """Ctrl-C while loss.png is drawn, the report's last part, in the first run only."""
    from toolkit.finetune import report

    draw = report.plot_losses
    calls = []

    def plot_losses(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return draw(*a, **kw)

    monkeypatch.setattr(report, "plot_losses", plot_losses)


@pytest.mark.slow
@pytest.mark.parametrize("method, weights", [("qlora", "adapter/adapter_model.safetensors"),
                                             ("full", "model/model.safetensors")])
def test_resume_after_training_ended_makes_only_the_report(tmp_path, tiny_llama_dir, monkeypatch, capsys, method,
                                                            weights):
    """Ctrl-C in the report after the checkpoint at max_steps was saved: --resume trains no step past
    max_steps; it takes the checkpoint's weights and finishes the run as an uninterrupted one would."""
    import torch
    from safetensors.torch import load_file

    from toolkit.finetune.trainer import finetune

    interrupt_report_once(monkeypatch)
    rec = make_recipe(tmp_path, tiny_llama_dir)
    report = method == "qlora"  # one report shows the loaded weights are measured; the full run checks weights only
    sets = ["training.max_steps=3", "training.save_steps=3", "eval.eval_steps=0", f"method.name={method}",
            f"eval.report={str(report).lower()}"]
    runs = tmp_path / "runs"
    with pytest.raises(KeyboardInterrupt):
        finetune(rec, sets, runs_dir=runs, gpu=False)
    (stage,) = list(runs.iterdir())
    assert stage.name.endswith(".incomplete")
    assert [p.name for p in (stage / "checkpoints").glob("checkpoint-*")] == ["checkpoint-3"]
    trained = load_file(str(stage / "checkpoints" / "checkpoint-3" / Path(weights).name))
    saved = load_file(str(stage / weights))  # what the interrupted run saved before its report
    assert saved.keys() == trained.keys() and all(torch.equal(saved[k], trained[k]) for k in saved)
    before = json.loads((stage / "run.json").read_text())
    first_report = json.loads((stage / "report.json").read_text()) if report else None
    capsys.readouterr()

    run = finetune(rec, sets, runs_dir=runs, resume=True, gpu=False)
    err = capsys.readouterr().err
    assert run.name == stage.name.removesuffix(".incomplete") and not stage.exists()
    assert (runs / "latest").resolve() == run.resolve() and not (run / "checkpoints").exists()
    info = json.loads((run / "run.json").read_text())
    assert info["steps"] == 3 and info["resumed_from"] == "checkpoint-3"
    assert [line for line in err.splitlines() if "already" in line] == [
        "resume: training already finished at step 3 (checkpoint-3): only the report is made"]
    for key in ("epochs", "train_loss", "tokens_seen", "train_runtime_s", "tokens_per_s"):
        assert info[key] == before[key], key
    assert max(json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()) == 3
    final = load_file(str(run / weights))
    assert final.keys() == trained.keys() and all(torch.equal(final[k], trained[k]) for k in final)
    if report:  # the report measured the trained weights, not the fresh adapter
        rep = json.loads((run / "report.json").read_text())
        assert rep["finetuned"]["answer_loss"] == pytest.approx(first_report["finetuned"]["answer_loss"], rel=1e-6)
        assert rep["finetuned"]["answer_loss"] != pytest.approx(rep["base"]["answer_loss"], rel=1e-6)
        assert (run / "loss.png").is_file()


def test_packing_plan_per_engine():
    from toolkit.finetune.trl_compat import packing_plan

    assert packing_plan(False, "unsloth").packing is False
    plain = packing_plan(True, "transformers+peft+bitsandbytes")
    assert plain.packing and plain.hook is None and "position_ids" in plain.mode
    # Unsloth's attention needs its packed-sequence metadata: with its hook packing stays on ...
    hook = lambda model, trainer: None  # noqa: E731
    on = packing_plan(True, "unsloth", unsloth_hook=hook)
    assert on.packing and on.hook is hook and "packed_seq_lengths" in on.mode
    # ... without it (an Unsloth that has none; none installed here) batches are padded, said why.
    off = packing_plan(True, "unsloth")
    assert not off.packing and off.mode == "padded" and "enable_sample_packing" in off.why


def test_unsloth_still_has_its_packing_hook():
    """Fails when Unsloth renames or drops the hook the Unsloth path relies on (runs where Unsloth is installed)."""
    import importlib.util

    if importlib.util.find_spec("unsloth") is None:
        pytest.skip("unsloth is not installed (CUDA machines only)")
    from toolkit.finetune.trl_compat import unsloth_packing_hook

    assert callable(unsloth_packing_hook())


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


def test_loraplus_needs_lora_adapters(tmp_path):
    from toolkit.finetune import recipe

    d = make_recipe(tmp_path, "embedded")
    with pytest.raises(UserError, match="training.loraplus_lr_ratio"):
        recipe.load(d, ["method.name=full", "training.loraplus_lr_ratio=16"], gpu=False)
    with pytest.raises(UserError, match="training.loraplus_lr_ratio must be >= 0"):
        recipe.load(d, ["training.loraplus_lr_ratio=-1"], gpu=False)
