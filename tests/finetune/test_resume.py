"""Resuming a run: Ctrl-C + --resume equals a straight run; a run whose training ended only makes its report."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from toolkit.core.errors import UserError
from tests.finetune.conftest import adapter_tensors, make_recipe, sigint_at_step

pytestmark = pytest.mark.usefixtures("one_torch_thread")


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
