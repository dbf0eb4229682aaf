"""The Gradio 6 chat app behind `toolkit chat --ui` / `make chat`: a Chat tab and a Compare tab
(two models side by side on one prompt, `ui.compare`), sharing the sidebar's settings.

A ChatInterface (streaming, stop, retry = regenerate, undo) with one control per decoding field
(generated from `toolkit.decoding.fields.FIELDS`, in its order, which is also the order of the
/chat API's inputs after message, model, system prompt and preset), the presets, a system
prompt (filled with the one a fine-tuned model was trained with, and following the picker until
the user writes their own) and a model picker (embedded model, each run in runs/, each exported GGUF). One model is
loaded at a time and a lock serialises decoding on it; the queue keeps concurrent requests
waiting instead of failing. Each reply is followed by a small stats line (tokens, tokens/s)
kept out of the prompt of later turns; an error (a bad setting, a message too long for the context
window) is such a note too, in place of the reply, and the failed message is not sent again.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from toolkit.core.errors import UserError  # noqa: E402
from toolkit.decoding.config import PRESET_FIELDS, PRESETS, DecodingConfig, with_preset  # noqa: E402
from toolkit.decoding.fields import FIELDS  # noqa: E402

# Plain text: headless browsers without emoji fonts show emoji as boxes.
STATS_PREFIX = "stats: "
TRIM_PREFIX = "trimmed: "
ERROR_PREFIX = "error: "
DEFAULTS = DecodingConfig()


def list_models(root: str | Path = ".") -> list[tuple[str, str]]:
    """(label, spec) for the pickers: the embedded model (transformers, and its GGUF through
    llama.cpp), every run folder in runs/, every GGUF under runs/*/gguf/ and exports/; labels
    from `ui.compare.display_name`."""
    from toolkit.core.models import embedded_gguf_path
    from ui.compare import display_name

    root = Path(root)
    specs = ["embedded"]
    try:
        specs.append(str(embedded_gguf_path()))
    except UserError:
        pass
    runs = root / "runs"
    if runs.is_dir():
        for run in sorted(p for p in runs.iterdir() if p.is_dir() and not p.is_symlink()):
            if (run / "adapter" / "adapter_config.json").is_file():
                specs.append(str(run))
    ggufs = sorted(runs.glob("*/gguf/*.gguf")) if runs.is_dir() else []
    ggufs += sorted((root / "exports").glob("**/*.gguf"))
    specs += [str(g) for g in ggufs if not g.parent.parent.is_symlink()]
    return [(display_name(s), s) for s in specs]


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
            from toolkit.decoding.backends import load

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
    """Chat history (ending with the new message) as role/content strings, without the stats /
    trim / error notes this UI adds, and without earlier user messages that got no answer (an error,
    or stopped before a word): as in the terminal chat, a failed turn is not sent again."""
    out = []
    for msg in history:
        meta = msg.get("metadata") or {}
        if meta.get("title"):
            continue
        text = _text(msg.get("content"))
        if msg.get("role") in ("user", "assistant") and text:
            if msg["role"] == "user" and out and out[-1]["role"] == "user":
                out.pop()
            out.append({"role": msg["role"], "content": text})
    return out


def trained_system(spec: str) -> str:
    """The system prompt `spec` was fine-tuned with ("" for none, or a typed-in spec that is no
    model: loading it says why)."""
    from toolkit.core.models import default_system_prompt

    try:
        return default_system_prompt(spec)
    except UserError:
        return ""


def system_for(spec: str, box: str, shown: str) -> str:
    """The system prompt `spec` runs with: the box's text where the user wrote one (neither empty
    nor the trained prompt last shown there), else `spec`'s own trained prompt."""
    return trained_system(spec) if box in ("", shown) else box


def follow_model(spec: str, current: str, shown: str) -> tuple[str, str]:
    """(system box, `shown`) after the picker changes to `spec`: the box shows the new model's
    trained prompt unless it holds one the user wrote."""
    return system_for(spec, current, shown), trained_system(spec)


def config_from_controls(*values) -> DecodingConfig:
    """The config from the decoding controls' values, in `FIELDS` order (seed -1 = random, stop
    one string per line); UserError names the bad field."""
    if len(values) != len(FIELDS):
        raise TypeError(f"expected {len(FIELDS)} control values ({', '.join(f.name for f in FIELDS)}), "
                        f"got {len(values)}")
    return DecodingConfig(**{f.name: f.from_ui(v) for f, v in zip(FIELDS, values)})


def request_config(message: str, *values) -> DecodingConfig:
    """`config_from_controls` for one request, with an empty message refused too; anything wrong is a
    gr.Error naming it (shown in the UI, nothing generated)."""
    try:
        cfg = config_from_controls(*values)
        if not (message or "").strip():
            raise UserError("the message is empty")
    except (UserError, ValueError, TypeError) as exc:
        raise gr.Error(f"Bad setting: {exc}", duration=10) from None
    return cfg


