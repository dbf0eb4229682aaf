"""Fine-tune a model from a recipe: TRL SFTTrainer + PEFT LoRA on a bitsandbytes nf4 base (QLoRA).

`finetune(recipe, overrides)` builds `runs/<recipe>-<YYYYmmdd-HHMMSS>/` inside a folder named
`...incomplete` (with an INCOMPLETE file) and renames it when everything is written: the
adapter + tokenizer, run.json, the resolved recipe.yaml, metrics.jsonl, TensorBoard events,
loss.png and the base-vs-fine-tuned report. Ctrl-C finishes the step, saves a checkpoint in the
incomplete folder and stops; `resume=True` continues from it (same data order, optimizer,
scheduler and RNG state, so the result equals an uninterrupted run). The adapter and run.json are
written as soon as training ends, before the report: a failing evaluation or report still
finalizes the run (run.json `report_error`, report_error.txt) and the command exits 1; nothing
after training deletes trained weights. A failure before that leaves nothing in runs/ unless a
checkpoint was already saved. Accelerate runs underneath, so
`accelerate launch --num_processes 2 -m toolkit finetune ...` trains on two processes (gloo
on CPU) and the main process alone writes the run folder.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Sequence

from toolkit.finetune import recipe as recipe_mod
from toolkit.finetune import resume, run_folder
from toolkit.core.errors import UserError
from toolkit.core.progress import quiet, say

def _broadcast(value, dist_state):
    """The main process's value on every process (run-folder name must agree across ranks)."""
    if dist_state.num_processes == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def finetune(recipe_spec: str | Path, overrides: Sequence[str] = (), runs_dir: str | Path | None = None,
             resume: bool | str = False, callbacks: Sequence = (), gpu: bool | None = None) -> Path:
    """Fine-tune per the recipe (+ `section.key=value` overrides); returns the finished run folder.

    `resume=True` continues the newest interrupted run of this recipe, or `resume=<path>` a given
    incomplete run folder; one whose training had ended (interrupted in the report) makes only its
    report. `callbacks` are extra transformers TrainerCallbacks.
    """
    from toolkit.finetune import data as data_mod
    from toolkit.core import hardware, primitive_caches

    primitive_caches.bound()  # before torch computes anything: every step's shapes are new
    rec = recipe_mod.load(recipe_spec, overrides, gpu=gpu)
    runs = Path(runs_dir if runs_dir is not None else rec.output.runs_dir)
    # Data first: bad data fails before torch is imported, any model loaded or folder made.
    train_ex, eval_ex = data_mod.read_splits(rec)
    if (leak := data_mod.held_out_leak(train_ex, eval_ex)):
        say(leak)
    dev = hardware.device()
    # Unsloth patches TRL/transformers/PEFT when it is imported, so it goes first (before accelerate too).
    from toolkit.finetune.base_model import prepare_engine

    prepare_engine(rec, dev, say)
    # `auto` follows the measured capability (toolkit.core.capability); float16 on a CPU is refused here.
    dtype, dtype_reason = hardware.dtype_choice(dev, "train", rec.method.compute_dtype, "method.compute_dtype")
    n_threads = hardware.apply_threads(dev)

    from accelerate import PartialState

    dist_state = PartialState(cpu=not dev.startswith("cuda"))
    main = dist_state.is_main_process
    if main:
        run_folder.check_writable(runs)
    stage = run_folder.open_stage(runs, rec, resume, overrides) if main else None
    stage = Path(_broadcast(str(stage) if stage else None, dist_state))
    resume_from = run_folder.latest_checkpoint(stage) if resume else None
    ok = False
    try:
        out = _train(rec, overrides, stage, runs, dev, dtype, train_ex, eval_ex, resume_from, callbacks,
                     dist_state, dtype_reason=dtype_reason, threads=n_threads)
        ok = True
        if dist_state.num_processes > 1:
            # Left to the interpreter's exit, gloo's worker threads can abort it ("terminate called
            # without an active exception", SIGABRT: pytorch/pytorch#190489), failing a finished run.
            # Only after a success, as torchtitan does: a rank that failed may leave the others in a collective.
            dist_state.destroy_process_group()
        return out
    finally:
        # A failed start leaves nothing behind; a checkpoint or trained weights are never deleted.
        if main and not ok and stage.exists() and run_folder.latest_checkpoint(stage) is None and not resume \
                and not run_folder.has_weights(stage):
            shutil.rmtree(stage, ignore_errors=True)


