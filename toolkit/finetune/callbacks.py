"""Trainer callbacks: progress bar (loss, tokens/s, ETA), metrics.jsonl, Ctrl-C → checkpoint.

Imports transformers; only toolkit.finetune.trainer imports this module. Progress follows
`toolkit.core.progress`: the bar and notices on stderr.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

from transformers import TrainerCallback

from toolkit.core.progress import say


class ProgressCallback(TrainerCallback):
    """One tqdm bar over optimizer steps with loss, tokens/s and ETA (replaces the Trainer's bar)."""

    def __init__(self):
        self.bar = None
        self._t0 = None
        self._tok0 = 0

    def on_train_begin(self, args, state, control, **kw):
        if not state.is_world_process_zero:
            return
        from toolkit.core.progress import bar

        self.bar = bar(state.max_steps, initial=state.global_step, desc="train", unit="step")
        self._t0, self._tok0 = time.perf_counter(), state.num_input_tokens_seen

    def on_step_end(self, args, state, control, **kw):
        if self.bar is None:
            return
        self.bar.update(state.global_step - self.bar.n)
        dt = time.perf_counter() - self._t0
        if dt > 0:
            self.bar.set_postfix_str(self._postfix(state, dt), refresh=False)

    def _postfix(self, state, dt):
        tok_s = (state.num_input_tokens_seen - self._tok0) / dt
        loss = next((h["loss"] for h in reversed(state.log_history) if "loss" in h), None)
        return (f"loss {loss:.3f} " if loss is not None else "") + f"{tok_s:.0f} tok/s"

    def on_train_end(self, args, state, control, **kw):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class MetricsCallback(TrainerCallback):
    """Appends every log (train loss, lr, eval loss, tokens seen) to metrics.jsonl with its step and time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._t0 = time.time()

    def on_log(self, args, state, control, logs=None, **kw):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": state.epoch, "time_s": round(time.time() - self._t0, 2)}
        row.update({k: v for k, v in logs.items() if isinstance(v, (int, float, str))})
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


class SkipLastEval(TrainerCallback):
    """No held-out loss at the last step: the report that follows measures it on every held-out example."""

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= state.max_steps:
            control.should_evaluate = False
        return control


class InterruptCallback(TrainerCallback):
    """First Ctrl-C: finish the current step, save a checkpoint, stop. A second Ctrl-C aborts at once.

    The handler only sets a flag: saving from inside a signal handler could write a torn
    checkpoint in the middle of an optimizer step.
    """

    def __init__(self):
        self.interrupted = False
        self._previous = None

    def install(self):
        self._previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._handle)
        return self

    def uninstall(self):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame):
        if self.interrupted:
            self.uninstall()
            raise KeyboardInterrupt
        self.interrupted = True
        say("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to abort)")

    def on_step_end(self, args, state, control, **kw):
        if self.interrupted:
            control.should_save = True
            control.should_training_stop = True
        return control
