"""Prefix (KV) reuse across calls on both backends: a next turn, a beam search, a stop midway."""

from __future__ import annotations

import pytest
import torch

from tests.decoding.test_backends import MESSAGES
from toolkit.decoding import DecodingConfig, generate


@pytest.mark.slow
@pytest.mark.parametrize("which", ["hf", "gguf"])
def test_next_turn_runs_only_past_the_prefix_it_kept(which, request):
    """A chat's next turn repeats the conversation so far: the backend keeps the KV of the prefix its
    last call left and runs only the rest. The logits and greedy answer equal a prefill from scratch."""
    backend = request.getfixturevalue(which)
    cfg = DecodingConfig(max_new_tokens=12)
    turn1 = backend.chat_ids(MESSAGES)
    first = generate(backend, turn1, cfg)
    reply = backend.decode(first.tokens)
    turn2 = backend.chat_ids(MESSAGES + [{"role": "assistant", "content": reply},
                                         {"role": "user", "content": "Which is sweetest?"}])
    run = []
    forward = backend._forward if which == "hf" else backend._decode
    spy = (lambda ids: run.append(ids.shape[1]) or forward(ids)) if which == "hf" else \
        (lambda tokens, *a: run.append(len(tokens)) or forward(tokens, *a))
    setattr(backend, "_forward" if which == "hf" else "_decode", spy)
    try:
        kept = backend.prefill(turn2)
        assert sum(run) < len(turn2) - len(turn1)  # the first turn and most of the reply were kept
        answer = generate(backend, turn2, cfg).tokens  # the same prompt again: all but its last token kept
        backend.reset()
        run.clear()
        whole = backend.prefill(turn2)
        assert sum(run) == len(turn2)
        backend.reset()
        fresh = generate(backend, turn2, cfg).tokens
    finally:
        delattr(backend, "_forward" if which == "hf" else "_decode")
    assert torch.allclose(kept, whole, atol=2e-3 if which == "hf" else 5e-2)
    assert answer == fresh


