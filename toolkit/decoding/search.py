"""Search loops over a minimal backend, and streaming with stop strings.

A backend (`toolkit.decoding.backends.hf.HFBackend`, `toolkit.decoding.backends.llamacpp.LlamaCppBackend`) keeps a
KV cache of one or more rows (sequences) and offers:

    prefill(ids) -> logits [vocab]         one row: the prompt (past the prefix its KV holds), next-token logits
                                            (after a fork, the row sharing the longest prefix with ids is kept)
    step(tokens) -> logits [rows, vocab]   append tokens[i] to row i, next-token logits per row
    fork(n)                                 row 0 becomes n identical rows (beam search start)
    reorder(rows)                           new row i = old row rows[i] (beam search bookkeeping)
    decode(ids) -> str, eos_ids, n_ctx
    reserve(cells)                          optional: KV room for all rows together (llama.cpp's shared cache)

Everything else, the choice of token, lives here, so both backends decode identically.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch

from toolkit.decoding import transforms as T
from toolkit.decoding.config import DecodingConfig

NEG = -1.0e9  # "impossible" score; finite so arithmetic on it stays well defined


class Backend(Protocol):
    eos_ids: frozenset[int]
    n_ctx: int

    def prefill(self, ids: list[int]) -> torch.Tensor: ...
    def step(self, tokens: list[int]) -> torch.Tensor: ...
    def fork(self, n: int) -> None: ...
    def reorder(self, rows: list[int]) -> None: ...
    def decode(self, ids: list[int]) -> str: ...


def _budget(backend: Backend, prompt_ids: list[int], cfg: DecodingConfig) -> int:
    room = backend.n_ctx - len(prompt_ids)
    if room <= 0:
        from toolkit.core.errors import UserError

        raise UserError(f"the prompt has {len(prompt_ids)} tokens, the context window holds {backend.n_ctx}")
    return min(cfg.max_new_tokens, room)


def token_stream(backend: Backend, prompt_ids: list[int], cfg: DecodingConfig) -> Iterator[int]:
    """Greedy or sampled tokens, one at a time, ending after an EOS token (which is yielded) or
    when max_new_tokens / the context window is reached."""
    strategy = cfg.effective_strategy
    if strategy == "beam":
        raise ValueError("beam search is not incremental: use beam_search()")
    budget = _budget(backend, prompt_ids, cfg)
    seed = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(4), "little")
    gen = torch.Generator().manual_seed(seed)
    seen = list(prompt_ids)
    logits = backend.prefill(list(prompt_ids)).float()
    for i in range(budget):
        history = torch.tensor(seen) if cfg.repetition_penalty != 1.0 else torch.empty(0, dtype=torch.long)
        if strategy == "greedy":
            token = int(T.greedy(T.repetition_penalty(logits, history, cfg.repetition_penalty)))
        else:
            token = _sample_token(logits, history, cfg, gen)
        yield token
        if token in backend.eos_ids or i + 1 == budget:
            return
        seen.append(token)
        logits = backend.step([token])[0].float()


def _sample_token(logits: torch.Tensor, history: torch.Tensor, cfg: DecodingConfig, gen: torch.Generator) -> int:
    """One draw through the transform chain (T.prepare_logits' order). After top-k every other
    token is -inf, so top-p / min-p / softmax run on those k values only: the same distribution
    without sorting the whole vocabulary each step."""
    x = T.temperature(T.repetition_penalty(logits, history, cfg.repetition_penalty), cfg.temperature)
    idx = None
    if 0 < cfg.top_k < x.numel():
        top, idx = torch.topk(x, cfg.top_k)
        ties = int((x >= top[-1]).sum())
        # T.top_k keeps every token tied with the k-th: so must the shortcut, or a tied one is never drawn
        x, idx = (top, idx) if ties == cfg.top_k else torch.topk(x, ties)
    x = T.min_p(T.top_p(x, cfg.top_p), cfg.min_p)
    choice = int(T.sample(T.probs(x), gen))
    return int(idx[choice]) if idx is not None else choice


def beam_search(backend: Backend, prompt_ids: list[int], cfg: DecodingConfig) -> list[int]:
    """Beam search with length penalty and EOS handling; returns the best hypothesis' new tokens.

    Each step scores every (beam, token) pair by accumulated log-probability and keeps the
    best 2*num_beams candidates (so that num_beams survive even if some end). A candidate ending
    in EOS (or at the length limit) among the top num_beams becomes a finished hypothesis with
    score logprob / new_len**length_penalty; the best num_beams non-finished continue. Search
    stops when the best running beam can no longer beat the worst of num_beams finished ones.
    This is transformers' beam search (early_stopping=False), so it returns the same tokens.
    """
    n = cfg.num_beams
    budget = _budget(backend, prompt_ids, cfg)
    reserve = getattr(backend, "reserve", None)  # a KV cache shared by the rows (llama.cpp) grows n cells a step
    if reserve is not None:
        reserve(len(prompt_ids) + n * budget)
    keep = max(2, 1 + len(backend.eos_ids)) * n
    lp = cfg.length_penalty
    logits = backend.prefill(list(prompt_ids)).float().unsqueeze(0).expand(n, -1)
    backend.fork(n)
    vocab = logits.shape[-1]
    prompt = torch.tensor(prompt_ids, dtype=torch.long)
    running: list[list[int]] = [[] for _ in range(n)]
    scores = torch.full((n,), NEG)
    scores[0] = 0.0  # the rows are identical at first: only one may seed the candidates
    finished: list[tuple[float, list[int]]] = []
    for step in range(budget):
        logprobs = torch.log_softmax(logits, dim=-1)
        if cfg.repetition_penalty != 1.0:
            seen = torch.stack([torch.cat([prompt, torch.tensor(r, dtype=torch.long)]) for r in running])
            logprobs = T.repetition_penalty(logprobs, seen, cfg.repetition_penalty)
        top_scores, top_idx = torch.topk((logprobs + scores[:, None]).reshape(-1), keep)
        beam_of, token_of = (top_idx // vocab).tolist(), (top_idx % vocab).tolist()
        last = step + 1 == budget
        ends = [last or t in backend.eos_ids for t in token_of]
        for j in range(n):  # only the top num_beams candidates may finish
            if ends[j]:
                finished.append((top_scores[j].item() / (step + 1) ** lp, running[beam_of[j]] + [token_of[j]]))
        finished = sorted(finished, key=lambda f: -f[0])[:n]
        alive = top_scores + torch.tensor(ends, dtype=torch.float32) * NEG
        chosen = torch.topk(alive, n).indices.tolist()
        if all(ends):
            break
        running = [running[beam_of[c]] + [token_of[c]] for c in chosen]
        scores = alive[chosen]
        if len(finished) == n and scores[0].item() / (step + 1) ** lp <= finished[-1][0]:
            break  # no running beam can overtake the worst finished one
        backend.reorder([beam_of[c] for c in chosen])
        logits = backend.step([token_of[c] for c in chosen]).float()
    return finished[0][1]


@dataclass
class Generation:
    """One finished answer: the text (stop string cut), the new token ids, and timings."""

    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos" | "stop" | "length"
    seconds: float
    first_token_s: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


class Stream:
    """Iterate to get text pieces as they are decoded; afterwards `.result` is the Generation.

    Text is decoded from all new tokens each time (a token can be half a UTF-8 character, and
    tokenizers merge spaces), and a piece is released only when it cannot be the start of a stop
    string, so a stop string never flashes on screen before being cut."""

    def __init__(self, backend: Backend, prompt_ids: list[int], cfg: DecodingConfig):
        self.backend, self.prompt_ids, self.cfg = backend, list(prompt_ids), cfg
        self.result: Generation | None = None
        self._cancelled = False

    def cancel(self) -> None:
        """Stop after the current token (the UI's stop button)."""
        self._cancelled = True

    def __iter__(self) -> Iterator[str]:
        cfg, backend = self.cfg, self.backend
        t0 = time.perf_counter()
        first = None
        if cfg.effective_strategy == "beam":
            tokens_iter: Iterator[int] = iter(beam_search(backend, self.prompt_ids, cfg))
        else:
            tokens_iter = token_stream(backend, self.prompt_ids, cfg)
        tokens: list[int] = []
        emitted = 0
        text = ""
        reason = "length"
        for token in tokens_iter:
            if first is None:
                first = time.perf_counter() - t0
            tokens.append(token)
            if token in backend.eos_ids:
                reason = "eos"
                break
            text = backend.decode([t for t in tokens if t not in backend.eos_ids])
            cut = _find_stop(text, cfg.stop)
            if cut is not None:
                text, reason = text[:cut], "stop"
                break
            if text.endswith("\ufffd"):
                continue  # an incomplete UTF-8 character: wait for the next token
            safe = len(text) - _stop_prefix_len(text, cfg.stop)
            if safe > emitted:
                yield text[emitted:safe]
                emitted = safe
            if self._cancelled:
                reason = "cancelled"
                break
        if hasattr(tokens_iter, "close"):
            tokens_iter.close()
        text = text.rstrip("\ufffd") if reason != "stop" else text
        if len(text) > emitted:
            yield text[emitted:]
        self.result = Generation(text, tokens, len(self.prompt_ids), reason, time.perf_counter() - t0, first)


def _find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def stream(backend: Backend, prompt_ids: list[int], cfg: DecodingConfig) -> Stream:
    """A Stream over the answer to `prompt_ids`."""
    return Stream(backend, prompt_ids, cfg)


def generate(backend: Backend, prompt_ids: list[int], cfg: DecodingConfig) -> Generation:
    """Decode to the end and return the Generation."""
    s = Stream(backend, prompt_ids, cfg)
    for _ in s:
        pass
    assert s.result is not None
    return s.result
