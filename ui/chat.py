"""The Gradio 6 chat app behind `toolkit chat --ui` / `make chat`.

A ChatInterface (streaming, stop, retry = regenerate, undo) with every decoding control of
`DecodingConfig`, the presets, a system prompt and a model picker (embedded model, each run in
runs/, each exported GGUF). One model is loaded at a time and a lock serialises decoding on it;
the queue keeps concurrent requests waiting instead of failing. Each reply is followed by a small
stats line (tokens, tokens/s) kept out of the prompt of later turns.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from toolkit.decoding.config import PRESETS, DecodingConfig  # noqa: E402
from toolkit.errors import UserError  # noqa: E402

# Plain text: headless browsers without emoji fonts show emoji as boxes.
STATS_PREFIX = "stats: "
TRIM_PREFIX = "trimmed: "
DEFAULTS = DecodingConfig()


def list_models(root: str | Path = ".") -> list[tuple[str, str]]:
    """(label, spec) for the picker: the embedded model (transformers, and its GGUF through
    llama.cpp), every run folder in runs/, every GGUF under runs/*/gguf/ and exports/."""
    from toolkit.models import embedded_gguf_path

    root = Path(root)
    models = [("embedded (transformers)", "embedded")]
    try:
        models.append(("embedded Q4_1 GGUF (llama.cpp)", str(embedded_gguf_path())))
    except UserError:
        pass
    runs = root / "runs"
    if runs.is_dir():
        for run in sorted(p for p in runs.iterdir() if p.is_dir() and not p.is_symlink()):
            if (run / "adapter" / "adapter_config.json").is_file():
                models.append((f"run: {run.name}", str(run)))
    ggufs = sorted(runs.glob("*/gguf/*.gguf")) if runs.is_dir() else []
    ggufs += sorted((root / "exports").glob("**/*.gguf"))
    for g in ggufs:
        if not g.parent.parent.is_symlink():
            models.append((f"GGUF: {g.relative_to(root)}", str(g)))
    return models


class ModelSlot:
    """Keeps one backend loaded; switching models closes the previous one. The lock makes
    decoding on the shared KV cache one request at a time."""

    def __init__(self, n_ctx: int | None = None):
        self.n_ctx = n_ctx
        self.spec: str | None = None
        self.backend = None
        self.lock = threading.Lock()

    def get(self, spec: str):
        if spec != self.spec:
            from toolkit.backends import load

            if self.backend is not None:
                self.backend.close()
                self.backend, self.spec = None, None
            self.backend = load(spec, n_ctx=self.n_ctx)
            self.spec = spec
        return self.backend

    def close(self) -> None:
        with self.lock:
            if self.backend is not None:
                self.backend.close()
                self.backend, self.spec = None, None


