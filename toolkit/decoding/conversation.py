"""Chat history -> prompt token ids, fitted into the context window.

The newest user message must fit together with room for the answer (`max_new_tokens`); when the
whole conversation does not, the oldest exchanges are dropped first (the system prompt stays),
and the caller is told how many so it can show a notice.
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
    template, dropping the oldest messages until prompt + max_new_tokens fits `backend.n_ctx`."""
    if not history or history[-1]["role"] != "user":
        raise UserError("the conversation must end with a user message")
    budget = backend.n_ctx - max_new_tokens
    if budget <= 0:
        raise UserError(f"max_new_tokens ({max_new_tokens}) leaves no room for the prompt "
                        f"in a {backend.n_ctx}-token context")
    head = [{"role": "system", "content": system}] if system and system.strip() else []
    start = 0
    while True:
        messages = head + history[start:]
        ids = backend.chat_ids(messages)
        if len(ids) <= budget:
            return Prompt(ids, messages, start)
        if start == len(history) - 1:
            raise UserError(f"the message is too long: {len(ids)} prompt tokens, but the context window "
                            f"({backend.n_ctx}) minus max_new_tokens ({max_new_tokens}) leaves {budget}")
        # Drop the oldest message, and any assistant reply that would then lead the history.
        start += 1
        while start < len(history) - 1 and history[start]["role"] != "user":
            start += 1
