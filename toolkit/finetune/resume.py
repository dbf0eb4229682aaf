"""Resuming a run (`toolkit finetune --resume`): what the Trainer's own figures miss after a resume,
and a run whose training had ended (a Ctrl-C in its report) finished without training a step past
max_steps, as transformers would from a checkpoint at max_steps."""

from __future__ import annotations

from pathlib import Path

from toolkit.finetune import run_folder


def totals(trainer, result, resume_from, tokens: int, train_s: float) -> tuple[float, float]:
    """(mean training loss over every step, tokens/s of this session). After a resume the Trainer's
    own figures cover this session's steps only for the loss, and all steps' tokens over this
    session's time for the rate; the loss is taken instead from the logged windows of every step
    (each log is its window's mean, rounded to 4 digits), the tokens less those at the checkpoint."""
    import json

    rate = result.metrics.get("train_tokens_per_second", tokens / max(train_s, 1e-9))
    if not resume_from:
        return result.training_loss, rate
    state = json.loads((Path(resume_from) / "trainer_state.json").read_text())
    rate = (tokens - state.get("num_input_tokens_seen", 0)) / max(train_s, 1e-9)
    loss, last = logged_loss(trainer.state.log_history)
    return (loss if last == trainer.state.global_step else result.training_loss), rate


def logged_loss(log_history) -> tuple[float | None, int]:
    """(mean training loss over the steps the logged windows cover, the last step logged)."""
    total, last = 0.0, 0
    for h in log_history:
        if "loss" in h and "step" in h:
            total, last = total + h["loss"] * (h["step"] - last), h["step"]
    return (total / last if last else None), last


def trained_already(trainer, ck: Path, stage: Path):
    """Resume from a checkpoint that ends the training without training: its state and weights (the best
    checkpoint's under load_best_model_at_end, as the Trainer ends) into `trainer`; returns a
    TrainOutput for the session that trained them."""
    from transformers import TrainerState
    from transformers.trainer_utils import TrainOutput

    trainer.state = state = TrainerState.load_from_json(str(ck / "trainer_state.json"))
    best = state.best_model_checkpoint if trainer.args.load_best_model_at_end else None
    run_folder.load_weights(trainer.model, Path(best) if best and Path(best).is_dir() else ck)
    # That session wrote run.json just before its report: its time, rate and exact mean loss.
    prior = run_folder.read_json(stage / "run.json")
    prior = prior if prior.get("steps") == state.global_step else {}
    loss = prior.get("train_loss", logged_loss(state.log_history)[0])
    return TrainOutput(state.global_step, loss, {"train_runtime": prior.get("train_runtime_s", 0.0),
                                                 "train_tokens_per_second": prior.get("tokens_per_s", 0.0)})