def _text(content) -> str:
    """Gradio 6 message content is a string or a list of blocks ({"type": "text", ...})."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(_text(c) for c in content)
    return ""


def history_to_messages(history: list[dict]) -> list[dict]:
    """Chat history as role/content strings, without the stats / trim notes this UI adds."""
    out = []
    for msg in history:
        meta = msg.get("metadata") or {}
        if meta.get("title"):
            continue
        text = _text(msg.get("content"))
        if msg.get("role") in ("user", "assistant") and text:
            out.append({"role": msg["role"], "content": text})
    return out


def config_from_controls(strategy, temperature, top_k, top_p, min_p, repetition_penalty, num_beams,
                         max_new_tokens, seed, stop) -> DecodingConfig:
    """Build the config from UI values; UserError names the bad field."""
    def as_int(name, value):
        if value is None or float(value) != int(float(value)):
            raise UserError(f"{name} must be a whole number, got {value}")
        return int(float(value))

    seed_v = None if seed is None or int(seed) < 0 else as_int("seed", seed)
    stops = tuple(s for s in (stop or "").split("\n") if s)
    return DecodingConfig(
        strategy=strategy, temperature=float(temperature), top_k=as_int("top_k", top_k), top_p=float(top_p),
        min_p=float(min_p), repetition_penalty=float(repetition_penalty),
        num_beams=as_int("num_beams", num_beams), max_new_tokens=as_int("max_new_tokens", max_new_tokens),
        seed=seed_v, stop=stops,
    )


def build_app(model: str = "embedded", root: str | Path = ".", n_ctx: int | None = None,
              initial: DecodingConfig | None = None) -> gr.Blocks:
    """The chat app; `model` is preselected (added to the picker if it is not listed) and the
    controls start at `initial` (the CLI's decoding flags)."""
    init = initial or DEFAULTS
    from toolkit.decoding.conversation import build_prompt
    from toolkit.decoding.search import stream

    slot = ModelSlot(n_ctx)
    models = list_models(root)
    if model not in [spec for _, spec in models]:
        models.insert(0, (model, model))

    def respond(message, history, spec, system, preset, strategy, temperature, top_k, top_p, min_p,
                repetition_penalty, num_beams, max_new_tokens, seed, stop):
        try:
            cfg = config_from_controls(strategy, temperature, top_k, top_p, min_p, repetition_penalty,
                                       num_beams, max_new_tokens, seed, stop)
            if not (message or "").strip():
                raise UserError("the message is empty")
        except (UserError, ValueError, TypeError) as exc:
            raise gr.Error(f"Bad setting: {exc}", duration=10) from None
        turns = history_to_messages(history) + [{"role": "user", "content": message}]
        with slot.lock:
            try:
                backend = slot.get(spec)
                prompt = build_prompt(backend, turns, system, cfg.max_new_tokens)
            except UserError as exc:
                raise gr.Error(str(exc), duration=10) from None
            notes = []
            if prompt.dropped_turns:
                note = (f"{TRIM_PREFIX}{prompt.dropped_turns} earlier message(s) left out to fit the "
                        f"{backend.n_ctx}-token context window")
                gr.Warning(note)
                notes.append(gr.ChatMessage(content="", metadata={"title": note}))
            s = stream(backend, prompt.ids, cfg)
            text = ""
            for piece in s:
                text += piece
                yield notes + [gr.ChatMessage(content=text)]
            g = s.result
            stats = (f"{STATS_PREFIX}{g.new_tokens} tokens · {g.tokens_per_s:.1f} tok/s · {g.finish_reason} · "
                     f"{cfg.effective_strategy} · {backend.name}")
            yield notes + [gr.ChatMessage(content=g.text), gr.ChatMessage(content="", metadata={"title": stats})]

    def apply_preset(name):
        values = {**DEFAULTS.to_dict(), **PRESETS[name]}
        return [values[k] for k in ("strategy", "temperature", "top_k", "top_p", "min_p", "repetition_penalty")]

    with gr.Blocks(title="toolkit chat", fill_height=True) as app:
        with gr.Sidebar(open=True, width=340):
            gr.Markdown("### Model and decoding")
            picker = gr.Dropdown(models, value=model, label="Model", allow_custom_value=True)
            system = gr.Textbox(label="System prompt", lines=2, placeholder="(the model's default)")
            preset = gr.Dropdown(list(PRESETS), value=None, label="Preset (fills the controls)")
            strategy = gr.Radio(["greedy", "sample", "beam"], value=init.strategy, label="Strategy")
            temperature = gr.Slider(0, 2, value=init.temperature, step=0.05, label="Temperature (0 = greedy)")
            top_k = gr.Slider(0, 200, value=init.top_k, step=1, label="Top-k (0 = off)")
            top_p = gr.Slider(0.01, 1, value=init.top_p, step=0.01, label="Top-p (1 = off)")
            min_p = gr.Slider(0, 1, value=init.min_p, step=0.01, label="Min-p (0 = off)")
            rep = gr.Slider(0.5, 2, value=init.repetition_penalty, step=0.05, label="Repetition penalty (1 = off)")
            beams = gr.Slider(1, 16, value=init.num_beams, step=1, label="Beams (strategy beam)")
            max_new = gr.Number(value=init.max_new_tokens, label="Max new tokens", precision=0)
            seed = gr.Number(value=-1 if init.seed is None else init.seed, label="Seed (-1 = random)", precision=0)
            stop = gr.Textbox("\n".join(init.stop), label="Stop strings (one per line)", lines=2)
        preset.change(apply_preset, preset, [strategy, temperature, top_k, top_p, min_p, rep])
        gr.ChatInterface(
            respond,
            additional_inputs=[picker, system, preset, strategy, temperature, top_k, top_p, min_p, rep, beams,
                               max_new, seed, stop],
            chatbot=gr.Chatbot(label="chat", height="70vh"),
            textbox=gr.Textbox(placeholder="Type a message…", submit_btn=True, stop_btn=True),
            title="toolkit chat",
            fill_height=True,
            api_name="chat",
        )
    app._toolkit_slot = slot  # tests and launch() close it
    return app


def launch(model: str = "embedded", host: str = "127.0.0.1", port: int = 7860, n_ctx: int | None = None,
           block: bool = True, root: str | Path = ".", initial: DecodingConfig | None = None):
    """Build and serve the app. The queue answers concurrent requests in turn (up to 64 waiting)."""
    app = build_app(model, root=root, n_ctx=n_ctx, initial=initial)
    app.queue(default_concurrency_limit=1, max_size=64)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True, quiet=not block)
    return app
