"""Fine-tune a model from a recipe: TRL SFTTrainer + PEFT LoRA on a bitsandbytes nf4 base (QLoRA).

`finetune(recipe, overrides)` builds `runs/<recipe>-<YYYYmmdd-HHMMSS>/` inside a folder named
`...incomplete` (with an INCOMPLETE file) and renames it when everything is written: the
adapter + tokenizer, run.json, the resolved recipe.yaml, metrics.jsonl, TensorBoard events,
loss.png and the base-vs-fine-tuned report. Ctrl-C finishes the step, saves a checkpoint in the
incomplete folder and stops; `resume=True` continues from it (same data order, optimizer,
scheduler and RNG state, so the result equals an uninterrupted run). Any other failure leaves
nothing in runs/ unless a checkpoint was already saved. Accelerate runs underneath, so
`accelerate launch --num_processes 2 -m toolkit finetune ...` trains on two processes (gloo
on CPU) and the main process alone writes the run folder.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

from toolkit.finetune import recipe as recipe_mod
from toolkit.core.errors import UserError
from toolkit.core.progress import quiet, say

INCOMPLETE_SUFFIX = ".incomplete"


def _check_writable(runs_dir: Path) -> None:
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        probe = runs_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output dir {runs_dir} is not writable: {exc.strerror or exc}") from None


def _latest_incomplete(runs_dir: Path, name: str) -> Path | None:
    cands = [p for p in runs_dir.glob(f"{name}-*{INCOMPLETE_SUFFIX}") if p.is_dir()]
    return max(cands, key=lambda p: p.name) if cands else None


def _latest_checkpoint(stage: Path) -> Path | None:
    cks = [p for p in (stage / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(cks, key=lambda p: int(p.name.split("-")[1])) if cks else None


def _broadcast(value, dist_state):
    """The main process's value on every process (run-folder name must agree across ranks)."""
    if dist_state.num_processes == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _atomic_symlink(link: Path, target_name: str) -> None:
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target_name)
    os.replace(tmp, link)


def finetune(recipe_spec: str | Path, overrides: Sequence[str] = (), runs_dir: str | Path | None = None,
             resume: bool | str = False, callbacks: Sequence = (), gpu: bool | None = None) -> Path:
    """Fine-tune per the recipe (+ `section.key=value` overrides); returns the finished run folder.

    `resume=True` continues the newest interrupted run of this recipe, or `resume=<path>` a given
    incomplete run folder. `callbacks` are extra transformers TrainerCallbacks.
    """
    from toolkit.finetune import data as data_mod
    from toolkit.core import hardware
    rec = recipe_mod.load(recipe_spec, overrides, gpu=gpu)
    runs = Path(runs_dir if runs_dir is not None else rec.output.runs_dir)
    # Data first: bad data fails before torch is imported, any model loaded or folder made.
    fmt, sysp = rec.data.format, rec.data.system_prompt
    train_ex = data_mod.read_examples(rec.data_path(rec.data.train), fmt, sysp)
    eval_ex = data_mod.read_examples(rec.data_path(rec.data.eval), fmt, sysp) if rec.data.eval else []
    dev = hardware.device()
    dtype = hardware.dtype_for(dev, "train") if rec.method.compute_dtype == "auto" else rec.method.compute_dtype

    from accelerate import PartialState

    dist_state = PartialState(cpu=not dev.startswith("cuda"))
    main = dist_state.is_main_process
    if main:
        _check_writable(runs)
    stage = _stage_dir(runs, rec, resume) if main else None
    stage = Path(_broadcast(str(stage) if stage else None, dist_state))
    resume_from = _latest_checkpoint(stage) if resume else None
    ok = False
    try:
        out = _train(rec, overrides, stage, runs, dev, dtype, train_ex, eval_ex, resume_from, callbacks,
                     dist_state)
        ok = True
        return out
    finally:
        if main and not ok and stage.exists() and _latest_checkpoint(stage) is None and not resume:
            shutil.rmtree(stage, ignore_errors=True)


def _stage_dir(runs: Path, rec, resume) -> Path:
    if resume:
        stage = Path(resume) if isinstance(resume, (str, Path)) and not isinstance(resume, bool) else \
            _latest_incomplete(runs, rec.output.name or rec.name)
        if stage is None or not stage.is_dir():
            raise UserError(f"--resume: no interrupted run of {rec.name} in {runs}")
        if _latest_checkpoint(stage) is None:
            raise UserError(f"--resume: {stage} has no checkpoint to resume from")
        saved = (stage / "recipe.yaml").read_text() if (stage / "recipe.yaml").is_file() else ""
        if saved and saved != recipe_mod.dump(rec):
            raise UserError(f"--resume: the recipe differs from the one {stage.name} started with "
                            "(pass the same recipe and --set values)")
        return stage
    prefix = rec.output.name or rec.name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stage = runs / f"{prefix}-{stamp}{INCOMPLETE_SUFFIX}"
    n = 1
    while stage.exists() or (runs / stage.name.removesuffix(INCOMPLETE_SUFFIX)).exists():
        n += 1
        stage = runs / f"{prefix}-{stamp}-{n}{INCOMPLETE_SUFFIX}"
    stage.mkdir(parents=True)
    (stage / "INCOMPLETE").write_text(
        "This run has not finished. If it was interrupted it holds a checkpoint:\n"
        f"  toolkit finetune <recipe> --resume   (or --resume {stage})\n")
    (stage / "recipe.yaml").write_text(recipe_mod.dump(rec))
    return stage


