"""A run's folder on disk: made as `<name>-<stamp>.incomplete/`, found again for `--resume`, renamed
when finished, with `runs/latest` pointing at the newest.

The stage folder is itself the temp name of the finished run, and files written after training
go through a temp file and a rename, so an interruption never leaves a half-written run where a
reader (resume, export, chat) would take it for a whole one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

from toolkit.core.errors import UserError
from toolkit.finetune import recipe as recipe_mod

INCOMPLETE_SUFFIX = ".incomplete"


def check_writable(runs_dir: Path) -> None:
    """Make `runs_dir` and prove a file can be written there, before any model is loaded."""
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
        probe = runs_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output dir {runs_dir} is not writable: {exc.strerror or exc}") from None


def latest_incomplete(runs_dir: Path, name: str) -> Path | None:
    """The newest interrupted run of recipe `name` in `runs_dir` (stamps sort by time), or None."""
    cands = [p for p in runs_dir.glob(f"{name}-*{INCOMPLETE_SUFFIX}") if p.is_dir()]
    return max(cands, key=lambda p: p.name) if cands else None


def latest_checkpoint(stage: Path) -> Path | None:
    """The highest-step complete checkpoint (one with its trainer_state.json) in a run folder, or None."""
    cks = [p for p in (stage / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    return max(cks, key=lambda p: int(p.name.split("-")[1])) if cks else None


def training_done(checkpoint: Path, max_steps: int) -> bool:
    """Whether `checkpoint` already ends its run's training: its step reached `max_steps` (the recipe's,
    when > 0) or, for a run of epochs, the step count the Trainer worked out and recorded in it."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    limit = max_steps if max_steps > 0 else state.get("max_steps", 0)
    return limit > 0 and state.get("global_step", 0) >= limit


def load_weights(model, checkpoint: Path) -> None:
    """A checkpoint's trained weights into `model`: an adapter through PEFT's own loader, else the full
    model's safetensors (one file or shards)."""
    from peft import PeftModel, load_peft_weights, set_peft_model_state_dict
    from safetensors.torch import load_file

    if isinstance(model, PeftModel):
        weights = load_peft_weights(str(checkpoint))
        unexpected = set_peft_model_state_dict(model, weights, adapter_name=model.active_adapter).unexpected_keys
    else:
        files = sorted(checkpoint.glob("model*.safetensors"))
        if not files:
            raise UserError(f"--resume: {checkpoint} holds no model weights (model*.safetensors)")
        unexpected = [k for f in files for k in model.load_state_dict(load_file(str(f)), strict=False).unexpected_keys]
    if unexpected:  # untrained weights kept silently would be reported as the fine-tuned model
        raise UserError(f"--resume: {checkpoint} does not fit the model "
                        f"(unexpected weights: {', '.join(unexpected[:3])})")


def atomic_symlink(link: Path, target_name: str) -> None:
    """Point `link` at the folder `target_name` (relative) in one rename, replacing what was there."""
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target_name, target_is_directory=True)  # Windows can't enter a file link to a folder
    try:
        os.replace(tmp, link)
    except OSError:
        tmp.unlink()
        raise


def point_latest(runs: Path, target_name: str) -> None:
    """`runs/latest` -> `target_name`, or a note where no link can be made: the run is whole without it.
    Windows makes links only in Developer Mode or as admin, and renames nothing onto a folder's link,
    so after a failure the old link goes (it would name an older run) and one more try follows."""
    link = runs / "latest"
    try:
        atomic_symlink(link, target_name)
    except OSError:
        try:
            if link.is_symlink():
                link.unlink()
            atomic_symlink(link, target_name)
        except OSError as exc:
            from toolkit.core.progress import say

            say(f"note: {link} not updated (no symbolic link: {exc.strerror or exc}); "
                f"the finished run is {runs / target_name}")


def has_weights(stage: Path) -> bool:
    """Whether a run folder holds trained weights (an adapter, or a full model), which nothing may delete."""
    return (stage / "adapter" / "adapter_config.json").is_file() or (stage / "model" / "config.json").is_file()


def open_stage(runs: Path, rec, resume, overrides: Sequence[str] = ()) -> Path:
    """The folder this run writes into: a new `<name>-<stamp>.incomplete/` holding the resolved
    recipe, or with `resume` the interrupted one (True: the newest of this recipe; a path: that one),
    refused unless it holds a checkpoint and was started with the same recipe."""
    if resume:
        prefix = rec.output.name or rec.name
        if isinstance(resume, (str, Path)) and not isinstance(resume, bool):
            stage = Path(resume).expanduser()
            if not stage.is_dir():
                raise UserError(f"--resume {resume}: no such run folder (give an interrupted run's "
                                f"{prefix}-<stamp>{INCOMPLETE_SUFFIX} folder, or --resume alone for the "
                                f"newest in {runs})")
        else:
            stage = latest_incomplete(runs, prefix)
            if stage is None:
                raise UserError(f"--resume: no interrupted run of {prefix} in {runs}")
        if latest_checkpoint(stage) is None:
            raise UserError(f"--resume: {stage} has no checkpoint to resume from")
        saved = (stage / "recipe.yaml").read_text() if (stage / "recipe.yaml").is_file() else ""
        # A run that fell back to the small model saved the recipe with its fallback profile applied.
        if saved and saved not in (recipe_mod.dump(rec), recipe_mod.dump(recipe_mod.for_fallback(rec, overrides))):
            raise UserError(f"--resume: the recipe differs from the one {stage.name} started with "
                            "(pass the same recipe and --set values)")
        return stage
    prefix = rec.output.name or rec.name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stage = runs / f"{prefix}-{stamp}{INCOMPLETE_SUFFIX}"
    n = 1
    while stage.exists() or final_path(runs, stage).exists():
        n += 1
        stage = runs / f"{prefix}-{stamp}-{n}{INCOMPLETE_SUFFIX}"
    stage.mkdir(parents=True)
    (stage / "INCOMPLETE").write_text(
        "This run has not finished. If it was interrupted it holds a checkpoint:\n"
        f"  toolkit finetune <recipe> --resume   (or --resume {stage})\n")
    (stage / "recipe.yaml").write_text(recipe_mod.dump(rec))
    return stage


def final_path(runs: Path, stage: Path) -> Path:
    """Where a finished run's folder goes: in `runs` (beside `runs/latest`, even for a run resumed
    from elsewhere), named as its stage folder without the `.incomplete` suffix."""
    return runs / stage.name.removesuffix(INCOMPLETE_SUFFIX)


def finish(runs: Path, stage: Path) -> Path:
    """Rename a finished stage folder to its final name and point `runs/latest` at it; returns the
    final folder. Its checkpoints go first: they exist to resume, and a finished run doesn't need them."""
    shutil.rmtree(stage / "checkpoints", ignore_errors=True)
    (stage / "INCOMPLETE").unlink(missing_ok=True)
    final = final_path(runs, stage)
    os.replace(stage, final)
    point_latest(runs, final.name)
    return final


def write_text(path: Path, text: str) -> None:
    """Write `text` to `path` through a temp file beside it and a rename: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")  # not the locale's: Windows' cp1252 lacks most of Unicode
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    """`write_text` of `data` as indented JSON."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def read_json(path: Path) -> dict:
    """A JSON file as `write_json` wrote it, or {} when there is none."""
    return json.loads(path.read_text()) if path.is_file() else {}