def controls_from_config(cfg: DecodingConfig) -> list:
    """The controls' values (in `FIELDS` order) that show `cfg`: config_from_controls' inverse."""
    return [f.to_ui(getattr(cfg, f.name)) for f in FIELDS]


def _control(f, value) -> gr.components.Component:
    c = f.control
    if c.kind == "radio":
        return gr.Radio(list(f.choices), value=value, label=c.label)
    if c.kind == "slider":
        # The slider spans the useful range, the config allows more (--temperature 2.5, --top-k 500):
        # a CLI value outside it widens it, else Gradio would refuse the control's own value.
        lo, hi = c.minimum, c.maximum
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            lo, hi = min(lo, value), max(hi, value)
        return gr.Slider(lo, hi, value=value, step=c.step, label=c.label)
    if c.kind == "number":
        return gr.Number(value=value, label=c.label, precision=0 if f.type is int else None)
    if c.kind == "textbox":
        return gr.Textbox(value, label=c.label, lines=2)
    raise ValueError(f"{f.name}: unknown control kind {c.kind!r}")


def build_app(model: str = "embedded", root: str | Path = ".", n_ctx: int | None = None,
              initial: DecodingConfig | None = None, system: str | None = None) -> gr.Blocks:
    """The chat app; `model` is preselected (added to the picker if it is not listed), the
    controls start at `initial` (the CLI's decoding flags) and the system prompt at `system`
    (None: the one `model` was trained with)."""
    init = initial or DEFAULTS
    from toolkit.decoding.conversation import build_prompt
    from toolkit.decoding.search import stream

    from ui.compare import build_tab, display_name

    slot = ModelSlot(n_ctx)
    models = list_models(root)
    if model not in [spec for _, spec in models]:
        models.insert(0, (display_name(model), model))

    def respond(message, history, spec, system, preset, *controls):
        turns = history_to_messages([*history, {"role": "user", "content": message}])
        with slot.lock:
            try:
                cfg = request_config(message, *controls)
                backend = slot.get(spec)
                prompt = build_prompt(backend, turns, system, cfg.max_new_tokens)
            except (UserError, gr.Error) as exc:
                # Raised, gr.Error leaves Gradio 6's chat textbox disabled until the page is reloaded:
                # the error becomes a note in the chat (and a toast) instead.
                text = exc.message if isinstance(exc, gr.Error) else str(exc)
                gr.Warning(text)
                yield [gr.ChatMessage(content="", metadata={"title": f"{ERROR_PREFIX}{text}"})]
                return
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

    # A preset fills only the fields presets set; the others stay as the user set them.
    filled = [f for f in FIELDS if f.name in PRESET_FIELDS]

    def apply_preset(name):
        cfg = with_preset(DEFAULTS, name)
        return [f.to_ui(getattr(cfg, f.name)) for f in filled]

    with gr.Blocks(title="toolkit chat", fill_height=True) as app:
        with gr.Sidebar(open=True, width=340):
            gr.Markdown("### Model and decoding")
            picker = gr.Dropdown(models, value=model, label="Model", allow_custom_value=True)
            shown = gr.State(trained_system(model))
            system = gr.Textbox(shown.value if system is None else system, label="System prompt", lines=2,
                                placeholder="(the model's default)")
            preset = gr.Dropdown(list(PRESETS), value=None, label="Preset (fills the controls)")
            controls = {f.name: _control(f, v) for f, v in zip(FIELDS, controls_from_config(init))}
        preset.change(apply_preset, preset, [controls[f.name] for f in filled])
        picker.change(follow_model, [picker, system, shown], [system, shown])
        with gr.Tab("Chat"):
            gr.ChatInterface(
                respond,
                additional_inputs=[picker, system, preset, *controls.values()],
                chatbot=gr.Chatbot(label="chat", height="70vh"),
                # elem_id: the placeholder, which tests could find it by, is gone after the first turn
                textbox=gr.Textbox(placeholder="Type a message…", submit_btn=True, stop_btn=True,
                                   elem_id="chat-input"),
                title="toolkit chat",
                fill_height=True,
                api_name="chat",
            )
        with gr.Tab("Compare"):
            compare_slots = build_tab(models, model, (system, shown), list(controls.values()), request_config,
                                      n_ctx)
    app._toolkit_slot = slot  # tests and launch() close it
    app._toolkit_compare_slots = compare_slots
    return app


def close_models(app) -> None:
    """Free every model the app loaded (chat and compare)."""
    for s in (app._toolkit_slot, *app._toolkit_compare_slots):
        s.close()


def launch(model: str = "embedded", host: str = "127.0.0.1", port: int = 7860, n_ctx: int | None = None,
           block: bool = True, root: str | Path = ".", initial: DecodingConfig | None = None,
           system: str | None = None):
    """Build and serve the app. The queue answers concurrent requests in turn (up to 64 waiting)."""
    app = build_app(model, root=root, n_ctx=n_ctx, initial=initial, system=system)
    app.queue(default_concurrency_limit=1, max_size=64)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=True, quiet=not block)
    return app
