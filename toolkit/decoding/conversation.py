"""Chat history -> prompt token ids, fitted into the context window.

The newest user message must fit together with room for the answer: `max_new_tokens`, but at most
half the window, so `--n-ctx 256` with the default 256 new tokens still chats (the answer is then
cut at the window, finish reason "length") instead of refusing every message. When the whole
conversation does not fit, the oldest exchanges are dropped first (the system prompt stays), and
the caller is told how many so it can show a notice.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.core.errors import UserError


@dataclass
class Prompt:
    ids: list[int]
    messages: list[dict]  # what was actually sent
    dropped_turns: int  # how many earlier messages were left out to fit the window


def build_prompt(backend, history: list[dict], system: str | None, max_new_tokens: int) -> Prompt:
    """Render `history` (role/content dicts, ending with the user's message) with the model's chat
    template, dropping the oldest messages until prompt + the answer's room fits `backend.n_ctx`."""
    if not history or history[-1]["role"] != "user":
        raise UserError("the conversation must end with a user message")
    room = min(max_new_tokens, backend.n_ctx // 2)
    budget = backend.n_ctx - room
    head = [{"role": "system", "content": system}] if system and system.strip() else []
    start = 0
    while True:
        messages = head + history[start:]
        ids = backend.chat_ids(messages)
        if len(ids) <= budget:
            return Prompt(ids, messages, start)
        if start == len(history) - 1:
            raise UserError(f"the message is too long: {len(ids)} prompt tokens, but the context window "
                            f"({backend.n_ctx}) minus {room} for the answer (max_new_tokens) leaves {budget}")
        # Drop the oldest message, and any assistant reply that would then lead the history.
        start += 1
        while start < len(history) - 1 and history[start]["role"] != "user":
            start += 1
