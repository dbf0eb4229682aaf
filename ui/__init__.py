"""Web UI (Gradio 6). `ui.chat.build_app()` is the chat app behind `toolkit chat --ui`."""