def _trainer_args(rec, stage: Path, dev: str, dtype: str, has_eval: bool):
    from trl import SFTConfig

    t, e = rec.training, rec.eval
    eval_on = has_eval and e.eval_steps > 0
    save_steps = t.save_steps
    if e.early_stopping_patience:
        if save_steps == 0 or save_steps % e.eval_steps:
            save_steps = e.eval_steps  # best-model tracking needs a checkpoint at every eval
    return SFTConfig(
        output_dir=str(stage / "checkpoints"),
        per_device_train_batch_size=t.batch_size, per_device_eval_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum, num_train_epochs=t.epochs, max_steps=t.max_steps,
        learning_rate=t.learning_rate, lr_scheduler_type=t.lr_scheduler, warmup_steps=t.warmup_ratio,
        weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, seed=t.seed, data_seed=t.seed,
        logging_steps=t.logging_steps, logging_first_step=True,
        eval_strategy="steps" if eval_on else "no", eval_steps=e.eval_steps if eval_on else None,
        eval_on_start=eval_on,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, save_total_limit=2,
        load_best_model_at_end=bool(e.early_stopping_patience), metric_for_best_model="eval_loss",
        greater_is_better=False,
        bf16=dtype == "bfloat16", fp16=dtype == "float16", use_cpu=not dev.startswith("cuda"),
        gradient_checkpointing=False,  # enabled on the model itself (train_model) so PEFT gets input grads
        report_to="none", disable_tqdm=True, include_num_input_tokens_seen="non_padding",
        max_length=rec.data.max_seq_len, packing=rec.data.packing, packing_strategy="bfd",
        padding_free=rec.data.packing, dataset_num_proc=None, remove_unused_columns=True,
        ddp_find_unused_parameters=False, dataloader_num_workers=0,
    )