class ReportFailed(UserError):
    """Training finished and its weights are saved, but the evaluation/report after it failed."""

    exit_code = 1


def _trainer_args(rec, stage: Path, dev: str, dtype: str, has_eval: bool, packing: bool | None = None):
    from trl import SFTConfig

    from toolkit.finetune.plan import report_ends
    from toolkit.finetune.trl_compat import PACKING_STRATEGY

    t, e = rec.training, rec.eval
    eval_on = has_eval and e.eval_steps > 0
    packing = rec.data.packing if packing is None else packing
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
        neftune_noise_alpha=t.neftune_noise_alpha or None,
        logging_steps=t.logging_steps, logging_first_step=True,
        eval_strategy="steps" if eval_on else "no", eval_steps=e.eval_steps if eval_on else None,
        # The report measures the base model on the whole held-out set: step 0 would repeat it.
        eval_on_start=eval_on and not report_ends(e),
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, save_total_limit=2,
        load_best_model_at_end=bool(e.early_stopping_patience), metric_for_best_model="eval_loss",
        greater_is_better=False,
        bf16=dtype == "bfloat16", fp16=dtype == "float16", use_cpu=not dev.startswith("cuda"),
        activation_checkpointing=False,  # enabled on the model itself (load_for_training) so PEFT gets input grads
        report_to="none", disable_tqdm=True, include_num_input_tokens_seen="non_padding",
        max_length=rec.data.max_seq_len, packing=packing, packing_strategy=PACKING_STRATEGY,
        padding_free=packing, dataset_num_proc=None, remove_unused_columns=True,
        ddp_find_unused_parameters=False, dataloader_num_workers=0,
    )


def _loraplus_optimizer(model, args, t):
    """LoRA+ (`training.loraplus_lr_ratio` > 0): PEFT's optimizer with B's learning rate scaled by the
    ratio, the optimizer class and settings the Trainer would pick otherwise; None leaves it to the Trainer."""
    if not t.loraplus_lr_ratio:
        return None
    from peft.optimizers import create_loraplus_optimizer
    from transformers import Trainer

    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    kwargs.pop("lr", None)
    return create_loraplus_optimizer(model, cls, lr=t.learning_rate, loraplus_lr_ratio=t.loraplus_lr_ratio,
                                     weight_decay=t.weight_decay, **kwargs)


