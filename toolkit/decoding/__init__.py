"""Decoding: how a next-token distribution becomes text, the same way on every backend.
`config` (DecodingConfig, presets), `fields` + `flags` (the one table: CLI flags, UI controls),
`transforms` (pure), `search` (greedy/sample/beam, streaming), `conversation`, `backends/` (hf, llama.cpp).

A language model gives, at every step, a score (logit) for each of its ~50k tokens. Turning
those scores into one token is a choice, and this package makes the choice explicit:

- `config`: `DecodingConfig`, the one set of knobs (strategy, temperature, top-k, top-p, min-p,
  repetition penalty, beams, length penalty, max tokens, stop strings, seed) shared by the
  CLI, the chat UI and both backends, plus the named presets.
- `fields`: `FIELDS`, one entry per config field (type, flag help, UI control, conversions);
  `flags` builds the CLI's decoding flags from it and `ui/chat.py` the web controls.
- `transforms`: small pure functions that reshape a logit vector (temperature, top-k, top-p,
  min-p, repetition penalty) and draw from it with an explicit random generator.
- `search`: the loops (greedy, sampling, beam search) over a tiny backend interface, "give me
  next-token logits, keep your cache", and the streaming iterator that cuts stop strings.
- `conversation`: chat history -> prompt ids, trimmed to the context window from the oldest turn.

Greedy (always the argmax) is reproducible and fine for short factual answers but tends to loop;
sampling trades some likelihood for variety; beam search keeps several hypotheses and returns
the one with the best length-normalised log-probability.

Only `config` and `fields` are imported eagerly: the CLI builds its flags and reads presets
without importing torch.
"""

from toolkit.decoding.config import PRESETS, DecodingConfig, preset
from toolkit.decoding.fields import FIELDS

_SEARCH = ("Generation", "Stream", "beam_search", "generate", "stream", "token_stream")

__all__ = ["FIELDS", "PRESETS", "DecodingConfig", "preset", *_SEARCH]


def __getattr__(name):
    if name in _SEARCH:
        from toolkit.decoding import search

        return getattr(search, name)
    raise AttributeError(f"module 'toolkit.decoding' has no attribute {name!r}")