def _train(rec, overrides, stage: Path, runs: Path, dev, dtype, train_ex, eval_ex, resume_from, extra_cbs,
           dist_state) -> Path:
    import torch
    from transformers import EarlyStoppingCallback, set_seed
    from transformers.trainer_callback import PrinterCallback
    from transformers.integrations import TensorBoardCallback
    from trl import SFTTrainer

    from toolkit.finetune import data as data_mod
    from toolkit.finetune.callbacks import InterruptCallback, MetricsCallback, ProgressCallback
    from toolkit.finetune.trl_compat import score_labelled_positions_only
    from toolkit.finetune.base_model import fallback, load_for_training, resolve_base

    main = dist_state.is_main_process
    announce = say if main else quiet
    t_start = time.time()
    choice = resolve_base(rec, announce, dev, dtype)
    set_seed(rec.training.seed)
    try:
        model, tok, notes = load_for_training(choice.source, rec, dev, dtype)
    except OSError as exc:  # download refused (gated / no network mid-way): the base can't be had
        choice = fallback(rec, choice.spec, f"loading failed: {str(exc).splitlines()[0]}", announce)
        set_seed(rec.training.seed)
        model, tok, notes = load_for_training(choice.source, rec, dev, dtype)
    announce(f"base {choice.spec} ({choice.source}) · {rec.method.name} · {notes['engine']} · {dev} {dtype}"
             + (f" · {dist_state.num_processes} processes" if dist_state.num_processes > 1 else ""))

    d = rec.data
    train_split = data_mod.tokenize_split(tok, train_ex, d.max_seq_len, d.overlong, d.completion_only_loss, "train")
    eval_split = (data_mod.tokenize_split(tok, eval_ex, d.max_seq_len, d.overlong, d.completion_only_loss, "eval")
                  if eval_ex else None)
    for name, sp in (("train", train_split), ("eval", eval_split)):
        if sp is not None and (sp.n_truncated or sp.n_dropped):
            announce(f"{name}: {sp.n_truncated} examples truncated and {sp.n_dropped} dropped "
                     f"(longer than data.max_seq_len={d.max_seq_len} / nothing left to learn)")
    prep_s = time.time() - t_start

    args = _trainer_args(rec, stage, dev, dtype, eval_split is not None)
    interrupt = InterruptCallback()
    cbs = [MetricsCallback(stage / "metrics.jsonl"), ProgressCallback(), interrupt, *extra_cbs]
    if main:
        from torch.utils.tensorboard import SummaryWriter

        cbs.append(TensorBoardCallback(tb_writer=SummaryWriter(str(stage / "tb"))))
    if rec.eval.early_stopping_patience:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=rec.eval.early_stopping_patience))
    trainer = SFTTrainer(
        model=model, args=args, train_dataset=data_mod.to_dataset(train_split),
        eval_dataset=_eval_dataset(eval_split, rec.eval.eval_examples) if eval_split else None,
        processing_class=tok, callbacks=cbs,
    )
    # With its bar disabled the Trainer prints every log dict to stdout; our bar shows the loss and
    # metrics.jsonl keeps every log, and stdout is for the run folder alone (toolkit.core.progress).
    trainer.remove_callback(PrinterCallback)
    # TRL casts QLoRA adapter weights to bf16; keep trainable weights in fp32 instead (autocast still
    # computes in bf16): small updates are not rounded away, and a resumed run, whose checkpoint
    # loads back in fp32, trains exactly the same weights as an uninterrupted one.
    for p in trainer.model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    interrupt.install()
    try:
        with score_labelled_positions_only(dev, announce):
            result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        interrupt.uninstall()
        for cb in cbs:
            if isinstance(cb, TensorBoardCallback) and cb.tb_writer is not None:
                cb.tb_writer.flush()
    if interrupt.interrupted:
        dist_state.wait_for_everyone()
        ck = _latest_checkpoint(stage)
        announce(f"interrupted at step {trainer.state.global_step}: checkpoint {ck}; "
                 f"continue with `toolkit finetune {rec.root} --resume`")
        raise KeyboardInterrupt
    dist_state.wait_for_everyone()
    if not main:
        return runs / stage.name.removesuffix(INCOMPLETE_SUFFIX)

    train_s = result.metrics.get("train_runtime", 0.0)
    tokens = trainer.state.num_input_tokens_seen
    _save_outputs(trainer, tok, stage, rec)
    info = {
        "recipe": rec.name, "recipe_dir": str(Path(rec.root).resolve()), "base_model": choice.spec, "base_source": choice.source,
        "requested_base_model": choice.requested, "fallback_reason": choice.fallback_reason,
        "estimator_pick": choice.pick, "method": rec.method.name, "engine": notes["engine"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": dev, "compute_dtype": dtype,
        "world_size": dist_state.num_processes, "profile": rec.profile, "overrides": list(overrides),
        "resumed_from": str(resume_from.name) if resume_from else None,
        "train_examples": len(train_split.input_ids), "eval_examples": len(eval_split.input_ids) if eval_split else 0,
        "truncated": train_split.n_truncated, "dropped": train_split.n_dropped,
        "train_tokens_per_epoch": train_split.n_tokens, "trained_tokens_per_epoch": train_split.n_trained,
        "steps": trainer.state.global_step, "epochs": trainer.state.epoch, "train_loss": result.training_loss,
        "train_runtime_s": round(train_s, 1), "tokens_seen": tokens,
        "tokens_per_s": round(result.metrics.get("train_tokens_per_second", tokens / max(train_s, 1e-9)), 1),
        "prep_s": round(prep_s, 1), "torch": torch.__version__,
    }
    if rec.eval.report and eval_split is not None:
        from toolkit.finetune import report
        t0 = time.time()
        announce("evaluating base vs fine-tuned on the held-out set ...")
        rep = report.evaluate(trainer.model, tok, eval_split, rec, dtype, choice)
        report.write(stage, rep, info)
        info["report"] = {k: rep[k] for k in ("base", "finetuned", "improvement")}
        info["report_s"] = round(time.time() - t0, 1)
    from toolkit.finetune.report import plot_losses

    plot_losses(stage / "metrics.jsonl", stage / "loss.png")
    info["wall_s"] = round(time.time() - t_start, 1)
    (stage / "run.json").write_text(json.dumps(info, indent=2) + "\n")
    # Checkpoints exist to resume; a finished run doesn't need them.
    shutil.rmtree(stage / "checkpoints", ignore_errors=True)
    (stage / "INCOMPLETE").unlink(missing_ok=True)
    final = runs / stage.name.removesuffix(INCOMPLETE_SUFFIX)
    os.replace(stage, final)
    _atomic_symlink(runs / "latest", final.name)
    announce(f"run saved: {final}")
    return final


def _eval_dataset(split, limit: int):
    """The in-training eval set: the first `limit` held-out examples (all when 0); the report uses all."""
    from toolkit.finetune import data as data_mod
    if limit and limit < len(split.input_ids):
        split = data_mod.TokenizedSplit(split.input_ids[:limit], split.labels[:limit], split.examples[:limit])
    return data_mod.to_dataset(split)


def _save_outputs(trainer, tok, stage: Path, rec) -> None:
    if rec.method.name == "full":
        trainer.model.save_pretrained(stage / "model")
        tok.save_pretrained(stage / "model")
    else:
        trainer.model.save_pretrained(stage / "adapter")
    tok.save_pretrained(stage / "adapter")