def _train(rec, overrides, stage: Path, runs: Path, dev, dtype, train_ex, eval_ex, resume_from, extra_cbs,
           dist_state, dtype_reason: str = "", threads: int | None = None) -> Path:
    import torch
    from transformers import EarlyStoppingCallback, set_seed
    from transformers.trainer_callback import PrinterCallback
    from transformers.integrations import TensorBoardCallback

    from toolkit.finetune import data as data_mod
    from toolkit.core import allocator, packed_linear, peak_memory, sdpa_backends
    from toolkit.finetune import cpu_lm_head, packed_attention, run_memory
    from toolkit.finetune.fused_lora import dropout_note, fused_on_cpu
    from toolkit.finetune.fused_norm import fused_norms_on_cpu
    from toolkit.finetune.fused_rope import fused_rope_on_cpu
    from toolkit.finetune.callbacks import InterruptCallback, MetricsCallback, ProgressCallback, SkipLastEval
    from toolkit.finetune.plan import report_ends
    from toolkit.finetune.sft_trainer import trainer_class
    from toolkit.finetune.trl_compat import lean_lm_head_on_cpu, packing_plan
    from toolkit.finetune.base_model import context_warning, load_with_fallback, loaded_weights, resolve_base

    main = dist_state.is_main_process
    announce = say if main else quiet
    t_start = time.time()
    choice = resolve_base(rec, announce, dev, dtype)
    # The fallback (small) model trains with the recipe's fallback profile, not the big model's settings.
    to_fallback = lambda: recipe_mod.for_fallback(rec, overrides)  # noqa: E731
    if choice.fallback_reason:
        rec = to_fallback()
    choice, rec, model, tok, notes = load_with_fallback(
        choice, rec, dev, dtype, announce, before_load=lambda: set_seed(rec.training.seed), fallback_recipe=to_fallback)
    if main and rec.profile == "fallback":
        (stage / "recipe.yaml").write_text(recipe_mod.dump(rec))
        announce("recipe: fallback profile applied (settings sized for the fallback model)")
    announce(f"base {choice.spec} ({choice.source}) · {rec.method.name} · {notes['engine']} · {dev} {dtype}"
             + (f" ({dtype_reason})" if dtype_reason else "") + (f" · {threads} threads" if threads else "")
             + (f" · {dist_state.num_processes} processes" if dist_state.num_processes > 1 else ""))

    d = rec.data
    if (warning := context_warning(choice, d.max_seq_len)):
        announce(warning)
    if (note := dropout_note(rec.lora.dropout, dev)):
        announce(note)
    train_split = data_mod.tokenize_split(tok, train_ex, d.max_seq_len, d.overlong, d.completion_only_loss, "train")
    data_mod.check_end_of_turn_trained(tok, train_split)
    eval_split = (data_mod.tokenize_split(tok, eval_ex, d.max_seq_len, d.overlong, d.completion_only_loss, "eval")
                  if eval_ex else None)
    for name, sp in (("train", train_split), ("eval", eval_split)):
        if sp is not None and (sp.n_truncated or sp.n_dropped):
            announce(f"{name}: {sp.n_truncated} examples truncated and {sp.n_dropped} dropped "
                     f"(longer than data.max_seq_len={d.max_seq_len} / nothing left to learn)")
    prep_s = time.time() - t_start

    pack = packing_plan(rec.data.packing, notes["engine"])
    if rec.data.packing and not pack.packing:
        announce(f"packing off: {pack.why}")
    attn = attn_reason = None
    if packed_attention.wanted(dev, pack.packing, notes["engine"]):
        from toolkit.core.hardware import attention_choice

        how = attention_choice(dev, dtype)
        attn_reason = how.reason
        if how.kernel != "masked":  # each packed conversation attended alone (see the module)
            attn = packed_attention.name(how.kernel, how.fallback, how.max_padding)
            packed_attention.use_on(model, how.kernel, how.fallback, how.max_padding)
    # On CUDA, SDPA (the masked packed rows, padded batches, the evals) keeps off cuDNN's kernel.
    sdpa_names = sdpa_backends.for_device(dev, notes["engine"])
    if sdpa_names is not None and attn is None and attn_reason:
        attn_reason += "; SDPA without cuDNN's kernel (it re-plans for every new packed-row length)"
    if attn_reason:
        announce(attn_reason)
    args = _trainer_args(rec, stage, dev, dtype, eval_split is not None, packing=pack.packing)
    interrupt = InterruptCallback()
    cbs = [MetricsCallback(stage / "metrics.jsonl"), ProgressCallback(), interrupt, *extra_cbs]
    if eval_split is not None and report_ends(rec.eval):
        cbs.append(SkipLastEval())  # the report measures the fine-tuned model on the whole held-out set
    if main:
        from torch.utils.tensorboard import SummaryWriter

        cbs.append(TensorBoardCallback(tb_writer=SummaryWriter(str(stage / "tb"))))
    if rec.eval.early_stopping_patience:
        cbs.append(EarlyStoppingCallback(early_stopping_patience=rec.eval.early_stopping_patience))
    trainer = trainer_class()(
        model=model, args=args, train_dataset=data_mod.to_dataset(train_split),
        # Only in-training evals use it: with eval_steps 0 (the report's two measurements only) TRL
        # would tokenize and pack it for nothing.
        eval_dataset=_eval_dataset(eval_split, rec.eval.eval_examples) if eval_split and rec.eval.eval_steps else None,
        processing_class=tok, callbacks=cbs, optimizers=(_loraplus_optimizer(model, args, rec.training), None),
    )
    # With its bar disabled the Trainer prints every log dict to stdout; our bar shows the loss and
    # metrics.jsonl keeps every log, and stdout is for the run folder alone (toolkit.core.progress).
    trainer.remove_callback(PrinterCallback)
    if pack.hook is not None:
        pack.hook(trainer.model, trainer)
    # TRL casts QLoRA adapter weights to bf16; keep trainable weights in fp32 instead (autocast still
    # computes in bf16): small updates are not rounded away, and a resumed run, whose checkpoint
    # loads back in fp32, trains exactly the same weights as an uninterrupted one.
    for p in trainer.model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    # The LM head's pack serves only cpu_lm_head's matmuls, and those only in fp32.
    packed, matmul_reason = packed_linear.for_device(trainer.model, dev, dtype, "train",
                                                     skip=cpu_lm_head.unpacked_head(trainer.model, dtype))
    if not dev.startswith("cuda"):
        announce(matmul_reason)
        hint = allocator.install_hint(allocator.detect())
        if hint:
            announce(hint)
    # The report was interrupted after the last checkpoint: from it the Trainer would train a step past max_steps.
    done = resume_from is not None and run_folder.training_done(resume_from, args.max_steps)
    if done:
        result = resume.trained_already(trainer, resume_from, stage)
        announce(f"resume: training already finished at step {result.global_step} ({resume_from.name}): "
                 "only the report is made")
    else:
        peak_memory.reset(dev)  # the training's own peak, to set beside the plan's (run.json `memory`)
        interrupt.install()
        try:
            with (lean_lm_head_on_cpu(dev, announce), fused_on_cpu(trainer.model, dev, announce),
                  fused_norms_on_cpu(trainer.model, dev), fused_rope_on_cpu(trainer.model, dev), packed,
                  sdpa_backends.kept_to(sdpa_names)):
                result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
        finally:
            interrupt.uninstall()
            for cb in cbs:
                if isinstance(cb, TensorBoardCallback) and cb.tb_writer is not None:
                    cb.tb_writer.flush()
    # A Ctrl-C during the last step stops nothing: the run is whole, and a resume from its last
    # checkpoint would train one step past max_steps.
    if interrupt.interrupted and trainer.state.global_step < trainer.state.max_steps:
        dist_state.wait_for_everyone()
        ck = run_folder.latest_checkpoint(stage)
        announce(f"interrupted at step {trainer.state.global_step}: checkpoint {ck}; "
                 f"continue with `toolkit finetune {rec.root} --resume`")
        raise KeyboardInterrupt
    dist_state.wait_for_everyone()
    if not main:
        return run_folder.final_path(runs, stage)

    trained_peak = None if done else peak_memory.peak(dev)
    train_s = result.metrics.get("train_runtime", 0.0)
    tokens = trainer.state.num_input_tokens_seen
    # The weights go to disk first: nothing after this point may lose them.
    _save_outputs(trainer, tok, stage, rec)
    try:
        memory = run_memory.record(rec, choice.spec, dev, dtype, trained_peak, [len(x) for x in train_split.input_ids])
        train_loss, rate = resume.totals(trainer, result, None if done else resume_from, tokens, train_s)
        info = {
            "recipe": rec.name, "recipe_dir": str(Path(rec.root).resolve()), "base_model": choice.spec, "base_source": choice.source,
            **loaded_weights(model, choice.source),
            "requested_base_model": choice.requested, "fallback_reason": choice.fallback_reason,
            "estimator_pick": choice.pick, "method": rec.method.name, "engine": notes["engine"], "packing": pack.mode,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": dev, "compute_dtype": dtype,
            "compute_dtype_reason": dtype_reason, "packed_attention": attn,
            "packed_attention_reason": attn_reason, "matmuls": matmul_reason, "threads": threads,
            "malloc": allocator.state(),
            "world_size": dist_state.num_processes, "profile": rec.profile, "overrides": list(overrides),
            "resumed_from": str(resume_from.name) if resume_from else None,
            "train_examples": len(train_split.input_ids), "eval_examples": len(eval_split.input_ids) if eval_split else 0,
            "truncated": train_split.n_truncated, "dropped": train_split.n_dropped,
            "train_tokens_per_epoch": train_split.n_tokens, "trained_tokens_per_epoch": train_split.n_trained,
            "steps": trainer.state.global_step, "epochs": trainer.state.epoch, "train_loss": train_loss,
            "train_runtime_s": round(train_s, 1), "tokens_seen": tokens, "tokens_per_s": round(rate, 1),
            "prep_s": round(prep_s, 1), "torch": torch.__version__, "memory": memory,
        }
        if (line := run_memory.line(memory)):
            announce(line)
        run_folder.write_json(stage / "run.json", info)
        # Training's freed pages (its packs, activations, the LM head's buffers) back to the OS before the
        # report, whose allocations are shaped otherwise: the run's peak stays the training's.
        allocator.release_free_memory()
        try:
            error = _evaluate_and_report(trainer, tok, eval_split, rec, dtype, choice, stage, info, announce)
        except KeyboardInterrupt:
            announce(f"interrupted after training: the trained weights are saved in {stage} "
                     "(`toolkit export` / `toolkit chat` take that folder)")
            raise
        run_memory.add_run_peak(memory, peak_memory.peak(dev))  # training and report
        info["wall_s"] = round(time.time() - t_start, 1)
        run_folder.write_json(stage / "run.json", info)
        final = run_folder.finish(runs, stage)
        if error:
            # The weights are trained and usable (`toolkit export` / `toolkit chat` take this folder),
            # so the run is kept and finalized; the command still fails so scripts notice.
            raise ReportFailed(f"evaluation/report failed after training: {error}; the trained weights are saved "
                               f"in {final} (run.json `report_error`, traceback in report_error.txt)")
        announce(f"run saved: {final}")
        return final
    except ReportFailed:
        raise
    except (OSError, UserError) as exc:  # a full disk, a folder in the way: the adapter is on disk already
        where = stage if stage.exists() else run_folder.final_path(runs, stage)
        raise UserError(f"saving the run failed after training ({exc}); the trained weights are in {where}") from None