@pytest.mark.slow
def test_a_forward_stopped_midway_keeps_nothing(hf, monkeypatch):
    """Ctrl-C (or the UI's stop) inside a forward leaves some layers a token longer than others: the
    next prefill must not keep any of that cache."""
    ids = hf.chat_ids(MESSAGES)
    hf.prefill(ids)
    layers = hf.model.model.layers
    real = layers[1].forward

    def stop(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(layers[1], "forward", stop)
    with pytest.raises(KeyboardInterrupt):
        hf.step([ids[-1]])
    monkeypatch.setattr(layers[1], "forward", real)
    assert hf.held.cached == [] and hf.cache is None
    again = hf.prefill(ids)
    hf.reset()
    assert torch.allclose(again, hf.prefill(ids), atol=1e-4)


class _Spy:
    """Counts the tokens each prefill runs through the model, and (the test's own oracle) tracks the
    tokens every row of the cache holds through the backend's public calls: the longest prefix a
    row shares with the next prompt is what that prefill may keep."""

    def __init__(self, backend, which: str):
        self.backend, self.inner = backend, "_forward" if which == "hf" else "_decode"
        self.rows: list[list[int]] = []
        self.prefills: list[tuple[int, int, torch.Tensor]] = []  # (tokens run, tokens it may keep, logits)
        self._run: list[int] = []

    def __enter__(self):
        from toolkit.decoding.backends import reusable_prefix

        b, run = self.backend, self._run
        forward, prefill, fork, reorder, step, reset = b._forward if self.inner == "_forward" else b._decode, \
            b.prefill, b.fork, b.reorder, b.step, b.reset
        if self.inner == "_forward":
            b._forward = lambda ids: run.append(ids.shape[1]) or forward(ids)
        else:
            b._decode = lambda tokens, *a: run.append(len(tokens)) or forward(tokens, *a)

        def spy_prefill(ids):
            may_keep = max((reusable_prefix(r, ids) for r in self.rows), default=0)
            start = len(run)
            logits = prefill(ids)
            self.prefills.append((sum(run[start:]), may_keep, logits))
            self.rows = [list(ids)]
            return logits

        def spy_fork(n):
            fork(n)
            self.rows = [list(self.rows[0]) for _ in range(n)]

        def spy_reorder(rows):
            reorder(rows)
            self.rows = [list(self.rows[r]) for r in rows]

        def spy_step(tokens):
            logits = step(tokens)
            self.rows = [r + [t] for r, t in zip(self.rows, tokens)]
            return logits

        def spy_reset():
            reset()
            self.rows = []

        b.prefill, b.fork, b.reorder, b.step, b.reset = spy_prefill, spy_fork, spy_reorder, spy_step, spy_reset
        return self

    def __exit__(self, *exc):
        for name in (self.inner, "prefill", "fork", "reorder", "step", "reset"):
            delattr(self.backend, name)


MOON = [{"role": "user", "content": "Write one sentence about the moon."}]
BEAMS = DecodingConfig(strategy="beam", num_beams=4, max_new_tokens=12)


def _after_the_beams(backend):
    """Beam search on MOON, then the next turn's prompt (the best answer, a new question) and what a
    prefill of it may keep: at least the beam search's prompt, which every row holds."""
    backend.reset()
    turn1 = backend.chat_ids(MOON)
    reply = backend.decode(generate(backend, turn1, BEAMS).tokens)
    turn2 = backend.chat_ids(MOON + [{"role": "assistant", "content": reply},
                                     {"role": "user", "content": "And one about the sun?"}])
    return turn1, turn2


@pytest.mark.slow
@pytest.mark.parametrize("which", ["hf", "gguf"])
def test_next_turn_after_a_beam_search_keeps_the_prompt(which, request):
    """`--num-beams` in a chat: the turn after a beam search keeps the KV of the longest prefix a beam
    row still holds (the conversation so far, at least) and runs only the rest; the logits and the
    greedy answer equal a prefill from scratch."""
    backend = request.getfixturevalue(which)
    cfg = DecodingConfig(max_new_tokens=12)
    with _Spy(backend, which) as spy:
        turn1, turn2 = _after_the_beams(backend)
        spy.prefills.clear()
        backend.prefill(turn2)
        answer = generate(backend, turn2, cfg).tokens
        backend.reset()
        whole = backend.prefill(turn2)
        backend.reset()
        fresh = generate(backend, turn2, cfg).tokens
    (ran, may_keep, kept), _again, (ran_whole, _, _), _fresh = spy.prefills
    assert may_keep >= len(turn1) and ran_whole == len(turn2)
    assert ran == len(turn2) - may_keep  # the old code ran the whole conversation after a beam search
    assert may_keep > len(turn1) + 5  # here a row also still holds most of the answer: kept as well
    assert torch.allclose(kept, whole, atol=2e-3 if which == "hf" else 5e-2)
    assert answer == fresh


@pytest.mark.slow
@pytest.mark.parametrize("which", ["hf", "gguf"])
def test_beam_search_after_a_beam_search_keeps_the_prompt(which, request):
    """A second beam search on the extended conversation keeps the first one's prompt too, and
    returns what a beam search from scratch returns, token for token."""
    backend = request.getfixturevalue(which)
    cfg = BEAMS.replace(num_beams=3)
    with _Spy(backend, which) as spy:
        turn1, turn2 = _after_the_beams(backend)
        spy.prefills.clear()
        beams = generate(backend, turn2, cfg).tokens
        backend.reset()
        fresh = generate(backend, turn2, cfg).tokens
    (ran, may_keep, kept), (ran_whole, _, whole) = spy.prefills
    assert may_keep >= len(turn1) and ran_whole == len(turn2)
    assert ran == len(turn2) - may_keep  # the old code ran the whole conversation after a beam search
    assert torch.allclose(kept, whole, atol=2e-3 if which == "hf" else 5e-2)
    assert beams == fresh


@pytest.mark.slow
@pytest.mark.parametrize("which", ["hf", "gguf"])
def test_a_beam_step_stopped_midway_keeps_nothing(which, request, monkeypatch):
    """Stopped inside a beam search's step (Ctrl-C, the UI's stop), the rows' KV is not known: the
    next prefill keeps none of it, not even the prompt every row held."""
    backend = request.getfixturevalue(which)
    backend.reset()
    ids = backend.chat_ids(MOON)
    with _Spy(backend, which) as spy:
        backend.prefill(ids)
        backend.fork(3)
        backend.step([ids[-1]] * 3)
        real = backend.model.model.layers[1].forward if which == "hf" else backend._lib.llama_decode

        def stop(*a, **kw):
            if which == "gguf":
                real(*a)  # the decode done, its tokens in the cache, then stopped
            raise KeyboardInterrupt

        if which == "hf":
            monkeypatch.setattr(backend.model.model.layers[1], "forward", stop)  # layer 0 holds a token more
        else:
            monkeypatch.setattr(backend._lib, "llama_decode", stop)
        with pytest.raises(KeyboardInterrupt):
            backend.step([ids[-2]] * 3)
        monkeypatch.undo()
        again = backend.prefill(ids)
        backend.reset()
        whole = backend.prefill(ids)
    (_, _, _), (ran, _, _), (ran_whole, _, _) = spy.prefills
    assert ran == ran_whole == len(ids)
    assert torch.allclose(again, whole, atol=1e-4 if which == "hf" else 5e-2)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["hf", "gguf"])
@pytest.mark.parametrize("where", ["fork", "reorder"])
def test_a_beam_search_stopped_while_its_rows_are_rearranged_keeps_nothing(which, where, request, monkeypatch):
    """Stopped between two layers of a fork or a reorder (HF repeats and reorders the cache layer by
    layer; llama.cpp copies and removes one sequence at a time), the rows no longer hold what the
    bookkeeping says: the next prefill runs the whole prompt and its logits equal a fresh one's."""
    backend = request.getfixturevalue(which)
    backend.reset()
    ids = backend.chat_ids(MOON)
    backend.prefill(ids)
    if where == "reorder":
        backend.fork(3)
        backend.step([ids[-1], ids[-2], ids[-3]])
    calls = {"n": 0}
    if which == "hf":
        layer = type(backend.cache.layers[0])
        real = getattr(layer, "batch_repeat_interleave" if where == "fork" else "reorder_cache")
        name = real.__name__
    else:
        name = "llama_memory_seq_cp" if where == "fork" else "llama_memory_seq_rm"
        real = getattr(backend._lib, name)

    def second_call_stops(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:  # the first layer / sequence done, the rest not
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(layer if which == "hf" else backend._lib, name, second_call_stops)
    with pytest.raises(KeyboardInterrupt):
        backend.fork(3) if where == "fork" else backend.reorder([2, 2, 1])
    monkeypatch.undo()
    with _Spy(backend, which) as spy:
        again = backend.prefill(ids)
    assert spy.prefills[0][0] == len(ids)
    backend.reset()
    assert torch.allclose(again, backend.prefill(ids), atol=1e-4 if which == "hf" else 5e-2)
