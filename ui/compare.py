"""Compare mode of the chat app: one prompt, the sidebar's decoding settings, two models
answering side by side, both streaming (base vs fine-tuned by default when a run exists).

Also `display_name`, the names a person reads in the model pickers ("embedded
(SmolLM2-135M-Instruct)", "finance-20261122-031438 (run, LoRA on embedded)", "...-q8_0.gguf"),
derived from `toolkit.core.models.resolve` / `run_info` rather than from cache paths.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from pathlib import Path

import gradio as gr

from toolkit.core.errors import UserError

STATS_PREFIX = "stats: "


def _base_label(base: str | None) -> str:
    if not base:
        return "unknown base"
    if base == "embedded" or base.count("/") == 1 and not Path(base).exists():
        return base  # `embedded` or a hub id reads as it is
    return Path(base).name


def display_name(spec: str | Path) -> str:
    """The picker label for a model spec: what it is, never where a cache put it."""
    from toolkit.core.models import EMBEDDED_HF_ID, embedded_gguf_path, resolve, run_info

    short = EMBEDDED_HF_ID.split("/")[-1]
    try:
        ref = resolve(str(spec))
    except UserError:
        return str(spec)
    if ref.kind == "embedded":
        return f"embedded ({short})"
    if ref.kind == "run":
        try:
            base = run_info(ref.path).get("base_model") or ref.base
        except UserError:  # an adapter folder without run.json: the adapter config names the base
            base = ref.base
        # The adapter is served on the unquantized base, QLoRA-trained or not: it is a LoRA here.
        return f"{ref.path.name} (run, LoRA on {_base_label(base)})"
    if ref.kind == "gguf":
        try:
            if ref.path.resolve() == embedded_gguf_path().resolve():
                return f"embedded ({short}, Q4_1 GGUF)"
        except UserError:
            pass
        return ref.path.name
    if ref.kind == "hf_dir":
        return f"{ref.path.name} (HF folder)"
    return ref.spec  # a hub id


def default_pair(specs: list[str], chosen: str) -> tuple[str, str]:
    """(left, right) to preselect: the newest run and the base it was trained on when the picker
    has a run, else the chosen model and the next one listed."""
    from toolkit.core.models import resolve

    runs = []
    for s in specs:
        try:
            ref = resolve(s)
        except UserError:
            continue
        if ref.kind == "run":
            runs.append(ref)
    if runs:
        run = max(runs, key=lambda r: r.path.name)  # run folders are named <recipe>-<timestamp>
        base = run.base if run.base in specs else "embedded"
        return base, run.spec
    others = [s for s in specs if s != chosen]
    return chosen, (others[0] if others else chosen)


def interleave(iterables):
    """(index, item) from several iterators in turn, each until it is exhausted, so two streams
    advance together in one thread (the CPU has two cores; two decoders at once would only
    share them)."""
    its = [iter(x) for x in iterables]
    live = list(range(len(its)))
    while live:
        for i in list(live):
            try:
                yield i, next(its[i])
            except StopIteration:
                live.remove(i)


def build_tab(models: list[tuple[str, str]], chosen: str, system, controls: list, request_config,
              n_ctx: int | None):
    """The Compare tab (call inside a gr.Blocks): two pickers, one prompt, two streaming replies.
    `system` (the sidebar's system box and the trained prompt it last showed) and `controls` are
    shared with the chat tab: a prompt the user wrote goes to both models, else each runs with the
    one it was trained with (`ui.chat.system_for`). Returns the two model slots (closed by the app's owner)."""
    from ui.chat import ModelSlot, system_for

    slots = (ModelSlot(n_ctx), ModelSlot(n_ctx))
    lock = threading.Lock()  # one comparison at a time: both slots are in use during one
    left, right = default_pair([s for _, s in models], chosen)

    def compare(message, spec_a, spec_b, system_prompt, shown, *values):
        from toolkit.decoding.conversation import build_prompt
        from toolkit.decoding.search import stream

        cfg = request_config(message, *values)  # ui.chat.request_config: gr.Error on a bad setting
        if cfg.seed is None:  # "random" still means the same random seed on both sides
            cfg = dataclasses.replace(cfg, seed=random.randrange(2**31))
        turns = [{"role": "user", "content": message}]
        with lock:
            try:
                backends = [slot.get(spec) for slot, spec in zip(slots, (spec_a, spec_b))]
                prompts = [build_prompt(b, turns, system_for(spec, system_prompt, shown), cfg.max_new_tokens)
                           for b, spec in zip(backends, (spec_a, spec_b))]
            except UserError as exc:
                raise gr.Error(str(exc), duration=10) from None
            streams = [stream(b, p.ids, cfg) for b, p in zip(backends, prompts)]
            texts = ["", ""]
            for i, piece in interleave(streams):
                texts[i] += piece
                yield texts[0], texts[1], "", ""
            stats = [f"{STATS_PREFIX}{s.result.new_tokens} tokens · {s.result.tokens_per_s:.1f} tok/s · "
                     f"{s.result.finish_reason} · {cfg.effective_strategy} · seed {cfg.seed} · {b.name}"
                     for s, b in zip(streams, backends)]
            yield streams[0].result.text, streams[1].result.text, stats[0], stats[1]

    gr.Markdown("Same prompt, same decoding settings (the sidebar), two models side by side. They take "
                "turns token by token, so each side's tok/s is about half what it gets alone.")
    with gr.Row():
        pick_a = gr.Dropdown(models, value=left, label="Left model", allow_custom_value=True)
        pick_b = gr.Dropdown(models, value=right, label="Right model", allow_custom_value=True)
    prompt = gr.Textbox(placeholder="Ask both models…", label="Prompt", lines=2)
    go = gr.Button("Compare", variant="primary")
    with gr.Row(equal_height=True):
        with gr.Column():
            out_a = gr.Textbox(label="Left reply", lines=14, max_lines=30, interactive=False)
            stats_a = gr.Markdown()
        with gr.Column():
            out_b = gr.Textbox(label="Right reply", lines=14, max_lines=30, interactive=False)
            stats_b = gr.Markdown()
    inputs = [prompt, pick_a, pick_b, *system, *controls]
    outputs = [out_a, out_b, stats_a, stats_b]
    go.click(compare, inputs, outputs, api_name="compare")
    prompt.submit(compare, inputs, outputs, api_visibility="private")
    return slots