def _evaluate_and_report(trainer, tok, eval_split, rec, dtype, choice, stage: Path, info: dict, announce) -> str:
    """Base-vs-fine-tuned report and loss plot into `stage`; returns "" or the error that stopped them
    (also recorded as run.json `report_error`, with the traceback in report_error.txt)."""
    from toolkit.finetune import report

    try:
        if rec.eval.report and eval_split is not None:
            t0 = time.time()
            n = len(eval_split.input_ids)
            announce(f"evaluating base vs fine-tuned on the held-out set ({n} conversations) ...")
            rep = report.evaluate(trainer.model, tok, eval_split, rec, dtype, choice, say=announce)
            report.write(stage, rep, info)
            announce(f"report: {report.summary(rep)} (report.md)")
            info["report"] = {k: rep[k] for k in ("base", "finetuned", "improvement", "seconds")}
            info["report_s"] = round(time.time() - t0, 1)
        report.plot_losses(stage / "metrics.jsonl", stage / "loss.png", info.get("report"), info.get("steps"))
    except Exception as exc:  # noqa: BLE001 - any failure here must not cost the trained weights
        import traceback

        error = (f"{type(exc).__name__}: {exc}".strip().splitlines() or [type(exc).__name__])[0]
        info["report_error"] = error
        (stage / "report_error.txt").write_text(traceback.format_exc(), encoding="utf-8")
        announce(f"ERROR after training: {error}")
        return error
    return ""


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
